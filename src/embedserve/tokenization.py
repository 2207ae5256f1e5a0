"""Tokenization off the event loop, bounded by the request's limits: per model, copies of its fast
tokenizer built as transformers builds them, fed in chunks that stop at the first limit a request
breaks (design notes 9, 12 and 31)."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Encoding, Tokenizer

T = TypeVar("T")

#: Characters per token assumed for a text's first window: generous (English is ~4.5 per token, code
#: ~3), so one window nearly always decides, and still bounded (a 256-token model reads ~2k characters
#: of a 1 MB text).
WINDOW_CHARS_PER_TOKEN = 8
#: Words at a window's end whose tokens are not trusted: the window may have cut the last word (and a
#: cut can change how the word before it normalizes or splits, as in Qwen's `.\n\n`).
UNTRUSTED_WORDS = 2
#: One trip to the tokenizer threads holds at most this many inputs and about this many characters
#: (~10 ms of work): small enough that a request queued behind a large one waits one chunk, not the
#: whole request, large enough that the trips cost nothing next to the work.
CHUNK_INPUTS = 256
CHUNK_CHARS = 32_768
#: Near the request's total or its key's budget, a trip holds about this many characters per token
#: still allowed: few enough that it rarely passes the limit by much (text has 1 to 5 characters per
#: token), so trips shrink geometrically towards it and stop within a few tokens past it.
TRIP_CHARS_PER_TOKEN = 2


def tokenizer_factory(
    folder: Path, *, lower_case: bool = False, truncate_to: int | None = None
) -> Callable[[], Tokenizer]:
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
            backend.normalizer = NormalizerSequence(
                [Lowercase(), current] if current is not None else [Lowercase()]
            )
        return backend

    return build


@dataclass(frozen=True, slots=True)
class Framing:
    """The special tokens the tokenizer's post-processor puts around every text (all-MiniLM-L6-v2:
    [CLS] ... [SEP] = 101 ... 102; bge-m3: <s> ... </s>; the original Qwen3 release: none)."""

    head: tuple[int, ...]
    tail: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tail)

    def frame(self, content: Sequence[int]) -> list[int]:
        return [*self.head, *content, *self.tail]

    def frames(self, ids: Sequence[int]) -> bool:
        """Whether `ids` carry this framing (always true for a tokenizer that adds none)."""
        n, h, t = len(ids), len(self.head), len(self.tail)
        return n >= self.size and tuple(ids[:h]) == self.head and tuple(ids[n - t :]) == self.tail


_PROBES = ("a", "hello world", "Zürich 🚀 x")


def framing_of(tok: Tokenizer) -> Framing | None:
    """The framing, when every probe text encodes as framing + its bare tokens; None for a
    post-processor that does something else (such a model is tokenized whole, the old way)."""
    bare = [tok.encode(text, add_special_tokens=False).ids for text in _PROBES]
    full = [tok.encode(text).ids for text in _PROBES]
    first, content = full[0], bare[0]
    start = next(
        (i for i in range(len(first) - len(content) + 1) if first[i : i + len(content)] == content), None
    )
    if start is None:
        return None
    framing = Framing(head=tuple(first[:start]), tail=tuple(first[start + len(content) :]))
    if all(framing.frame(b) == f for b, f in zip(bare, full, strict=True)):
        return framing
    return None


@dataclass(frozen=True, slots=True)
class TokenLimits:
    """What tokenizing one request may run to. `per_input` is the model's limit: longer inputs are cut
    to it when `truncate`, else tokenization stops at the first input longer than `refuse_above` (the
    model's limit, or less when the memory budget fits less). `total` and `budget` (the key's tokens per
    minute, None when unlimited) stop it once the request's tokens pass them."""

    per_input: int
    truncate: bool
    total: int
    budget: int | None = None
    refuse_above: int | None = None  # None: per_input


class Stop(Enum):
    """Why tokenization stopped before the last input (the counts it saw are then lower bounds)."""

    INPUT = "input"  # the last sequence is longer than the limit (it may be only the start of the input)
    TOTAL = "total"  # the request's tokens passed `TokenLimits.total`
    BUDGET = "budget"  # ... passed the key's budget


@dataclass(frozen=True, slots=True)
class Tokenized:
    sequences: list[list[int]]  # the inputs tokenized, in order: all of them unless `stopped`
    stopped: Stop | None = None
    produced: int = 0  # tokens the tokenizer made for this request, those after a stop included


def scan(sequences: Sequence[list[int]], limits: TokenLimits, seen: int) -> tuple[int, Stop | None]:
    """Pure: how many of `sequences` (following `seen` tokens of the same request) pass, and why the
    rest do not. The first sequence that breaks a limit is counted in: it is the evidence."""
    refuse_above = limits.refuse_above if limits.refuse_above is not None else limits.per_input
    total = seen
    for i, ids in enumerate(sequences):
        total += len(ids)
        if len(ids) > refuse_above:
            return i + 1, Stop.INPUT
        if total > limits.total:
            return i + 1, Stop.TOTAL
        if limits.budget is not None and total > limits.budget:
            return i + 1, Stop.BUDGET
    return len(sequences), None


def next_chunk(texts: Sequence[str], start: int, window: int, max_chars: int = CHUNK_CHARS) -> int:
    """Pure: where the trip that starts at `start` ends: at most CHUNK_INPUTS texts and about
    `max_chars` characters (the first text always goes); a text longer than `window`, read by
    windows, goes alone."""
    end, chars = start, 0
    while end < len(texts) and end - start < CHUNK_INPUTS:
        long = len(texts[end]) > window
        if end > start and (long or chars + len(texts[end]) > max_chars):
            break
        chars += min(len(texts[end]), window)
        end += 1
        if long:
            break
    return end


def upper_bound(texts: Sequence[str], prefix: str, *, per_input: int, framing_size: int) -> int:
    """Pure: at most how many tokens `texts` make, before tokenizing them: every token holds at least
    one UTF-8 byte of its text (WordPiece, byte-level BPE, Unigram with byte fallback), plus the
    framing, a Metaspace `▁` and an appended EOS, and no input counts more than the model's limit."""
    extra = (len(prefix.encode()) if prefix else 0) + framing_size + 2
    return sum(min(per_input, (len(t) if t.isascii() else len(t.encode())) + extra) for t in texts)


def trusted_prefix(encoding: Encoding) -> list[int]:
    """The tokens of a window that the whole text has too: all but those of its last words."""
    words = [w for w in encoding.word_ids if w is not None]
    if not words:
        return []
    last = max(words) - UNTRUSTED_WORDS + 1
    ids = encoding.ids
    kept = next((i for i, w in enumerate(encoding.word_ids) if w is not None and w >= last), len(ids))
    return ids[:kept]


class TokenizerPool:
    """Encodes texts for one model on the shared tokenizer threads. Holds `copies` tokenizers (one per
    thread: a `tokenizers.Tokenizer` must not be used by two threads at once); a call borrows one."""

    def __init__(self, build: Callable[[], Tokenizer], executor: ThreadPoolExecutor, *, copies: int) -> None:
        self._executor = executor
        self._free: queue.SimpleQueue[Tokenizer] = queue.SimpleQueue()
        tokenizers = [build() for _ in range(max(1, copies))]
        for tok in tokenizers:
            self._free.put(tok)
        probe = tokenizers[0]
        self.vocab_size = probe.get_vocab_size(with_added_tokens=True)
        self.pad_id = pad_id_of(probe)
        self.framing = framing_of(probe) if probe.truncation is None else None
        self._probe = probe
        # The framing's token names, for messages: read now, since a request must not use a copy that a
        # tokenizer thread may be using.
        framed = () if self.framing is None else (*self.framing.head, *self.framing.tail)
        self._names = {i: probe.id_to_token(i) for i in framed}

    @contextmanager
    def _borrow(self) -> Iterator[Tokenizer]:
        tok = self._free.get()  # never waits while copies >= the executor's threads
        try:
            yield tok
        finally:
            self._free.put(tok)

    async def in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work` on the tokenizer threads (text work that is too long for the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def shown(self, framing: Framing) -> str:
        """The framing as a message shows it: `[CLS] (101) ... [SEP] (102)`."""

        def name(ids: tuple[int, ...]) -> str:
            return " ".join(f"{self._names.get(i, '?')} ({i})" for i in ids)

        return f"{name(framing.head)} ... {name(framing.tail)}".strip()

    def token_id(self, token: str) -> int | None:
        found = self._probe.token_to_id(token)
        return None if found is None else int(found)

    def encode_sync(self, texts: Sequence[str], prefix: str = "") -> list[list[int]]:
        """`prefix` (a prompt such as "query: ") is embedded and counted like the text."""
        prefixed = [prefix + t for t in texts] if prefix else list(texts)
        with self._borrow() as tok:
            encodings = tok.encode_batch(prefixed, add_special_tokens=True)
        return [enc.ids for enc in encodings]

    def upper_bound(self, texts: Sequence[str], prefix: str, per_input: int) -> int:
        size = self.framing.size if self.framing is not None else 0
        return upper_bound(texts, prefix, per_input=per_input, framing_size=size)

    async def encode(self, texts: Sequence[str], prefix: str, limits: TokenLimits) -> Tokenized:
        """Tokenize `texts` chunk by chunk, stopping at the first limit they break (see Stop); inputs
        over the model's limit are cut to it when `limits.truncate`."""
        loop = asyncio.get_running_loop()
        if self.framing is None:  # a post-processor we cannot frame ourselves: whole texts, one trip
            sequences = await loop.run_in_executor(
                self._executor,
                self._encode_whole,
                texts,
                prefix,
                limits.per_input if limits.truncate else None,
            )
            kept, stop = scan(sequences, limits, 0)
            return Tokenized(sequences[:kept], stop, sum(len(ids) for ids in sequences))
        window = self._window(limits)
        out: list[list[int]] = []
        start = seen = produced = 0
        while start < len(texts):
            # Near the total or the key's budget, trips shrink to what may still fit, so that a
            # request over them is found a few tokens past the limit, not a whole chunk past it.
            left = min(limits.total, limits.budget if limits.budget is not None else limits.total) - seen
            end = next_chunk(texts, start, window, min(CHUNK_CHARS, (left + 1) * TRIP_CHARS_PER_TOKEN))
            part = await loop.run_in_executor(
                self._executor, self._encode_chunk, texts[start:end], prefix, limits, window
            )
            produced += sum(len(ids) for ids in part)
            kept, stop = scan(part, limits, seen)
            out += part[:kept]
            seen += sum(len(ids) for ids in part[:kept])
            if stop is not None:
                return Tokenized(out, stop, produced)
            start = end
        return Tokenized(out, None, produced)

    def _encode_whole(self, texts: Sequence[str], prefix: str, truncate_to: int | None) -> list[list[int]]:
        """(A tokenizer thread.) The tokenizer's own pipeline on whole texts, truncation included."""
        prefixed = [prefix + t for t in texts] if prefix else list(texts)
        with self._borrow() as tok:
            if truncate_to is not None:
                tok.enable_truncation(truncate_to)
            try:
                encodings = tok.encode_batch(prefixed, add_special_tokens=True)
            finally:
                tok.no_truncation()
        return [enc.ids for enc in encodings]

    def _window(self, limits: TokenLimits) -> int:
        return (limits.per_input + 1) * WINDOW_CHARS_PER_TOKEN

    def _encode_chunk(
        self, texts: Sequence[str], prefix: str, limits: TokenLimits, window: int
    ) -> list[list[int]]:
        """(A tokenizer thread.) Framed ids of each text, content cut to the limit when truncating;
        a text longer than `window` characters is read only as far as the limit needs."""
        assert self.framing is not None
        framing = self.framing
        cap = limits.per_input - framing.size  # content tokens that fit
        with self._borrow() as tok:
            if len(texts) == 1 and len(texts[0]) > window:
                contents = [self._encode_long(tok, prefix + texts[0], cap, window)]
            else:
                prefixed = [prefix + t for t in texts] if prefix else list(texts)
                contents = [enc.ids for enc in tok.encode_batch(prefixed, add_special_tokens=False)]
        if limits.truncate:
            contents = [ids[: max(cap, 0)] for ids in contents]
        return [framing.frame(ids) for ids in contents]

    @staticmethod
    def _encode_long(tok: Tokenizer, text: str, cap: int, window: int) -> list[int]:
        """The content tokens of a long text, or only as many of its first ones as show that it has
        more than `cap` (at least cap + 1; the whole text when it has fewer). The window grows
        (doubling) while its trusted tokens do not reach past `cap`."""
        size = window
        while size < len(text):
            trusted = trusted_prefix(tok.encode(text[:size], add_special_tokens=False))
            if len(trusted) > cap:
                return trusted
            size *= 2
        ids: list[int] = tok.encode(text, add_special_tokens=False).ids
        return ids


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
