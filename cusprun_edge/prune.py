"""Prune stage: apply a method's plan to the model for real and save the expert."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from . import __version__, arch
from .expert_io import save_expert
from .methods import Plan, get_method, make_plan
from .score import ScoreSet
from .structure import (
    add_output_bias,
    count_params,
    keep_ffn_channels,
    keep_heads,
    keep_layers,
    record_structure,
)


@torch.no_grad()
def apply_plan(model, plan: Plan) -> None:
    """Physically remove the units the plan drops (in place)."""
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    for i, parts in enumerate(arch.all_layer_parts(model)):
        if plan.ffn_bias and plan.ffn_bias[i] is not None:
            add_output_bias(parts, "mlp", plan.ffn_bias[i], spec)
        if plan.o_bias and plan.o_bias[i] is not None:
            add_output_bias(parts, "attn", plan.o_bias[i], spec)
        parts = arch.layer_parts(arch.decoder_layers(model)[i], spec)
        if plan.ffn_keep[i].numel() < parts.down.in_features:
            keep_ffn_channels(parts, plan.ffn_keep[i], spec)
        if len(plan.q_keep[i]) < parts.o.in_features // hd or len(plan.kv_keep[i]) < parts.k.out_features // hd:
            keep_heads(parts, plan.q_keep[i], plan.kv_keep[i], hd, spec)
    if len(plan.layers_keep) < len(arch.decoder_layers(model)):
        keep_layers(model, plan.layers_keep)
    record_structure(model)


def prune_model(model, scores: ScoreSet | None, corpus_names: list[str], method: str, ratio: float,
                options: dict | None = None) -> dict:
    """Prune `model` in place; returns a record with the achieved ratio and parameter counts."""
    spec = get_method(method)
    if spec.needs_data and scores is not None:
        scores.check_model(model)
    before = count_params(model)
    t0 = time.time()
    plan = make_plan(model, scores, corpus_names, method, ratio, options)
    apply_plan(model, plan)
    after = count_params(model)
    return {
        "method": method,
        "target_ratio": ratio,
        "achieved_ratio": (before["prunable"] - after["prunable"]) / before["prunable"],
        "params_before": before,
        "params_after": after,
        "options": options or {},
        "seconds": round(time.time() - t0, 2),
    }


def prune_and_save(model, tokenizer, scores, corpus_names, method, ratio, out: Path, *, options=None,
                   extra: dict | None = None, force: bool = False, vocab_texts: list[str] | None = None,
                   vocab_keep_top: int = 8192) -> dict:
    """Prune, optionally drop vocabulary rows unseen in `vocab_texts` (the expert's calibration text),
    and save the expert."""
    record = prune_model(model, scores, corpus_names, method, ratio, options)
    if vocab_texts is not None:
        from .vocab import prune_vocab_for_corpora

        record["vocab"] = prune_vocab_for_corpora(model, tokenizer, vocab_texts, keep_top=vocab_keep_top)
        record["params_after"] = count_params(model)
    record.update({"tool": f"cusprun-edge {__version__}", "corpora": corpus_names, **(extra or {})})
    if scores is not None:
        record["scores"] = {"model_hash": scores.model_hash,
                            "corpora": {k: c.sha256 for k, c in scores.corpora.items()}}
    save_expert(model, tokenizer, out, record, force=force)
    return record
