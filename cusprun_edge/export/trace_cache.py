"""Traced fp32 graphs, kept in the user cache so the same model is traced once.

Tracing is most of an export's time (SmolLM2-135M: about 30 s of torch.export, decompositions and onnxscript's
optimizer on 2 cores), and the same dense model is traced again by every build of it, every precision and
plan, and the builder comparison. A graph is stored under a key of everything that decides it: the weights
and config (hashed), the attention kind, the opset, the rotary table length, the source of the modules that
trace and rewrite it, and the versions of torch, onnxscript and onnx_ir. A hit is copied into the
export's directory; the export gates it on parity as it would a fresh trace. The cache keeps the most
recently used graphs up to KEEP_BYTES in all (dir_cache.py), and always the newest. CUSPRUN_EDGE_TRACE_CACHE=0
turns it off.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from . import dir_cache
from .common import DATA_FILE, MODEL_FILE

KEEP_BYTES = 4 * 1024**3  # SmolLM2-135M's fp32 graph is about 0.54 GB, Gemma-3-270M's about 1.1 GB
INFO_FILE = "trace.json"
KIND, SWITCH = "traces", "CUSPRUN_EDGE_TRACE_CACHE"
# the modules whose source decides the traced graph
CODE = ("trace.py", "attention.py", "passes.py", "common.py", "trace_cache.py")


def enabled() -> bool:
    return dir_cache.enabled(SWITCH)


def root() -> Path:
    return dir_cache.root(KIND)


def trace_key(model, attention: str, opset: int, max_positions: int) -> str:
    import torch

    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE:
        h.update((here / name).read_bytes())
    for dist in ("torch", "onnxscript", "onnx-ir", "transformers"):
        try:
            h.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(dist.encode())
    h.update(json.dumps([attention, opset, max_positions, model.config.to_json_string()]).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()[:24]


def lookup(key: str, directory: Path) -> dict | None:
    """Put the cached graph of `key` into `directory` (model.onnx and its data); its record, or None."""
    return dir_cache.lookup(KIND, key, directory, switch=SWITCH, info=INFO_FILE)


def store(key: str, directory: Path, record: dict) -> None:
    """Keep the graph in `directory` under `key` (complete or not at all), then drop the least recently used
    beyond KEEP_BYTES."""
    files = [name for name in (MODEL_FILE, DATA_FILE) if (directory / name).exists()]  # small graphs: no data
    dir_cache.store(KIND, key, directory, record, files=files, keep_bytes=KEEP_BYTES, switch=SWITCH, info=INFO_FILE)
