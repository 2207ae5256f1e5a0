"""Small corpora in every input format, the real `embedserve embed` command (in this process, or as a
subprocess), and the rows of an output (a Parquet file, or a folder of shards) by id."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from embedserve.cli.main import main

MODEL = "all-MiniLM-L6-v2"
WORDS = ["river", "bridge", "engineer", "stone", "arch", "cable", "tower", "wind", "load", "steel", "span"]
#: The last cosine a Ray job's vector may have to the local command's for the same text.
COSINE = 0.9999


def texts(count: int, salt: str = "") -> list[str]:
    """Varied texts of 3 to 40 words, an accent and an emoji among them."""
    out = []
    for i in range(count):
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + (i * 13) % 38))
        out.append(f"{salt}{i}: {words}" + (" Zürich 🚀" if i % 9 == 0 else ""))
    return out


def write_input(path: Path, items: list[str], *, prefix: str = "doc") -> Path:
    """`items` as a file of the format its extension names, with ids PREFIX-0, PREFIX-1, ... (plain text
    carries none: its ids are line numbers). Parquet in row groups of 7."""
    ids = [f"{prefix}-{i}" for i in range(len(items))]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_bytes(
            b"".join(orjson.dumps({"id": k, "text": t}) + b"\n" for k, t in zip(ids, items, strict=True))
        )
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "title", "text"])
            writer.writerows([k, f"title {k}", t] for k, t in zip(ids, items, strict=True))
    elif path.suffix == ".parquet":
        pq.write_table(pa.table({"id": ids, "text": items}), path, row_group_size=7)
    else:
        path.write_text("".join(t + "\n" for t in items), encoding="utf-8")
    return path


def embed(*args: str | Path) -> tuple[int, str, str]:
    """The command in this process (the tests' Ray already joined): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["embed", *map(str, args)])
    return status, out.getvalue(), err.getvalue()


def embed_process(*args: str | Path, **popen: object) -> subprocess.Popen[str]:
    """The real command as a subprocess (stdout and stderr piped)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "embedserve", "embed", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def rows_of(path: Path) -> dict[str, tuple[np.ndarray, int]]:
    """id -> (vector, tokens) of an output; every id once."""
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids), "an id is in the output twice"
    flat = table.column("embedding").combine_chunks().values.to_numpy()
    vectors = flat.reshape(len(table), -1)
    return {
        k: (vectors[i], t)
        for i, (k, t) in enumerate(zip(ids, table.column("tokens").to_pylist(), strict=True))
    }


def assert_same_rows(
    got: dict[str, tuple[np.ndarray, int]], expected: dict[str, tuple[np.ndarray, int]]
) -> None:
    assert sorted(got) == sorted(expected)
    for key, (vector, tokens) in expected.items():
        other, other_tokens = got[key]
        cosine = float(np.dot(vector, other) / (np.linalg.norm(vector) * np.linalg.norm(other)))
        assert cosine >= COSINE, (key, cosine)
        assert other_tokens == tokens, key
