"""`embedserve embed --engine ray` on a local Ray (2 CPUs, shared by the module): every input format, a
folder and a glob give the local command's rows (the same ids, cosine >= 0.9999, the same token counts)
as a folder of Parquet shards with its columns; a run SIGKILLed mid-job, then rerun, ends with every id
once and the shards written before the kill untouched; a bad input or record is one line, exit 2."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from corpora import MODEL, assert_same_rows, embed, embed_process, rows_of, texts, write_input

from embedserve.corpus.output import RunInfo
from embedserve.corpus.parquet_output import schema_of
from rayenv import local_ray

FORMATS = {"jsonl": "docs.jsonl", "csv": "docs.csv", "parquet": "docs.parquet", "text": "docs.txt"}
#: Small pieces, so that a file of a few dozen texts is several shards.
PIECE = ["--piece-bytes", "1500"]


@pytest.fixture(scope="module")
def ray() -> Iterator[Any]:
    with local_ray(num_cpus=2) as ray:
        yield ray


@pytest.fixture(scope="module")
def folder_job(ray: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A folder of one file per format (and a hidden file and a _SUCCESS marker, which are not input),
    embedded by one Ray job with 2 single-threaded replicas: (folder, output, the command's stdout)."""
    folder = tmp_path_factory.mktemp("corpus") / "in"
    for fmt, name in FORMATS.items():
        write_input(folder / name, texts(40, salt=f"{fmt} "), prefix=fmt)
    (folder / ".hidden.jsonl").write_text("not input\n")
    (folder / "_SUCCESS").write_text("")
    out = folder.parent / "out"
    status, stdout, stderr = embed(
        folder, "--model", MODEL, "-o", out, "--engine", "ray", "--replicas", "2", *PIECE
    )
    assert status == 0, stderr
    return folder, out, stdout


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_in_a_folder_gives_the_local_commands_rows(
    folder_job: tuple[Path, Path, str], tmp_path: Path, fmt: str
) -> None:
    folder, out, _ = folder_job
    local = tmp_path / "local.parquet"
    status, _, stderr = embed(folder / FORMATS[fmt], "--model", MODEL, "-o", local)
    assert status == 0, stderr
    expected = rows_of(local)
    if fmt == "text":  # numbered ids, named by their file when the input is several files
        expected = {f"docs.txt:{key}": row for key, row in expected.items()}
    shards = rows_of(out)
    assert_same_rows({k: v for k, v in shards.items() if k in expected or k.startswith(f"{fmt}-")}, expected)


def test_the_output_is_a_folder_of_shards_with_the_local_commands_columns(
    folder_job: tuple[Path, Path, str],
) -> None:
    _, out, stdout = folder_job
    shards = sorted(out.glob("part-*.parquet"))
    # JSONL and text cut into byte ranges, Parquet a shard per row group (40 rows in 7s), CSV one.
    assert len(shards) > 4 + 6 and not list(out.glob(".*"))
    wanted = schema_of(RunInfo(MODEL, 384))
    for shard in shards:
        schema = pq.read_schema(shard)
        assert schema.names == wanted.names and schema.types == wanted.types
        assert schema.metadata[b"embedserve"] == wanted.metadata[b"embedserve"]
    assert stdout.startswith("embedded 160 rows, ") and "tokens/s) into " in stdout
    assert "with 2 replicas" in stdout


def test_a_glob_embeds_only_the_files_it_matches(ray: Any, tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl", "c.csv"):
        write_input(tmp_path / "in" / name, texts(6, salt=name), prefix=name)
    status, stdout, stderr = embed(
        f"{tmp_path}/in/*.jsonl",
        "--model",
        MODEL,
        "-o",
        tmp_path / "out",
        "--engine",
        "ray",
        "--replicas",
        "1",
    )
    assert status == 0, stderr
    assert sorted(rows_of(tmp_path / "out")) == sorted(
        f"{n}-{i}" for n in ("a.jsonl", "b.jsonl") for i in range(6)
    )
    assert stdout.startswith("embedded 12 rows")


def test_a_rerun_after_a_sigkill_keeps_the_shards_written_and_embeds_the_rest(
    ray: Any, tmp_path: Path
) -> None:
    items = texts(240)
    source = write_input(tmp_path / "docs.jsonl", items)
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    run = embed_process(
        source,
        "--model",
        MODEL,
        "-o",
        out,
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--replicas",
        "2",
        "--piece-bytes",
        "1200",
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < 3:
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no shards written"
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.communicate(timeout=30)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    status, stdout, stderr = embed(
        source, "--model", MODEL, "-o", out, "--engine", "ray", "--replicas", "2", "--piece-bytes", "1200"
    )
    assert status == 0, stderr
    assert "pieces were there already" in stdout
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert {name: after[name] for name in before} == before
    assert len(after) > len(before), "the kill came after the last shard"
    assert sorted(rows_of(out)) == sorted(f"doc-{i}" for i in range(240))
    assert not list(out.glob(".*"))


def test_a_bad_record_fails_the_job_naming_it_and_the_other_pieces_are_written(
    ray: Any, tmp_path: Path
) -> None:
    items = texts(60)
    source = write_input(tmp_path / "docs.jsonl", items)
    lines = source.read_bytes().splitlines(keepends=True)
    lines[49] = b'{"id": "doc-49", "text": 7}\n'
    source.write_bytes(b"".join(lines))
    status, stdout, stderr = embed(
        source, "--model", MODEL, "-o", tmp_path / "out", "--engine", "ray", *PIECE
    )
    assert status == 2 and stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("embedserve: error: docs.jsonl line 50: 'text' is a number, not a string")
    written = rows_of(tmp_path / "out")
    assert "doc-0" in written and "doc-49" not in written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nothing.jsonl"], "no input '{tmp}/nothing.jsonl'"),
        (["{tmp}/*.parquet"], "no file matches '{tmp}/*.parquet'"),
        (["{tmp}/docs.jsonl", "--replicas", "0"], "--replicas: must be at least 1, got 0"),
        (["{tmp}/docs.jsonl", "--output-format", "jsonl"], "--engine ray writes Parquet shards"),
    ],
)
def test_a_bad_input_or_flag_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    write_input(tmp_path / "docs.jsonl", texts(3))
    run = embed_process(
        *[a.format(tmp=tmp_path) for a in args], "--model", MODEL, "-o", tmp_path / "out", "--engine", "ray"
    )
    stdout, stderr = run.communicate(timeout=60)
    assert run.returncode == 2 and stdout == ""
    assert stderr == f"embedserve: error: {message.format(tmp=tmp_path)}\n" or (
        stderr.count("\n") == 1 and message.format(tmp=tmp_path) in stderr
    ), stderr
