"""The stage base of the `build` pipeline: the context stages share, progress, and `Stage` itself.

The stages (stages.py) build on this module; build.py runs them. A stage's
fingerprint covers its config keys, a digest of the inputs they name (the model's files, the corpora, the
target profile: `INPUTS`), its upstream stages' fingerprints, the tool version and a hash of the code it
runs, found from its imports (`stage_code`), so a stage re-runs when any of them changed (and every stage
after it, through the upstream fingerprints).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

from .. import __version__
from .config import BuildConfig

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # cusprun_edge/


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
        self._streamed = None
        self.fingerprints: dict[str, str] = {}
        self._inputs: dict[str, str] = {}

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def input_digest(self, key: str) -> str:
        """A digest of what the config value `key` names outside the build (`INPUTS`: the model's files, the
        expert's corpora, the target profile), so a stage whose config keys name it re-runs when it changes.
        One that cannot be read digests as such: the stage that reads it reports why."""
        if key not in self._inputs:
            try:
                self._inputs[key] = INPUTS[key](getattr(self.config, key))
            except Exception:
                self._inputs[key] = "unreadable"
        return self._inputs[key]

    def dense(self):
        """The dense model and tokenizer (loaded once per build, on first use)."""
        if self._model is None:
            from ..model.load import load_model

            self._streamed = None  # the whole model holds everything the streamed one did
            self._model = load_model(
                self.config.model, trust_remote_code=self.config.trust_remote_code,
                allow_pickle=self.config.allow_pickle,
            )
        return self._model

    def streamed(self):
        """The dense model and tokenizer for stages that sweep it layer by layer (model/sequential.py): its
        decoder layers stay on disk until a sweep reads one (model/lazy.py). The whole model once loaded."""
        if self._model is not None:
            return self._model
        if self._streamed is None:
            from ..model.lazy import lazy_model

            self._streamed = lazy_model(self.config.model, trust_remote_code=self.config.trust_remote_code,
                                        allow_pickle=self.config.allow_pickle)
        return self._streamed


def _files_digest(paths) -> str:
    """Names, sizes and modification times (a model is GBs: its bytes are not read on every build)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        st = path.stat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _model_digest(source: str) -> str:
    from ..model.load import EMBEDDED, resolve_source

    kind, where = resolve_source(source)
    if kind == "embedded":  # by content: its path is inside each checkout's own .venv (a few hundred MB to read)
        from ..fsutil import sha256_file

        return sha256_file(Path(EMBEDDED[where].locate()))[:16]
    if kind == "hub":
        return str(where)
    where = Path(where)
    return _files_digest([where] if where.is_file() else [p for p in where.rglob("*") if p.is_file()])


def _corpora_digest(expert: str) -> str:
    from ..config.corpora import ExpertSpec

    corpora = ExpertSpec.parse(expert).corpora()  # every split: calibration, held apart, held out, multiple choice
    text = json.dumps({name: asdict(c) for name, c in corpora.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _target_digest(target: str) -> str:
    from ..config.targets import resolve_target

    profile = {k: v for k, v in asdict(resolve_target(target)).items() if k != "path"}  # its content, not its place
    return hashlib.sha256(json.dumps(profile, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _prompts_digest(_user_prompts) -> str:
    """The built-in prompts and checked prompts the generate stage answers (the user's own are in the config)."""
    from ..config.corpora import calib_root

    h = hashlib.sha256()
    for name in ("prompts.json", "checks.json"):
        path = calib_root() / name
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:16]


# config keys that name an input from outside the build -> how to digest it
INPUTS = {"model": _model_digest, "expert": _corpora_digest, "target": _target_digest, "prompts": _prompts_digest}


# --------------------------------------------------------------------------- the code a stage runs
#
# A stage's fingerprint hashes the source it runs, found from its imports rather than kept by hand (a
# hand list once forgot damage.py, and a changed prune was silently skipped): its own module, then every
# package module imported by the statements of its module that the stage class reaches by name, every
# module those import, and so on, counting imports inside functions and relative imports.


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted name -> source file of every module of the package at `package_dir` (`x/__init__.py` is `x`)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


@lru_cache(maxsize=None)
def _parsed(path: Path, mtime_ns: int, size: int) -> tuple[str, ast.Module, list]:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    return text, tree, _import_nodes(tree.body)


def _parse(path: Path) -> tuple[str, ast.Module, list]:
    """A file's text, syntax tree and every import statement in it (cached until the file changes)."""
    return _parsed(path, *_stat(path))


def _import_nodes(stmts) -> list:
    return [n for top in stmts for n in ast.walk(top) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _imported(imports: list, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The package modules that the import statements `imports` of `module` import."""
    found = set()

    def nearest(name: str) -> str | None:  # `from .export import export_model` imports the package export
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    for node in imports:
        if isinstance(node, ast.Import):
            found.update(nearest(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = (module if is_package else module.rpartition(".")[0]).split(".")
                if node.level - 1 >= len(parts):
                    continue
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import arch` imports the module arch
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else nearest(base))
    found.discard(None)
    found.discard(module)
    return found


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (functions included)."""
    modules = package_modules(package_dir)
    graph = _graph(tuple((name, path, *_stat(path)) for name, path in modules.items()))
    return {name: set(deps) for name, deps in graph.items()}


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=8)
def _graph(files: tuple) -> dict[str, set[str]]:  # keyed by every file's stat: recomputed after an edit
    modules = {name: path for name, path, *_ in files}
    return {name: _imported(_parse(path)[2], name, path.name == "__init__.py", modules)
            for name, path in modules.items()}


def _reached(tree: ast.Module, qualname: str) -> list[ast.stmt]:
    """The top-level statements of a module that the class `qualname` reaches: itself, the functions,
    classes and assignments it names (transitively), and the module's imports and other statements."""
    defined: dict[str, list[ast.stmt]] = {}
    always = []
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(stmt.name, []).append(stmt)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        defined.setdefault(name.id, []).append(stmt)
        elif not (i == 0 and isinstance(stmt, ast.Expr)):  # the docstring runs nothing
            always.append(stmt)
    todo = [*always, *defined.get(qualname.split(".")[0], [])]
    seen: dict[int, ast.stmt] = {}
    while todo:
        stmt = todo.pop()
        if id(stmt) in seen:
            continue
        seen[id(stmt)] = stmt
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                todo.extend(defined.get(node.id, []))
    return sorted(seen.values(), key=lambda s: s.lineno)


@lru_cache(maxsize=None)
def _own_imports(path: Path, mtime_ns: int, size: int, qualname: str) -> list:
    """The import statements among what the class `qualname` reaches in its own module."""
    return _import_nodes(_reached(_parsed(path, mtime_ns, size)[1], qualname))


def stage_code(stage_cls: type, package_dir: Path = PACKAGE_DIR) -> dict[str, str]:
    """The code `stage_cls` runs: {file: sha256} of its own module (all of it) and of every package module
    that what the stage reaches of its own module imports, transitively. Only the imports are followed from
    the reached part: stages.py's prune stage does not run report/render.py, which its report stage imports."""
    modules = package_modules(package_dir)
    own = stage_cls.__module__
    own_path = modules.get(own) or Path(inspect.getsourcefile(stage_cls))  # a stage from outside the package
    imports = _own_imports(own_path, *_stat(own_path), stage_cls.__qualname__)
    graph = import_graph(package_dir)
    todo = list(_imported(imports, own, own_path.name == "__init__.py", modules))
    closure: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(graph[name])
    base = package_dir.parent
    code = {modules[m].relative_to(base).as_posix(): hashlib.sha256(_parse(modules[m])[0].encode()).hexdigest()
            for m in closure}
    key = own_path.relative_to(base).as_posix() if own in modules else own_path.name
    code[key] = hashlib.sha256(_parse(own_path)[0].encode()).hexdigest()
    return dict(sorted(code.items()))


def code_hash(stage_cls: type, package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 over the code `stage_cls` runs (`stage_code`), in a stable order."""
    return hashlib.sha256(json.dumps(stage_code(stage_cls, package_dir)).encode()).hexdigest()[:16]


def content_key(ctx: BuildContext, stages: tuple[type, ...], keys: tuple[str, ...], **extra) -> str:
    """A key of what decides a result from content alone, the same in every checkout and build (a fingerprint holds
    its upstream stages' finishing times, so it is not): the code `stages` run, the config values `keys`, what the
    inputs they name hold (the model's files, the corpora, the target profile), the tool and the libraries that
    compute, and `extra`. The user cache (stages.py) keeps results under it."""
    from ..export.package import library_versions

    cfg = asdict(ctx.config)
    parts = {"code": [code_hash(s) for s in stages], "config": {k: cfg[k] for k in keys},
             "inputs": {k: ctx.input_digest(k) for k in keys if k in INPUTS}, "version": __version__,
             "libraries": library_versions(), **extra}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class Stage:
    name: str = ""
    depends: tuple[str, ...] = ()
    # a stage that draws its own progress bar (scoring); the CLI then shows none for it
    own_progress: bool = False

    def config_keys(self) -> tuple[str, ...]:
        return ()

    def fingerprint(self, ctx: BuildContext) -> str:
        cfg = asdict(ctx.config)
        parts = {k: cfg[k] for k in self.config_keys()}
        parts["inputs"] = {k: ctx.input_digest(k) for k in self.config_keys() if k in INPUTS}
        parts["upstream"] = [ctx.fingerprints[d] for d in self.depends]
        parts["version"] = __version__
        parts["code"] = code_hash(type(self))
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def code_modules(self) -> list[str]:
        """The source files whose code this stage runs (its fingerprint hashes them)."""
        return list(stage_code(type(self)))

    def run(self, ctx: BuildContext, work: Path) -> dict:
        raise NotImplementedError
