"""Reconstruction pass: after a plan removes units, refit the kept columns of each layer's output
projections (o_proj, down_proj) so the layer's output matches the dense layer's on calibration activations.

For a projection W with input a (o_proj: the concatenated head outputs; down_proj: the FFN activations),
K the kept columns, G = sum over calibration tokens of a a^T and C = sum of a_target a^T:

    W_K' = W C[:, K] (G[K, K] + ridge * mean(diag G[K, K]) * I)^-1

(the least-squares fit of W a_target by W_K' a_K with a ridge term; C = G when the target is the dense layer on
the same inputs). Only weights are refitted; gate/up/q/k/v rows are just dropped, so shapes and the export stay.

The pass is sequential and holds one decoder layer at a time (GPTQ style): the inputs of layer 0 are captured
once per calibration batch, then each layer is copied, its attention pruned and refitted, its MLP refitted on
the refitted attention's output, and the calibration stream advanced through it, so later layers are fitted
on the outputs of already pruned earlier ones (mode "one-shot" takes every statistic from the dense model
instead). Only that layer's statistics (float64 Gram matrices) exist at any time; the layer copy runs on
`device`, the streams wait on the CPU. Each layer runs about twice over the calibration documents: O(layers).

The ridge term, and whether to refit at all, is chosen on calibration documents held apart from scoring
(`Corpus.tune`), never on the evaluation split: the pass also carries the held-apart documents, so each
projection takes the ridge in RIDGES whose refit best predicts its target on them (a cross-validated ridge,
from their own Gram statistics: no extra pass), and at the end the refitted model is kept only if its
held-apart perplexity beats the same plan without refit (a cheap pass over the held-apart documents alone).
Measured on SmolLM2's code expert at 25% (held-apart ppl): no refit 10.86, fitting the dense layer on the same
inputs 7.06, fitting the dense model's own activations (target "dense") 9.42, one-shot dense statistics 7.05.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError
from ..measure.evaluate import nll_sum
from ..model import arch
from ..model.sequential import Stream, capture_stream, input_of, run_layer, visiting
from ..model.shards import OffloadedLayers, is_lazy, materialized
from ..model.structure import keep_ffn_channels, keep_heads

MODES = ("none", "sequential", "one-shot")
TARGETS = ("layer", "dense")
# The ridge when there is nothing held apart to choose on (a tiny corpus), or the grid's centre otherwise.
START_RIDGE = 1e-2
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# --------------------------------------------------------------------------- statistics


_ALIVE: "weakref.WeakSet[Statistic]" = weakref.WeakSet()


@dataclass(eq=False)
class Statistic:
    """One accumulated Gram matrix (float64) of one projection's input in one layer."""

    layer: int
    module: str  # "o" | "down"
    kind: str  # "gram" (a a^T) | "cross" (a_target a^T)
    matrix: torch.Tensor

    def __post_init__(self):
        _ALIVE.add(self)


def alive_statistics() -> list[tuple[int, str, str]]:
    """(layer, module, kind) of every statistic matrix currently in memory (freed ones drop out at once)."""
    return sorted((s.layer, s.module, s.kind) for s in list(_ALIVE))


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float,
                  cross: torch.Tensor | None = None) -> torch.Tensor:
    """W_K' = W C[:, K] (G[K, K] + ridge * mean(diag G[K, K]) I)^-1 for full G (and C; C = G when None)."""
    keep = keep.to(gram.device)
    return _ridge_solve(weight, gram[keep][:, keep], (gram if cross is None else cross)[:, keep], ridge)


def _ridge_solve(weight: torch.Tensor, g_kk: torch.Tensor, c_k: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve W_K' (G_KK + ridge * mean(diag G_KK) I) = W C_K in float64; returned in the weight's dtype."""
    rhs = weight.to(c_k.device, torch.float64) @ c_k  # [out, |K|]
    a = _with_ridge(g_kk, ridge)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs.T, chol).T
    else:  # singular without a ridge (units that never fire): least-norm solution
        sol = torch.linalg.lstsq(a, rhs.T, driver="gelsd" if a.device.type == "cpu" else None).solution.T
    return sol.to(weight.dtype)


def _with_ridge(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """G + ridge * mean(diag G) I: the ridge is relative to the inputs' mean energy."""
    scale = float(gram.diagonal().mean()) or 1.0
    out = gram.clone()  # one copy, no identity matrix: for an 8B model's FFN these are GBs each
    out.diagonal().add_(ridge * scale)
    return out


def obs_select(weight: torch.Tensor, gram: torch.Tensor, pool: torch.Tensor, n: int,
               ridge: float = START_RIDGE) -> torch.Tensor:
    """The `n` input channels of `pool` whose removal the refit compensates best, chosen greedily (OBS, as
    SlimGPT and ZipLM do for structured units): with H = G + ridge * mean(diag G) I over all input channels,
    removing channel k and refitting the rest costs ||W[:, k]||^2 / (H^-1)_kk at the layer's output; after each
    removal W and H^-1 are updated as the refit would update them. Returns the removed channels, sorted."""
    g = gram.to(torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(_with_ridge(g, ridge)))
    w = weight.to(g.device, torch.float64).clone()
    alive = torch.zeros(g.shape[0], dtype=torch.bool, device=g.device)
    alive[pool.to(g.device)] = True
    removed = []
    for _ in range(n):
        idx = alive.nonzero().squeeze(1)
        cost = (w[:, idx] ** 2).sum(0) / hinv.diagonal()[idx]
        k = int(idx[int(cost.argmin())])
        row = hinv[k] / hinv[k, k]
        w -= torch.outer(w[:, k], row)  # the rest absorb what channel k carried
        hinv -= torch.outer(hinv[:, k], row)  # H^-1 of the channels left
        alive[k] = False
        removed.append(k)
    return torch.tensor(sorted(removed), dtype=torch.long)


# --------------------------------------------------------------------------- one pass


@dataclass
class PassResult:
    weights: dict[int, dict[str, torch.Tensor]]  # layer -> {"o": W, "down": W} refitted (CPU)
    tune_nll: float | None  # mean next-token NLL of the held-apart documents through the pruned layers
    seconds: float
    peak_statistics: int  # most statistic matrices alive at once
    stats_bytes: int  # largest per-projection statistics footprint
    ridges: dict[str, float] = field(default_factory=dict)  # "layer/module" -> ridge used
    ffn_keep: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> kept channels chosen by OBS


def _head_cols(q_keep: list[int], hd: int) -> torch.Tensor:
    return torch.tensor([h * hd + j for h in q_keep for j in range(hd)], dtype=torch.long)


def _accumulate(layer_idx, module_name, pairs, masks, keep, tag=""):
    """G[:, K] = sum a a_K^T (rows K of it are G[K, K], all the solve needs) and, when `pairs` also yield a
    target activation, C[:, K] = sum a_target a_K^T. pairs yields (a, a_target | None) per batch."""
    gram = cross = None
    for (a, a_t), mask in zip(pairs, masks):
        m = mask.to(a.device)
        v = a[m].float()
        vk = v[:, keep.to(v.device)]
        if gram is None:
            shape = (v.shape[1], len(keep))
            gram = Statistic(layer_idx, module_name, tag + "gram", torch.zeros(shape, dtype=torch.float64, device=v.device))
            if a_t is not None:
                cross = Statistic(layer_idx, module_name, tag + "cross",
                                  torch.zeros(shape, dtype=torch.float64, device=v.device))
        gram.matrix += (v.T @ vk).double()
        if a_t is not None:
            cross.matrix += (a_t[m].float().T @ vk).double()
    return gram, cross


def _pairs(src, tgt, xs, xts, kws, device):
    """Per batch: (input of the projection src = (layer, module) on xs, that of tgt on xts or None)."""
    for b, k in enumerate(kws):
        a = input_of(*src, xs[b], k, device)
        yield a, (input_of(*tgt, xts[b], k, device) if tgt is not None else None)


def _heldout_error(weight, w_new, gram_t, cross_t, keep) -> float:
    """Squared error of W_K' a_K against the target W a_t on held-apart tokens, up to a constant:
    tr(W_K' G_KK W_K'^T) - 2 tr(W_K' C_K^T W^T), from their statistics (C = G for the layer target)."""
    w64, wn = weight.to(gram_t.device, torch.float64), w_new.to(gram_t.device, torch.float64)
    g_kk = gram_t[keep.to(gram_t.device)]
    c_k = gram_t if cross_t is None else cross_t
    return float(((wn @ g_kk) * wn).sum() - 2 * ((w64 @ c_k) * wn).sum())


@torch.no_grad()
def run_pass(model, plan, calib: Stream | None, tune: Stream | None, *, mode: str = "sequential",
             target: str = "layer", ridge: float | None = None, device="cpu",
             on_statistics: Callable[[int, str], None] | None = None,
             ffn_pool: list[torch.Tensor] | None = None) -> PassResult:
    """Prune a copy of each layer after `plan`, refit it (mode != "none"), and carry the streams through it.

    mode "sequential": statistics on the already pruned and refitted earlier layers' outputs;
    "one-shot": on the dense model's activations; "none": no refit (the held-apart documents still pass).
    target "layer": fit the dense layer's projection on the same inputs; "dense": fit the dense model's own
    activations (the dense path's input to the same layer). ridge None: per projection, the ridge in
    RIDGES whose refit best fits the held-apart documents (needs `tune`). The model itself is not changed.
    `on_statistics(layer, module)` is called when a projection's statistics are complete, before its solve.
    `ffn_pool` (select "obs"): per layer, the channels down_proj's removals are chosen from by obs_select, on that
    layer's full Gram, instead of the plan's; the choice is returned in `ffn_keep`."""
    t0 = time.time()
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    layers = arch.decoder_layers(model)
    refit = mode != "none"
    if refit and calib is None:
        raise UserError("reconstruction needs calibration documents")
    if refit and ridge is None and tune is None:
        raise UserError("choosing the ridge needs held-apart calibration documents")
    dense_path = refit and (mode == "one-shot" or target == "dense")
    cv = refit and ridge is None
    # streams: calibration (pruned path, dense path) and held-apart (pruned path, dense path)
    x_p = list(calib.hidden) if refit and mode == "sequential" else None
    x_d = list(calib.hidden) if dense_path else None
    x_t = list(tune.hidden) if tune is not None else None
    x_td = list(tune.hidden) if cv and dense_path else None
    # a lazy model's refitted projections wait on disk: all layers' would be most of an 8B model's o/down
    weights = OffloadedLayers() if is_lazy(model) else {}
    ridges: dict[str, float] = {}
    peak, stats_bytes = 0, 0
    selected: dict[int, torch.Tensor] = {}

    for i in range(len(layers)):
        with materialized(model, i) as layer:  # a lazy model's layer is read here and dropped after
            work = copy.deepcopy(layer).to(device)  # becomes the pruned (refitted) layer
            dense = copy.deepcopy(layer).to(device) if dense_path else None
            parts = arch.layer_parts(work, spec)
            n_q = parts.o.in_features // hd
            prune_heads = len(plan.q_keep[i]) < n_q or len(plan.kv_keep[i]) < parts.k.out_features // hd
            prune_ffn = plan.ffn_keep[i].numel() < parts.down.in_features
            out: dict[str, torch.Tensor] = {}
            for name, pruned, keep in (("o", prune_heads, _head_cols(plan.q_keep[i], hd)),
                                       ("down", prune_ffn, plan.ffn_keep[i])):
                new_w = None
                if pruned and refit:
                    module = parts.o if name == "o" else parts.down
                    dparts = arch.layer_parts(dense, spec) if dense is not None else None
                    dmodule = (dparts.o if name == "o" else dparts.down) if dparts else None
                    src = (dense, dmodule) if mode == "one-shot" else (work, module)
                    tgt = (dense, dmodule) if mode == "sequential" and target == "dense" else None
                    xs = x_d if mode == "one-shot" else x_p
                    select = name == "down" and bool(ffn_pool)
                    width = module.in_features
                    stats = _accumulate(i, name, _pairs(src, tgt, xs, x_d, calib.layer_kwargs[i], device),
                                        calib.masks, torch.arange(width) if select else keep)
                    if select:  # the full Gram chooses the removals; the solve then needs its kept columns only
                        removed = obs_select(module.weight, stats[0].matrix, ffn_pool[i], width - len(keep))
                        kept = torch.ones(width, dtype=torch.bool)
                        kept[removed] = False
                        keep = selected[i] = kept.nonzero().squeeze(1)
                        for st in stats:
                            if st is not None:
                                st.matrix = st.matrix[:, keep.to(st.matrix.device)]
                    if cv:  # the same statistics on the held-apart documents, to choose the ridge
                        xts = x_td if mode == "one-shot" else x_t
                        stats += _accumulate(i, name, _pairs(src, tgt, xts, x_td, tune.layer_kwargs[i], device),
                                             tune.masks, keep, tag="tune-")
                    peak = max(peak, len(_ALIVE))
                    stats_bytes = max(stats_bytes, sum(st.matrix.numel() * 8 for st in stats if st is not None))
                    if on_statistics:
                        on_statistics(i, name)
                    gram, cross = stats[0].matrix, stats[1].matrix if stats[1] is not None else None
                    g_kk = gram[keep.to(gram.device)]
                    candidates = RIDGES if cv else (ridge,)
                    best = None
                    for r in candidates:
                        w = _ridge_solve(module.weight, g_kk, gram if cross is None else cross, r)
                        err = _heldout_error(module.weight, w, stats[2].matrix,
                                             stats[3].matrix if stats[3] is not None else None, keep) if cv else 0.0
                        if best is None or err < best[0]:
                            best = (err, r, w)
                    _, ridges[f"{i}/{name}"], new_w = best
                    del stats, gram, cross, g_kk  # this projection's statistics are gone before the next ones exist
                if name == "o" and pruned:
                    keep_heads(parts, plan.q_keep[i], plan.kv_keep[i], hd, spec)
                elif name == "down" and pruned:
                    keep_ffn_channels(parts, keep, spec)
                parts = arch.layer_parts(work, spec)
                if new_w is not None:
                    target_module = parts.o if name == "o" else parts.down
                    target_module.weight.copy_(new_w.to(target_module.weight.device))
                    out[name] = new_w.cpu()
            if out:
                weights[i] = out
            if x_p is not None:
                x_p = [run_layer(work, x, k, device) for x, k in zip(x_p, calib.layer_kwargs[i])]
            if x_d is not None:
                x_d = [run_layer(dense, x, k, device) for x, k in zip(x_d, calib.layer_kwargs[i])]
            if x_t is not None:
                x_t = [run_layer(work, x, k, device) for x, k in zip(x_t, tune.layer_kwargs[i])]
            if x_td is not None:
                x_td = [run_layer(dense, x, k, device) for x, k in zip(x_td, tune.layer_kwargs[i])]
            del work, dense
    tune_nll = stream_nll(model, x_t, tune, device) if x_t is not None else None
    return PassResult(weights, tune_nll, time.time() - t0, peak, stats_bytes, ridges, selected)


def stream_nll(model, hidden: list[torch.Tensor], stream: Stream, device) -> float:
    """Mean next-token NLL of a stream at the last layer's output, through the model's final norm and head
    (on `device`, like the layers)."""
    spec = arch.spec_for(model)
    norm, head = arch.get(model, spec.final_norm), arch.get(model, spec.lm_head)
    cap = getattr(model.config, "final_logit_softcapping", None)
    nll, count = 0.0, 0
    with visiting(norm, device), visiting(head, device):
        for h, ids, mask in zip(hidden, stream.ids, stream.masks):
            logits = head(norm(h.to(device))).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            s, n = nll_sum(logits, ids, mask.long())
            nll, count = nll + s, count + n
    return nll / max(1, count)


# --------------------------------------------------------------------------- choosing the ridge


@dataclass
class Choice:
    """What was tried on the held-apart documents and what was kept."""

    mode: str
    target: str
    ridge: float | str | None  # None: no refit; "per-layer": chosen per projection (see ridges)
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    ridges: dict[str, float] = field(default_factory=dict)
    tried: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_statistics: int = 0
    stats_bytes: int = 0
    calib_tokens: int = 0
    tune_tokens: int = 0
    note: str = ""
    select: str = "scores"
    ffn_keep: dict[int, torch.Tensor] = field(default_factory=dict)  # OBS's choice, when the refit is kept

    def record(self) -> dict:
        counts: dict[str, int] = {}
        for r in self.ridges.values():
            counts[f"{r:g}"] = counts.get(f"{r:g}", 0) + 1
        return {
            "mode": self.mode if self.ridge is not None else "none", "requested_mode": self.mode,
            "target": self.target, "ridge": self.ridge, "ridge_counts": counts, "tried": self.tried,
            "seconds": round(self.seconds, 2), "peak_statistics_alive": self.peak_statistics,
            "stats_mb": round(self.stats_bytes / 2**20, 1), "calib_tokens": self.calib_tokens,
            "tune_tokens": self.tune_tokens, "note": self.note,
            **({"select": "obs" if self.ffn_keep else "scores (the refit, and OBS with it, was not kept)"}
               if self.select == "obs" else {}),
        }


def choose_and_refit(model, plan, tokenizer, calib_texts: list[str], tune_texts: list[str], *,
                     mode: str = "sequential", target: str = "layer", ridge: float | str = "auto",
                     device="cpu", batch_size: int = 8, max_length: int = 512,
                     on_statistics=None, ffn_pool: list[torch.Tensor] | None = None) -> Choice:
    """Refitted weights for `plan` (the model is not changed).

    ridge="auto": each projection's ridge is the one in RIDGES whose refit best fits the held-apart documents,
    then the refitted model is kept only if its held-apart perplexity beats no refit. A number: that ridge.
    `ffn_pool`: choose down_proj's removals by OBS within it (run_pass); the choice comes with the refit."""
    if mode not in MODES or mode == "none":
        raise UserError(f"reconstruction mode must be one of {', '.join(MODES[1:])}, got {mode}")
    if target not in TARGETS:
        raise UserError(f"--option refit_target={target} is not valid; choose one of {', '.join(TARGETS)}")
    if not calib_texts:
        raise UserError("reconstruction needs the expert's calibration documents")
    t0 = time.time()
    calib = capture_stream(model, tokenizer, calib_texts, batch_size=batch_size, max_length=max_length)
    tune = (capture_stream(model, tokenizer, tune_texts, batch_size=batch_size, max_length=max_length)
            if tune_texts else None)
    choice = Choice(mode, target, None, calib_tokens=calib.n_tokens, tune_tokens=tune.n_tokens if tune else 0,
                    select="obs" if ffn_pool else "scores")

    def attempt(label, r, refit=True):
        """One pass; r None: the ridge chosen per projection on the held-apart documents."""
        res = run_pass(model, plan, calib if refit else None, tune, mode=mode if refit else "none",
                       target=target, ridge=r, device=device, on_statistics=on_statistics,
                       ffn_pool=ffn_pool if refit else None)
        choice.peak_statistics = max(choice.peak_statistics, res.peak_statistics)
        choice.stats_bytes = max(choice.stats_bytes, res.stats_bytes)
        if res.tune_nll is not None:
            choice.tried.append({"refit": label, "tune_ppl": round(math.exp(res.tune_nll), 4),
                                 "seconds": round(res.seconds, 1)})
        return res

    if not isinstance(ridge, str):
        res = attempt(f"ridge {float(ridge):g}", float(ridge))
        choice.ridge, choice.weights, choice.ridges = float(ridge), res.weights, res.ridges
        choice.ffn_keep, choice.note = res.ffn_keep, "ridge given"
    elif tune is None:
        # nothing held apart to choose on (a tiny corpus): the usual ridge, unchecked
        res = attempt(f"ridge {START_RIDGE:g}", START_RIDGE)
        choice.ridge, choice.weights, choice.ridges = START_RIDGE, res.weights, res.ridges
        choice.ffn_keep = res.ffn_keep
        choice.note = "no held-apart documents: ridge not tuned, not checked against no refit"
    else:
        base = attempt("none", None, refit=False)
        res = attempt("per-layer ridge", None)
        choice.ridges = res.ridges  # recorded either way: what the refit would have used
        if res.tune_nll < base.tune_nll:
            choice.ridge, choice.weights, choice.ffn_keep = "per-layer", res.weights, res.ffn_keep
            choice.note = "ridge chosen per projection on held-apart documents; refit beats no refit there"
        else:
            choice.note = "no refit: the refit made held-apart perplexity worse"
    choice.seconds = time.time() - t0
    return choice


@torch.no_grad()
def load_refitted(model, weights: dict[int, dict[str, torch.Tensor]]) -> None:
    """Copy refitted projection weights into an already pruned model (same layer indices and shapes)."""
    spec = arch.spec_for(model)
    layers = arch.decoder_layers(model)
    for i, mods in weights.items():
        load_refitted_layer(layers[i], i, mods, spec)


@torch.no_grad()
def load_refitted_layer(layer, i: int, mods: dict[str, torch.Tensor], spec) -> None:
    """Copy one pruned layer's refitted projections ({"o": W, "down": W}) into it."""
    parts = arch.layer_parts(layer, spec)
    for name, w in mods.items():
        lin = parts.o if name == "o" else parts.down
        if lin.weight.shape != w.shape:
            raise ValueError(f"layer {i} {name}: refitted weight {tuple(w.shape)} vs {tuple(lin.weight.shape)}")
        lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))
