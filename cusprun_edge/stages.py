"""The stage base of the `build` pipeline: its config, the context stages share, and `Stage` itself.

Stages (in their own modules) import this module only; `pipeline.py` composes them. A stage's
fingerprint covers its config keys, its upstream stages' fingerprints, the tool version and a hash of
the source of the modules it runs, so a stage re-runs when its code changed (and every stage after it,
through the upstream fingerprints).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from . import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class BuildConfig:
    target: str = "x86-cpu"
    model: str = "smollm2-135m"
    expert: str = "language=en,domain=general"
    ratio: float = 0.25
    method: str = "cusprun"
    precision: str | None = None  # the target's default when None
    method_options: dict = field(default_factory=dict)
    threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    quick_bench: bool = False
    prompts: list[str] = field(default_factory=list)  # the user's own prompts for the generations
    prune_vocab: bool = False
    max_ppl_ratio: float | None = None  # when set, the prune stage searches the ratio (search.py)


class Progress:
    """What a running stage tells the user; the default shows nothing (the CLI passes a rich one).

    The pipeline calls `begin` and `end` around each stage it runs; the stage calls `start` (what it
    does now, and how many steps when it knows) and `update`."""

    def begin(self, stage: str, own_progress: bool = False) -> None:
        pass

    def end(self) -> None:
        pass

    def start(self, description: str, total: float | None = None) -> None:
        pass

    def update(self, description: str | None = None, advance: float = 0, total: float | None = None) -> None:
        pass


class BuildContext:
    """What stages share while one build runs: the config, the output root, and loaded objects."""

    def __init__(self, config: BuildConfig, out: Path, progress: Progress | None = None):
        self.config = config
        self.out = out
        self.progress = progress or Progress()
        self._model = None
        self.fingerprints: dict[str, str] = {}

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def dense(self):
        """The dense model and tokenizer (loaded once per build, on first use)."""
        if self._model is None:
            from .models import load_model

            self._model = load_model(
                self.config.model, trust_remote_code=self.config.trust_remote_code,
                allow_pickle=self.config.allow_pickle,
            )
        return self._model


def _module_files(module: str) -> list[Path]:
    """The source files of `cusprun_edge.<module>`: one .py, or every .py of a subpackage."""
    package = PACKAGE_DIR / module
    if package.is_dir():
        return sorted(package.rglob("*.py"))
    single = PACKAGE_DIR / f"{module}.py"
    return [single] if single.is_file() else []


@lru_cache(maxsize=None)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_hash(modules: tuple[str, ...]) -> str:
    """sha256 over the source of `modules` (names inside this package), in a stable order."""
    digest = hashlib.sha256()
    for module in sorted(modules):
        for path in _module_files(module):
            st = path.stat()
            digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
            digest.update(_file_digest(path, st.st_mtime_ns, st.st_size).encode())
    return digest.hexdigest()[:16]


class Stage:
    name: str = ""
    depends: tuple[str, ...] = ()
    # the package modules whose code decides this stage's output: a change to any re-runs the stage
    modules: tuple[str, ...] = ()
    # a stage that draws its own progress bar (scoring); the CLI then shows none for it
    own_progress: bool = False

    def config_keys(self) -> tuple[str, ...]:
        return ()

    def fingerprint(self, ctx: BuildContext) -> str:
        cfg = asdict(ctx.config)
        parts = {k: cfg[k] for k in self.config_keys()}
        parts["upstream"] = [ctx.fingerprints[d] for d in self.depends]
        parts["version"] = __version__
        parts["code"] = code_hash(tuple(self.modules))
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, ctx: BuildContext, work: Path) -> dict:
        raise NotImplementedError
