"""Nothing half-written: outputs are built in a temporary directory and renamed when complete."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def atomic_directory(out: Path):
    """Yield a fresh directory beside `out`; on success it replaces `out`, on any failure it is removed
    (outputs.py: locked while alive, a killed run's leftovers removed by the next run)."""
    from .outputs import atomic_directory as staged

    with staged(Path(out)) as tmp:
        yield tmp


def check_replaceable(out, marker: str, what: str) -> None:
    """`--force` replaces only our own outputs: `out` must be absent, an empty directory, or a directory
    holding `marker` (what we write into every such output) and only files we wrote. Anything else is a
    one-line UserError (outputs.py holds the policy)."""
    from . import outputs

    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    owner = outputs.EXPERT if marker == "cusprun.json" else \
        outputs.Owner(f"{what} (no {marker})", lambda p: (p / marker).is_file())
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"{out} is not {what}; --force only replaces one, so nothing was deleted: choose another --out")
    outputs.check_replaceable(out, owner)


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
