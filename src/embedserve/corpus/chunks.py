"""Rows into the chunks the engine embeds one call each, and an engine error on a chunk turned into one
that names the record it is about (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from embedserve.corpus.rows import Row
from embedserve.errors import ContextLengthExceeded, InvalidRequest


@dataclass(frozen=True, slots=True)
class Chunk:
    rows: tuple[Row, ...]

    @property
    def ids(self) -> list[str]:
        return [row.id for row in self.rows]

    @property
    def texts(self) -> list[str]:
        return [row.text for row in self.rows]


def estimate_tokens(text: str) -> int:
    """Pure: about how many tokens a text is, without a tokenizer: ~4 characters a token in English
    prose, plus the two special tokens a text is framed in. Only sizes chunks; the engine counts."""
    return len(text) // 4 + 2


def chunked(rows: Iterable[Row], *, batch_tokens: int, max_items: int) -> Iterator[Chunk]:
    """Consecutive rows, a chunk closed once it holds about `batch_tokens` tokens or `max_items` rows
    (a text longer than `batch_tokens` is a chunk alone). A bad record comes after the rows before it:
    their chunk first, then its error."""
    pending: list[Row] = []
    tokens = 0
    try:
        for row in rows:
            pending.append(row)
            tokens += estimate_tokens(row.text)
            if tokens >= batch_tokens or len(pending) >= max_items:
                yield Chunk(tuple(pending))
                pending, tokens = [], 0
    except InvalidRequest:
        if pending:
            yield Chunk(tuple(pending))
        raise
    if pending:
        yield Chunk(tuple(pending))


#: How the engine's messages name one input of a call: `input[3] is an empty string; ...`.
_INPUT_INDEX = re.compile(r"\binput\[(\d+)\]")


def locate(exc: InvalidRequest, chunk: Chunk, where: Callable[[int], str]) -> InvalidRequest:
    """Pure: the engine's refusal of one input of `chunk`, as the same error about the record:
    `docs.jsonl line 7 (id 'a7'): the text is an empty string; every input must be non-empty.` An
    error about no one input (an unsupported --dimensions) is returned as it is."""
    found = _INPUT_INDEX.search(exc.message)
    if found is None or int(found.group(1)) >= len(chunk.rows):
        return exc
    row = chunk.rows[int(found.group(1))]
    message = exc.message[: found.start()] + "the text" + exc.message[found.end() :]
    if isinstance(exc, ContextLengthExceeded):
        message += " Or pass --truncate, which cuts such texts to the model's limit."
    return type(exc)(f"{where(row.number)} (id {row.id!r}): {message}", param=exc.param)
