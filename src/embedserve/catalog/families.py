"""Model-family presets: how the authors of bge-m3 and Qwen3-Embedding run their models (pooling,
padding side, limits, Matryoshka sizes, query instruction, EOS handling), chosen from the model's names
and its config.json architecture. Pure: no files are read here."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from embedserve.spec import FamilyName
from embedserve.types import PaddingSide, Pooling

# Qwen3-Embedding was trained with Matryoshka representation learning at these sizes; each model serves
# the ones up to its hidden size (0.6B: 64..1024, 4B: 64..2560, 8B: 64..4096).
QWEN3_MRL_SIZES = (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 4096)
QWEN3_DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True, slots=True)
class Family:
    """What a family fixes, whatever the folder's own sentence-transformers files say."""

    name: FamilyName
    model_types: tuple[str, ...]  # config.json `model_type` values of the architecture
    pooling: Pooling
    normalize: bool
    max_input_tokens: int
    padding_side: PaddingSide
    matryoshka_sizes: tuple[int, ...] = ()
    query_template: str | None = None  # with `{instruction}`; documents take no instruction
    default_instruction: str | None = None
    eos_token: str | None = None  # every sequence must end with it (last-token pooling reads it)
    hub_org: str = ""

    def matryoshka_dimensions(self, native: int) -> tuple[int, ...]:
        if not self.matryoshka_sizes:
            return ()
        sizes = {d for d in self.matryoshka_sizes if d <= native}
        return tuple(sorted(sizes | {native}))


FAMILIES: dict[FamilyName, Family] = {
    "bge-m3": Family(
        name="bge-m3",
        model_types=("xlm-roberta",),
        pooling="cls",
        normalize=True,
        max_input_tokens=8192,
        padding_side="right",
        hub_org="BAAI",
    ),
    "qwen3-embedding": Family(
        name="qwen3-embedding",
        model_types=("qwen3",),
        pooling="last_token",
        normalize=True,
        max_input_tokens=32768,
        padding_side="left",
        matryoshka_sizes=QWEN3_MRL_SIZES,
        query_template="Instruct: {instruction}\nQuery:",
        default_instruction=QWEN3_DEFAULT_TASK,
        eos_token="<|endoftext|>",
        hub_org="Qwen",
    ),
}

_NAME_PATTERNS: tuple[tuple[re.Pattern[str], FamilyName], ...] = (
    (re.compile(r"^bge-m3$", re.IGNORECASE), "bge-m3"),
    (re.compile(r"^qwen3-embedding-\d+(\.\d+)?b$", re.IGNORECASE), "qwen3-embedding"),
)


def family_by_name(names: Iterable[str]) -> FamilyName | None:
    """The family whose published name is the last path component of any of `names`."""
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        for pattern, family in _NAME_PATTERNS:
            if pattern.match(base):
                return family
    return None


def detect_family(
    names: Iterable[str], explicit: FamilyName | Literal["auto", "none"] = "auto"
) -> Family | None:
    """The preset for a model: `explicit` when given, else by name. The caller checks the architecture
    (`architecture_matches`): a folder called bge-m3 holding a BERT gets no preset."""
    if explicit == "none":
        return None
    chosen = family_by_name(names) if explicit == "auto" else explicit
    return FAMILIES[chosen] if chosen is not None else None


def architecture_matches(family: Family, config: Mapping[str, Any]) -> bool:
    return config.get("model_type") in family.model_types


def canonical_names(family: Family, names: Iterable[str]) -> tuple[str, ...]:
    """Both spellings of a published model's name: `Qwen3-Embedding-0.6B` and
    `Qwen/Qwen3-Embedding-0.6B`, from whichever of them (or a folder of that name) was given."""
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if family_by_name([base]) == family.name:
            return (base, f"{family.hub_org}/{base}")
    return ()


def query_instruction_of(template: str, prompt: str) -> str | None:
    """The task text inside a query prompt written with `template` (as config_sentence_transformers
    stores it), or None when the prompt does not follow the template."""
    head, sep, tail = template.partition("{instruction}")
    if not sep or not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) < len(head + tail):
        return None
    return prompt[len(head) : len(prompt) - len(tail)]
