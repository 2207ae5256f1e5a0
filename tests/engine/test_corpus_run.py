"""The corpus run on an engine (fake backends: real tokenizer and pipeline): rows written in input order,
only the chunks in flight held whatever the corpus size, and a bad record ending the run once the rows
before it are written."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from embedserve import Engine
from embedserve.backends.fake import fake_backends
from embedserve.corpus.chunks import chunked
from embedserve.corpus.output import RunInfo
from embedserve.corpus.rows import Row, Source
from embedserve.corpus.run import Job, Tally, embed_chunks
from embedserve.errors import EmptyInput, InvalidRequest
from embedserve.types import FloatMatrix

MODEL = "all-MiniLM-L6-v2"
WHERE = Source(Path("docs.jsonl"), "line").where


class Recorded:
    """An output that keeps what is written (ids only) and checks, at each write, how many rows the
    run has taken from the reader and not yet written."""

    def __init__(self, pulled: list[int]) -> None:
        self.path = Path("recorded")
        self.info = RunInfo(MODEL, 384)
        self.rows = 0
        self.ids: list[str] = []
        self.held: list[int] = []
        self._pulled = pulled

    def done_ids(self) -> Iterator[str]:
        return iter(())

    def write(self, ids: Sequence[str], vectors: FloatMatrix, tokens: Sequence[int]) -> None:
        assert vectors.shape == (len(ids), 384) and len(tokens) == len(ids)
        self.ids.extend(ids)
        self.rows += len(ids)
        self.held.append(self._pulled[0] - self.rows)

    def checkpoint(self) -> None:
        pass

    def finish(self) -> None:
        pass


def counted(rows: Iterator[Row], pulled: list[int]) -> Iterator[Row]:
    for row in rows:
        pulled[0] += 1
        yield row


def synthetic(count: int, bad: int | None = None) -> Iterator[Row]:
    """A corpus generated as it is read (never a list): `bad` is the line of an empty text."""
    for number in range(1, count + 1):
        yield Row(f"doc-{number}", "" if number == bad else f"passage {number} about rivers", number)


def run(rows: Iterator[Row], output: Recorded, **kwargs: int) -> Tally:
    async def go() -> Tally:
        async with Engine.open(backends=fake_backends()) as engine:
            chunks = chunked(rows, batch_tokens=kwargs.pop("batch_tokens", 200), max_items=64)
            return await embed_chunks(engine, Job(MODEL), chunks, output, where=WHERE, **kwargs)

    return asyncio.run(go())


def test_rows_are_written_in_input_order_holding_only_the_chunks_in_flight() -> None:
    pulled = [0]
    output = Recorded(pulled)
    tally = run(counted(synthetic(20_000), pulled), output, in_flight=3)
    assert output.ids == [f"doc-{n}" for n in range(1, 20_001)]
    assert tally.rows == 20_000 and tally.tokens > 20_000
    # Taken from the reader and not written yet: at most the chunks in flight (64 rows each at most).
    assert max(output.held) <= 3 * 64


def test_an_empty_text_ends_the_run_naming_its_line_after_the_rows_before_it_are_written() -> None:
    output = Recorded([0])
    with pytest.raises(EmptyInput) as refused:
        run(synthetic(1000, bad=700), output)
    assert refused.value.message == (
        "docs.jsonl line 700 (id 'doc-700'): the text is an empty string; every input must be non-empty."
    )
    assert output.ids[-1] == f"doc-{len(output.ids)}"  # in order, up to the chunk of line 700
    assert 600 < len(output.ids) < 700


def test_a_reader_error_ends_the_run_once_the_rows_read_before_it_are_written() -> None:
    def broken() -> Iterator[Row]:
        yield from synthetic(300)
        raise InvalidRequest("docs.jsonl line 301: not valid JSON (unexpected character at column 1)")

    output = Recorded([0])
    with pytest.raises(InvalidRequest, match="line 301: not valid JSON"):
        run(broken(), output)
    assert output.ids == [f"doc-{n}" for n in range(1, 301)]
