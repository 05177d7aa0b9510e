"""Stage fingerprints from real imports: editing any module a stage's code imports (transitively, imports
inside functions and relative imports included) changes that stage's code hash and no other's; the
package's import graph has no cycle."""

import ast
import shutil

from conftest import REPO

from cusprun_edge import pipeline
from cusprun_edge.stages import code_hash, import_graph, stage_code


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
    assert "cusprun_edge.bench" in graph["cusprun_edge.pipeline"]  # imported inside _default_stages
    assert "cusprun_edge.expert_io" in graph["cusprun_edge.models"]
    assert "cusprun_edge" in graph["cusprun_edge.export.package"]  # `from .. import __version__`, in a function
    assert _cycles(graph) == []


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


def _insert_in_class(path, qualname: str) -> None:
    """A comment inside the class `qualname` (a top-level class): an edit to the stage's own code."""
    text = path.read_text()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == qualname)
    lines = text.splitlines(keepends=True)
    lines.insert(node.body[0].lineno - 1, "    # an edit to the stage\n")
    path.write_text("".join(lines))


def test_editing_a_module_changes_exactly_the_stages_that_run_it(tmp_path):
    """In a copy of the package: append a comment to each module in turn; the code hash of every stage
    whose code imports that module changes, and no other stage's. A stage's own module counts by the part
    the stage reaches (its class and the helpers it calls): an edit inside the class changes it."""
    pkg = tmp_path / "cusprun_edge"
    shutil.copytree(REPO / "cusprun_edge", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    classes = {s.name: type(s) for s in pipeline.STAGES}
    files = {name: set(stage_code(cls, pkg)) for name, cls in classes.items()}
    own = {name: cls.__module__.replace(".", "/") + ".py" for name, cls in classes.items()}
    base = {name: code_hash(cls, pkg) for name, cls in classes.items()}
    # what the hand-kept lists missed, and what a stage must not depend on
    assert {"cusprun_edge/damage.py", "cusprun_edge/reconstruct.py", "cusprun_edge/search.py",
            "cusprun_edge/evaluate.py", "cusprun_edge/methods.py"} <= files["prune"]
    assert {f"cusprun_edge/export/{m}.py" for m in ("__init__", "build", "trace", "precision", "quant_plan",
                                                    "calibration", "parity", "package")} <= files["export"]
    assert "cusprun_edge/report.py" not in files["prune"] | files["export"] | files["bench"]

    edited = 0
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(tmp_path).as_posix()
        text = path.read_text()
        path.write_text(text + "\n# an edit\n")
        changed = {name for name, cls in classes.items() if code_hash(cls, pkg) != base[name]}
        # a comment after the last statement of a stage's own module is not code that stage runs
        expected = {name for name in classes if rel in files[name] and rel != own[name]}
        assert changed == expected, rel
        edited += bool(expected)
        path.write_text(text)
    assert edited >= 20

    for name, cls in classes.items():
        path = tmp_path / own[name]
        text = path.read_text()
        _insert_in_class(path, cls.__qualname__)
        assert code_hash(cls, pkg) != base[name], name
        path.write_text(text)
        assert code_hash(cls, pkg) == base[name], name


def test_a_helper_the_stage_calls_is_its_code(tmp_path):
    """PruneStage runs `_search_ratio` of pipeline.py: an edit there changes prune's hash, not load's."""
    pkg = tmp_path / "cusprun_edge"
    shutil.copytree(REPO / "cusprun_edge", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    prune, load = type(pipeline.STAGES[2]), type(pipeline.STAGES[0])
    before = code_hash(prune, pkg), code_hash(load, pkg)
    path = pkg / "pipeline.py"
    path.write_text(path.read_text().replace("def _search_ratio(ctx, model, tok, scores, corpora)",
                                             "def _search_ratio(ctx, model, tok, scores, corpora)  ", 1))
    assert code_hash(prune, pkg) != before[0]
    assert code_hash(load, pkg) == before[1]
