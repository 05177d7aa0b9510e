"""Reconstruction after pruning on tiny real models: the refit leaves unpruned layers alone, lowers a pruned
layer's output error, runs one layer's statistics at a time, and is chosen on held-apart documents without
ever making them worse than no refit; methods without it prune exactly as before."""

import copy
import math

import pytest
import torch
from tiny import FAMILIES, TEXT, tiny_model

from cusprun_edge import UserError
from cusprun_edge.config.corpora import Corpus
from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
from cusprun_edge.model import arch
from cusprun_edge.model.sequential import capture_stream
from cusprun_edge.model.structure import structure_of
from cusprun_edge.prune.methods import METHODS, Plan, make_plan
from cusprun_edge.prune.pruner import apply_plan, prune_model
from cusprun_edge.prune.reconstruct import (
    alive_statistics,
    choose_and_refit,
    obs_select,
    refit_columns,
    run_pass,
)
from cusprun_edge.prune.score import score_model

CALIB, TUNE = TEXT[:40], TEXT[40:55]
CORPORA = {"domain/a": Corpus("domain/a", CALIB, tune=TUNE)}


def _plan(model, unpruned=(1,)) -> Plan:
    """Layers other than `unpruned` lose a third of their FFN channels; layer 2 also loses one query head per
    KV group (GQA-consistent)."""
    n = len(arch.decoder_layers(model))
    p = arch.all_layer_parts(model)[0]
    C, n_q, n_kv = p.down.in_features, model.config.num_attention_heads, model.config.num_key_value_heads
    g = torch.Generator().manual_seed(0)
    plan = Plan(ffn_keep=[], q_keep=[], kv_keep=[list(range(n_kv)) for _ in range(n)], layers_keep=list(range(n)))
    group = n_q // n_kv
    for i in range(n):
        keep = torch.arange(C) if i in unpruned else torch.randperm(C, generator=g)[: 2 * C // 3].sort().values
        plan.ffn_keep.append(keep)
        plan.q_keep.append([h for h in range(n_q) if not (i == 2 and h % group == 0)])
    return plan


def _layer_error(model, pruned, tok, i) -> float:
    """Relative error of decoder layer i's output (pruned vs dense), both fed the dense layer's inputs."""
    stream = capture_stream(model, tok, CALIB, batch_size=8)
    dense_l, pruned_l = arch.decoder_layers(model)[i], arch.decoder_layers(pruned)[i]
    x = stream.hidden
    for j in range(i):
        x = [arch.decoder_layers(model)[j](h, **k) for h, k in zip(x, stream.layer_kwargs[j])]
    err = ref = 0.0
    for h, k, m in zip(x, stream.layer_kwargs[i], stream.masks):
        d, p = dense_l(h, **k), pruned_l(h, **k)
        err += float((d - p)[m].pow(2).sum())
        ref += float((d - h)[m].pow(2).sum())  # the layer's own contribution to the residual stream
    return math.sqrt(err / ref)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_refit_leaves_unpruned_layers_unchanged_and_lowers_pruned_layer_error(family):
    model, tok = tiny_model(family)
    plan = _plan(model, unpruned=(1,))
    plain = copy.deepcopy(model)
    apply_plan(plain, plan)
    refit = copy.deepcopy(model)
    choice = choose_and_refit(model, plan, tok, CALIB, [], ridge=1e-3)
    assert sorted(choice.weights) == [0, 2, 3] and set(choice.weights[2]) == {"o", "down"}
    apply_plan(refit, copy.deepcopy(plan))
    from cusprun_edge.prune.reconstruct import load_refitted

    load_refitted(refit, choice.weights)
    dense_1, refit_1 = arch.all_layer_parts(model)[1], arch.all_layer_parts(refit)[1]
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert torch.equal(getattr(dense_1, name).weight, getattr(refit_1, name).weight), name
    for i in (0, 2):
        before, after = _layer_error(model, plain, tok, i), _layer_error(model, refit, tok, i)
        assert after < 0.7 * before, (i, before, after)
    # a solve that keeps every column and has no ridge returns the weight itself
    w = arch.all_layer_parts(model)[0].down.weight
    a = torch.randn(500, w.shape[1], dtype=torch.float64)
    assert torch.allclose(refit_columns(w, a.T @ a, torch.arange(w.shape[1]), 0.0), w, atol=1e-5)


@torch.no_grad()
def test_sequential_pass_holds_one_layer_of_statistics_at_a_time():
    model, tok = tiny_model("llama")
    plan = _plan(model, unpruned=())
    calib = capture_stream(model, tok, CALIB)
    seen = []

    def on_statistics(layer, module):
        seen.append((layer, module, alive_statistics()))

    res = run_pass(model, plan, calib, None, mode="sequential", target="dense", ridge=1e-2,
                   on_statistics=on_statistics)
    # o before down in every layer, layers in order; only that projection's gram and cross exist meanwhile
    assert [(layer, module) for layer, module, _ in seen] == [(0, "down"), (1, "down"), (2, "o"), (2, "down"),
                                                              (3, "down")]
    for layer, module, alive in seen:
        assert alive == [(layer, module, "cross"), (layer, module, "gram")]
    assert res.peak_statistics == 2 and alive_statistics() == []
    assert res.stats_bytes == 2 * 128 * 85 * 8  # G[:, K] and C[:, K] of one down_proj, float64
    # choosing the ridge adds the held-apart documents' statistics of the same projection, nothing more
    seen.clear()
    res = run_pass(model, plan, calib, capture_stream(model, tok, TUNE), mode="sequential", target="dense",
                   ridge=None, on_statistics=on_statistics)
    for layer, module, alive in seen:
        assert alive == [(layer, module, k) for k in ("cross", "gram", "tune-cross", "tune-gram")]
    assert res.peak_statistics == 4 and alive_statistics() == [] and len(res.ridges) == 5


@torch.no_grad()
def test_sequential_statistics_come_from_the_pruned_earlier_layers():
    """Layer 0 sees the same inputs either way; later layers are fitted on the refitted layers' outputs."""
    model, tok = tiny_model("qwen2")
    plan = _plan(model, unpruned=())
    calib = capture_stream(model, tok, CALIB)
    seq = run_pass(model, plan, calib, None, mode="sequential", ridge=1e-2).weights
    one = run_pass(model, plan, calib, None, mode="one-shot", ridge=1e-2).weights
    assert torch.allclose(seq[0]["down"], one[0]["down"], atol=1e-5)
    assert not torch.allclose(seq[3]["down"], one[3]["down"], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@torch.no_grad()
def test_ridge_is_chosen_on_held_apart_documents_and_never_hurts_them(family):
    model, tok = tiny_model(family)
    scores = score_model(model, tok, CORPORA, show_progress=False)
    expert = copy.deepcopy(model)
    rec = prune_model(expert, scores, ["domain/a"], "cusprun", 0.3, tokenizer=tok, corpora=CORPORA)
    r = rec["reconstruction"]
    tried = {t["refit"]: t["tune_ppl"] for t in r["tried"]}
    assert set(tried) == {"none", "per-layer ridge"} and r["calib_tokens"] > r["tune_tokens"] > 0
    # every projection got a ridge from the grid, chosen on the held-apart documents
    shape = structure_of(expert)
    pruned = sum(c < 128 for c in shape.intermediate_sizes) + sum(h < 6 for h in shape.num_attention_heads)
    assert pruned > 0 and sum(r["ridge_counts"].values()) == pruned
    # the streamed held-apart perplexity is the pruned model's real perplexity on those documents
    real = perplexity(torch_logits_fn(expert), tok, TUNE)
    kept = tried["per-layer ridge"] if r["mode"] == "sequential" else tried["none"]
    assert real == pytest.approx(kept, rel=1e-3)
    assert real <= tried["none"] * (1 + 1e-3)
    assert (r["ridge"] == "per-layer") == (tried["per-layer ridge"] < tried["none"])
    assert rec["peak_rss_mb"] > 0


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m].reconstruct == "none"] + ["cusprun"])
@torch.no_grad()
def test_without_reconstruction_plans_and_weights_are_unchanged(method):
    """Reconstruction is a separate pass: the plan does not depend on it, and a method without it keeps the
    surviving weights exactly as they were (today's behaviour, no tokenizer or corpora needed)."""
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    # (cusprun's damage budgets need held-apart documents, which this case has none of: uniform budgets)
    base = {"allocation": "uniform"} if method == "cusprun" else {}
    off = base | ({"reconstruct": "none"} if method == "cusprun" else {})
    plan = make_plan(model, scores, ["domain/a"], method, 0.3, dict(off))
    plan_on = make_plan(model, scores, ["domain/a"], method, 0.3, base | {"reconstruct": "sequential"})
    assert [k.tolist() for k in plan.ffn_keep] == [k.tolist() for k in plan_on.ffn_keep]
    assert plan.q_keep == plan_on.q_keep and plan.layers_keep == plan_on.layers_keep
    expected = copy.deepcopy(model)
    apply_plan(expected, plan)
    pruned = copy.deepcopy(model)
    rec = prune_model(pruned, scores, ["domain/a"], method, 0.3, dict(off))
    assert rec["reconstruction"] == {"mode": "none"}
    for (name, a), (_, b) in zip(expected.state_dict().items(), pruned.state_dict().items()):
        assert torch.equal(a, b), name


def test_reconstruction_is_available_to_every_method_and_recorded():
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    m = copy.deepcopy(model)
    rec = prune_model(m, scores, ["domain/a"], "flap", 0.3, {"reconstruct": True, "ridge": 0.01},
                      tokenizer=tok, corpora=CORPORA)
    r = rec["reconstruction"]
    assert r["mode"] == "sequential" and r["ridge"] == 0.01 and r["bias_compensation"] == "replaced by the refit"
    assert not any(p.down.bias is not None for p in arch.all_layer_parts(m))
    plain = copy.deepcopy(model)
    prune_model(plain, scores, ["domain/a"], "flap", 0.3, {"bias_compensation": False})
    assert [p.down.weight.shape for p in arch.all_layer_parts(plain)] == \
        [p.down.weight.shape for p in arch.all_layer_parts(m)]
    assert not torch.equal(arch.all_layer_parts(plain)[0].down.weight, arch.all_layer_parts(m)[0].down.weight)


@torch.no_grad()
def test_obs_removes_the_channel_the_refit_can_replace():
    """Channel 3 carries exactly what channel 1 does: removing it costs nothing once channel 1 absorbs its weight,
    though its weight is the largest; a second removal never takes the other copy too."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64)
    a[:, 3] = a[:, 1]
    gram = a.T @ a
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w[:, 3] *= 10
    assert obs_select(w, gram, torch.tensor([1, 2, 3]), 1, ridge=1e-9).tolist() in ([1], [3])
    two = obs_select(w, gram, torch.tensor([1, 2, 3]), 2, ridge=1e-9).tolist()
    assert 2 in two and len(two) == 2  # never both copies: the second costs what the pair carried
    # the refit after OBS's choice reproduces the layer exactly
    keep = torch.tensor([0, 1, 2, 4, 5])
    assert torch.allclose(refit_columns(w, gram, keep, 0.0) @ a[:, keep].T, w @ a.T, atol=1e-6)


def test_select_obs_keeps_each_layers_count_and_chooses_within_the_pool():
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    opts = {"allocation": "uniform", "select": "obs"}
    plan = make_plan(model, scores, ["domain/a"], "cusprun", 0.3, dict(opts))
    by_scores = make_plan(model, scores, ["domain/a"], "cusprun", 0.3, {"allocation": "uniform"})
    m = copy.deepcopy(model)
    rec = prune_model(m, scores, ["domain/a"], "cusprun", 0.3, dict(opts), tokenizer=tok, corpora=CORPORA)
    assert rec["reconstruction"]["select"] == "obs"
    widths = structure_of(m).intermediate_sizes
    assert widths == [len(k) for k in by_scores.ffn_keep]  # the same count per layer as the scores' plan
    obs_plan = copy.deepcopy(plan)
    res = run_pass(model, obs_plan, capture_stream(model, tok, CALIB), None, ridge=1e-2, ffn_pool=plan.ffn_pool)
    changed = 0
    for i, keep in res.ffn_keep.items():
        removed = set(range(arch.all_layer_parts(model)[i].down.in_features)) - set(keep.tolist())
        assert removed <= set(plan.ffn_pool[i].tolist())  # only among the units Cus-Prun ranks least relevant
        changed += removed != set(range(arch.all_layer_parts(model)[i].down.in_features)) - set(
            by_scores.ffn_keep[i].tolist())
    assert changed > 0
    with pytest.raises(UserError, match="select=obs .* needs reconstruction"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.3, {"select": "obs", "reconstruct": "none"})


def test_bad_reconstruction_options():
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    with pytest.raises(UserError, match="reconstruct=maybe is not valid"):
        prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, {"reconstruct": "maybe"},
                    tokenizer=tok, corpora=CORPORA)
    with pytest.raises(UserError, match="ridge must be auto or a number"):
        prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, {"ridge": "big"},
                    tokenizer=tok, corpora=CORPORA)
    with pytest.raises(UserError, match="refit_target=both is not valid"):
        prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, {"refit_target": "both"},
                    tokenizer=tok, corpora=CORPORA)
    with pytest.raises(UserError, match="needs the tokenizer and the expert's corpora"):
        prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3)
    with pytest.raises(UserError, match="--device gpu0 is not a device"):
        prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, tokenizer=tok, corpora=CORPORA,
                    device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, tokenizer=tok,
                        corpora=CORPORA, device="cuda")


def test_quality_benchmark_measures_every_method_with_and_without_reconstruction():
    from benchmarks.quality import variants

    rows = variants(quick=False)
    for name, spec in METHODS.items():
        states = {({"reconstruct": spec.reconstruct} | opts)["reconstruct"] != "none"
                  for label, (m, opts) in rows.items() if m == name and "head_policy" not in opts}
        assert states == ({False} if spec.allocation == "layers" else {True, False}), name
    assert list(rows)[:2] == ["cusprun", "cusprun[reconstruct=none]"]
