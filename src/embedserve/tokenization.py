"""Tokenization off the event loop: a shared thread pool in which every worker thread holds its own copy
of each model's fast tokenizer (a `tokenizers.Tokenizer` is not safe to share across threads)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer_json(folder: Path, *, lower_case: bool = False) -> str:
    """The serialized fast tokenizer exactly as transformers configures it for this folder (special
    tokens, post-processor), with truncation and padding off. `lower_case` (sentence-transformers'
    `do_lower_case`) puts a Lowercase normalizer in front, as sentence-transformers does."""
    from tokenizers.normalizers import Lowercase, Sequence
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    backend: Tokenizer = hf.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    if lower_case and "Lowercase" not in backend.to_str():
        current = backend.normalizer
        backend.normalizer = Sequence([Lowercase(), current] if current is not None else [Lowercase()])
    return backend.to_str()


class TokenizerPool:
    """Encodes texts for one model on the shared tokenizer threads."""

    def __init__(self, tokenizer_json: str, executor: ThreadPoolExecutor, *,
                 truncate_to: int | None = None) -> None:
        self._json = tokenizer_json
        self._executor = executor
        self._truncate_to = truncate_to
        self._local = threading.local()
        probe = self._make()
        self.vocab_size = probe.get_vocab_size(with_added_tokens=True)
        self.pad_id = self._pad_id(probe)
        self._probe = probe

    def token_id(self, token: str) -> int | None:
        found = self._probe.token_to_id(token)
        return None if found is None else int(found)

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

    def encode_sync(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """`prefix` (a prompt such as "query: ") is embedded and counted like the text."""
        prefixed = [prefix + t for t in texts] if prefix else list(texts)
        encodings = self._tokenizer().encode_batch(prefixed, add_special_tokens=True)
        return [enc.ids for enc in encodings]

    async def encode(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_sync, texts, prefix)


def ensure_last(sequences: list[list[int]], token_id: int) -> list[list[int]]:
    """Every sequence ending with `token_id` (Qwen3-Embedding pools the hidden state of its EOS)."""
    return [ids if ids and ids[-1] == token_id else [*ids, token_id] for ids in sequences]


def make_tokenizer_executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embedserve-tokenize")
