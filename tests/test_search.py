"""Quality-target ratio search on a real (tiny) model: bounds, the chosen ratio, and refusal."""

import copy

import pytest
import torch
from tiny import TEXT, tiny_model

from cusprun_edge import UserError
from cusprun_edge.config.corpora import Corpus
from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
from cusprun_edge.pipeline.search import search_ratio
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

CORPORA = {"domain/a": Corpus("domain/a", TEXT[:12], tune=TEXT[40:46])}


def fitted_tiny_model():
    """A tiny model fitted for a few steps on the test sentences, so pruning it costs perplexity
    (a random model's perplexity is flat in the ratio)."""
    model, tok = tiny_model("llama")
    ids = tok(TEXT[:5], return_tensors="pt", padding=True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(**ids, labels=ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), tok


@pytest.fixture(scope="module")
def measured():
    model, tok = fitted_tiny_model()
    scores = score_model(model, tok, CORPORA, batch_size=4, show_progress=False)
    tried = []

    def measure(ratio):
        tried.append(ratio)
        expert = copy.deepcopy(model)
        prune_model(expert, scores, list(CORPORA), "magnitude", ratio)
        return perplexity(torch_logits_fn(expert), tok, CORPORA["domain/a"].tune)

    dense = perplexity(torch_logits_fn(model), tok, CORPORA["domain/a"].tune)
    return measure, dense, tried


def test_search_picks_the_largest_passing_ratio_within_bounds(measured):
    measure, dense, tried = measured
    curve = {r: measure(r) / dense for r in (0.05, 0.45)}
    target = (curve[0.05] + curve[0.45]) / 2  # between the ends, so the answer is strictly inside
    tried.clear()
    result = search_ratio(measure, dense, target, lo=0.05, hi=0.45, tolerance=0.02, max_steps=10)
    assert all(0.05 <= r <= 0.45 for r in tried)
    points = {p["ratio"]: p for p in result["points"]}
    assert points[result["ratio"]]["passed"] and points[result["ratio"]]["ppl_ratio"] <= target
    failing = [r for r, p in points.items() if not p["passed"]]
    assert failing and min(failing) > result["ratio"]
    assert min(failing) - result["ratio"] <= 0.02 + 1e-9 or len(tried) == 10


def test_search_refuses_an_impossible_target(measured):
    measure, dense, tried = measured
    tried.clear()
    with pytest.raises(UserError, match="max-ppl-ratio"):
        search_ratio(measure, dense, 1.0000001, lo=0.2, hi=0.45, floor=0.05)
    assert min(tried) >= 0.05 and len(tried) <= 8
    with pytest.raises(UserError, match="above 1.0"):
        search_ratio(measure, dense, 0.9)


def saved_model_and_notes(tmp_path, n_docs: int):
    """The fitted tiny model saved as a directory, and `n_docs` test sentences as a folder of .txt files."""
    model, tok = fitted_tiny_model()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "notes"
    data.mkdir()
    for i, text in enumerate(TEXT[:n_docs]):
        (data / f"{i:02d}.txt").write_text(text)
    return data


def test_build_refuses_an_impossible_target_in_one_line(tmp_path):
    from conftest import assert_one_line_error, run_cli

    data = saved_model_and_notes(tmp_path, 16)
    out = tmp_path / "build"
    proc = run_cli("build", "--model", tmp_path / "model", "--expert", f"domain={data}", "--method", "magnitude",
                   "--max-ppl-ratio", "1.000001", "--precision", "fp32", "--out", out)
    assert_one_line_error(proc, "max-ppl-ratio")
    assert not (out / "prune").exists() and not list(out.glob(".prune.tmp-*"))
    proc = run_cli("build", "--model", tmp_path / "model", "--max-ppl-ratio", "0.8", "--out", tmp_path / "b2")
    assert_one_line_error(proc, "above 1.0")
    assert not (tmp_path / "b2").exists()


def test_prune_stage_ships_the_search_probe_it_chose(tmp_path, monkeypatch):
    """A quality-target build prunes once per probe: the chosen ratio's probe is the saved expert, and its
    perplexity on the held-apart documents is the one the search recorded."""
    import cusprun_edge.prune.pruner as prune_mod
    from cusprun_edge.model.expert_io import load_expert
    from cusprun_edge.pipeline.config import BuildConfig
    from cusprun_edge.pipeline.stage import BuildContext
    from cusprun_edge.pipeline.stages import PruneStage, ScoreStage

    data = saved_model_and_notes(tmp_path, 20)
    calls = []
    real = prune_mod.prune_model
    monkeypatch.setattr(prune_mod, "prune_model", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    cfg = BuildConfig(model=str(tmp_path / "model"), expert=f"domain={data}", method="magnitude",
                      max_ppl_ratio=1.5, precision="fp32")
    ctx = BuildContext(cfg, tmp_path / "build")
    for stage in (ScoreStage(), PruneStage()):
        ctx.stage_dir(stage.name).mkdir(parents=True)
        record = stage.run(ctx, ctx.stage_dir(stage.name))
    search = record["ratio_search"]
    assert record["target_ratio"] == search["ratio"] and len(calls) == len(search["points"])
    expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
    from cusprun_edge.config.corpora import ExpertSpec

    tune = [t for c in ExpertSpec.parse(cfg.expert).corpora().values() for t in c.tune]
    chosen = next(p for p in search["points"] if p["ratio"] == round(search["ratio"], 4))
    assert chosen["passed"] and perplexity(torch_logits_fn(expert), etok, tune) == pytest.approx(chosen["ppl"], rel=1e-4)


def test_search_judges_each_ratio_on_the_int4_artifact_as_it_would_ship(tmp_path):
    """With an int4 target the search measures every probe with its weights rounded by the build's plan (the
    artifact's logits, simulated in PyTorch), and records what it judged."""
    from cusprun_edge.config.corpora import ExpertSpec
    from cusprun_edge.model.expert_io import load_expert
    from cusprun_edge.pipeline.config import BuildConfig
    from cusprun_edge.pipeline.stage import BuildContext
    from cusprun_edge.pipeline.stages import PruneStage, ScoreStage, as_shipped

    data = saved_model_and_notes(tmp_path, 20)
    cfg = BuildConfig(model=str(tmp_path / "model"), expert=f"domain={data}", method="magnitude",
                      max_ppl_ratio=1.5, precision="int4", quant_plan="fast")
    ctx = BuildContext(cfg, tmp_path / "build")
    for stage in (ScoreStage(), PruneStage()):
        ctx.stage_dir(stage.name).mkdir(parents=True)
        record = stage.run(ctx, ctx.stage_dir(stage.name))
    search = record["ratio_search"]
    assert search["judged_as"].startswith("int4, fast plan")
    assert all(0.02 <= p["ratio"] <= 0.45 for p in search["points"])
    expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
    corpora = ExpertSpec.parse(cfg.expert).corpora()
    tune = [t for c in corpora.values() for t in c.tune]
    chosen = next(p for p in search["points"] if p["ratio"] == round(search["ratio"], 4))
    shipped = as_shipped(etok, corpora, "int4", "fast")(expert)
    assert perplexity(torch_logits_fn(shipped), etok, tune) == pytest.approx(chosen["ppl"], rel=1e-4)
    assert perplexity(torch_logits_fn(expert), etok, tune) != pytest.approx(chosen["ppl"], rel=1e-4)
