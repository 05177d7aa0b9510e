"""Damage probes for budgets that follow measured damage (allocation "damage").

A uniform allocation removes the same share of every layer. To spread the budget by what a removal costs at
the model's output, each layer is pruned alone, as the uniform plan would prune it, and the mean next-token
NLL of the held-apart calibration documents (`Corpus.tune`, never the eval split) is measured at the output:
damage_i = NLL(layer i pruned, every other layer dense) - NLL(dense). methods.make_plan then gives layer i a
share of the budget proportional to (mean damage / damage_i) ** power, capped (see methods._fractions).

Cost: the held-apart stream is captured at every layer's input once (dense), then probe i runs layers i..L-1,
about L/2 model passes over the held-apart documents in all; no refit is involved (a probe measures what the
removed units carry, which the refit later compensates in part).
"""

from __future__ import annotations

import copy
import time

import torch

from ..model import arch
from ..model.structure import keep_ffn_channels, keep_heads
from .reconstruct import _forward, _stream_nll, capture_stream, visiting


@torch.no_grad()
def layer_damage(model, plan, tokenizer, texts: list[str], *, device="cpu", batch_size: int = 8,
                 max_length: int = 512) -> dict:
    """Per-layer output damage of `plan`'s removals, one layer at a time, on `texts` (held-apart documents).
    Returns {"damage": [...], "dense_nll": float, "seconds": float, "tokens": int}."""
    t0 = time.time()
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    layers = arch.decoder_layers(model)
    stream = capture_stream(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    inputs = [list(stream.hidden)]  # inputs[i]: the dense stream at layer i's input
    for i, layer in enumerate(layers):
        inputs.append(_run(layer, inputs[-1], stream.layer_kwargs[i], device))
    dense_nll = _stream_nll(model, inputs[-1], stream, device)
    damage = []
    for i, layer in enumerate(layers):
        parts = arch.layer_parts(layer, spec)
        heads_cut = len(plan.q_keep[i]) < parts.o.in_features // hd
        ffn_cut = plan.ffn_keep[i].numel() < parts.down.in_features
        if not (heads_cut or ffn_cut):
            damage.append(0.0)
            continue
        work = copy.deepcopy(layer)
        wparts = arch.layer_parts(work, spec)
        if heads_cut:
            keep_heads(wparts, plan.q_keep[i], plan.kv_keep[i], hd, spec)
            wparts = arch.layer_parts(work, spec)
        if ffn_cut:
            keep_ffn_channels(wparts, plan.ffn_keep[i], spec)
        xs = _run(work, inputs[i], stream.layer_kwargs[i], device)
        for j in range(i + 1, len(layers)):
            xs = _run(layers[j], xs, stream.layer_kwargs[j], device)
        damage.append(_stream_nll(model, xs, stream, device) - dense_nll)
        del work, xs
    return {"damage": [round(d, 5) for d in damage], "dense_nll": round(dense_nll, 5),
            "seconds": round(time.time() - t0, 1), "tokens": stream.n_tokens}


def _run(layer, xs: list[torch.Tensor], kwargs: list[dict], device) -> list[torch.Tensor]:
    """`layer` over every batch on `device`. A layer that lives elsewhere (the model on the CPU, --device cuda)
    is moved there for the call and back after it, so one layer at a time occupies the accelerator."""
    with visiting(layer, device):
        return [_forward(layer, x, k, device) for x, k in zip(xs, kwargs)]


def damage_weights(damage: list[float], power: float, cap: float) -> list[float]:
    """Relative share of the budget per layer: (mean damage / damage_i) ** power, in [1/cap, cap]; a layer
    whose removal did not hurt (damage <= 0) gets the cap."""
    pos = [d for d in damage if d > 0]
    if not pos:
        return [1.0] * len(damage)
    mean = sum(pos) / len(pos)
    return [min(cap, max(1 / cap, (mean / d) ** power)) if d > 0 else cap for d in damage]
