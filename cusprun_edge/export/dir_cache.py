"""Directories kept in the user cache under a key: traced graphs (trace_cache.py) and the build's dense exports
(pipeline/stages.py: the same model, target, plan, corpora and code give the same files in every build).

An entry is stored complete or not at all (written beside, then renamed), and a hit copies its files into the
caller's directory. Each kind keeps its most recently used entries up to a size budget, by bytes rather than
count (the test suite's tiny entries must not push out a real model's), and always the newest. Setting the
kind's environment variable to 0 turns it off.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

INFO_FILE = "entry.json"


def root(kind: str) -> Path:
    from ..model.load import cache_root

    return cache_root() / kind


def enabled(switch: str) -> bool:
    return os.environ.get(switch, "1") != "0"


def lookup(kind: str, key: str, directory: Path, *, switch: str, info: str = INFO_FILE) -> dict | None:
    """Copy the entry `key` into `directory`; its record, or None."""
    entry = root(kind) / key
    info_path = entry / info
    if not enabled(switch) or not info_path.is_file():
        return None
    try:
        record = json.loads(info_path.read_text())
        directory.mkdir(parents=True, exist_ok=True)
        # the files it was stored with, each required: another process may be dropping this entry meanwhile
        for name in record["files"]:
            shutil.copyfile(entry / name, directory / name)
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    os.utime(info_path)  # most recently used
    return record


def store(kind: str, key: str, directory: Path, record: dict, *, files: list[str], keep_bytes: int, switch: str,
          info: str = INFO_FILE) -> None:
    """Keep `files` of `directory` under `key`, then drop the least recently used entries beyond `keep_bytes`."""
    if not enabled(switch):
        return
    base = root(kind)
    tmp = base / f".{key}.tmp-{os.getpid()}"
    final = base / key
    try:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in files:
            shutil.copyfile(directory / name, tmp / name)  # not a hard link: onnx refuses external data with several
        (tmp / info).write_text(json.dumps({**record, "files": files, "stored": time.time()}))
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return  # a full disk or a read-only cache costs the work again next time, nothing else
    used, sizes = {}, {}
    for entry in base.iterdir():
        try:
            used[entry] = (entry / info).stat().st_mtime
            sizes[entry] = sum(f.stat().st_size for f in entry.iterdir())
        except OSError:  # not an entry, or one another process is dropping
            continue
    total = sum(sizes.values())
    for old in sorted(used, key=used.get):
        if total <= keep_bytes or old == final:
            break
        shutil.rmtree(old, ignore_errors=True)
        total -= sizes[old]
