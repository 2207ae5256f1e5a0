"""Tokenization off the event loop: a shared thread pool in which every worker thread holds its own copy
of each model's fast tokenizer (a `tokenizers.Tokenizer` is not safe to share across threads)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True, slots=True)
class TextRecipe:
    """How a model's authors turn a text into ids, before the tokenizer itself."""

    prefix: str = ""  # a prompt such as "query: " (counted and embedded like any other text)
    strip: bool = False  # sentence-transformers strips surrounding whitespace
    lower_case: bool = False  # sentence-transformers `do_lower_case`


def load_tokenizer_json(folder: Path) -> str:
    """The serialized fast tokenizer exactly as transformers configures it for this folder (special
    tokens, post-processor), with truncation and padding off."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    backend: Tokenizer = hf.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return backend.to_str()


class TokenizerPool:
    """Encodes texts for one model on the shared tokenizer threads."""

    def __init__(self, tokenizer_json: str, executor: ThreadPoolExecutor, recipe: TextRecipe,
                 *, truncate_to: int | None = None) -> None:
        self._json = tokenizer_json
        self._executor = executor
        self._recipe = recipe
        self._truncate_to = truncate_to
        self._local = threading.local()
        probe = self._make()
        self.vocab_size = probe.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._pad_id(probe)

    def _make(self) -> Tokenizer:
        tok = Tokenizer.from_str(self._json)
        if self._truncate_to is not None:
            tok.enable_truncation(self._truncate_to)
        return tok

    @staticmethod
    def _pad_id(tok: Tokenizer) -> int:
        for name in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
            token_id = tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        return 0  # the attention mask hides padding, so any valid id will do

    def _tokenizer(self) -> Tokenizer:
        tok: Tokenizer | None = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._make()
            self._local.tok = tok
        return tok

    def prepare(self, text: str) -> str:
        recipe = self._recipe
        if recipe.strip:
            text = text.strip()
        if recipe.lower_case:
            text = text.lower()
        return recipe.prefix + text

    def encode_sync(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer().encode_batch([self.prepare(t) for t in texts],
                                                   add_special_tokens=True)
        return [enc.ids for enc in encodings]

    async def encode(self, texts: Sequence[str]) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_sync, texts)


def make_tokenizer_executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embedserve-tokenize")
