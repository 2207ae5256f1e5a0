"""The server's tokenizers give exactly the ids transformers gives (the reference every recipe starts
from), including where a Unigram vocabulary scores two segmentations the same; copies are shared
safely between the tokenizer threads; a text far over the limit is read only as far as the limit needs,
with the same ids as transformers' truncation, and a request stops at the first limit it breaks."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import FamilyModels
from embedserve.tokenization import (
    Framing,
    Stop,
    Tokenized,
    TokenizerPool,
    TokenLimits,
    ensure_last,
    tokenizer_factory,
)
from support import bundled_folder

TEXTS = [
    "Ni, Nk = a.shape[:axis], a.shape[axis+1:] out[ii + s_[...,] + kk] = func1d",  # tied segmentation
    "x...y ... .. . ....",
    "hello world",
    "Zürich, São Paulo — naïve café 🚀",
    "  leading and trailing spaces  ",
]


def folders(models: FamilyModels) -> dict[str, Path]:
    return {
        "minilm": bundled_folder(),
        "bge-m3": models.bge_m3,
        "qwen3": models.qwen3,
        "qwen3-no-eos": models.qwen3_no_eos,
    }


@pytest.mark.parametrize("name", ["minilm", "bge-m3", "qwen3", "qwen3-no-eos"])
def test_ids_are_the_ones_transformers_gives(family_models: FamilyModels, name: str) -> None:
    folder = folders(family_models)[name]
    with ThreadPoolExecutor(2) as executor:
        pool = TokenizerPool(tokenizer_factory(folder), executor, copies=2)
        ours = pool.encode_sync(TEXTS)
    assert ours == AutoTokenizer.from_pretrained(str(folder))(TEXTS)["input_ids"]


def test_truncation_keeps_the_special_tokens_as_transformers_does(family_models: FamilyModels) -> None:
    folder = family_models.bge_m3
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(folder, truncate_to=8), executor, copies=1)
        ours = pool.encode_sync(TEXTS)
    reference = AutoTokenizer.from_pretrained(str(folder))(TEXTS, truncation=True, max_length=8)
    assert ours == reference["input_ids"] and all(ids[-1] == 2 for ids in ours)


def test_concurrent_encoding_on_every_thread_gives_the_same_ids(family_models: FamilyModels) -> None:
    with ThreadPoolExecutor(4) as executor:
        pool = TokenizerPool(tokenizer_factory(family_models.bge_m3), executor, copies=4)
        expected = pool.encode_sync(TEXTS)
        results = list(executor.map(lambda _: pool.encode_sync(TEXTS), range(200)))
    assert all(r == expected for r in results)


def test_ensure_last_appends_only_where_missing() -> None:
    assert ensure_last([[1, 2], [3, 9], [9]], 9) == [[1, 2, 9], [3, 9], [9]]


# ---- reading long texts only as far as the limit needs ------------------------------------------

#: Texts far longer than a small limit's first window: words, code and punctuation with newlines,
#: scripts without spaces, and spaces that make few tokens of many characters.
LONG_TEXTS = [
    "the cat reads a long book. " * 40,
    "def f(x):\n    return x.shape[:axis], a[ii + s_[...,]]\n\n" * 20,
    "Zürich 東京都 São Paulo 🚀🚀 naïve café — " * 30,
    "東京都渋谷区神南一丁目" * 60,
    "a" + " " * 3000 + "b c d",
    "x" * 2500,
]


def encode(pool: TokenizerPool, texts: list[str], limits: TokenLimits) -> Tokenized:
    return asyncio.run(pool.encode(texts, "", limits))


@pytest.mark.parametrize("name", ["minilm", "bge-m3", "qwen3", "qwen3-no-eos"])
@pytest.mark.parametrize("limit", [16, 40])
def test_truncating_long_texts_by_windows_gives_transformers_truncation(
    family_models: FamilyModels, name: str, limit: int
) -> None:
    folder = folders(family_models)[name]
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(folder), executor, copies=1)
        ours = encode(pool, LONG_TEXTS, TokenLimits(per_input=limit, truncate=True, total=10**6))
    assert ours.stopped is None
    reference = AutoTokenizer.from_pretrained(str(folder))(LONG_TEXTS, truncation=True, max_length=limit)
    assert ours.sequences == reference["input_ids"]


@pytest.mark.parametrize("name", ["minilm", "bge-m3", "qwen3"])
def test_an_over_long_text_is_found_from_its_first_characters(family_models: FamilyModels, name: str) -> None:
    folder = folders(family_models)[name]
    huge = "the cat reads a long book about bridges. " * 25_000  # 1 MB
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(folder), executor, copies=1)
        out = encode(
            pool, ["fine", huge, "never read"], TokenLimits(per_input=64, truncate=False, total=10**6)
        )
        assert out.stopped is Stop.INPUT and len(out.sequences) == 2
        assert 64 < len(out.sequences[1]) <= 65 * 8, "a lower bound from the first window"
        assert out.produced < 1000, "the rest of the text was never tokenized"
        full = len(pool.encode_sync([huge])[0])
    assert full > 100_000


@pytest.mark.parametrize("name", ["minilm", "bge-m3", "qwen3", "qwen3-no-eos"])
def test_texts_within_the_limits_are_tokenized_exactly_whatever_their_length(
    family_models: FamilyModels, name: str
) -> None:
    folder = folders(family_models)[name]
    texts = [*TEXTS, *LONG_TEXTS]
    with ThreadPoolExecutor(2) as executor:
        pool = TokenizerPool(tokenizer_factory(folder), executor, copies=2)
        out = encode(pool, texts * 60, TokenLimits(per_input=100_000, truncate=False, total=10**7))
        assert out.stopped is None
        assert out.sequences == pool.encode_sync(texts) * 60


def test_a_request_stops_once_it_passes_its_total_or_its_budget(family_models: FamilyModels) -> None:
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(bundled_folder()), executor, copies=1)
        texts = ["a short text of a few words"] * 5000
        total = encode(pool, texts, TokenLimits(per_input=256, truncate=False, total=500))
        budget = encode(pool, texts, TokenLimits(per_input=256, truncate=False, total=10**6, budget=300))
    assert total.stopped is Stop.TOTAL and 500 < sum(map(len, total.sequences)) < 520
    assert budget.stopped is Stop.BUDGET and 300 < sum(map(len, budget.sequences)) < 320
    assert total.produced < 10_000 and budget.produced < 10_000, "stopped within a chunk or two"


def test_a_tokenizer_that_cannot_be_framed_truncates_whole_texts_as_transformers_does(
    family_models: FamilyModels,
) -> None:
    """A tokenizer whose framing is unknown (here: one built truncating) is run whole, its own way."""
    folder = family_models.bge_m3
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(folder, truncate_to=512), executor, copies=1)
        assert pool.framing is None
        cut = encode(pool, LONG_TEXTS, TokenLimits(per_input=16, truncate=True, total=10**6))
        over = encode(pool, ["fine", *LONG_TEXTS], TokenLimits(per_input=16, truncate=False, total=10**6))
    reference = AutoTokenizer.from_pretrained(str(folder))(LONG_TEXTS, truncation=True, max_length=16)
    assert cut.stopped is None and cut.sequences == reference["input_ids"]
    assert over.stopped is Stop.INPUT and len(over.sequences) == 2


@pytest.mark.parametrize(
    ("name", "head", "tail"), [("minilm", (101,), (102,)), ("bge-m3", (0,), (2,)), ("qwen3-no-eos", (), ())]
)
def test_each_tokenizer_knows_the_framing_it_puts_around_a_text(
    family_models: FamilyModels, name: str, head: tuple[int, ...], tail: tuple[int, ...]
) -> None:
    with ThreadPoolExecutor(1) as executor:
        pool = TokenizerPool(tokenizer_factory(folders(family_models)[name]), executor, copies=1)
    assert pool.framing == Framing(head=head, tail=tail)
