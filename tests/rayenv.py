"""A local Ray for the tests: started once per module that asks for it (`num_cpus=2`, a small object
store, loopback only: tests/hermetic.py), shut down after. Ray's own test cluster utility (several
raylets on this machine) for the tests whose actors must land on different nodes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

OBJECT_STORE_BYTES = 128 * 1024**2


@contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[Any]:
    import ray

    ray.init(
        address="local",  # always a Ray of its own: never one that another process on this machine runs
        num_cpus=num_cpus,
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def multi_node_ray(nodes: int = 2, cpus_per_node: int = 1) -> Iterator[Any]:
    """`nodes` raylets on this machine, each with its own resources, and a driver connected to them."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": cpus_per_node,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "node_ip_address": "127.0.0.1",
        },
    )
    for _ in range(nodes - 1):
        cluster.add_node(
            num_cpus=cpus_per_node, object_store_memory=OBJECT_STORE_BYTES, node_ip_address="127.0.0.1"
        )
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
