"""Imported first by conftest: tests never download, and see a Hugging Face cache and a data dir of the
session's own (tests install tiny checkpoints into the cache under the real repo ids; the developer's
cache and data dir are never read or touched)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HF_HOME = tempfile.mkdtemp(prefix="embedserve-test-hf-")
os.environ["HF_HOME"] = HF_HOME
os.environ.pop("HF_HUB_CACHE", None)
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
# Exported ONNX graphs: shared by the session's servers (each model is exported once), then removed.
DATA_DIR = tempfile.mkdtemp(prefix="embedserve-test-data-")
os.environ["EMBEDSERVE_DATA_DIR"] = DATA_DIR
atexit.register(shutil.rmtree, DATA_DIR, ignore_errors=True)
# Ray on loopback only: a node's address is 127.0.0.1 rather than the machine's (Ray reads this switch,
# meant for single-machine platforms, when it is imported; the tests' several-raylet clusters need it,
# since Ray turns a loopback address given to ray.init into the machine's). Ray's usage reporting off.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
