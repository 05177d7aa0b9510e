"""Stage fingerprints from real imports: editing any module a stage's code imports (transitively, imports
inside functions and relative imports included) changes that stage's code hash and no other's; the
package's import graph has no cycle."""

import shutil

from conftest import REPO

from cusprun_edge.pipeline import build as pipeline
from cusprun_edge.pipeline.stage import code_hash, import_graph, stage_code


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_package_imports_have_no_cycle():
    graph = import_graph()
    # the graph sees imports inside functions and relative imports from a subpackage
    assert "cusprun_edge.measure.bench" in graph["cusprun_edge.pipeline.stages"]  # imported inside BenchStage.run
    assert "cusprun_edge.model.expert_io" in graph["cusprun_edge.model.load"]
    assert "cusprun_edge" in graph["cusprun_edge.export.package"]  # `from .. import __version__`, in a function
    assert _cycles(graph) == []


# the packages from the bottom up: a package imports only those before it (README, "Architecture")
LAYERS = ("errors", "outputs", "fsutil", "library_logs", "config", "model", "export", "measure", "prune", "report",
          "pipeline", "console", "cli")


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: cusprun_edge itself (its __version__)


def test_packages_import_downwards_only():
    """Every import, inside functions too, goes from a package to one below it in LAYERS, so no stage's
    family imports the pipeline that composes it and the folders read in the order of the data flow."""
    graph = import_graph()
    assert {_package(m) for m in graph} - {None} == set(LAYERS)  # a new package takes a place in LAYERS
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if _package(a) and _package(b) and _package(a) != _package(b)
                    and LAYERS.index(_package(b)) > LAYERS.index(_package(a)))
    assert upward == []


def test_cycle_finder_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "cusprun_edge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import g\n    return g\n")
    (pkg / "sub" / "c.py").write_text("def g():\n    from ..a import b\n    return b\n")
    graph = import_graph(pkg)
    assert graph["cusprun_edge.b"] == {"cusprun_edge.sub.c"}
    assert _cycles(graph) == [["cusprun_edge.a", "cusprun_edge.b", "cusprun_edge.sub.c"]]


def test_editing_a_module_changes_exactly_the_stages_that_run_it(tmp_path):
    """In a copy of the package: append a comment to each module in turn; the code hash of every stage
    whose module is that one or imports it (transitively) changes, and no other stage's."""
    pkg = tmp_path / "cusprun_edge"
    shutil.copytree(REPO / "cusprun_edge", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    classes = {s.name: type(s) for s in pipeline.STAGES}
    files = {name: set(stage_code(cls, pkg)) for name, cls in classes.items()}
    base = {name: code_hash(cls, pkg) for name, cls in classes.items()}
    # what the hand-kept lists missed, and what a stage must not depend on
    assert {"cusprun_edge/prune/damage.py", "cusprun_edge/prune/reconstruct.py", "cusprun_edge/pipeline/search.py",
            "cusprun_edge/measure/evaluate.py", "cusprun_edge/prune/methods.py"} <= files["prune"]
    assert {f"cusprun_edge/export/{m}.py" for m in ("__init__", "build", "trace", "precision", "quant_plan",
                                                    "calibration", "parity", "package")} <= files["export"]
    assert "cusprun_edge/report/render.py" not in files["prune"] | files["export"] | files["bench"]

    edited = 0
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(tmp_path).as_posix()
        text = path.read_text()
        path.write_text(text + "\n# an edit\n")
        changed = {name for name, cls in classes.items() if code_hash(cls, pkg) != base[name]}
        expected = {name for name in classes if rel in files[name]}
        assert changed == expected, rel
        edited += bool(expected)
        path.write_text(text)
    assert edited >= 20


def test_imports_are_followed_from_what_the_stage_reaches():
    """stages.py's prune stage reaches `_search_ratio`, whose imports (search, evaluate) are its code; the
    report stage in the same module imports report/render.py, which load, score, prune and export do not run."""
    files = {s.name: set(s.code_modules()) for s in pipeline.STAGES}
    assert {"cusprun_edge/pipeline/search.py", "cusprun_edge/pipeline/stages.py"} <= files["prune"]
    assert "cusprun_edge/pipeline/search.py" not in files["load"] | files["score"]
    assert "cusprun_edge/report/render.py" not in files["load"] | files["score"] | files["prune"] | files["export"]


def test_a_changed_input_changes_the_stages_whose_config_names_it(tmp_path, monkeypatch):
    """Beyond code: the model's files, the expert's corpora and the target profile are digested into the
    fingerprint of every stage whose config keys name them (the stages after follow through upstream)."""
    from cusprun_edge.config.targets import builtin_dirs
    from cusprun_edge.pipeline.config import BuildConfig
    from cusprun_edge.pipeline.stage import BuildContext

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(12):
        (notes / f"{i}.txt").write_text(f"Document {i} is about the sea and the ships on it.")
    target = tmp_path / "mine.toml"
    shutil.copy(builtin_dirs()[0] / "x86-cpu.toml", target)
    cfg = BuildConfig(model=str(model), expert=f"domain={notes}", target=str(target))

    def fingerprints():
        ctx = BuildContext(cfg, tmp_path / "out")
        ctx.fingerprints = {s.name: "upstream" for s in pipeline.STAGES}  # each stage's own part only
        return {s.name: s.fingerprint(ctx) for s in pipeline.STAGES}

    def changed(before):
        return {name for name, fp in fingerprints().items() if fp != before[name]}

    def naming(key):
        return {s.name for s in pipeline.STAGES if key in s.config_keys()}

    base = fingerprints()
    assert changed(base) == set()
    (model / "config.json").write_text('{"edited": true}')
    assert changed(base) == naming("model") == {"load"}
    base = fingerprints()
    (notes / "3.txt").write_text("Another document entirely.")
    assert changed(base) == naming("expert") and {"score", "prune"} <= naming("expert")
    base = fingerprints()
    target.write_text(target.read_text().replace("memory_budget_mb = ", "memory_budget_mb = 1"))
    assert changed(base) == naming("target") == {"export", "bench"}  # bench runs at the target's thread count
    # the built-in prompts and checked prompts are package data, not code: their content is an input too
    from cusprun_edge.config import corpora

    calib = tmp_path / "calib"
    shutil.copytree(corpora.calib_root(), calib)
    monkeypatch.setattr(corpora, "calib_root", lambda: calib)
    base = fingerprints()
    (calib / "checks.json").write_text((calib / "checks.json").read_text() + "\n")
    assert changed(base) == naming("prompts") == {"generate"}
