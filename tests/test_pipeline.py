"""build: an interrupted build resumes from the last finished stage; unchanged stages are skipped."""

import json

import pytest
from test_report import _config, tiny_artifacts  # noqa: F401  (session fixture shared with the report tests)

from cusprun_edge import pipeline


def test_interrupted_build_resumes(tiny_artifacts, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "build"
    cfg = _config(tiny_artifacts["dense_hf"], 0.4)
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

    monkeypatch.setattr(type(bench_stage), "run", original)
    seen = []
    pipeline.build(cfg, out, on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert seen == [("load", "skipped"), ("score", "skipped"), ("prune", "skipped"), ("export", "skipped"),
                    ("validate", "skipped"), ("bench", "running"), ("bench", "done"),
                    ("report", "running"), ("report", "done")]
    assert (out / "export" / "stage.json").read_text() == export_record  # not rebuilt
    assert json.loads((out / "report" / "stage.json").read_text())["stage"] == "report"

    # a changed ratio re-runs pruning and everything after it, but not loading or scoring
    seen.clear()
    pipeline.build(_config(tiny_artifacts["dense_hf"], 0.5), out,
                   on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert [n for n, s in seen if s == "skipped"] == ["load", "score"]
    assert [n for n, s in seen if s == "done"] == ["prune", "export", "validate", "bench", "report"]
