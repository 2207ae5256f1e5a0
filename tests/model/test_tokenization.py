"""The server's tokenizers give exactly the ids transformers gives (the reference every recipe starts
from), including where a Unigram vocabulary scores two segmentations the same; copies are shared
safely between the tokenizer threads."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import FamilyModels
from embedserve.tokenization import TokenizerPool, ensure_last, tokenizer_factory
from support import bundled_folder

TEXTS = [
    "Ni, Nk = a.shape[:axis], a.shape[axis+1:] out[ii + s_[...,] + kk] = func1d",  # tied segmentation
    "x...y ... .. . ....",
    "hello world",
    "Zürich, São Paulo — naïve café 🚀",
    "  leading and trailing spaces  ",
]


def folders(models: FamilyModels) -> dict[str, Path]:
    return {"minilm": bundled_folder(), "bge-m3": models.bge_m3, "qwen3": models.qwen3,
            "qwen3-no-eos": models.qwen3_no_eos}


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
