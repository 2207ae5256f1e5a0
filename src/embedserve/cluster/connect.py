"""Joining Ray: the cluster at --ray-address, or a local Ray on this machine, on loopback with the
machine's cores and a bounded object store. Ray is an extra; without it one line says how to get it."""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from embedserve.backends.threads import usable_cores
from embedserve.errors import ConfigError

#: A local Ray's object store: the blocks in flight between stages (texts in, vectors out), never a
#: corpus. Ray's default (30% of memory) would take 7 GiB of a 24 GiB machine from the models.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


def require_ray() -> ModuleType:
    """The `ray` module, or ConfigError naming the extra that brings it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ConfigError("Ray is not installed: pip install 'embedserve[ray]' (Ray 2.60 or later)") from None


def connect(
    address: str | None,
    *,
    num_cpus: int | None = None,
    object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES,
) -> bool:
    """Join the cluster at `address` (HOST:PORT or ray://HOST:PORT), or start a local Ray with
    `num_cpus` (default: the cores this process may use) -> whether this call started it (so its caller
    shuts it down). A process already connected (a driver that called ray.init) stays as it is."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address is not None:
        ray.init(address=address, **quiet)
        return True
    ray.init(
        address="local",  # a Ray of its own, never one that `ray start` left running on the machine
        num_cpus=num_cpus or usable_cores(),
        object_store_memory=object_store_bytes,
        _node_ip_address="127.0.0.1",  # a local Ray listens on loopback only
        **quiet,
    )
    return True
