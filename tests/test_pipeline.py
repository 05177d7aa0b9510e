"""build: an interrupted build resumes from the last finished stage; unchanged stages are skipped; a stage
whose code changed re-runs with every stage after it; the pipeline and its stages import no cycle."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, USER_PROMPT, tiny_build_config

from cusprun_edge.pipeline import build as pipeline


def test_interrupted_build_resumes(tiny_builds, tiny_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """The finished ratio-0.5 build, its last three stages removed, runs again with bench interrupted."""
    out = tmp_path / "build"
    shutil.copytree(tiny_builds[1], out)
    for stage in ("bench", "generate", "report"):
        shutil.rmtree(out / stage)
    cfg = tiny_build_config(tiny_artifacts["dense_hf"], 0.5)
    bench_stage = next(s for s in pipeline.STAGES if s.name == "bench")
    original = type(bench_stage).run

    def interrupted(self, ctx, work):
        (work / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(bench_stage), "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(cfg, out)
    for stage in ("load", "score", "prune", "export", "validate"):
        assert (out / stage / "stage.json").exists()
    assert not (out / "bench").exists() and not list(out.glob(".bench.tmp-*"))
    export_record = (out / "export" / "stage.json").read_text()
    # what a run killed with SIGKILL leaves: a stage's temporary directory, never renamed
    left = out / ".bench.tmp-killed"
    left.mkdir()
    (left / "bench.json").write_text("{")

    monkeypatch.setattr(type(bench_stage), "run", original)
    seen = []
    pipeline.build(cfg, out, on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert seen == [("load", "skipped"), ("score", "skipped"), ("prune", "skipped"), ("export", "skipped"),
                    ("validate", "skipped"), ("bench", "running"), ("bench", "done"),
                    ("generate", "running"), ("generate", "done"), ("report", "running"), ("report", "done")]
    assert (out / "export" / "stage.json").read_text() == export_record  # not rebuilt
    assert json.loads((out / "report" / "stage.json").read_text())["stage"] == "report"
    assert not left.exists() and not list(out.glob(".*.tmp-*"))

    # a changed ratio re-runs pruning and everything after it, but not loading or scoring
    seen.clear()
    pipeline.build(tiny_build_config(tiny_artifacts["dense_hf"], 0.4), out,
                   on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert [n for n, s in seen if s == "skipped"] == ["load", "score"]
    assert [n for n, s in seen if s == "done"] == ["prune", "export", "validate", "bench", "generate", "report"]

    # a stage run again (its directory deleted: new speed figures) re-runs the stages that read it
    shutil.rmtree(out / "bench")
    seen.clear()
    pipeline.build(tiny_build_config(tiny_artifacts["dense_hf"], 0.4), out,
                   on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert [n for n, s in seen if s == "done"] == ["bench", "report"]


def test_the_second_build_takes_the_dense_export_from_the_cache(tiny_builds):  # noqa: F811
    """r30 is built after r50 from the same model, corpora, target and plan: its dense export is r50's files (the
    user cache's copy), with a note saying so and this checkout's target profile; the expert is its own."""
    r30, r50, _ = tiny_builds
    first, second = r50 / "export" / "dense", r30 / "export" / "dense"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"):
        if (first / name).exists():
            assert (second / name).read_bytes() == (first / name).read_bytes(), name
    notes = json.loads((second / "manifest.json").read_text())["notes"]
    assert any("taken from the user cache" in n for n in notes)
    assert not any("taken from the user cache" in n for n in json.loads((first / "manifest.json").read_text())["notes"])
    assert (r30 / "export" / "expert" / "model.onnx").read_bytes() != (r50 / "export" / "expert" / "model.onnx").read_bytes()


def test_changed_stage_code_reruns_it_and_the_stages_after(tiny_builds, tiny_artifacts, tmp_path):  # noqa: F811
    """A copy of the package with one edited module (bench.py) resumes a finished build: bench and the
    report after it re-run, every other stage is skipped (their code is byte for byte the same). Then an
    edit to a module that only an import chain leads to (damage.py) re-runs prune and the stages after."""
    finished, _, _ = tiny_builds
    out = tmp_path / "build"
    shutil.copytree(finished, out)
    src = tmp_path / "src"
    # the copy holds the package data too (corpora, prompts and target profiles)
    shutil.copytree(REPO / "cusprun_edge", src / "cusprun_edge", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = json.loads((out / "build.json").read_text())
    script = (
        "import json, sys\n"
        "import cusprun_edge.pipeline.build as p\n"
        f"assert p.__file__.startswith({str(src)!r}), p.__file__\n"
        f"cfg = p.BuildConfig(**json.loads({json.dumps(cfg)!r}))\n"
        f"p.build(cfg, {str(out)!r}, on_stage=lambda n, s: print(n, s.split(' ')[0]))\n"
    )

    def resume():
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                              timeout=900, env={**os.environ, "PYTHONPATH": str(src)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return dict(line.split(" ") for line in proc.stdout.splitlines() if line.count(" ") == 1)

    # first with the copy as it is: up to date with the code of this moment (the tree may be edited
    # while the suite runs), normally all skipped
    assert set(resume()) == {s.name for s in pipeline.STAGES}
    bench_py = src / "cusprun_edge" / "measure" / "bench.py"
    bench_py.write_text(bench_py.read_text() + "\n# a change to the bench stage's code\n")
    states = resume()
    assert states == {"load": "skipped", "score": "skipped", "prune": "skipped", "export": "skipped",
                      "validate": "skipped", "bench": "done", "generate": "skipped", "report": "done"}
    # damage.py is no stage's module: prune imports it (through methods), and re-runs with all after it
    damage_py = src / "cusprun_edge" / "prune" / "damage.py"
    damage_py.write_text(damage_py.read_text() + "\n# a change to code the prune stage imports\n")
    states = resume()
    assert states == {"load": "skipped", "score": "skipped", "prune": "done", "export": "done",
                      "validate": "done", "bench": "done", "generate": "done", "report": "done"}


def test_every_stage_runs_code_it_hashes():
    names = [s.name for s in pipeline.STAGES]
    assert names == ["load", "score", "prune", "export", "validate", "bench", "generate", "report"]
    assert all(s.code_modules() for s in pipeline.STAGES)  # every stage's code is in its fingerprint


def test_cli_build_is_quiet_and_logs_libraries(tiny_builds, tiny_artifacts, tmp_path):  # noqa: F811
    """`cusprun-edge build`: a line per stage, the verdict and the report path on the terminal; what the
    exporter and ONNX Runtime print goes to <out>/build.log. Resumed from a finished build with its
    export removed, so export, validate, bench, generate and report really run."""
    from conftest import run_cli

    finished, _, _ = tiny_builds
    out = tmp_path / "build"
    shutil.copytree(finished, out)
    shutil.rmtree(out / "export")
    log_before = (out / "build.log").stat().st_size if (out / "build.log").exists() else 0
    proc = run_cli("build", "--target", "x86-cpu", "--model", tiny_artifacts["dense_hf"], "--expert",
                   "language=en,domain=general", "--ratio", "0.3", "--method", "magnitude", "--precision", "fp32",
                   "--quick-bench", "--threads", "1", "--prompt", USER_PROMPT, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 15, lines
    assert [line.split()[0] for line in lines[:8]] == ["load", "score", "prune", "export", "validate", "bench",
                                                       "generate", "report"]
    assert lines[3].split()[1:3] == ["done", "in"]  # export (removed) ran again
    # the finished build measured the GenAI builder's int4: the verdict names what a user would otherwise ship
    assert "what a user would otherwise ship" in lines[-2] and lines[-1] == f"report: {out / 'report' / 'report.html'}"
    assert proc.stderr == ""
    log = (out / "build.log").read_text()
    assert (out / "build.log").stat().st_size > log_before and "--- " in log


def test_the_dense_models_statistics_come_from_the_user_cache(tiny_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """Two builds of the same model, corpora, method and ratio in different directories: the second takes the
    scores and the damage probes from the user cache (saying so), and its expert is the first's, tensor for
    tensor; validate takes its dense side (our dense export's sums, the dense model's multiple-choice count), its
    record the same. Another ratio measures its own damage but reuses the scores; with the cache off, both are
    measured."""
    from safetensors.torch import load_file

    from cusprun_edge.pipeline.config import BuildConfig
    from cusprun_edge.pipeline.stage import BuildContext

    monkeypatch.setenv("CUSPRUN_EDGE_CACHE", str(tmp_path / "cache"))

    def first_stages(name, ratio=0.3, upto="prune"):
        cfg = BuildConfig(target="x86-cpu", model=str(tiny_artifacts["dense_hf"]), expert="language=en,domain=general",
                          ratio=ratio, method="cusprun", precision="fp32", baseline=False, threads=1)
        ctx = BuildContext(cfg, tmp_path / name)
        results = {}
        names = [s.name for s in pipeline.STAGES]
        for stage in pipeline.STAGES[:names.index(upto) + 1]:
            work = ctx.stage_dir(stage.name)
            work.mkdir(parents=True)
            results[stage.name] = stage.run(ctx, work)
            ctx.fingerprints[stage.name] = stage.name
        return results, tmp_path / name

    def weights(out):
        tensors = {}
        for f in sorted((out / "prune" / "expert").glob("*.safetensors")):
            tensors.update(load_file(f))
        return tensors

    first, a = first_stages("a", upto="validate")
    assert "from_cache" not in first["score"] and "layer_damage_from_cache" not in first["prune"]
    assert "dense_side_from_cache" not in first["validate"]
    second, b = first_stages("b", upto="validate")
    assert second["score"]["from_cache"] and second["prune"]["layer_damage_from_cache"]
    # validate's dense side (our dense export and the dense model, the same in both builds) too; the same record
    assert second["validate"]["dense_side_from_cache"]
    va, vb = (json.loads((o / "validate" / "validate.json").read_text()) for o in (a, b))
    assert vb["dense_side_reused"] and not va["dense_side_reused"]
    assert vb["overall"] == va["overall"] and vb["dense_side"] == va["dense_side"]
    assert {**vb["three_way"], "dense_artifact": None} == {**va["three_way"], "dense_artifact": None}  # each its own
    assert (b / "score" / "scores.safetensors").read_bytes() == (a / "score" / "scores.safetensors").read_bytes()
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    record = json.loads((b / "prune" / "expert" / "cusprun.json").read_text())
    assert record["layer_damage"]["from_cache"] == second["prune"]["layer_damage_from_cache"]
    assert record["layer_damage"]["damage"] == json.loads((a / "prune" / "expert" / "cusprun.json").read_text())[
        "layer_damage"]["damage"]

    other, _ = first_stages("c", ratio=0.4)
    assert other["score"]["from_cache"] and "layer_damage_from_cache" not in other["prune"]
    monkeypatch.setenv("CUSPRUN_EDGE_STATS_CACHE", "0")
    off, _ = first_stages("d")
    assert "from_cache" not in off["score"] and "layer_damage_from_cache" not in off["prune"]
