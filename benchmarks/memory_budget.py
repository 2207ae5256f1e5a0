"""Memory as admitted work, at a real model's shapes: a Qwen3-Embedding-0.6B-shaped model (its layers'
shapes: hidden 1024, 16 query and 8 key/value heads of 128, FFN 3072; 2 layers instead of 28 and a
small vocabulary, which change neither a pass's peak nor the attention's) served with the default
memory budget. Prints whether an 8,192-token input is refused and what length the 400 names, then the
resident size before, at the peak of and after the longest input that fits.

    .venv/bin/python benchmarks/memory_budget.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

import hermetic  # noqa: E402, F401  (offline hub, a private cache)
from support import server_process  # noqa: E402
from tiny_models import build_tiny_qwen3_embedding  # noqa: E402


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def main() -> None:
    import torch
    from transformers import Qwen3Config, Qwen3Model

    root = Path(tempfile.mkdtemp(prefix="embedserve-memory-"))
    folder = build_tiny_qwen3_embedding(root / "Qwen3-Embedding-0.6B")
    config = json.loads((folder / "config.json").read_text())
    shapes = {
        "hidden_size": 1024,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 3072,
        "num_hidden_layers": 2,
    }
    dropped = ("architectures", "transformers_version", "model_type")
    kept = {k: v for k, v in config.items() if k not in dropped}
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(**{**kept, **shapes})).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "architectures": ["Qwen3ForCausalLM"]}))
    with server_process("--model", f"qwen={folder}", "--data-dir", str(root / "data")) as served:
        url = f"{served.base}/v1/embeddings"
        refused = httpx.post(url, json={"model": "qwen", "input": [[40] * 8191]}, timeout=600)
        found = re.search(r"at most (\d+) tokens", refused.text)
        print(f"8,192 tokens: {refused.status_code} {refused.json().get('error', {}).get('message')}")
        if found is None:
            return
        fits = int(found.group(1))
        before, started = _status(served.proc.pid, "VmRSS"), time.perf_counter()
        answer = httpx.post(url, json={"model": "qwen", "input": [[40] * (fits - 1)]}, timeout=1800)
        took = time.perf_counter() - started
        peak, after = _status(served.proc.pid, "VmHWM"), _status(served.proc.pid, "VmRSS")
    print("| input | status | seconds | RSS before MiB | peak MiB | after MiB |")
    print("|---|---|---:|---:|---:|---:|")
    print(
        f"| {fits} tokens (the longest that fits) | {answer.status_code} | {took:.1f} | {before >> 20} "
        f"| {peak >> 20} | {after >> 20} |"
    )


if __name__ == "__main__":
    main()
