"""Imported first by conftest: tests never download, and see a Hugging Face cache of the session's own
(tests install tiny checkpoints into it under the real repo ids; the developer's cache is never read or
touched)."""

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
