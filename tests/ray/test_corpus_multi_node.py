"""A corpus job on a Ray cluster of two nodes (two raylets on this machine, one CPU each): the two
single-threaded replicas land on different nodes (each shard names the node that wrote it), and the
output is still the local command's rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
from corpora import MODEL, assert_same_rows, embed, rows_of, texts, write_input

from embedserve.cluster.shards import SHARD_KEY
from rayenv import multi_node_ray


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with multi_node_ray(nodes=2, cpus_per_node=1) as cluster:
        yield cluster


def test_two_replicas_on_two_nodes_write_the_local_commands_rows(cluster: Any, tmp_path: Path) -> None:
    import ray

    source = write_input(tmp_path / "docs.jsonl", texts(60))
    out = tmp_path / "out"
    status, stdout, stderr = embed(
        source, "--model", MODEL, "-o", out, "--engine", "ray", "--replicas", "2", "--piece-bytes", "400"
    )
    assert status == 0, stderr
    assert "with 2 replicas" in stdout
    writers = {
        orjson.loads(pq.read_schema(shard).metadata[SHARD_KEY])["node"]
        for shard in out.glob("part-*.parquet")
    }
    nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    # One CPU a node and one a replica: each node holds one replica, and both wrote shards.
    assert len(nodes) == 2 and writers == nodes
    local = tmp_path / "local.parquet"
    status, _, stderr = embed(source, "--model", MODEL, "-o", local)
    assert status == 0, stderr
    assert_same_rows(rows_of(out), rows_of(local))
