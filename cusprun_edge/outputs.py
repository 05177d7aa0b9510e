"""One output policy for every subcommand: never delete or overwrite what the tool did not write.

- An output that already exists (a file, or a directory that is not empty) is refused unless `--force`;
  with `--force` only an output this tool wrote is replaced (a score file, an expert, an export, a
  validate/bench record, a report), and a directory only when every file in it is one the tool wrote.
- `--out` equal to or inside one of the command's inputs is refused.
- Path problems (a parent that is a file, a parent we cannot write in, a name too long, a directory where
  a file goes) are one line before any work starts.
- Everything is written in a staging directory beside the output (`OUT.tmp-XXXX`, its marker file inside),
  locked while its run is alive; the temporary files of the libraries (tempfile) go there too. Success
  renames the result into place; failure or Ctrl-C removes it; a run killed with SIGKILL leaves it, and the
  next run writing the same output removes it (its lock is free).
- A build directory is written by one run at a time (an advisory lock on the directory) and resumed only
  when it holds its own build record.

Ctrl-C: the command registers what an interrupt keeps (`on_interrupt`); `cli.main` prints it in one line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .errors import UserError

STAGING_MARKER = ".cusprun-staging"
BUILD_RECORD = "build.json"
BUILD_RECORD_KEYS = {"target", "model", "expert", "ratio", "method"}
_TMP_SUFFIX_BYTES = 16  # ".tmp-" and mkdtemp's 8 random characters, with a margin


# --------------------------------------------------------------------------- what is ours


@dataclass(frozen=True)
class Owner:
    """How to tell an output this tool wrote: `is_ours(path)`, and for a directory the names of its files
    the tool wrote (`own_files(path)`, relative POSIX paths); None when any file in it is the tool's."""

    what: str  # "an expert directory", "a score file", ...
    is_ours: Callable[[Path], bool]
    own_files: Callable[[Path], set[str]] | None = None


def _json_object(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def json_record(what: str, *keys: str) -> Owner:
    """A JSON record the tool writes (validate.json, bench.json): an object with these keys."""
    return Owner(what, lambda p: p.is_file() and (d := _json_object(p)) is not None and set(keys) <= set(d))


def _is_score_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(min(n, 1 << 24))
        meta = json.loads(header).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return "cusprun" in meta


SCORES = Owner("a cusprun-edge score file", lambda p: p.is_file() and _is_score_file(p))

# what `save_expert` writes: the model and tokenizer (transformers' names) and its own record
_EXPERT_NAMES = ("config.json", "generation_config.json", "cusprun.json", "chat_template.jinja", "chat_template.json",
                 "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.json",
                 "tokenizer_config.json", "tokenizer.model", "model.safetensors.index.json",
                 "modeling_cusprun.py")  # expert_io.REMOTE_CODE_FILE: transformers' trust_remote_code loader


def _expert_files(path: Path) -> set[str]:
    own = {p.name for p in path.iterdir() if p.is_file() and (p.name in _EXPERT_NAMES or p.suffix == ".safetensors")}
    compat = path / "hf-compat"  # the zero-padded copy `prune --hf-compat` writes inside (expert_io.HF_COMPAT_DIR)
    if (compat / "cusprun-hf-compat.json").is_file() and not compat.is_symlink():
        own |= {f"hf-compat/{name}" for name in _expert_files(compat) | {"cusprun-hf-compat.json"}}
    return own


EXPERT = Owner("an expert directory (cusprun.json)", lambda p: (p / "cusprun.json").is_file(), _expert_files)


def _export_files(path: Path) -> set[str]:
    manifest = _json_object(path / "manifest.json") or {}
    files = manifest.get("files")
    return {*(files if isinstance(files, dict) else {}), "manifest.json", "export.log"}


EXPORT = Owner("an export directory (manifest.json)", lambda p: (p / "manifest.json").is_file(), _export_files)
GGUF_EXPORT = Owner("an export directory (manifest.json)", lambda p: (p / "manifest.json").is_file())

def _report_files(path: Path) -> set[str]:
    """report.json/.md/.html, its plots (PNG) and, in a build, the report stage's record."""
    return {p.name for p in path.iterdir() if p.is_file() and (p.name.startswith("report.") or p.suffix == ".png"
                                                               or p.name == "stage.json")}


REPORT = Owner("a report directory (report.json)", lambda p: (p / "report.json").is_file(), _report_files)


# --------------------------------------------------------------------------- checks before any work


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(path.anchor or "/")


def check_path(out: Path, option: str = "--out") -> None:
    """The output's own name and where it goes: one line for what would fail when writing."""
    absolute = Path(os.path.abspath(out))
    if not out.name or out.name in (".", ".."):
        raise UserError(f"{option} {out} names no file or directory; pass a path such as ./out")
    ancestor = _existing_ancestor(absolute)
    if not ancestor.is_dir():
        raise UserError(f"{option} {out}: {ancestor} is a file, not a directory; choose another {option}")
    longest = max(len(os.fsencode(part)) for part in absolute.relative_to(ancestor).parts)
    if longest + _TMP_SUFFIX_BYTES > _name_max(ancestor):
        raise UserError(f"{option} {out}: a name in it is too long for the file system "
                        f"(at most {_name_max(ancestor) - _TMP_SUFFIX_BYTES} bytes here); choose a shorter one")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write in {ancestor} (permission denied); choose another {option}")


def check_not_inside(out: Path, inputs: Iterable, option: str = "--out") -> None:
    """`out` must be neither one of the inputs nor inside one (a model directory, a corpus folder, ...)."""
    target = Path(os.path.realpath(out))
    for source in inputs:
        if source is None:
            continue
        path = Path(str(source)).expanduser()
        if not path.exists():
            continue
        real = Path(os.path.realpath(path))
        if target == real or real in target.parents:
            raise UserError(f"{option} {out} is {'the input' if target == real else 'inside the input'} {source}; "
                            f"choose an {option} outside your inputs")


def check_output(out, *, kind: str, force: bool = False, owner: Owner | None = None, inputs: Iterable = (),
                 option: str = "--out") -> Path:
    """Refuse (one line, nothing touched) an output this command may not write. `kind`: "file" or "dir".
    Returns `out` with `~` expanded."""
    out = Path(out).expanduser()
    check_path(out, option)
    check_not_inside(out, inputs, option)
    if out.is_symlink():
        raise UserError(f"{option} {out} is a symbolic link; choose another {option}")
    if not out.exists():
        return out
    if kind == "file":
        if out.is_dir():
            example = out / ("scores.safetensors" if owner is SCORES else "out.json")
            raise UserError(f"{option} {out} is a directory; pass the path of a file (e.g. {example})")
        if not force:
            raise UserError(f"{out} already exists; choose another {option} or pass --force (it replaces only a file "
                            "cusprun-edge wrote)")
        if owner is not None and not owner.is_ours(out):
            raise UserError(f"{out} is not {owner.what}; --force replaces only what cusprun-edge wrote, so nothing "
                            f"was touched: choose another {option}")
        return out
    if not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a directory; choose another {option}")
    if not any(out.iterdir()):
        return out
    if not force:
        raise UserError(f"{out} already exists and is not empty; choose another {option} or pass --force (it "
                        "replaces only an output cusprun-edge wrote)")
    check_replaceable(out, owner, option)
    return out


def check_replaceable(out: Path, owner: Owner | None, option: str = "--out") -> None:
    """`--force` on an existing directory: it must be ours, and every file in it one we wrote."""
    if owner is None or not owner.is_ours(out):
        what = owner.what if owner else "an output of cusprun-edge"
        raise UserError(f"{out} is not {what}; --force replaces only what cusprun-edge wrote, so nothing was "
                        f"touched: choose another {option}")
    if owner.own_files is None:
        return
    own = owner.own_files(out)
    foreign = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                     if (p.is_file() or p.is_symlink()) and p.relative_to(out).as_posix() not in own)
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{out} holds files cusprun-edge did not write ({listed}); --force replaces only its own "
                        f"output, so nothing was touched: move them or choose another {option}")


# --------------------------------------------------------------------------- staging


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def clear_stale(out: Path) -> list[Path]:
    """Remove the staging directories a killed run left beside `out` (marked as ours, lock free)."""
    removed = []
    out = Path(out)
    if not out.parent.is_dir():
        return removed
    for path in out.parent.glob(glob.escape(out.name) + ".tmp-*"):
        if path.is_symlink() or not path.is_dir() or not (path / STAGING_MARKER).is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def temporary_files_in(directory: Path):
    """Temporary files of this process (tempfile) and of the processes it starts (TMPDIR) go to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(directory)
    os.environ["TMPDIR"] = str(directory)
    try:
        yield directory
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last) so a failure can remove them."""
    created = []
    for parent in reversed([directory, *directory.parents]):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def _remove_created(created: list[Path]) -> None:
    for directory in reversed(created):
        try:
            directory.rmdir()  # only when still empty
        except OSError:
            break


class Staging:
    """A locked directory beside the output: `path` is where the output is written (a file or a directory
    named like it), `tmp` holds temporary files; `commit()` renames `path` into place."""

    def __init__(self, out: Path, kind: str):
        self.out, self.kind = Path(out), kind
        self.root = self.path = self.tmp = None
        self._fd = None
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self):
        clear_stale(self.out)
        self._created = _make_parents(Path(os.path.abspath(self.out)).parent)
        try:
            self.root = Path(tempfile.mkdtemp(prefix=self.out.name + ".tmp-", dir=self.out.parent))
            self._fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # held until the run ends: its files are alive
            (self.root / STAGING_MARKER).write_text(f"{os.getpid()}\n")
            self.path = self.root / self.out.name
            if self.kind == "dir":
                self.path.mkdir()
            self.tmp = self.root / "tmp"
            self._temp = temporary_files_in(self.tmp)
            self._temp.__enter__()
        except BaseException:
            self._cleanup(failed=True)
            raise
        return self

    def commit(self) -> Path:
        """Put the finished output in place (a directory replaces a previous one, checked by the caller)."""
        if self.kind == "file":
            if self.out.is_dir():
                raise UserError(f"{self.out} became a directory while it was written; nothing was replaced")
            os.replace(self.path, self.out)
        else:
            old = None
            if self.out.exists() or self.out.is_symlink():
                old = self.root / "replaced"
                os.rename(self.out, old)
            try:
                os.rename(self.path, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out)
                raise
        self.committed = True
        return self.out

    def _cleanup(self, failed: bool) -> None:
        if getattr(self, "_temp", None) is not None:
            self._temp.__exit__(None, None, None)
            self._temp = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if failed:
            _remove_created(self._created)

    def __exit__(self, exc_type, exc, tb):
        self._cleanup(failed=not self.committed)
        return False


def staging(out, kind: str = "file") -> Staging:
    return Staging(Path(out), kind)


@contextlib.contextmanager
def atomic_directory(out: Path):
    """Yield a fresh directory; on success it replaces `out`, on any failure it is removed."""
    with staging(out, "dir") as stage:
        yield stage.path
        stage.commit()


@contextlib.contextmanager
def write_file(out: Path):
    """Yield a path to write the output file at; renamed onto `out` when the block succeeds."""
    with staging(out, "file") as stage:
        yield stage.path
        stage.commit()


# --------------------------------------------------------------------------- build directories


def is_build_directory(out: Path) -> bool:
    record = _json_object(Path(out) / BUILD_RECORD)
    return record is not None and BUILD_RECORD_KEYS <= set(record)


def check_build_directory(out, inputs: Iterable = (), option: str = "--out") -> Path:
    """A build writes into a new or empty directory, or resumes its own (it holds build.json)."""
    out = Path(out).expanduser()
    check_path(out, option)
    check_not_inside(out, inputs, option)
    if out.is_symlink() and not out.is_dir():
        raise UserError(f"{option} {out} is a symbolic link; choose another {option}")
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a directory; choose another {option}")
    if out.is_dir() and any(out.iterdir()) and not is_build_directory(out):
        raise UserError(f"{out} is not empty and is not a build directory (no {BUILD_RECORD} written by "
                        f"cusprun-edge); nothing in it was touched: choose another {option}")
    return out


class BuildLock:
    """Check, create and lock a build directory for one run. `created`: the run made the directory."""

    def __init__(self, out: Path, inputs: Iterable = ()):
        self.out = Path(out)
        self.inputs = list(inputs)
        self.created: list[Path] = []
        self._fd = None

    def __enter__(self):
        check_build_directory(self.out, self.inputs)
        self.created = _make_parents(self.out)
        try:
            self._fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
            if not _try_lock(self._fd):
                raise UserError(f"another build is writing here ({self.out}); wait for it to finish or choose "
                                "another --out")
            check_build_directory(self.out)  # it may have changed while we waited for nothing
        except BaseException:
            self.release()
            _remove_created(self.created)
            raise
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove_created(self) -> None:
        _remove_created(self.created)

    def __exit__(self, exc_type, exc, tb):
        self.release()
        return False


# --------------------------------------------------------------------------- interrupts

_interrupt_note: Callable[[], str] | str | None = None


def on_interrupt(note: Callable[[], str] | str | None) -> None:
    """What an interrupt of the running command keeps and how to resume, for `cli.main`'s one line."""
    global _interrupt_note
    _interrupt_note = note


def interrupt_message() -> str:
    note = _interrupt_note() if callable(_interrupt_note) else _interrupt_note
    return f"interrupted: {note}" if note else "interrupted: nothing was written"
