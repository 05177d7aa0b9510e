"""Damage probes for budgets that follow measured damage (allocation "damage").

A uniform allocation removes the same share of every layer. To spread the budget by what a removal costs at
the model's output, each layer is pruned alone, as the uniform plan would prune it, and the mean next-token
NLL of the held-apart calibration documents (`Corpus.tune`, never the eval split) is measured at the output:
damage_i = NLL(layer i pruned, every other layer dense) - NLL(dense). methods.make_plan then gives layer i a
share of the budget proportional to (mean damage / damage_i) ** power, capped (see methods._fractions).

Cost: probe i runs layers i..L-1, about L/2 model passes over the held-apart documents in all, in one sweep
that reads each layer once; no refit is involved (a probe measures what the
removed units carry, which the refit later compensates in part).
"""

from __future__ import annotations

import copy
import time

import torch

from ..model import arch
from ..model.sequential import capture_stream, run_layer, visiting
from ..model.shards import materialized
from ..model.structure import keep_ffn_channels, keep_heads
from .reconstruct import stream_nll


@torch.no_grad()
def layer_damage(model, plan, tokenizer, texts: list[str], *, device="cpu", batch_size: int = 8,
                 max_length: int = 512) -> dict:
    """Per-layer output damage of `plan`'s removals, one layer at a time, on `texts` (held-apart documents).
    Returns {"damage": [...], "dense_nll": float, "seconds": float, "tokens": int}.

    One sweep over the layers (model/sequential.py): at layer j, every probe begun at an earlier layer passes
    the dense layer j, probe j begins from the dense stream through the pruned copy of layer j, and the dense
    stream moves on; so each layer is read once (a lazy model's from disk), while the streams of the probes
    under way wait in memory (held-apart tokens x hidden size each)."""
    t0 = time.time()
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    stream = capture_stream(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    dense = stream.hidden  # the dense stream at the input of the layer being swept
    probes: dict[int, list[torch.Tensor]] = {}  # layer pruned -> its stream at the same place
    for j in range(len(arch.decoder_layers(model))):
        kwargs = stream.layer_kwargs[j]
        with materialized(model, j) as layer, visiting(layer, device):
            for i in probes:
                probes[i] = _run(layer, probes[i], kwargs, device)
            parts = arch.layer_parts(layer, spec)
            heads_cut = len(plan.q_keep[j]) < parts.o.in_features // hd
            ffn_cut = plan.ffn_keep[j].numel() < parts.down.in_features
            if heads_cut or ffn_cut:
                work = copy.deepcopy(layer)
                wparts = arch.layer_parts(work, spec)
                if heads_cut:
                    keep_heads(wparts, plan.q_keep[j], plan.kv_keep[j], hd, spec)
                    wparts = arch.layer_parts(work, spec)
                if ffn_cut:
                    keep_ffn_channels(wparts, plan.ffn_keep[j], spec)
                probes[j] = _run(work, dense, kwargs, device)
                del work
            dense = _run(layer, dense, kwargs, device)
    dense_nll = stream_nll(model, dense, stream, device)
    damage = [stream_nll(model, probes.pop(i), stream, device) - dense_nll if i in probes else 0.0
              for i in range(len(arch.decoder_layers(model)))]
    return {"damage": [round(d, 5) for d in damage], "dense_nll": round(dense_nll, 5),
            "seconds": round(time.time() - t0, 1), "tokens": stream.n_tokens}


def _run(layer, xs: list[torch.Tensor], kwargs: list[dict], device) -> list[torch.Tensor]:
    """`layer` (already on `device`) over every batch."""
    return [run_layer(layer, x, k, device) for x, k in zip(xs, kwargs)]


def damage_weights(damage: list[float], power: float, cap: float) -> list[float]:
    """Relative share of the budget per layer: (mean damage / damage_i) ** power, in [1/cap, cap]; a layer
    whose removal did not hurt (damage <= 0) gets the cap."""
    pos = [d for d in damage if d > 0]
    if not pos:
        return [1.0] * len(damage)
    mean = sum(pos) / len(pos)
    return [min(cap, max(1 / cap, (mean / d) ** power)) if d > 0 else cap for d in damage]
