"""Traced fp32 graphs, kept in the user cache so the same model is traced once.

Tracing is most of an export's time (SmolLM2-135M: about 30 s of torch.export, decompositions and onnxscript's
optimizer on 2 cores), and the same dense model is traced again by every build of it, every precision and
plan, and the builder comparison. A graph is stored under a key of everything that decides it: the weights
and config (hashed), the attention kind, the opset, the rotary table length, the source of the modules that
trace and rewrite it, and the versions of torch, onnxscript and onnx_ir. A hit is copied into the
export's directory; the export gates it on parity as it would a fresh trace. The cache keeps the most
recently used graphs up to KEEP_BYTES in all (by size, not count: the test suite's tiny graphs must not push out
a real model's), and always the newest. CUSPRUN_EDGE_TRACE_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from .common import DATA_FILE, MODEL_FILE

KEEP_BYTES = 4 * 1024**3  # SmolLM2-135M's fp32 graph is about 0.54 GB, Gemma-3-270M's about 1.1 GB
INFO_FILE = "trace.json"
# the modules whose source decides the traced graph
CODE = ("trace.py", "attention.py", "passes.py", "common.py", "trace_cache.py")


def enabled() -> bool:
    return os.environ.get("CUSPRUN_EDGE_TRACE_CACHE", "1") != "0"


def root() -> Path:
    from ..model.load import cache_root

    return cache_root() / "traces"


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
    entry = root() / key
    info = entry / INFO_FILE
    if not enabled() or not info.is_file():
        return None
    try:
        record = json.loads(info.read_text())
        # the files it was stored with, each required: another process may be dropping this entry meanwhile
        for name in record["files"]:
            shutil.copyfile(entry / name, directory / name)
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    os.utime(info)  # most recently used
    return record


def store(key: str, directory: Path, record: dict) -> None:
    """Keep the graph in `directory` under `key` (complete or not at all), then drop the least recently used
    beyond KEEP_BYTES."""
    if not enabled():
        return
    base = root()
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = base / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = [name for name in (MODEL_FILE, DATA_FILE) if (directory / name).exists()]  # small graphs: no data
        for name in files:
            shutil.copyfile(directory / name, tmp / name)  # not a hard link: onnx refuses external data with several
        (tmp / INFO_FILE).write_text(json.dumps({**record, "files": files, "stored": time.time()}))
        final = base / key
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError:
        shutil.rmtree(base / f".{key}.tmp-{os.getpid()}", ignore_errors=True)
        return  # a full disk or a read-only cache costs a trace next time, nothing else
    used, sizes = {}, {}
    for entry in base.iterdir():
        try:
            used[entry] = (entry / INFO_FILE).stat().st_mtime
            sizes[entry] = sum(f.stat().st_size for f in entry.iterdir())
        except OSError:  # not an entry, or one another process is dropping
            continue
    total = sum(sizes.values())
    for old in sorted(used, key=used.get):
        if total <= KEEP_BYTES or old == final:
            break
        shutil.rmtree(old, ignore_errors=True)
        total -= sizes[old]
