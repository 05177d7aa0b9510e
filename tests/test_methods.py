"""Scoring and every pruning method on tiny models: shapes, achieved ratio, reload, and Cus-Prun's
defining property that units with zero impact on the expert's corpora are the first to go."""

import copy
import math

import pytest
import torch
from tiny import FAMILIES, TEXT, tiny_model

from cusprun_edge import UserError, load_expert
from cusprun_edge.config.corpora import Corpus
from cusprun_edge.model import arch
from cusprun_edge.model.structure import check_gqa, count_params, structure_of
from cusprun_edge.prune.methods import METHODS, MIN_FFN_KEEP, make_plan
from cusprun_edge.prune.pruner import prune_and_save, prune_model
from cusprun_edge.prune.score import ScoreSet, score_model

IDS = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(2))
CORPORA = {"domain/a": Corpus("domain/a", TEXT[:12]), "task/b": Corpus("task/b", TEXT[12:24])}
# cusprun's default budgets follow measured damage (prune_model measures it); plans made here alone are uniform
UNIFORM = {"allocation": "uniform"}


@pytest.fixture(scope="module", params=FAMILIES)
def scored(request):
    model, tok = tiny_model(request.param)
    return model, tok, score_model(model, tok, CORPORA, batch_size=4, show_progress=False)


def test_scores_have_every_statistic(scored):
    model, _, scores = scored
    cs = scores.corpora["domain/a"]
    n_layers = len(arch.decoder_layers(model))
    assert cs.n_docs == 12 and cs.n_tokens > 12
    assert cs.layer("ffn_impact_doc", 0).shape == (12, 128)
    assert cs.layer("head_impact_doc", n_layers - 1).shape == (12, 6)
    assert all(float(cs.layer("block_influence", i)) > 0 for i in range(n_layers))
    assert torch.all(cs.layer("ffn_sq", 1) >= 0)


def test_scores_save_load_and_model_check(scored, tmp_path):
    model, _, scores = scored
    scores.save(tmp_path / "s.safetensors")
    loaded = ScoreSet.load(tmp_path / "s.safetensors")
    assert loaded.model_hash == scores.model_hash and set(loaded.corpora) == set(scores.corpora)
    for key in ("ffn_impact_doc", "o_sq", "block_influence"):
        assert torch.equal(loaded.corpora["task/b"].layer(key, 2), scores.corpora["task/b"].layer(key, 2))
    loaded.check_model(model)
    family = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[model.config.model_type]
    other, _ = tiny_model(family, seed=7)
    with pytest.raises(UserError, match="another model"):
        loaded.check_model(other)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_prunes_to_ratio_and_reloads(scored, method, tmp_path):
    model, tok, scores = scored
    m = copy.deepcopy(model)
    rec = prune_and_save(m, tok, scores, ["domain/a", "task/b"], method, 0.3, tmp_path / method, corpora=CORPORA)
    # whole layers are coarse units; channels and head tiers land within a few channels of the target
    tolerance = 0.15 if method == "shortgpt" else 0.02
    assert abs(rec["achieved_ratio"] - 0.3) <= tolerance, rec["achieved_ratio"]
    assert rec["achieved_ratio"] <= 0.3 + 1e-9
    assert count_params(m)["prunable"] < count_params(model)["prunable"]
    s = structure_of(m)
    for q, kv in zip(s.num_attention_heads, s.num_key_value_heads):
        assert q % kv == 0 and kv == model.config.num_key_value_heads
    loaded, _ = load_expert(tmp_path / method)
    assert torch.equal(loaded(IDS).logits, m(IDS).logits)
    assert torch.isfinite(m(IDS).logits).all()
    if method == "shortgpt":
        assert len(s.source_layers) < model.config.num_hidden_layers
    else:
        assert len(s.source_layers) == model.config.num_hidden_layers


def test_cusprun_removes_zero_impact_units_first_and_keeps_logits():
    model, tok = tiny_model("llama")
    parts = arch.all_layer_parts(model)
    dead = {i: torch.arange(i * 7, i * 7 + 24) for i in range(len(parts))}  # 24 of 128 channels per layer
    with torch.no_grad():
        for i, p in enumerate(parts):
            p.down.weight[:, dead[i]] = 0
    ref = model(IDS).logits
    scores = score_model(model, tok, CORPORA, show_progress=False)
    budget_ratio = 24 * 3 * 96 * len(parts) / count_params(model)["prunable"]
    plan = make_plan(model, scores, ["domain/a"], "cusprun", budget_ratio, UNIFORM)
    for i in range(len(parts)):
        removed = set(range(128)) - set(plan.ffn_keep[i].tolist())
        assert removed == set(dead[i].tolist()), i
    m = copy.deepcopy(model)
    # selection alone (a refit would re-weigh the surviving channels, by design)
    prune_model(m, scores, ["domain/a"], "cusprun", budget_ratio, {"reconstruct": "none"})
    assert torch.allclose(m(IDS).logits, ref, atol=1e-5)


def test_cusprun_expert_keeps_units_any_dimension_needs():
    """A unit irrelevant to one dimension but important to another must stay (R = max over dimensions)."""
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    a, b = scores.corpora["domain/a"], scores.corpora["task/b"]
    a.tensors["ffn_impact_rms_doc"][0][:, 5] = 0.0  # channel 5: irrelevant for domain/a ...
    b.tensors["ffn_impact_rms_doc"][0][:, 5] = 1e6  # ... but dominant for task/b
    only_a = make_plan(model, scores, ["domain/a"], "cusprun", 0.2, UNIFORM)
    both = make_plan(model, scores, ["domain/a", "task/b"], "cusprun", 0.2, UNIFORM)
    assert 5 not in only_a.ffn_keep[0].tolist()
    assert 5 in both.ffn_keep[0].tolist()


def test_flap_bias_compensation_recovers_the_mean_output():
    """With bias compensation, removing a constant-output channel changes nothing on average."""
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    plan = make_plan(model, scores, ["domain/a"], "flap", 0.2)
    assert plan.ffn_bias and any(b is not None and b.abs().sum() > 0 for b in plan.ffn_bias)
    no_comp = make_plan(model, scores, ["domain/a"], "flap", 0.2, {"bias_compensation": False})
    assert not no_comp.ffn_bias


def test_bad_inputs(scored):
    model, _, scores = scored
    with pytest.raises(UserError, match="ratio"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.95)
    with pytest.raises(UserError, match="ratio"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.0)
    with pytest.raises(UserError, match="unknown method"):
        make_plan(model, scores, ["domain/a"], "obs", 0.2)
    with pytest.raises(UserError, match="no scores for language/zz"):
        make_plan(model, scores, ["language/zz"], "cusprun", 0.2, UNIFORM)
    with pytest.raises(UserError, match="empty"):
        score_model(model, None, {"x": Corpus("x", [])}, show_progress=False)
    assert check_gqa([0], [0], 6, 2) == 1


def test_head_policy_ffn_first_spends_the_ffn_before_any_head():
    """ffn_first removes no query head until the FFN is at its floor; fraction removes a head tier as soon
    as a layer's fraction reaches 1/group. Both meet the same budget."""
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    n_q = model.config.num_attention_heads
    group = n_q // model.config.num_key_value_heads

    def heads_removed(plan):
        return sum(n_q - len(q) for q in plan.q_keep)

    mid = 1.05 / group
    assert heads_removed(make_plan(model, scores, ["domain/a"], "cusprun", mid, UNIFORM)) == 0
    assert heads_removed(make_plan(model, scores, ["domain/a"], "cusprun", mid,
                                   {**UNIFORM, "head_policy": "fraction"})) > 0
    high = make_plan(model, scores, ["domain/a"], "cusprun", 0.85, UNIFORM)
    assert heads_removed(high) > 0
    assert all(len(k) == max(1, math.ceil(MIN_FFN_KEEP * 128)) for k in high.ffn_keep)
    with pytest.raises(UserError, match="head_policy=heads_last is not valid"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.2, {"head_policy": "heads_last"})
    with pytest.raises(UserError, match="does not fit"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.2, {"allocation": "layers"})
