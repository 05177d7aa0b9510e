"""Nothing half-written: outputs are built in a temporary directory and renamed when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: Path):
    """Yield a fresh directory beside `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(out, marker: str, what: str) -> None:
    """`--force` replaces only our own outputs: `out` must be absent, an empty directory, or a directory
    holding `marker` (what we write into every such output). Anything else is a one-line UserError."""
    from .errors import UserError

    out = Path(out)
    if not out.exists():
        return
    if out.is_dir() and ((out / marker).is_file() or not any(out.iterdir())):
        return
    raise UserError(f"{out} is not {what} (no {marker}); --force only replaces one, so nothing was deleted: "
                    "choose another --out")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path
