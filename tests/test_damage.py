"""Budgets from measured damage on a tiny real model: each layer's probe is the real output damage of its
uniform-plan removal on held-apart documents, and layers that hurt more lose less."""

import copy

import pytest
import torch
from tiny import TEXT, tiny_model

from cusprun_edge import UserError
from cusprun_edge.config.corpora import Corpus
from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
from cusprun_edge.model import arch
from cusprun_edge.model.structure import count_params, structure_of
from cusprun_edge.prune.damage import damage_weights, layer_damage
from cusprun_edge.prune.methods import make_plan
from cusprun_edge.prune.pruner import apply_plan, prune_model
from cusprun_edge.prune.score import score_model

CALIB, TUNE = TEXT[:40], TEXT[40:55]
CORPORA = {"domain/a": Corpus("domain/a", CALIB, tune=TUNE)}


@torch.no_grad()
def test_a_layer_probe_is_the_output_damage_of_pruning_that_layer_alone():
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    plan = make_plan(model, scores, ["domain/a"], "cusprun", 0.3, {"allocation": "uniform", "reconstruct": "none"})
    probe = layer_damage(model, plan, tok, TUNE)
    n = len(arch.decoder_layers(model))
    assert len(probe["damage"]) == n and probe["tokens"] > 0
    dense_ppl = perplexity(torch_logits_fn(model), tok, TUNE)
    i = 1
    only_i = copy.deepcopy(plan)
    full = make_plan(model, None, [], "random", 0.0001, {})  # a plan that keeps (almost) everything
    for j in range(n):
        if j != i:
            only_i.ffn_keep[j], only_i.q_keep[j], only_i.kv_keep[j] = (
                torch.arange(arch.all_layer_parts(model)[j].down.in_features), full.q_keep[j], full.kv_keep[j])
    pruned = copy.deepcopy(model)
    apply_plan(pruned, only_i)
    ppl_i = perplexity(torch_logits_fn(pruned), tok, TUNE)
    assert torch.tensor(probe["dense_nll"]).exp().item() == pytest.approx(dense_ppl, rel=1e-3)
    assert probe["damage"][i] == pytest.approx(torch.tensor(ppl_i / dense_ppl).log().item(), abs=2e-3)


def test_damage_allocation_spends_the_same_budget_and_spares_the_most_damaged_layer():
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    uni, dmg = copy.deepcopy(model), copy.deepcopy(model)
    opts = {"reconstruct": "none", "head_policy": "ffn_first"}
    r_uni = prune_model(uni, scores, ["domain/a"], "cusprun", 0.3, {**opts, "allocation": "uniform"})
    r_dmg = prune_model(dmg, scores, ["domain/a"], "cusprun", 0.3, dict(opts), tokenizer=tok, corpora=CORPORA)
    assert r_dmg["allocation"] == "damage" and r_uni["allocation"] == "uniform"  # damage: cusprun's default
    assert r_dmg["achieved_ratio"] == pytest.approx(r_uni["achieved_ratio"], abs=0.02)
    damage = r_dmg["layer_damage"]["damage"]
    widths = structure_of(dmg).intermediate_sizes
    worst, least = max(range(len(damage)), key=damage.__getitem__), min(range(len(damage)), key=damage.__getitem__)
    assert widths[worst] > widths[least]
    assert count_params(dmg)["prunable"] == pytest.approx(count_params(uni)["prunable"], rel=0.03)


def test_damage_weights_and_refusals():
    w = damage_weights([0.1, 0.4, 0.0, 1e-6], power=0.5, cap=2.0)
    assert w[0] > w[1] and w[2] == 2.0 and w[3] == 2.0 and min(w) >= 0.5
    assert damage_weights([0.0, 0.0], 1.0, 2.0) == [1.0, 1.0]
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    with pytest.raises(UserError, match="allocation=damage measures"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.3, {"allocation": "damage"})
    with pytest.raises(UserError, match="damage_cap must be a number"):
        make_plan(model, scores, ["domain/a"], "cusprun", 0.3, {"allocation": "damage", "damage_cap": 0.5})
    # cusprun's default budgets need held-apart documents: without them it falls back to uniform, and says so;
    # asked for by name, damage budgets without them are refused
    fallback = prune_model(copy.deepcopy(model), scores, ["domain/a"], "cusprun", 0.3, {"reconstruct": "none"},
                           tokenizer=tok, corpora={"domain/a": Corpus("domain/a", CALIB)})
    assert fallback["allocation"] == "uniform" and "no held-apart" in fallback["allocation_note"]
    with pytest.raises(UserError, match="held-apart calibration documents"):
        prune_model(model, scores, ["domain/a"], "cusprun", 0.3, {"allocation": "damage", "reconstruct": "none"},
                    tokenizer=tok, corpora={"domain/a": Corpus("domain/a", CALIB)})
