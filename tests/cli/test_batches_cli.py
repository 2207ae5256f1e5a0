"""`embedserve batches list|show|cancel`: an operator's view of every key's batches in the database (the
CLI as a subprocess), as the API's JSON or a table; an unknown id is one line and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from embedserve.batches.store import BatchStore
from embedserve.db import open_database
from embedserve.files import FileStore


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedserve", "batches", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


def cli_json(data_dir: Path, *args: str) -> Any:
    result = cli(data_dir, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def make_batches(data_dir: Path) -> list[str]:
    db = open_database(None, data_dir)
    try:
        files = FileStore(db, data_dir / "files", max_bytes=1 << 20, min_free=0, expiry_s=86400)
        for i in range(3):
            files.register(files.new_record(f"file-{i:032x}", "key_a", "in.jsonl", "batch", 1))
        store = BatchStore(db)
        return [
            store.create(
                batch_id=f"batch_0000000000000{i}",
                owner=owner,
                input_file_id=f"file-{i:032x}",
                endpoint="/v1/embeddings",
                completion_window="24h",
                metadata={"n": str(i)},
                window_s=86400,
            ).id
            for i, owner in enumerate(["key_a", "key_b", "key_a"])
        ]
    finally:
        db.close()


def test_list_shows_every_keys_batches_newest_first(tmp_path: Path) -> None:
    ids = make_batches(tmp_path)
    listed = cli_json(tmp_path, "list")
    assert [b["id"] for b in listed["data"]] == ids[::-1]
    assert [b["owner"] for b in listed["data"]] == ["key_a", "key_b", "key_a"]
    assert listed["data"][0]["status"] == "validating" and not listed["has_more"]
    page = cli_json(tmp_path, "list", "--limit", "1", "--after", ids[2])
    assert [b["id"] for b in page["data"]] == [ids[1]] and page["has_more"]
    table = cli(tmp_path, "list")
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split()[:3] == ["ID", "STATUS", "OWNER"]
    assert len(table.stdout.splitlines()) == 4


def test_show_and_cancel_one_batch(tmp_path: Path) -> None:
    ids = make_batches(tmp_path)
    shown = cli_json(tmp_path, "show", ids[1])
    assert shown["id"] == ids[1] and shown["metadata"] == {"n": "1"} and shown["object"] == "batch"
    cancelled = cli_json(tmp_path, "cancel", ids[1])
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"]
    assert cli_json(tmp_path, "show", ids[1])["status"] == "cancelling"


def test_an_unknown_batch_is_one_line_and_exit_1(tmp_path: Path) -> None:
    make_batches(tmp_path)
    for action in ("show", "cancel"):
        result = cli(tmp_path, action, "batch_nope")
        assert result.returncode == 1
        assert result.stderr.strip() == "embedserve: error: No such batch: batch_nope"
