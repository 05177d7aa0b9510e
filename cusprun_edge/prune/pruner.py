"""Prune stage: apply a method's plan to the model for real and save the expert."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import __version__
from ..errors import UserError
from ..measure.memory import measured
from ..model import arch
from ..model.expert_io import save_expert
from ..model.shards import materialized, reader_of
from ..model.structure import (
    add_output_bias,
    count_params,
    keep_ffn_channels,
    keep_heads,
    keep_layers,
    record_structure,
)
from .methods import Plan, make_plan, method_with_overrides
from .reconstruct import load_refitted_layer
from .score import ScoreSet


@torch.no_grad()
def apply_plan(model, plan: Plan, refitted: dict | None = None, staging: Path | None = None) -> None:
    """Physically remove the units the plan drops (in place), and copy in the `refitted` output projections
    (reconstruct.choose_and_refit's weights) when given.

    A lazy model (model/lazy.py) is edited one layer at a time: each layer is read, edited, written into the
    directory `staging` (one safetensors file per layer, float32) and dropped, and the model reads it from
    there afterwards, so the whole model never sits in memory (save_expert moves the files into the expert)."""
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    reader = reader_of(model)
    if reader is not None and staging is None:
        raise ValueError("a lazy model is pruned layer by layer into a staging directory: pass staging")
    for i in range(len(arch.decoder_layers(model))):
        with materialized(model, i) as layer:
            _edit_layer(layer, i, plan, spec, hd)
            if refitted and i in refitted:
                load_refitted_layer(layer, i, refitted[i], spec)
            if reader is not None:
                reader.stage_layer(f"{spec.layers}.{i}.", layer, Path(staging) / f"layer-{i:05d}.safetensors")
    if len(plan.layers_keep) < len(arch.decoder_layers(model)):
        if reader is not None:
            raise UserError("removing whole layers is not done layer by layer yet; load the model whole")
        keep_layers(model, plan.layers_keep)
    record_structure(model)


def _edit_layer(layer, i: int, plan: Plan, spec, hd: int) -> None:
    parts = arch.layer_parts(layer, spec)
    if plan.ffn_bias and plan.ffn_bias[i] is not None:
        add_output_bias(parts, "mlp", plan.ffn_bias[i], spec)
    if plan.o_bias and plan.o_bias[i] is not None:
        add_output_bias(parts, "attn", plan.o_bias[i], spec)
    parts = arch.layer_parts(layer, spec)
    if plan.ffn_keep[i].numel() < parts.down.in_features:
        keep_ffn_channels(parts, plan.ffn_keep[i], spec)
    if len(plan.q_keep[i]) < parts.o.in_features // hd or len(plan.kv_keep[i]) < parts.k.out_features // hd:
        keep_heads(parts, plan.q_keep[i], plan.kv_keep[i], hd, spec)


@contextmanager
def _peak_memory(device):
    """Peak resident memory of this process while the block runs (measure/memory.py), and on CUDA the peak
    allocated device memory: the prune stage's footprint for the record."""
    cuda = torch.device(device).type == "cuda" if device is not None else False
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {}
    with measured() as span:
        yield out
    out["peak_rss_mb"] = span.record()["peak_rss_mb"]
    if cuda:
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def prune_model(model, scores: ScoreSet | None, corpus_names: list[str], method: str, ratio: float,
                options: dict | None = None, *, tokenizer=None, corpora: dict | None = None,
                device=None, staging: Path | None = None, layer_damage: dict | None = None) -> dict:
    """Prune `model` in place; returns a record with the achieved ratio and parameter counts.

    Methods whose recipe reconstructs (cusprun by default; any method with --option reconstruct=...) refit the
    kept output projections on the `corpora` (name -> Corpus): scoring documents for the statistics,
    held-apart `tune` documents for the ridge; they need the tokenizer and the corpora.
    A lazy model (model/lazy.py) is pruned one layer at a time into the directory `staging` (apply_plan).
    `layer_damage`: damage.layer_damage's record for this model and uniform plan, measured earlier."""
    spec = method_with_overrides(method, dict(options or {}))
    if spec.needs_data and scores is not None:
        scores.check_model(model)
    if spec.reconstruct != "none" and (tokenizer is None or not corpora):
        raise UserError(f"method '{method}' reconstructs after pruning and needs the tokenizer and the expert's "
                        "corpora (or pass --option reconstruct=none)")
    before = count_params(model)
    t0 = time.time()
    device = _device(device) if device is not None else next(model.parameters()).device
    allocation_note = None
    if spec.allocation == "damage" and not _has_tune(tokenizer, corpora):
        if "allocation" in (options or {}):
            raise UserError("allocation=damage needs the tokenizer and held-apart calibration documents "
                            "(the expert's corpora have none); use --option allocation=uniform")
        # the recipe's default, not the user's request: budgets fall back to the same share per layer
        options = {**(options or {}), "allocation": "uniform"}
        spec = method_with_overrides(method, dict(options))
        allocation_note = "uniform: no held-apart calibration documents to measure damage on"
    with _peak_memory(device) as memory:
        damage = None
        if spec.allocation == "damage":
            damage = layer_damage or _layer_damage(model, scores, corpus_names, method, ratio, options, tokenizer, corpora, device)
        plan = make_plan(model, scores, corpus_names, method, ratio, options,
                         layer_damage=damage["damage"] if damage else None)
        recon = _reconstruct(model, plan, spec, tokenizer, corpora, device)
        apply_plan(model, plan, recon.pop("weights", None), staging)
    after = count_params(model)
    return {
        "method": method,
        "target_ratio": ratio,
        "achieved_ratio": (before["prunable"] - after["prunable"]) / before["prunable"],
        "params_before": before,
        "params_after": after,
        "options": options or {},
        "allocation": spec.allocation,
        **({"allocation_note": allocation_note} if allocation_note else {}),
        "reconstruction": recon,
        **({"layer_damage": damage} if damage else {}),
        "seconds": round(time.time() - t0, 2),
        **memory,
    }


def prunes_layer_by_layer(method: str, options: dict | None = None, prune_vocab: bool = False) -> bool:
    """Whether this prune can run on a lazy model, one decoder layer in memory at a time (everything but
    removing whole layers and trimming the vocabulary, which still need the whole model)."""
    spec = method_with_overrides(method, dict(options or {}))
    return spec.allocation != "layers" and not prune_vocab


def _has_tune(tokenizer, corpora) -> bool:
    return tokenizer is not None and any(c.tune for c in (corpora or {}).values())


def _layer_damage(model, scores, corpus_names, method, ratio, options, tokenizer, corpora, device) -> dict:
    """Each layer's output damage under the uniform plan, on the held-apart documents (damage.py)."""
    tune = [t for c in (corpora or {}).values() for t in c.tune]
    from .damage import layer_damage

    uniform = make_plan(model, scores, corpus_names, method, ratio, {**(options or {}), "allocation": "uniform"})
    return layer_damage(model, uniform, tokenizer, tune, device=device)


def _device(name) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {name} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    return device


def _reconstruct(model, plan: Plan, spec, tokenizer, corpora, device) -> dict:
    """Choose and compute the refit for `plan` (reconstruct.py); the model is not changed here."""
    if spec.reconstruct == "none":
        return {"mode": "none"}
    if len(plan.layers_keep) < len(arch.decoder_layers(model)):
        return {"mode": "none", "note": "whole layers removed: no kept columns to refit"}
    from .reconstruct import choose_and_refit

    if plan.ffn_bias or plan.o_bias:  # the refit fits the dense output itself; FLAP's bias would count twice
        plan.ffn_bias, plan.o_bias = [], []
    calib = [t for c in corpora.values() for t in c.calib]
    tune = [t for c in corpora.values() for t in c.tune]
    choice = choose_and_refit(model, plan, tokenizer, calib, tune, mode=spec.reconstruct,
                              target=spec.refit_target, ridge=spec.ridge, device=device,
                              ffn_pool=plan.ffn_pool or None)
    for i, keep in choice.ffn_keep.items():  # select=obs: the refit chose which channels go
        plan.ffn_keep[i] = keep
    return {**choice.record(), "weights": choice.weights,
            **({"bias_compensation": "replaced by the refit"} if spec.bias_compensation else {})}


def prune_and_save(model, tokenizer, scores, corpus_names, method, ratio, out: Path, *, options=None,
                   extra: dict | None = None, force: bool = False, vocab_texts: list[str] | None = None,
                   vocab_size: int | None = None, vocab_floor: float | None = None,
                   vocab_held_out: dict | None = None, corpora: dict | None = None, device=None,
                   pruned_record: dict | None = None, layer_damage: dict | None = None) -> dict:
    """Prune (refitting on `corpora` when the recipe reconstructs), optionally trim the vocabulary to what
    `vocab_texts` (the expert's calibration text) and its languages need (vocab.py: `vocab_size` tokens, or the
    smallest within `vocab_floor` on the corpora's tune documents), and save the expert with its own tokenizer.
    `pruned_record`: `model` is already pruned (prune_model's record, e.g. the ratio search's last passing
    probe); only the rest is done. `layer_damage`: the damage probes' record of an earlier prune of the same dense
    model, scores, method and ratio (the build's user cache), used instead of measuring again."""
    rule = None
    if vocab_texts is not None:  # its bad input is refused before the prune's minutes
        if reader_of(model) is not None:
            raise UserError("trimming the vocabulary is not done layer by layer yet; load the model whole")
        from .vocab import vocab_rule

        rule = vocab_rule(tokenizer, vocab_texts, corpora, vocab_size)
    with _staging(model, Path(out)) as staging:
        record = pruned_record if pruned_record is not None else prune_model(
            model, scores, corpus_names, method, ratio, options, tokenizer=tokenizer, corpora=corpora,
            device=device, staging=staging, layer_damage=layer_damage)
        if vocab_texts is not None:
            from .vocab import DEFAULT_FLOOR, trim_vocab_for_corpora

            tokenizer, record["vocab"] = trim_vocab_for_corpora(
                model, tokenizer, vocab_texts, corpora=corpora, size=vocab_size,
                floor=DEFAULT_FLOOR if vocab_floor is None else vocab_floor, held_out=vocab_held_out, rule=rule)
            record["params_after"] = count_params(model)
        record.update({"tool": f"cusprun-edge {__version__}", "corpora": corpus_names, **(extra or {})})
        if scores is not None:
            record["scores"] = {"model_hash": scores.model_hash,
                                "corpora": {k: c.sha256 for k, c in scores.corpora.items()}}
        save_expert(model, tokenizer, out, record, force=force)  # links the staged layers in
    return record


@contextmanager
def _staging(model, out: Path):
    """Where a lazy model's pruned layers wait until the expert is saved (beside `out`, so save_expert links
    them in; removed after, whatever happens); None for a whole model."""
    if reader_of(model) is None:
        yield None
        return
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.layers-tmp-", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
