"""Tokenization off the event loop: a shared thread pool, and for each model as many copies of its fast
tokenizer as there are tokenizer threads, each built exactly as transformers builds it (a copy made by
serializing one tokenizer can break ties between equally scored Unigram segmentations differently)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from tokenizers import Tokenizer


def tokenizer_factory(folder: Path, *, lower_case: bool = False,
                      truncate_to: int | None = None) -> Callable[[], Tokenizer]:
    """Builds the folder's fast tokenizer as transformers configures it (special tokens,
    post-processor), with padding off and truncation only at `truncate_to`. `lower_case`
    (sentence-transformers' `do_lower_case`) puts a Lowercase normalizer in front, as
    sentence-transformers does."""

    def build() -> Tokenizer:
        from tokenizers.normalizers import Lowercase
        from tokenizers.normalizers import Sequence as NormalizerSequence
        from transformers import AutoTokenizer

        backend: Tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True).backend_tokenizer
        backend.no_padding()
        if truncate_to is None:
            backend.no_truncation()
        else:
            backend.enable_truncation(truncate_to)
        if lower_case and "Lowercase" not in backend.to_str():
            current = backend.normalizer
            backend.normalizer = NormalizerSequence([Lowercase(), current] if current is not None
                                                    else [Lowercase()])
        return backend

    return build


class TokenizerPool:
    """Encodes texts for one model on the shared tokenizer threads. Holds `copies` tokenizers (one per
    thread: a `tokenizers.Tokenizer` must not be used by two threads at once); a call borrows one."""

    def __init__(self, build: Callable[[], Tokenizer], executor: ThreadPoolExecutor, *,
                 copies: int) -> None:
        self._executor = executor
        self._free: queue.SimpleQueue[Tokenizer] = queue.SimpleQueue()
        tokenizers = [build() for _ in range(max(1, copies))]
        for tok in tokenizers:
            self._free.put(tok)
        probe = tokenizers[0]
        self.vocab_size = probe.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad_id_of(probe)
        self._probe = probe

    @contextmanager
    def _borrow(self) -> Iterator[Tokenizer]:
        tok = self._free.get()  # never waits while copies >= the executor's threads
        try:
            yield tok
        finally:
            self._free.put(tok)

    def token_id(self, token: str) -> int | None:
        found = self._probe.token_to_id(token)
        return None if found is None else int(found)

    def encode_sync(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """`prefix` (a prompt such as "query: ") is embedded and counted like the text."""
        prefixed = [prefix + t for t in texts] if prefix else list(texts)
        with self._borrow() as tok:
            encodings = tok.encode_batch(prefixed, add_special_tokens=True)
        return [enc.ids for enc in encodings]

    async def encode(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.encode_sync, texts, prefix)


def pad_id_of(tok: Tokenizer) -> int:
    for name in ("[PAD]", "<pad>", "<|endoftext|>", "</s>"):
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return 0  # the attention mask hides padding, so any valid id will do


def ensure_last(sequences: list[list[int]], token_id: int) -> list[list[int]]:
    """Every sequence ending with `token_id` (Qwen3-Embedding pools the hidden state of its EOS)."""
    return [ids if ids and ids[-1] == token_id else [*ids, token_id] for ids in sequences]


def make_tokenizer_executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embedserve-tokenize")
