"""`embedserve embed`, the real command as a subprocess on the bundled model: each input format into each
output format gives the vectors the live server's /v1/embeddings gives (official SDK) for the same
texts; --dimensions and --input-type pass through; a SIGKILL mid-run then --resume ends with every id
once and a clean run's vectors; progress on a terminal and off it; every bad input is one line and its
exit status."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from openai import OpenAI

from conftest import MRL_DIMS
from embedserve.corpus.npy_output import sidecar
from embedserve.corpus.parquet_output import parts_dir
from gates import wait_until
from support import MIXED_TEXTS

MODEL = "all-MiniLM-L6-v2"
WORDS = ["river", "bridge", "engineer", "stone", "arch", "cable", "tower", "wind", "load", "steel", "span"]


def corpus(count: int, most_words: int = 60) -> list[str]:
    """Varied texts of 3 to `most_words` words (and the session's mixed ones: emoji, accents, a long
    one)."""
    texts = [*MIXED_TEXTS]
    for i in range(count - len(texts)):
        words = 3 + (i * 13) % (most_words - 2)
        texts.append(f"{i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(words)))
    return texts[:count]


def ids_for(texts: list[str]) -> list[str]:
    return [f"doc-{i}" for i in range(len(texts))]


def write_input(folder: Path, fmt: str, texts: list[str], *, with_ids: bool = True) -> Path:
    """The texts as an input file of `fmt` (ids doc-0, doc-1, ... where the format carries them)."""
    keys = ids_for(texts)
    if fmt == "jsonl":
        path = folder / "docs.jsonl"
        path.write_bytes(
            b"".join(
                orjson.dumps({"id": k, "text": t} if with_ids else {"text": t}) + b"\n"
                for k, t in zip(keys, texts, strict=True)
            )
        )
    elif fmt == "csv":
        import csv

        path = folder / "docs.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "title", "text"])
            writer.writerows([k, f"title {k}", t] for k, t in zip(keys, texts, strict=True))
    elif fmt == "parquet":
        path = folder / "docs.parquet"
        pq.write_table(pa.table({"id": keys, "text": texts}), path, row_group_size=7)
    else:
        path = folder / "docs.txt"
        path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def read_output(path: Path) -> tuple[list[str], np.ndarray, list[int]]:
    """(ids, vectors [N, D] float32, token counts) of an output, by its extension."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.schema.field("embedding").type.list_size > 0  # fixed-size
        flat = table.column("embedding").combine_chunks().values.to_numpy()
        return (
            table.column("id").to_pylist(),
            flat.reshape(len(table), -1),
            table.column("tokens").to_pylist(),
        )
    if path.suffix == ".jsonl":
        rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        vectors = np.asarray([r["embedding"] for r in rows], np.float32)
        return [r["id"] for r in rows], vectors, [r["tokens"] for r in rows]
    lines = [orjson.loads(line) for line in sidecar(path).read_bytes().splitlines()]
    vectors = np.load(path)
    assert vectors.dtype == np.float32 and vectors.shape[0] == len(lines)
    return [r["id"] for r in lines], vectors, [r["tokens"] for r in lines]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}  # HF_HOME decides


def embed_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "embedserve", "embed", *map(str, args)]


def embed(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(embed_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env())


def api_vectors(client: OpenAI, model: str, texts: list[str], **options: Any) -> tuple[np.ndarray, int]:
    """/v1/embeddings for `texts` (in requests of 64): the vectors and the usage's tokens."""
    vectors, tokens = [], 0
    for at in range(0, len(texts), 64):
        answer = client.embeddings.create(model=model, input=texts[at : at + 64], **options)
        vectors.extend(d.embedding for d in answer.data)
        tokens += answer.usage.prompt_tokens
    return np.asarray(vectors, np.float32), tokens


def single_model_file(folder: Path, entry: str) -> Path:
    path = folder / "models.toml"
    path.write_text(f"[[models]]\n{entry}\n")
    return path


# ---- the API's vectors, in every format ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_fmt", "out_fmt"),
    [
        ("jsonl", "parquet"),
        ("csv", "jsonl"),
        ("parquet", "npy"),
        ("text", "parquet"),
        ("jsonl", "npy"),
        ("text", "jsonl"),
    ],
)
def test_each_input_format_into_each_output_gives_the_apis_vectors(
    tmp_path: Path, client: OpenAI, in_fmt: str, out_fmt: str
) -> None:
    texts = corpus(150)
    source = write_input(tmp_path, in_fmt, texts)
    out = tmp_path / f"vectors.{out_fmt}"
    done = embed(source, "--model", MODEL, "--output", out, "--batch-tokens", "300")
    assert done.returncode == 0, done.stderr
    got_ids, got, tokens = read_output(out)
    expected, api_tokens = api_vectors(client, MODEL, texts)
    # Plain text has no ids: each is its line number.
    assert got_ids == (ids_for(texts) if in_fmt != "text" else [str(n) for n in range(1, 151)])
    assert got.shape == (150, 384)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert sum(tokens) == api_tokens
    assert done.stdout.startswith(f"embedded 150 rows, {api_tokens:,} tokens in ")


def test_jsonl_without_ids_is_numbered_by_line(tmp_path: Path) -> None:
    source = write_input(tmp_path, "jsonl", corpus(5), with_ids=False)
    done = embed(source, "--model", MODEL, "-o", tmp_path / "v.jsonl")
    assert done.returncode == 0, done.stderr
    assert read_output(tmp_path / "v.jsonl")[0] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize(
    ("entry", "model", "flags", "options"),
    [
        (
            f'id = "minilm-mrl"\nsource = "sentence-transformers/all-MiniLM-L6-v2"\n'
            f"matryoshka_dimensions = {list(MRL_DIMS)}",
            "minilm-mrl",
            ["--dimensions", "128"],
            {"dimensions": 128},
        ),
        (
            'id = "minilm-prompted"\nsource = "all-MiniLM-L6-v2"\n'
            'prompts = { passage = "passage: ", query = "query: " }\ndefault_prompt_name = "passage"',
            "minilm-prompted",
            ["--input-type", "query"],
            {"extra_body": {"input_type": "query"}},
        ),
    ],
)
def test_dimensions_and_input_type_pass_through_as_the_apis_fields(
    tmp_path: Path, client: OpenAI, entry: str, model: str, flags: list[str], options: dict[str, Any]
) -> None:
    texts = corpus(40)
    source = write_input(tmp_path, "jsonl", texts)
    models = single_model_file(tmp_path, entry)
    done = embed(source, "--models-file", models, "-o", tmp_path / "v.parquet", *flags, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    _, got, _ = read_output(tmp_path / "v.parquet")
    expected, tokens = api_vectors(client, model, texts, **options)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    plain, _ = api_vectors(client, model, texts)
    assert not np.allclose(got[:, : plain.shape[1]], plain[:, : got.shape[1]], atol=1e-3)  # the flag did act
    assert summary["model"] == model and summary["tokens"] == tokens and summary["rows"] == 40
    assert summary["dimensions"] == got.shape[1] == options.get("dimensions", 384)


# ---- killed, then resumed ------------------------------------------------------------------------------

KILL_ROWS = 1200
KILL_TEXTS = corpus(KILL_ROWS, most_words=12)


@pytest.fixture(scope="module")
def kill_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A corpus big enough to kill mid-run, and a clean run's output of it."""
    folder = tmp_path_factory.mktemp("kill")
    source = write_input(folder, "jsonl", KILL_TEXTS)
    clean = folder / "clean.parquet"
    done = embed(source, "--model", MODEL, "-o", clean)
    assert done.returncode == 0, done.stderr
    return source, clean


def whole_rows_on_disk(out: Path) -> int:
    """Rows a kill now would leave (finished part files; whole lines; ids in the sidecar)."""
    if out.suffix == ".parquet":
        return sum(pq.read_metadata(p).num_rows for p in parts_dir(out).glob("part-*.parquet"))
    lines = out if out.suffix == ".jsonl" else sidecar(out)
    return lines.read_bytes().count(b"\n") if lines.exists() else 0


@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl", "npy"])
def test_a_run_killed_mid_way_resumes_to_every_id_once_with_a_clean_runs_vectors(
    tmp_path: Path, kill_corpus: tuple[Path, Path], out_fmt: str
) -> None:
    source, clean = kill_corpus
    out = tmp_path / f"vectors.{out_fmt}"
    flags = ["--model", MODEL, "-o", out, "--checkpoint-rows", "100", "--batch-tokens", "400"]
    proc = subprocess.Popen(
        embed_cmd(source, *flags), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_until(lambda: whole_rows_on_disk(out) > 0 or proc.poll() is not None, "a checkpoint is on disk")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed: make the corpus bigger"
    kept = whole_rows_on_disk(out)
    assert 0 < kept < KILL_ROWS

    again = embed(source, "--model", MODEL, "-o", out)
    assert again.returncode == 2 and "exists: --resume continues it" in again.stderr
    resumed = embed(source, *flags, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["skipped"] >= kept and summary["skipped"] + summary["rows"] == KILL_ROWS

    got_ids, got, tokens = read_output(out)
    clean_ids, expected, clean_tokens = read_output(clean)
    assert got_ids == clean_ids == ids_for(KILL_TEXTS)  # every id once, in input order
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert tokens == clean_tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name] + ([sidecar(out).name] if out_fmt == "npy" else [])
    )


def test_sigterm_stops_a_run_checkpointed_and_resume_finishes_it(
    tmp_path: Path, kill_corpus: tuple[Path, Path]
) -> None:
    source, clean = kill_corpus
    out = tmp_path / "vectors.jsonl"
    flags = ["--model", MODEL, "-o", out, "--checkpoint-rows", "100", "--batch-tokens", "400"]
    proc = subprocess.Popen(
        embed_cmd(source, *flags), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: whole_rows_on_disk(out) > 0 or proc.poll() is not None, "a checkpoint is on disk")
        proc.send_signal(signal.SIGTERM)
    finally:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped = stderr.strip().splitlines()[-1]
    rows = whole_rows_on_disk(out)
    assert stopped == f"embedserve: stopped by SIGTERM: {rows:,} rows are in {out} (--resume continues)"
    assert out.read_bytes().endswith(b"\n")  # whole rows only: the buffer was checkpointed
    resumed = embed(source, *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"; {rows:,} rows were there already" in resumed.stdout
    assert read_output(out)[0] == read_output(clean)[0]


# ---- progress ------------------------------------------------------------------------------------------


def test_off_a_terminal_progress_is_plain_lines_on_stderr_and_the_summary_on_stdout(tmp_path: Path) -> None:
    source = write_input(tmp_path, "text", corpus(200))
    done = embed(
        source, "--model", MODEL, "-o", tmp_path / "v.npy", "--progress-every", "0", "--batch-tokens", "200"
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) > 1 and all(line.startswith("embed: ") for line in lines), done.stderr
    assert "/200 rows (" in lines[0] and " rows/s, " in lines[0] and " tokens/s, ETA " in lines[0]
    assert lines[-1].startswith("embed: 200/200 rows (100%)")
    (summary,) = done.stdout.strip().splitlines()
    assert (
        summary.startswith("embedded 200 rows, ") and f"into {tmp_path / 'v.npy'}; model loaded in" in summary
    )


def test_on_a_terminal_progress_is_a_bar_with_rate_and_eta(tmp_path: Path) -> None:
    source = write_input(tmp_path, "text", corpus(200))
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # as a terminal has
    proc = subprocess.Popen(
        embed_cmd(source, "--model", MODEL, "-o", tmp_path / "v.parquet", "--batch-tokens", "200"),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(controller, 4096)
            except OSError:  # the terminal's other side closed
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=300)
    finally:
        reader.join(30)
        os.close(controller)
    assert proc.returncode == 0, shown.decode(errors="replace")
    bar = shown.decode(errors="replace")
    assert "embed: 100%|" in bar and "200/200 [" in bar and " rows/s, " in bar and "tokens/s]" in bar
    assert "<00:" in bar  # the ETA
    assert stdout.decode().startswith("embedded 200 rows")


# ---- bad input: one line and its exit status -----------------------------------------------------------


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command's only line on stderr, besides progress lines."""
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("embed: ")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def bad_inputs(folder: Path) -> Iterator[tuple[list[str | Path], int, str]]:
    jsonl = folder / "docs.jsonl"
    jsonl.write_text(
        '{"id": "a", "text": "fine"}\n{"id": "b", "text": "also fine"}\n{"id": "c", "body": "x"}\n'
    )
    text = folder / "docs.txt"
    text.write_text("fine\n\nafter an empty line\n")
    long = folder / "long.txt"
    long.write_text("short\n" + "word " * 400 + "\n")
    exists = folder / "exists.jsonl"
    exists.write_text("")
    yield (
        [folder / "nothing.jsonl", "-o", folder / "v.parquet"],
        2,
        f"embedserve: error: no input '{folder / 'nothing.jsonl'}'",
    )
    yield [jsonl, "-o", folder / "v.bin"], 2, "cannot tell the output format of"
    yield (
        [jsonl, "-o", folder / "v.parquet"],
        2,
        (
            "embedserve: error: docs.jsonl line 3: no 'text' field (--text-field names the field that holds "
            "the text) (2 rows before it are in"
        ),
    )
    yield (
        [text, "-o", folder / "t.parquet"],
        2,
        (
            "embedserve: error: docs.txt line 2 (id '2'): the text is an empty string; every input must be "
            "non-empty."
        ),
    )
    yield [long, "-o", folder / "l.parquet"], 2, "long.txt line 2 (id '2'): the text is at least"
    yield (
        [jsonl, "-o", exists],
        2,
        (f"embedserve: error: output {exists} exists: --resume continues it, --overwrite replaces it"),
    )
    yield (
        [jsonl, "-o", folder / "d.parquet", "--dimensions", "64"],
        2,
        ("embedserve: error: --dimensions: The model 'all-MiniLM-L6-v2' does not support"),
    )
    yield (
        [jsonl, "-o", folder / "p.parquet", "--input-type", "poem"],
        2,
        ("embedserve: error: --input-type: 'input_type' must be one of "),
    )
    yield [jsonl, "-o", folder / "m.parquet", "--model", "paraphrase-MiniLM-L3-v2"], 2, "embedserve: error: "
    yield [jsonl, "-o", folder / "x.parquet", "--text-field", "body"], 2, "docs.jsonl line 1: no 'body' field"
    yield [text, "-o", folder / "f.parquet", "--id-field", "key"], 2, "plain text input has no fields"
    yield [jsonl, "-o", jsonl, "--overwrite", "--output-format", "jsonl"], 2, "is the input"


def test_each_bad_input_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    for args, status, message in bad_inputs(tmp_path):
        done = embed(*args, *([] if "--model" in args else ["--model", MODEL]))
        assert done.returncode == status, (args, done.stderr)
        line = one_line(done)
        assert message in line, (args, line)


def test_a_models_file_of_several_models_is_refused_naming_them(tmp_path: Path, models_file: Path) -> None:
    source = write_input(tmp_path, "jsonl", corpus(3))
    done = embed(source, "--models-file", models_file, "-o", tmp_path / "v.parquet")
    assert done.returncode == 2
    assert one_line(done).startswith(
        "embedserve: error: embed runs one model; 4 are declared (all-MiniLM-L6-v2, "
    )


def test_truncate_embeds_an_over_long_text_as_the_api_does(tmp_path: Path) -> None:
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "word " * 400 + "\n")
    done = embed(long, "--model", MODEL, "-o", tmp_path / "v.jsonl", "--truncate")
    assert done.returncode == 0, done.stderr
    assert read_output(tmp_path / "v.jsonl")[2] == [3, 256]


def test_a_resume_from_another_input_is_refused_naming_the_first_row_that_differs(tmp_path: Path) -> None:
    source = write_input(tmp_path, "jsonl", corpus(10))
    out = tmp_path / "v.parquet"
    assert embed(source, "--model", MODEL, "-o", out).returncode == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"x{i}", "text": "t"}) + "\n" for i in range(20)))
    done = embed(other, "--model", MODEL, "-o", out, "--resume")
    assert done.returncode == 2
    assert one_line(done) == (
        "embedserve: error: cannot resume: row 1 of v.parquet has id 'doc-0', but other.jsonl line 1 has id "
        "'x0': the output was not made from this input (--overwrite starts again)"
    )
