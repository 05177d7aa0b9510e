"""Pruning methods as data: a unit scorer plus an allocation rule, all reading one shared ScoreSet.

A method turns statistics into a `Plan` (which FFN channels, query heads and layers stay). Scores are
"importance": higher means keep. Units are:
  - FFN channels (a gate row, an up row and a down column; 3*hidden parameters),
  - head tiers: the t-th least important query head of *every* KV group, so the GQA grouping stays
    valid and every layer keeps the same KV-head count (ONNX Runtime GenAI sizes one KV cache for all),
  - whole layers (ShortGPT only).
Allocation: `global` ranks units of all layers together (scores must be comparable), `uniform` removes the
same fraction from every layer, `logistic` follows SEAP's depth schedule with the first and last layer kept, `damage` gives each layer a share
of the budget that falls with the damage its uniform-plan removal does at the model's output on held-apart
calibration documents (damage.py; prune_model measures it).
Head policy (uniform and logistic): `fraction` takes a layer's fraction from its FFN channels and its head
tiers alike (so past 1/group of a layer, a whole tier goes); `ffn_first` takes the layer's share of
parameters from FFN channels and removes head tiers only once the FFN is at its floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..model import arch
from ..model.shards import materialized
from ..model.structure import count_params
from .registry import (  # noqa: F401
    METHODS,
    OBS_POOL,
    RECIPE_CHOICES,
    SCORER_NAMES,
    MethodSpec,
    check_options,
    check_ratio,
    get_method,
    method_with_overrides,
)
from .score import CorpusScores, ScoreSet

MIN_FFN_KEEP = 1 / 16  # never empty a layer's MLP: an all-zero block would waste the export anyway


@dataclass
class Plan:
    """What stays: per layer kept FFN channels and query/KV heads, kept layers, FLAP bias vectors."""

    ffn_keep: list[torch.Tensor]
    q_keep: list[list[int]]
    kv_keep: list[list[int]]
    layers_keep: list[int]
    ffn_bias: list[torch.Tensor | None] = field(default_factory=list)
    o_bias: list[torch.Tensor | None] = field(default_factory=list)
    # select "obs": per layer, the FFN channels the refit may choose its removals from (reconstruct.obs_select)
    ffn_pool: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LayerUnits:
    """Importance of one layer's units: FFN channels [C] and query heads [H]."""

    ffn: torch.Tensor
    heads: torch.Tensor



# --------------------------------------------------------------------------- pooled statistics


def pooled(corpora: list[CorpusScores], key: str, i: int) -> torch.Tensor:
    """Sum of a token-summed statistic over several corpora (baselines pool the expert's data)."""
    return sum(c.layer(key, i) for c in corpora)


def n_tokens(corpora: list[CorpusScores]) -> int:
    return sum(c.n_tokens for c in corpora)


# --------------------------------------------------------------------------- scorers


def _percentile_ranks(x: torch.Tensor) -> torch.Tensor:
    """Row-wise percentile rank in [0, 1] of each entry among its row (x: [docs, units])."""
    ranks = x.argsort(dim=1).argsort(dim=1).float()
    return ranks / max(1, x.shape[1] - 1)


def score_cusprun(model, corpora, opts) -> list[LayerUnits]:
    """Relevance R of a unit = max over the expert's dimensions of the tau-quantile over documents of its
    within-layer percentile rank of impact. "R < sigma" is exactly Cus-Prun's rule: in the lowest sigma of
    units in at least a fraction tau of documents, for every dimension; pruning the lowest R at a ratio
    picks sigma. tau=1 is the strict every-document rule; the default 0.9 lets a few atypical documents
    not veto a unit (the corpora are small, so one odd document would otherwise decide)."""
    tau = float(opts.get("tau", 0.9))
    suffix = {"mean": "_impact_doc", "rms": "_impact_rms_doc"}[opts.get("aggregate", "rms")]
    out = []
    for i in range(len(arch.decoder_layers(model))):
        per_dim = []
        for kind in ("ffn" + suffix, "head" + suffix):
            rel = torch.stack([torch.quantile(_percentile_ranks(c.layer(kind, i)), tau, dim=0) for c in corpora])
            mean_impact = torch.stack([c.layer(kind, i).mean(0) for c in corpora]).max(0).values
            # ties in R (common with few documents) are broken by mean impact
            tie = _percentile_ranks(mean_impact[None])[0] * 1e-3
            per_dim.append(rel.max(0).values + tie)
        out.append(LayerUnits(*per_dim))
    return out


def _weighted_parts(model):
    """(i, the parts of decoder layer i) with their weights, for scorers that read them: a lazy model's layers
    are read one at a time (model/shards.py)."""
    spec = arch.spec_for(model)
    for i in range(len(arch.decoder_layers(model))):
        with materialized(model, i) as layer:
            yield i, arch.layer_parts(layer, spec)


def _w(linear) -> torch.Tensor:
    """A projection's weight on the CPU in fp32, where the statistics are (the model may be on an accelerator)."""
    return linear.weight.detach().float().cpu()


def score_wanda_sp(model, corpora, opts) -> list[LayerUnits]:
    out = []
    hd = arch.head_dim(model)
    for i, p in _weighted_parts(model):
        a_norm = pooled(corpora, "ffn_sq", i).sqrt()
        x_mlp = pooled(corpora, "mlp_in_sq", i).sqrt()
        x_att = pooled(corpora, "attn_in_sq", i).sqrt()
        o_norm = pooled(corpora, "o_sq", i).sqrt()
        ffn = (_w(p.down).abs() * a_norm).sum(0) + (_w(p.gate).abs() * x_mlp).sum(1) \
            + (_w(p.up).abs() * x_mlp).sum(1)
        o_cols = (_w(p.o).abs() * o_norm).sum(0)
        q_rows = (_w(p.q).abs() * x_att).sum(1)
        heads = o_cols.view(-1, hd).sum(1) + q_rows.view(-1, hd).sum(1)
        out.append(LayerUnits(ffn, heads))
    return out


def _variance(corpora, prefix: str, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = n_tokens(corpora)
    mean = pooled(corpora, f"{prefix}_sum", i) / n
    var = (pooled(corpora, f"{prefix}_sq", i) / n - mean * mean).clamp(min=0)
    return mean, var


def score_flap(model, corpora, opts) -> list[LayerUnits]:
    """Fluctuation of each input feature times the squared norm of its weight column, then standardized
    per layer and unit type so that one global threshold compares them (FLAP's adaptive structure)."""
    hd = arch.head_dim(model)
    raw = []
    for i, p in _weighted_parts(model):
        _, var_a = _variance(corpora, "ffn", i)
        _, var_o = _variance(corpora, "o", i)
        ffn = var_a * _w(p.down).pow(2).sum(0)
        heads = (var_o * _w(p.o).pow(2).sum(0)).view(-1, hd).sum(1)
        raw.append(LayerUnits(ffn, heads))
    return [LayerUnits(_standardize(u.ffn), _standardize(u.heads)) for u in raw]


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp(min=1e-12)


def score_seap(model, corpora, opts) -> list[LayerUnits]:
    hd = arch.head_dim(model)
    n = n_tokens(corpora)
    out = []
    for i, p in _weighted_parts(model):
        ffn = pooled(corpora, "ffn_abs", i) / n * _w(p.down).norm(dim=0)
        heads = (pooled(corpora, "o_abs", i) / n * _w(p.o).norm(dim=0)).view(-1, hd).sum(1)
        out.append(LayerUnits(ffn, heads))
    return out


def score_magnitude(model, corpora, opts) -> list[LayerUnits]:
    hd = arch.head_dim(model)
    out = []
    for _, p in _weighted_parts(model):
        ffn = _w(p.gate).abs().sum(1) + _w(p.up).abs().sum(1) + _w(p.down).abs().sum(0)
        heads = _w(p.q).abs().sum(1).view(-1, hd).sum(1) + _w(p.o).abs().sum(0).view(-1, hd).sum(1)
        out.append(LayerUnits(ffn, heads))
    return out


def score_random(model, corpora, opts) -> list[LayerUnits]:
    g = torch.Generator().manual_seed(int(opts.get("seed", 0)))
    return [
        LayerUnits(torch.rand(p.down.in_features, generator=g), torch.rand(p.o.in_features // arch.head_dim(model), generator=g))
        for p in arch.all_layer_parts(model)
    ]


def score_block_influence(model, corpora, opts) -> list[float]:
    n = n_tokens(corpora)
    return [float(pooled(corpora, "block_influence", i)) / n for i in range(len(arch.decoder_layers(model)))]


SCORERS: dict[str, Callable] = {
    "cusprun": score_cusprun, "wanda_sp": score_wanda_sp, "flap": score_flap, "seap": score_seap,
    "magnitude": score_magnitude, "random": score_random, "block_influence": score_block_influence,
}
assert tuple(SCORERS) == SCORER_NAMES  # the registry names them without importing torch


# --------------------------------------------------------------------------- allocation


@dataclass
class _Geometry:
    hidden: int
    hd: int
    n_q: list[int]
    n_kv: list[int]
    ffn: list[int]
    ffn_cost: int  # parameters per FFN channel
    head_cost: list[int]  # parameters per query head, per layer
    layer_cost: list[int]


def _geometry(model) -> _Geometry:
    hd = arch.head_dim(model)
    parts = arch.all_layer_parts(model)
    hidden = model.config.hidden_size
    layers = arch.decoder_layers(model)
    return _Geometry(
        hidden=hidden, hd=hd,
        n_q=[p.o.in_features // hd for p in parts],
        n_kv=[p.k.out_features // hd for p in parts],
        ffn=[p.down.in_features for p in parts],
        ffn_cost=3 * hidden + int(parts[0].gate.bias is not None) * 2,
        head_cost=[hd * hidden * 2 + (hd if p.q.bias is not None else 0) for p in parts],
        layer_cost=[sum(x.numel() for x in layer.parameters()) for layer in layers],
    )


def _head_tiers(heads: torch.Tensor, n_kv: int, reduce: str) -> list[tuple[float, list[int]]]:
    """Tiers of removable query heads: tier t holds the t-th least important head of every KV group.
    The last head of each group is never offered (a group keeps at least one query head)."""
    group = heads.numel() // n_kv
    order = heads.view(n_kv, group).argsort(dim=1)  # per group, ascending importance
    tiers = []
    for t in range(group - 1):
        members = [int(g * group + order[g, t]) for g in range(n_kv)]
        vals = heads[members]
        tiers.append((float(vals.detach().max() if reduce == "max" else vals.detach().mean()), members))
    return tiers


def _ffn_limit(geo: _Geometry, i: int) -> int:
    """How many FFN channels layer i may lose (MIN_FFN_KEEP of them always stay)."""
    return geo.ffn[i] - max(1, math.ceil(MIN_FFN_KEEP * geo.ffn[i]))


def _removed_counts_for_fractions(geo: _Geometry, fracs: list[float], head_policy: str) -> tuple[list[int], list[int]]:
    n_ffn, n_tiers = [], []
    for i, s in enumerate(fracs):
        group = geo.n_q[i] // geo.n_kv[i]
        if head_policy == "ffn_first":
            # s is the share of the layer's prunable parameters; FFN channels pay first
            target = s * (geo.ffn[i] * geo.ffn_cost + geo.n_q[i] * geo.head_cost[i])
            ffn = min(int(round(target / geo.ffn_cost)), _ffn_limit(geo, i))
            rest = target - ffn * geo.ffn_cost
            tiers = min(int(round(rest / (geo.n_kv[i] * geo.head_cost[i]))), group - 1) if rest > 0 else 0
        else:
            ffn = min(int(round(s * geo.ffn[i])), _ffn_limit(geo, i))
            tiers = min(int(math.floor(s * group + 1e-9)), group - 1)
        n_ffn.append(ffn)
        n_tiers.append(tiers)
    return n_ffn, n_tiers


def _cost(geo: _Geometry, n_ffn: list[int], n_tiers: list[int]) -> int:
    return sum(n * geo.ffn_cost for n in n_ffn) + sum(
        t * geo.n_kv[i] * geo.head_cost[i] for i, t in enumerate(n_tiers)
    )


def _fractions(spec: MethodSpec, n_layers: int, x: float, weights: list[float] | None = None) -> list[float]:
    if spec.allocation == "uniform":
        return [x] * n_layers
    if spec.allocation == "damage":  # weights from damage.damage_weights
        return [min(0.95, x * w) for w in weights]
    # SEAP: sparsity rises with depth along a logistic curve; the first and last layer are kept whole
    fr = []
    for i in range(n_layers):
        if i == 0 or i == n_layers - 1:
            fr.append(0.0)
        else:
            fr.append(min(0.95, x / (1 + math.exp(-8 * (i / (n_layers - 1) - 0.5)))))
    return fr


def _scheduled_plan(spec, geo, units, budget, weights=None) -> tuple[list[int], list[int]]:
    """Per-layer removal counts from a one-parameter schedule, the parameter found by bisection."""
    lo, hi = 0.0, 2.0
    for _ in range(50):
        mid = (lo + hi) / 2
        counts = _removed_counts_for_fractions(geo, _fractions(spec, len(units), mid, weights), spec.head_policy)
        if _cost(geo, *counts) > budget:
            hi = mid
        else:
            lo = mid
    fractions = _fractions(spec, len(units), lo, weights)
    n_ffn, n_tiers = _removed_counts_for_fractions(geo, fractions, spec.head_policy)
    # top up with the cheapest unit (FFN channels, most removable layer first) to reach the budget
    left = budget - _cost(geo, n_ffn, n_tiers)
    i = 0
    while left >= geo.ffn_cost and i < 10 * len(units) * max(geo.ffn):
        layer = i % len(units)
        if fractions[layer] > 0 and n_ffn[layer] < _ffn_limit(geo, layer):
            n_ffn[layer] += 1
            left -= geo.ffn_cost
        i += 1
    return n_ffn, n_tiers


def _global_plan(spec, geo, units, budget) -> tuple[list[int], list[list[int]], list[int]]:
    """Greedy over all units sorted by importance: remove while the parameter budget allows."""
    cands = []  # (score, cost, kind, layer, payload)
    for i, u in enumerate(units):
        for k in range(u.ffn.numel()):
            cands.append((float(u.ffn[k]), geo.ffn_cost, "ffn", i, k))
        for score, members in _head_tiers(u.heads, geo.n_kv[i], spec.head_tier_reduce):
            cands.append((score, len(members) * geo.head_cost[i], "tier", i, members))
    cands.sort(key=lambda c: c[0])
    removed_ffn = [[] for _ in units]
    removed_heads = [[] for _ in units]
    left = budget
    for score, cost, kind, i, payload in cands:
        if cost > left:
            continue
        if kind == "ffn":
            if len(removed_ffn[i]) >= _ffn_limit(geo, i):
                continue
            removed_ffn[i].append(payload)
        else:
            removed_heads[i].extend(payload)
        left -= cost
    return removed_ffn, removed_heads





@torch.no_grad()
def make_plan(model, scores: ScoreSet | None, corpus_names: list[str], method: str, ratio: float,
              options: dict | None = None, layer_damage: list[float] | None = None) -> Plan:
    """Decide what to remove so that `ratio` of the prunable (non-embedding) parameters go.
    allocation "damage" needs `layer_damage` (damage.layer_damage of the uniform plan; prune_model measures it)."""
    opts = dict(options or {})
    spec = method_with_overrides(method, opts)
    check_ratio(ratio)
    if spec.allocation == "damage" and layer_damage is None:
        raise UserError("allocation=damage measures each layer's damage on held-apart documents; "
                        "run it through `prune`/`build`, which have the expert's corpora")
    corpora = []
    if spec.needs_data:
        if scores is None:
            raise UserError(f"method '{method}' needs scores; run `cusprun-edge score` first")
        missing = [d for d in corpus_names if d not in scores.corpora]
        if missing:
            raise UserError(
                f"the score file has no scores for {', '.join(missing)} (it has {', '.join(scores.corpora)}); "
                "re-run `cusprun-edge score` with this expert"
            )
        corpora = [scores.corpora[d] for d in corpus_names]
    geo = _geometry(model)
    budget = int(ratio * count_params(model)["prunable"])
    n_layers = len(geo.ffn)
    plan = Plan(
        ffn_keep=[torch.arange(c) for c in geo.ffn],
        q_keep=[list(range(q)) for q in geo.n_q],
        kv_keep=[list(range(kv)) for kv in geo.n_kv],
        layers_keep=list(range(n_layers)),
    )
    if spec.allocation == "layers":
        bi = SCORERS[spec.scorer](model, corpora, opts)
        removed, left = [], budget
        for i in sorted(range(n_layers), key=lambda i: bi[i]):
            if geo.layer_cost[i] <= left and len(removed) < n_layers - 1:
                removed.append(i)
                left -= geo.layer_cost[i]
        plan.layers_keep = [i for i in range(n_layers) if i not in removed]
        return plan
    units = SCORERS[spec.scorer](model, corpora, opts)
    if spec.allocation == "global":
        removed_ffn, removed_heads = _global_plan(spec, geo, units, budget)
    else:
        weights = None
        if spec.allocation == "damage":
            from .damage import damage_weights

            weights = damage_weights(layer_damage, spec.damage_power, spec.damage_cap)
        n_ffn, n_tiers = _scheduled_plan(spec, geo, units, budget, weights)
        removed_ffn, removed_heads = [], []
        for i, u in enumerate(units):
            removed_ffn.append(u.ffn.argsort()[: n_ffn[i]].tolist())
            removed_heads.append(
                [h for _, m in _head_tiers(u.heads, geo.n_kv[i], spec.head_tier_reduce)[: n_tiers[i]] for h in m]
            )
    for i in range(n_layers):
        drop = set(removed_ffn[i])
        plan.ffn_keep[i] = torch.tensor([k for k in range(geo.ffn[i]) if k not in drop], dtype=torch.long)
        gone = set(removed_heads[i])
        plan.q_keep[i] = [h for h in range(geo.n_q[i]) if h not in gone]
    if spec.select == "obs":
        plan.ffn_pool = [u.ffn.argsort()[: min(geo.ffn[i], OBS_POOL * len(removed_ffn[i]))]
                         for i, u in enumerate(units)]
    if spec.bias_compensation:
        plan.ffn_bias, plan.o_bias = _compensation(model, corpora, plan)
    return plan


def _compensation(model, corpora, plan: Plan):
    """FLAP's bias: the removed units' mean contribution, W[:, removed] @ mean(x_removed), kept as a bias."""
    n = n_tokens(corpora)
    hd = arch.head_dim(model)
    ffn_bias, o_bias = [], []
    for i, p in _weighted_parts(model):
        mean_a = pooled(corpora, "ffn_sum", i) / n
        gone = torch.ones(p.down.in_features, dtype=torch.bool)
        gone[plan.ffn_keep[i]] = False
        ffn_bias.append(_w(p.down)[:, gone] @ mean_a[gone] if gone.any() else None)
        mean_x = pooled(corpora, "o_sum", i) / n
        cols = torch.ones(p.o.in_features, dtype=torch.bool)
        for h in plan.q_keep[i]:
            cols[h * hd:(h + 1) * hd] = False
        o_bias.append(_w(p.o)[:, cols] @ mean_x[cols] if cols.any() else None)
    return ffn_bias, o_bias


# --------------------------------------------------------------------------- checking --option

