"""embedserve.catalog.families (pure presets) and embedserve.prompts (pure prompt choice)."""

from __future__ import annotations

import pytest

from embedserve.catalog.families import (
    FAMILIES,
    QWEN3_DEFAULT_TASK,
    canonical_names,
    detect_family,
    family_by_name,
    query_instruction_of,
)
from embedserve.errors import InvalidInputType, InvalidInstruction
from embedserve.prompts import choose_prefix, input_types

QWEN = FAMILIES["qwen3-embedding"]
BGE = FAMILIES["bge-m3"]


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("BAAI/bge-m3", "bge-m3"),
        ("bge-m3", "bge-m3"),
        ("/models/BGE-M3/", "bge-m3"),
        ("Qwen/Qwen3-Embedding-0.6B", "qwen3-embedding"),
        ("Qwen3-Embedding-4B", "qwen3-embedding"),
        ("/srv/weights/qwen3-embedding-8b", "qwen3-embedding"),
        ("BAAI/bge-m3-unsupervised", None),
        ("BAAI/bge-large-en-v1.5", None),
        ("Qwen/Qwen3-0.6B", None),
        ("Qwen/Qwen3-Reranker-0.6B", None),
        ("all-MiniLM-L6-v2", None),
    ],
)
def test_family_is_recognised_by_its_published_name(name: str, family: str | None) -> None:
    assert family_by_name([name]) == family


@pytest.mark.parametrize(
    ("hidden", "expected"),
    [
        (1024, (64, 128, 256, 512, 768, 1024)),  # Qwen3-Embedding-0.6B
        (2560, (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560)),  # 4B
        (4096, (64, 128, 256, 512, 768, 1024, 1536, 2048, 2560, 4096)),  # 8B
        (100, (64, 100)),  # an unusual fine-tune: the trained sizes it has, and its own width
    ],
)
def test_qwen3_matryoshka_dimensions_are_the_trained_sizes_up_to_the_hidden_size(
    hidden: int, expected: tuple[int, ...]
) -> None:
    assert QWEN.matryoshka_dimensions(hidden) == expected


def test_bge_m3_is_not_matryoshka() -> None:
    assert BGE.matryoshka_dimensions(1024) == ()


def test_presets_are_the_authors_recipes() -> None:
    assert (BGE.pooling, BGE.normalize, BGE.max_input_tokens, BGE.padding_side) == (
        "cls",
        True,
        8192,
        "right",
    )
    assert (QWEN.pooling, QWEN.normalize, QWEN.max_input_tokens, QWEN.padding_side) == (
        "last_token",
        True,
        32768,
        "left",
    )
    assert QWEN.eos_token == "<|endoftext|>" and BGE.eos_token is None


def test_explicit_family_wins_over_the_name_and_none_switches_it_off() -> None:
    assert detect_family(["my-finetune"], "qwen3-embedding") is QWEN
    assert detect_family(["BAAI/bge-m3"], "none") is None
    assert detect_family(["BAAI/bge-m3"]) is BGE


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["BAAI/bge-m3"], ("bge-m3", "BAAI/bge-m3")),
        (["/models/bge-m3"], ("bge-m3", "BAAI/bge-m3")),
        (["Qwen3-Embedding-0.6B"], ("Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-0.6B")),
    ],
)
def test_canonical_names_are_both_spellings(names: list[str], expected: tuple[str, str]) -> None:
    family = BGE if "bge" in names[0] else QWEN
    assert canonical_names(family, names) == expected


def test_instruction_is_read_back_from_a_query_prompt_that_follows_the_template() -> None:
    template = "Instruct: {instruction}\nQuery:"
    assert query_instruction_of(template, f"Instruct: {QWEN3_DEFAULT_TASK}\nQuery:") == QWEN3_DEFAULT_TASK
    assert query_instruction_of(template, "query: ") is None
    assert query_instruction_of("no slot", "no slot") is None


# ---- prompts ------------------------------------------------------------------------------------

QWEN_TEMPLATE = "Instruct: {instruction}\nQuery:"


def qwen_prefix(input_type: str | None, instruction: str | None) -> str:
    return choose_prefix(
        model="q",
        prompts={"query": "ignored", "document": ""},
        default_prompt_name=None,
        query_template=QWEN_TEMPLATE,
        default_instruction="Default task",
        input_type=input_type,
        instruction=instruction,
    )


def st_prefix(
    input_type: str | None, *, default: str | None = None, prompts: dict[str, str] | None = None
) -> str:
    return choose_prefix(
        model="e5",
        prompts=prompts or {"query": "query: ", "passage": "passage: ", "clustering": "cluster: "},
        default_prompt_name=default,
        query_template=None,
        default_instruction=None,
        input_type=input_type,
        instruction=None,
    )


def test_qwen3_queries_take_the_instruction_and_documents_nothing() -> None:
    assert qwen_prefix("query", None) == "Instruct: Default task\nQuery:"
    assert qwen_prefix("query", "Find code") == "Instruct: Find code\nQuery:"
    assert qwen_prefix("document", None) == ""
    assert qwen_prefix(None, None) == ""


def test_instruction_braces_are_taken_literally() -> None:
    assert qwen_prefix("query", "Match {json} keys") == "Instruct: Match {json} keys\nQuery:"


@pytest.mark.parametrize("input_type", [None, "document"])
def test_instruction_without_a_query_is_refused(input_type: str | None) -> None:
    with pytest.raises(InvalidInstruction) as info:
        qwen_prefix(input_type, "Find code")
    assert info.value.param == "instruction" and "input_type 'query'" in info.value.message


def test_instruction_on_a_model_without_a_template_is_refused() -> None:
    with pytest.raises(InvalidInstruction) as info:
        choose_prefix(
            model="bge-m3",
            prompts={},
            default_prompt_name=None,
            query_template=None,
            default_instruction=None,
            input_type="query",
            instruction="Find code",
        )
    assert info.value.code == "invalid_instruction" and "'bge-m3' takes no instruction" in info.value.message


def test_sentence_transformers_prompts_serve_queries_and_documents() -> None:
    assert st_prefix("query") == "query: "
    assert st_prefix("document") == "passage: "
    assert st_prefix("clustering") == "cluster: "
    assert st_prefix(None) == "passage: "  # plain OpenAI clients embed documents
    assert st_prefix(None, default="query") == "query: "  # unless the model names a default
    assert st_prefix("document", prompts={"query": "q: ", "document": "d: ", "passage": "p: "}) == "d: "


def test_models_without_prompts_put_nothing_in_front() -> None:
    for input_type in (None, "query", "document"):
        assert (
            choose_prefix(
                model="m",
                prompts={},
                default_prompt_name=None,
                query_template=None,
                default_instruction=None,
                input_type=input_type,
                instruction=None,
            )
            == ""
        )


def test_unknown_input_type_lists_the_ones_the_model_takes() -> None:
    with pytest.raises(InvalidInputType) as info:
        st_prefix("search")
    assert info.value.param == "input_type"
    assert "['query', 'document', 'clustering']" in info.value.message and "'search'" in info.value.message


def test_input_types_are_query_document_and_other_prompt_names() -> None:
    assert input_types({}) == ["query", "document"]
    assert input_types({"query": "", "passage": "", "classification": "c: "}) == [
        "query",
        "document",
        "classification",
    ]
