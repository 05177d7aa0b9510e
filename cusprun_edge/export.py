"""Export stage: compile a (pruned) causal LM into an ONNX decoder with a KV cache, for one target.

1. `torch.onnx.export` (dynamo) traces a thin wrapper whose KV cache is flat tensors
   (`past_key_values.{i}.key/value` -> `present.{i}.key/value`), each layer shaped by its own KV
   heads, so per-layer pruned widths export as they are. Attention becomes ONNX Runtime's fused
   `GroupQueryAttention` (a torch custom op with its own ONNX translation; it also applies the
   rotary embedding and appends to the cache) or, for other runtimes, plain ONNX ops.
2. Graph passes: the dimension names ONNX Runtime GenAI expects, tied lm_head weights made
   constant (so quantizers see them), the target's opset; with GroupQueryAttention also fused
   RMSNorms and one packed q/k/v projection per layer, the graph GenAI's own builder emits.
3. Parity gate: the fp32 graph against PyTorch on fixed prompts, with and without the cache;
   then the target precision (fp16 / int8 / int4) against PyTorch with its own thresholds.
4. `genai_config.json` and tokenizer files, so `onnxruntime_genai.Model(out)` runs the directory,
   and `manifest.json` (profile, versions, hashes, parity numbers, structure).

Everything is built in a temporary directory beside `out` and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import inspect
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache

from . import arch
from .errors import UserError
from .fsutil import atomic_directory, sha256_file
from .structure import count_params, structure_of
from .targets import TargetProfile, resolve_target

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"

# Fixed prompts for the parity gate (fact, code, French, story), each extended by DECODE_STEPS greedy tokens.
PARITY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:",
    "Le patient présente une fièvre et une toux depuis",
    "Once upon a time, a little dragon",
)
DECODE_STEPS = 3

# Parity limits per precision, against PyTorch fp32 logits on PARITY_PROMPTS:
#   max_abs_diff   largest |onnx - torch| logit difference
#   max_rel_rms    rms(onnx - torch) / rms(torch - its mean): scale-free; uncorrelated logits give ~1.4
#   max_kl         mean KL(torch || onnx) of the next-token distributions, in nats
#   min_top1       share of positions whose most likely token matches PyTorch's
# KL and max_abs_diff measure closeness. Top-1 over ~60 positions (16 of them cached steps) is coarse:
# one near-tie flipping costs 0.06 of the cached score, so its floors sit well below what faithful
# exports measure and only catch a broken graph (top-1 near 0).
# Measured on SmolLM2-135M and two 25%-pruned SmolLM2 experts (x86, onnxruntime CPU):
#   fp32  max_abs_diff 1e-4 - 3e-4 (dense, 25% experts), rel_rms < 1e-5: the same math in another
#         order. A 45%-pruned expert measured max_abs_diff 0.003-0.006 at rel_rms 8e-5, KL 2e-9, top-1
#         1.0 (its logits are larger and its activations spikier), so the absolute limit is 0.02 and the
#         scale-free rel_rms 1e-3 carries the check: a wrong mask, rotary position or cache step
#         measures > 0.1 in both.
#   fp16  rel_rms 0.003, KL < 1e-4, top-1 1.0. A broken fp16 graph (RMSNorm overflow) measured
#         rel_rms 1.9 and top-1 0.0.
#   int8  (8-bit weight-only) KL 0.010-0.012, rel_rms 0.10-0.14, top-1 0.875-0.96.
#   int4  (4-bit weight-only, round-to-nearest) KL 0.9-1.04, top-1 0.48-0.69. SmolLM2's weights come
#         from a Q4_1 GGUF, so any other 4-bit grid rounds them a second time: ONNX Runtime GenAI's
#         own int4 export of it measures KL 0.72-0.87, top-1 0.51-0.63, a PyTorch emulation of the
#         same rounding KL 0.92. The limit takes that and rejects models int4 breaks (a randomly
#         pruned SmolLM2: KL 4.8, in ONNX and the PyTorch emulation alike).
# Tiny random test models have almost flat distributions, so KL and top-1 say little there; the
# tests check rel_rms on them instead.
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_diff": 0.02, "max_rel_rms": 1e-3, "min_top1": 0.9},
    "fp16": {"max_rel_rms": 0.05, "max_kl": 0.01, "min_top1": 0.85},
    "int8": {"max_rel_rms": 0.3, "max_kl": 0.05, "min_top1": 0.75},
    "int4": {"max_kl": 1.5, "min_top1": 0.35},
}

# Weight-only quantization of every MatMul with a constant weight (MatMulNBits), int4 and int8 alike.
# Symmetric: no zero points to store or apply, the layout MLAS's fastest kernels take; asymmetric
# measured worse on SmolLM2 (KL 0.92 vs 0.81 at int4). Block 32 along the input dimension.
# accuracy_level 4 lets the CPU kernel quantize activations to int8 per block (MLAS's fast path).
# int8 is weight-only too: onnxruntime's quantize_dynamic (int8 activations per tensor) measured
# KL 1.18 / top-1 0.43 on SmolLM2, worse than int4, because LLM activations have outlier channels.
WEIGHT_ONLY = {"block_size": 32, "symmetric": True, "accuracy_level": 4}

# Ops kept in fp32 in an fp16 export: rotary angles (position * frequency) lose whole radians in
# fp16, and any RMSNorm left unfused would overflow on its sum of squares past |x| ~ 256.
FP16_KEEP_FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Softmax", "Cos", "Sin", "Range",
                      "CumSum"]

GENAI_PROVIDERS = {"CUDAExecutionProvider": "cuda", "NvTensorRTRTXExecutionProvider": "NvTensorRtRtx",
                   "DmlExecutionProvider": "dml", "WebGpuExecutionProvider": "webgpu",
                   "QNNExecutionProvider": "qnn", "OpenVINOExecutionProvider": "OpenVINO"}
ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


# =========================================================================== public API


def export_source(source, target, out, **kwargs) -> dict:
    """Load `source` (embedded name, .gguf, HF or expert directory) and export it; returns the manifest."""
    from .models import load_model

    model, tokenizer = load_model(str(source))
    return export_model(model, tokenizer, target, out, source=str(source), **kwargs)


def export_model(
    model,
    tokenizer,
    target,
    out,
    *,
    precision: str | None = None,
    force: bool = False,
    attention: str | None = None,
    thresholds: dict[str, dict[str, float]] | None = None,
    source: str | None = None,
) -> dict:
    """Export `model` for `target` (a TargetProfile or its name/path) into the directory `out`.

    `precision` defaults to the target's; `attention` ("gqa" or "standard") to the target's;
    `thresholds` overrides entries of THRESHOLDS. Returns the manifest (also written to
    `out/manifest.json`). Raises UserError on bad input or failed parity, leaving nothing behind.
    """
    started = time.perf_counter()
    profile = resolve_target(target)
    precision = precision or profile.precision
    if precision not in profile.precisions:
        raise UserError(
            f"precision '{precision}' is not available for target '{profile.name}'; "
            f"choose one of {', '.join(profile.precisions)}"
        )
    attention = attention or profile.attention
    if attention not in ("gqa", "standard"):
        raise UserError(f"attention '{attention}' is unknown; use 'gqa' or 'standard'")
    limits = {p: {**THRESHOLDS[p], **(thresholds or {}).get(p, {})} for p in THRESHOLDS}
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; choose another output directory or pass --force")
        if not _replaceable(out):
            raise UserError(f"{out} exists and is not an export directory (no {MANIFEST_FILE}); "
                            "--force replaces only a previous export: choose another output directory")
    _check_model(model)
    memory = estimate_memory(model, precision, profile)
    if memory["total_mb"] > profile.memory_budget_mb:
        raise UserError(
            f"the exported model needs about {memory['total_mb']:.0f} MB on '{profile.name}' "
            f"(weights {memory['weights_mb']:.0f} MB + KV cache {memory['kv_cache_mb']:.0f} MB at "
            f"{profile.max_sequence_length} tokens), over its {profile.memory_budget_mb} MB budget; "
            "choose a lower precision or prune further"
        )

    with atomic_directory(out) as tmp:
        manifest = _build(model, tokenizer, profile, precision, attention, limits, tmp, memory, source)
        _write_manifest(tmp, manifest, started)
    return manifest


def _replaceable(out: Path) -> bool:
    """--force replaces a previous export or an empty directory, never anything else."""
    if out.is_symlink() or not out.is_dir():
        return False
    return (out / MANIFEST_FILE).is_file() or not any(out.iterdir())


def _check_model(model) -> None:
    arch.spec_for(model)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise UserError(
            f"export needs a float32 model on the CPU, got {param.dtype} on {param.device}; "
            "load it with load_model(..., dtype=torch.float32)"
        )


# =========================================================================== the pipeline


def _build(model, tokenizer, profile, precision, attention, limits, tmp, memory, source) -> dict:
    timings: dict[str, float] = {}
    notes: list[str] = []
    t = time.perf_counter()
    reference = reference_logits(model, tokenizer)
    timings["reference"] = round(time.perf_counter() - t, 2)
    fp32_dir = tmp / "fp32"
    attention, exporter, fp32_parity, rotary_fused = _export_fp32(
        model, attention, profile, reference, limits, fp32_dir, timings, notes)

    t = time.perf_counter()
    quantization = convert_precision(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, precision)
    timings["convert"] = round(time.perf_counter() - t, 2)
    parity = {"fp32": fp32_parity}
    if precision != "fp32":
        t = time.perf_counter()
        parity[precision] = check_parity(tmp / MODEL_FILE, reference, limits[precision])
        timings[f"parity_{precision}"] = round(time.perf_counter() - t, 2)
        if precision == "int4" and not parity[precision]["passed"] and parity[precision].get("ran", True):
            t = time.perf_counter()
            quantization, parity[precision] = _mixed_int4(model, fp32_dir, tmp, reference, limits[precision],
                                                           parity[precision]["failure"])
            timings["convert_mixed_int4"] = round(time.perf_counter() - t, 2)
            notes.append(quantization["fallback"])
        if not parity[precision]["passed"]:
            hint = {"int4": "; this model loses too much at int4: try --precision int8",
                    "int8": "; try --precision fp16 or fp32"}.get(precision, "")
            raise UserError(f"export failed parity ({precision}): {parity[precision]['failure']}{hint}")
    shutil.rmtree(fp32_dir)

    t = time.perf_counter()
    tokenizer.save_pretrained(tmp)
    genai = write_genai_config(model, tokenizer, profile, attention, tmp)
    if genai.get("skipped"):
        notes.append(genai["skipped"])
    timings["package"] = round(time.perf_counter() - t, 2)
    return {
        "format": "cusprun-edge-onnx",
        "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "cusprun-edge", "version": _tool_version()},
        "libraries": _library_versions(),
        "source": _source_record(model, source),
        "target": profile.to_dict(),
        "precision": precision,
        "quantization": quantization,
        "opset": _opset_of(tmp / MODEL_FILE),
        "exporter": exporter,
        "attention": "GroupQueryAttention" if attention == "gqa" else "standard",
        "io": _io_record(model, attention, rotary_fused),
        "parameters": count_params(model),
        "structure": structure_of(model).to_dict(),
        "pruned": getattr(model.config, "cusprun_structure", None) is not None,
        "memory_estimate_mb": memory,
        "parity": {"prompts": list(PARITY_PROMPTS), "decode_steps": DECODE_STEPS,
                   "runtime": "onnxruntime CPUExecutionProvider", "reference": "PyTorch fp32",
                   "thresholds": {p: limits[p] for p in parity}, **parity},
        "genai": genai,
        "timings_s": timings,
        "notes": notes,
    }


def _export_fp32(model, attention, profile, reference, limits, directory, timings, notes):
    """Export the fp32 graph into `directory` and gate it.

    Returns (attention, exporter, parity, whether GroupQueryAttention applies the rotary embedding).

    A GroupQueryAttention export that fails to trace or fails parity is retried with plain attention."""
    tries = ["gqa", "standard"] if attention == "gqa" else ["standard"]
    for kind in tries:
        last = kind == tries[-1]
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        t = time.perf_counter()
        try:
            onnx_model, exporter = export_onnx(model, kind, profile.opset, context_length(model, profile))
        except Exception as exc:  # any exporter failure: try the next attention kind, then give up
            if last:
                raise UserError(f"ONNX export failed: {_one_line(exc)}") from exc
            notes.append(f"GroupQueryAttention export failed ({_one_line(exc)}); exported plain attention")
            continue
        rotary_fused = any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0)
                           for n in onnx_model.graph)
        save_onnx(onnx_model, directory / MODEL_FILE)
        del onnx_model
        timings["export"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        parity = check_parity(directory / MODEL_FILE, reference, limits["fp32"])
        timings["parity_fp32"] = round(time.perf_counter() - t, 2)
        if parity["passed"]:
            return kind, exporter, parity, rotary_fused
        if last:
            raise UserError(f"export failed parity (fp32): {parity['failure']}")
        notes.append(f"GroupQueryAttention export failed parity ({parity['failure']}); "
                     "exported plain attention")
    raise AssertionError("unreachable")


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# =========================================================================== decoder wrapper

_ATTENTION_STATE: contextvars.ContextVar[dict] = contextvars.ContextVar("cusprun_attention_state")


class CachedDecoder(nn.Module):
    """`model` with its KV cache as flat tensors.

    forward(input_ids, attention_mask, position_ids, past) -> (logits, present...), where `past` and
    `present` alternate key, value per layer, each [batch, kv_heads_of_that_layer, length, head_dim].
    With `fused_attention`, attention runs as one `group_query_attention` op per layer that also
    appends to the cache (the way ONNX Runtime's GroupQueryAttention works).
    """

    def __init__(self, model: nn.Module, fused_attention: bool, max_positions: int = 0):
        super().__init__()
        self.model = model
        self.fused_attention = fused_attention
        # With rotary caches, the fused op also applies the rotary embedding (transformers' own
        # application is bypassed), which lets ONNX Runtime rotate inside GroupQueryAttention.
        caches = rotary_caches(model, max_positions) if fused_attention and max_positions else None
        self.rotary_layers: list[str] = []
        if caches:
            for kind, (cos, sin) in caches["tables"].items():
                self.register_buffer(f"cos_{kind}", cos, persistent=False)
                self.register_buffer(f"sin_{kind}", sin, persistent=False)
            self.rotary_layers = caches["layers"]

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        pairs = list(zip(past[0::2], past[1::2]))
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": True}
        if not self.fused_attention:
            out = self.model(**kwargs, past_key_values=DynamicCache(ddp_cache_data=pairs))
            present = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            return (out.logits, *[t for kv in present for t in kv])
        rotary = [(getattr(self, f"cos_{kind}"), getattr(self, f"sin_{kind}")) for kind in self.rotary_layers]
        state = {"past": pairs, "attention_mask": attention_mask, "present": [None] * len(pairs),
                 "rotary": rotary or None}
        token = _ATTENTION_STATE.set(state)
        try:
            with _rotary_bypassed(self.model) if rotary else contextlib.nullcontext():
                out = self.model(**kwargs, past_key_values=_PastOnlyCache(ddp_cache_data=pairs))
        finally:
            _ATTENTION_STATE.reset(token)
        return (out.logits, *[t for kv in state["present"] for t in kv])


def rotary_caches(model, max_positions: int) -> dict | None:
    """cos/sin tables [max_positions, head_dim / 2] per rotary kind, and each layer's kind.

    Read from the model's own rotary module (so rope scaling is included); None when the model's
    rotary is not the rotate-half form GroupQueryAttention implements."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    parts = arch.all_layer_parts(model)
    if rotary is None or not all(hasattr(sys.modules[type(p.attn).__module__], "apply_rotary_pos_emb")
                                 for p in parts):
        return None
    takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
    kinds = [getattr(p.attn, "layer_type", None) or "default" for p in parts]
    positions = torch.arange(max_positions)[None]
    tables = {}
    with torch.no_grad():
        for kind in dict.fromkeys(kinds):
            dummy = torch.zeros(1, dtype=torch.float32)
            cos, sin = rotary(dummy, positions, kind) if takes_type else rotary(dummy, positions)
            cos, sin = cos[0].float(), sin[0].float()
            half = cos.shape[-1] // 2
            if cos.shape[-1] != arch.head_dim(model) or not (
                    torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
                return None  # partial or interleaved rotary
            tables[kind] = (cos[:, :half].contiguous(), sin[:, :half].contiguous())
    return {"tables": tables, "layers": kinds}


@contextlib.contextmanager
def _rotary_bypassed(model):
    """Make the attention modules' apply_rotary_pos_emb a no-op: the fused op rotates instead."""
    modules = {sys.modules[type(p.attn).__module__] for p in arch.all_layer_parts(model)}
    saved = {module: module.apply_rotary_pos_emb for module in modules}
    try:
        for module in modules:
            module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
        yield
    finally:
        for module, function in saved.items():
            module.apply_rotary_pos_emb = function


class _VarArgsDecoder(nn.Module):
    """The TorchScript exporter flattens positional tensors only."""

    def __init__(self, decoder: CachedDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return self.decoder(input_ids, attention_mask, position_ids, list(past))


class _PastOnlyCache(DynamicCache):
    """Holds the past (for mask sizes) but hands new keys/values through: the fused op appends them."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str):
    """Run `model` with transformers attention implementation `name`, restoring the old one after."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    configs[id(model.config)] = model.config
    old = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = name
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = old[key]


# =========================================================================== GroupQueryAttention op


@torch.library.custom_op("cusprun_edge::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    attention_mask: torch.Tensor,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
    scale: float,
    window: int,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention of new tokens over past + new keys: (output [B,S,H,D], present_key, present_value).

    query [B,H,S,D], key/value [B,KV,S,D], past [B,KV,P,D], attention_mask [B,P+S] (1 = attend).
    With cos/sin caches [positions, D/2], query and key are first rotated (rotate-half form) at
    positions P..P+S-1. `window` > 0 limits each query to the last `window` positions (sliding
    attention). Mirrors com.microsoft.GroupQueryAttention for right-padded (or unpadded) batches.
    """
    total, new = past_key.shape[2] + key.shape[2], query.shape[2]
    if cos_cache is not None and sin_cache is not None:
        cos = cos_cache[total - new:total].repeat(1, 2)
        sin = sin_cache[total - new:total].repeat(1, 2)
        query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
    present_key = torch.cat([past_key, key], dim=2)
    present_value = torch.cat([past_value, value], dim=2)
    groups = query.shape[1] // key.shape[1]
    k = present_key.repeat_interleave(groups, dim=1)
    v = present_value.repeat_interleave(groups, dim=1)
    scores = (query @ k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    q_pos = torch.arange(total - new, total, device=query.device)[:, None]
    k_pos = torch.arange(total, device=query.device)[None, :]
    allowed = k_pos <= q_pos
    if window > 0:
        allowed = allowed & (k_pos > q_pos - window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).contiguous(), present_key, present_value


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, scale, window, softcap):
    batch, heads, new, dim = query.shape
    total = past_key.shape[2] + key.shape[2]
    present = key.new_empty(batch, key.shape[1], total, dim)
    return query.new_empty(batch, new, heads, dim), present, present.clone()


def fused_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """A transformers attention function: the layer's past comes from the active CachedDecoder."""
    state = _ATTENTION_STATE.get()
    layer = module.layer_idx
    past_key, past_value = state["past"][layer]
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    softcap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
    cos, sin = state["rotary"][layer] if state["rotary"] else (None, None)
    output, present_key, present_value = torch.ops.cusprun_edge.group_query_attention(
        query, key, value, past_key, past_value, state["attention_mask"], cos, sin,
        scale, int(sliding_window or 0), float(softcap or 0.0),
    )
    state["present"][layer] = (present_key, present_value)
    return output, None


FUSED_ATTENTION = "cusprun_edge_gqa"
AttentionInterface.register(FUSED_ATTENTION, fused_attention_forward)


def _gqa_schema():
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr = OpSchema.Attribute
    return OpSchema(
        "GroupQueryAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("past_key", "T", param_option=optional),
                param("past_value", "T", param_option=optional), param("seqlens_k", "M"),
                param("total_sequence_length", "M"), param("cos_cache", "T", param_option=optional),
                param("sin_cache", "T", param_option=optional)],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("M", ["tensor(int32)"], "")],
        attributes=[attr(name, kind, "") for name, kind in (
            ("num_heads", OpSchema.AttrType.INT), ("kv_num_heads", OpSchema.AttrType.INT),
            ("scale", OpSchema.AttrType.FLOAT), ("local_window_size", OpSchema.AttrType.INT),
            ("softcap", OpSchema.AttrType.FLOAT), ("do_rotary", OpSchema.AttrType.INT),
            ("rotary_interleaved", OpSchema.AttrType.INT))],
    )


def _gqa_translation():
    """The ONNX for group_query_attention: one com.microsoft.GroupQueryAttention node.

    Sequence lengths come from the attention mask as GenAI's own models compute them
    (seqlens_k = tokens so far - 1, total_sequence_length = mask width), so with
    `past_present_share_buffer` GenAI can hand the op one preallocated cache buffer."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    gqa = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())

    def to_bsd(x):  # [B, N, S, D] -> [B, S, N*D]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))

    def translate(query, key, value, past_key, past_value, attention_mask, cos_cache, sin_cache, scale: float,
                  window: int, softcap: float):
        heads, dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
        seen = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(seen, op.Constant(value_int=1)), to=ir.DataType.INT32)
        total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2)), to=ir.DataType.INT32)
        rotary = cos_cache is not None
        output, present_key, present_value = gqa(
            to_bsd(query), to_bsd(key), to_bsd(value), past_key, past_value, seqlens_k, total,
            cos_cache, sin_cache, num_heads=heads, kv_num_heads=kv_heads, scale=scale,
            local_window_size=window if window > 0 else -1, softcap=softcap,
            do_rotary=int(rotary), rotary_interleaved=0,
        )
        return op.Reshape(output, op.Constant(value_ints=[0, 0, heads, dim])), present_key, present_value

    return translate


# =========================================================================== torch -> ONNX


def _kv_layout(model) -> tuple[list[int], int]:
    return structure_of(model).num_key_value_heads, arch.head_dim(model)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _example_inputs(model):
    kv_heads, head_dim = _kv_layout(model)
    # Distinct sizes, none 0 or 1, so the tracer specialises no dynamic axis by accident.
    batch, new, past_len = 2, 3, 5
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, new))
    attention_mask = torch.ones(batch, past_len + new, dtype=torch.long)
    position_ids = torch.arange(past_len, past_len + new).expand(batch, new).contiguous()
    past = [torch.randn(batch, kv, past_len, head_dim) * 0.1 for kv in kv_heads for _ in range(2)]
    return input_ids, attention_mask, position_ids, past


def export_onnx(model, attention: str, opset: int, max_positions: int = 0):
    """Trace the cached decoder to an onnx_ir.Model; returns (model, exporter description).

    `max_positions` sizes the rotary tables of fused attention (0: rotary stays in plain ops)."""
    decoder = CachedDecoder(model, fused_attention=attention == "gqa", max_positions=max_positions).eval()
    args = _example_inputs(model)
    input_names, output_names = io_names(len(args[3]) // 2)
    dyn = torch.export.Dim.DYNAMIC
    tokens = {0: dyn, 1: dyn}
    dynamic_shapes = (tokens, tokens, tokens, [{0: dyn, 2: dyn} for _ in args[3]])
    implementation = FUSED_ATTENTION if attention == "gqa" else "sdpa"
    table = {torch.ops.cusprun_edge.group_query_attention.default: _gqa_translation()}
    try:
        with torch.no_grad(), attention_implementation(model, implementation), _quiet():
            program = torch.onnx.export(
                decoder, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=max(opset, 18), optimize=True,
                custom_translation_table=table, verbose=False,
            )
        onnx_model, exporter = program.model, "torch.onnx.export(dynamo=True)"
    except Exception as exc:
        if attention == "gqa":
            raise  # the fused op exists only for the dynamo exporter; the caller retries plain attention
        with attention_implementation(model, implementation):
            onnx_model = _export_torchscript(decoder, args, input_names, output_names, opset)
        exporter = f"torch.onnx.export(dynamo=False) (TorchScript fallback; dynamo failed: {_one_line(exc)})"
    if opset < 18 and onnx_model.opset_imports.get("", 18) >= 18:
        lower_to_opset_17(onnx_model)  # before the fusions: they add ops no ONNX converter knows
    _finish_graph(onnx_model, model, ort_fusions=attention == "gqa")
    return onnx_model, exporter


def _export_torchscript(decoder, args, input_names, output_names, opset):
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in input_names[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in output_names[1:]})
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), _quiet():
        path = Path(scratch) / MODEL_FILE
        torch.onnx.export(
            _VarArgsDecoder(decoder), (*args[:3], *args[3]), str(path), dynamo=False,
            input_names=input_names, output_names=output_names, dynamic_axes=axes,
            opset_version=min(opset, 20),
        )
        model = ir.load(path)
        ir.external_data.load_to_model(model)
    return model


@contextlib.contextmanager
def _quiet():
    """The exporters and quantizers print progress, log every node and warn about every traced branch;
    keep the CLI's output clean (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxruntime", "onnxscript", "onnx_ir", "root")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _finish_graph(onnx_model, model, ort_fusions: bool) -> None:
    """Name the dynamic axes as GenAI and readers expect and, for a graph that is ONNX Runtime's
    already (GroupQueryAttention), use its fused ops."""
    kv_heads, head_dim = _kv_layout(model)
    graph = onnx_model.graph
    seq = ["batch_size", "sequence_length"]
    shapes = {"input_ids": seq, "position_ids": seq, "logits": [*seq, model.config.vocab_size],
              "attention_mask": ["batch_size", "total_sequence_length"]}
    for i, kv in enumerate(kv_heads):
        for part in ("key", "value"):
            shapes[f"past_key_values.{i}.{part}"] = ["batch_size", kv, "past_sequence_length", head_dim]
            shapes[f"present.{i}.{part}"] = ["batch_size", kv, "total_sequence_length", head_dim]
    for value in [*graph.inputs, *graph.outputs]:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    if ort_fusions:
        # One SimplifiedLayerNormalization per RMSNorm: it accumulates in fp32 whatever the input type,
        # so an fp16 export cannot overflow on the sum of squares.
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization

        fuse_rms_normalization(onnx_model)
        _attention_without_reshapes(graph)
        _pack_qkv_projections(graph)
        ir.passes.common.RemoveUnusedNodesPass()(onnx_model)


def _producer(value, op_type: str, perm: list[int] | None = None):
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    if perm is not None and list(node.attributes.get_ints("perm", [])) != perm:
        return None
    return node


def _attention_without_reshapes(graph) -> None:
    """Feed GroupQueryAttention its projections as they come, [batch, seq, heads * head_dim].

    transformers views them as [batch, heads, seq, head_dim] and the op's translation turns them
    back: Reshapes (and Transpose pairs) that ONNX Runtime would run at every step. The same goes
    for the output. (Not when something sits in between, e.g. Gemma's per-head q/k norms.)"""
    for node in list(graph):
        if node.op_type != "GroupQueryAttention":
            continue
        for index in (0, 1, 2):
            source = _before_views(node.inputs[index])
            if source is not node.inputs[index]:
                node.replace_input_with(index, source)
        output, query = node.outputs[0], node.inputs[0]
        if output.shape is None and query.shape is not None and len(query.shape) == 3:
            output.shape = query.shape.copy()  # [batch, seq, heads * head_dim], like the query
        merged = _after_views(output)
        if merged is not output:
            ir.convenience.replace_all_uses_with(merged, output)


_SWAP = [0, 2, 1, 3]


def _before_views(value):
    """The value `value` is a pure re-view of (Reshapes and cancelling Transpose pairs), else `value`."""
    current = value
    while current is not None:
        reshape = _producer(current, "Reshape")
        if reshape is not None:
            current = reshape.inputs[0]
            continue
        second = _producer(current, "Transpose", _SWAP)
        first = _producer(second.inputs[0], "Transpose", _SWAP) if second else None
        if first is None:
            break
        current = first.inputs[0]
    same = current is not None and current.shape is not None and value.shape is not None
    return current if same and list(current.shape) == list(value.shape) and current is not value else value


def _after_views(value):
    """The last value of a chain of single-use Reshapes after `value` with `value`'s shape, else `value`."""
    current, found = value, value
    while True:
        uses = list(current.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
            break
        current = uses[0].node.outputs[0]
        if current.is_graph_output():
            break
        if current.shape is not None and value.shape is not None and list(current.shape) == list(value.shape):
            found = current
    return found


def _pack_qkv_projections(graph) -> None:
    """One MatMul (and bias Add) for query, key and value: GroupQueryAttention splits packed input
    itself, and one wide (quantized) MatMul runs faster than three narrow ones."""
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or any(v is None for v in node.inputs[:3]):
            continue
        parts = [_projection(v) for v in node.inputs[:3]]
        if None in parts or len({id(p[0].inputs[0]) for p in parts}) != 1:
            continue
        if len({p[2] is None for p in parts}) != 1:
            continue  # bias on some projections only
        weights = [p[1] for p in parts]
        packed_weight = np.concatenate(weights, axis=1)
        x = parts[0][0].inputs[0]
        name = parts[0][0].name
        weight = ir.Value(name=f"{name}.qkv_weight", const_value=ir.tensor(packed_weight),
                          shape=ir.Shape(packed_weight.shape), type=ir.TensorType(ir.DataType.FLOAT))
        graph.register_initializer(weight)
        matmul = ir.node("MatMul", [x, weight], name=f"{name}.qkv")
        matmul.outputs[0].name = f"{name}.qkv_output"
        new_nodes, packed = [matmul], matmul.outputs[0]
        if parts[0][2] is not None:
            packed_bias = np.concatenate([p[2] for p in parts])
            bias = ir.Value(name=f"{name}.qkv_bias", const_value=ir.tensor(packed_bias),
                            shape=ir.Shape(packed_bias.shape), type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(bias)
            add = ir.node("Add", [packed, bias], name=f"{name}.qkv_add")
            add.outputs[0].name = f"{name}.qkv_sum"
            new_nodes.append(add)
            packed = add.outputs[0]
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, packed)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)


def _projection(value):
    """(MatMul node, weight array, bias array or None) when `value` is x @ W (+ b) with constant W, b."""
    add = _producer(value, "Add")
    bias = None
    if add is not None:
        matmul = _producer(add.inputs[0], "MatMul")
        constant = add.inputs[1].const_value if add.inputs[1] is not None else None
        if matmul is None or constant is None or len(constant.shape) != 1:
            return None
        bias = constant.numpy()
    else:
        matmul = _producer(value, "MatMul")
    if matmul is None or matmul.inputs[1].const_value is None or len(matmul.inputs[1].shape) != 2:
        return None
    return matmul, matmul.inputs[1].const_value.numpy(), bias


# Opset 18 moved Reduce* axes from an attribute to an input; these ops changed in other ways or are new,
# and the graphs exported here never use them, so lowering refuses rather than guesses.
_REDUCE_AXES_INPUT_AT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_UNLOWERABLE_AT_18 = {"Pad", "Resize", "ScatterND", "ScatterElements", "Col2Im", "CenterCropPad",
                      "GroupNormalization", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "LpPool",
                      "Mish", "OptionalGetElement", "OptionalHasElement"}


def lower_to_opset_17(onnx_model) -> None:
    """Rewrite an opset-18 graph as opset 17 (what TensorRT 8.5 parses): Reduce* axes back to an
    attribute, Split's num_outputs dropped (an even split is the opset-13 default)."""
    for node in onnx_model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _REDUCE_AXES_INPUT_AT_18:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                raise UserError(f"cannot lower {node.name} to opset 17: it uses noop_with_empty_axes")
            node.attributes.pop("noop_with_empty_axes", None)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                axes = node.inputs[1].const_value
                if axes is None:
                    raise UserError(f"cannot lower {node.name} to opset 17: its axes are computed")
                node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.numpy().reshape(-1)])
                node.resize_inputs(1)
        elif node.op_type == "Split" and "num_outputs" in node.attributes:
            x, axis = node.inputs[0], node.attributes.get_int("axis", 0)
            size = x.shape[axis] if x.shape is not None else None
            if not isinstance(size, int) or size % len(node.outputs):
                raise UserError(f"cannot lower {node.name} to opset 17: uneven or dynamic split")
            node.attributes.pop("num_outputs")
        elif node.op_type in _UNLOWERABLE_AT_18:
            raise UserError(f"cannot lower the graph to opset 17: it uses {node.op_type} ({node.name})")
    onnx_model.opset_imports[""] = 17


def save_onnx(onnx_model, path: Path) -> None:
    """Save with every weight in one external file beside the graph, so models over 2 GB work.
    onnx_ir warns once per intermediate value that has a shape but no dtype (left by the exporter's
    shape inference) and drops that shape; the graph is valid either way, so those warnings are muted."""
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        ir.save(onnx_model, str(path), external_data=DATA_FILE)
    finally:
        serde_log.setLevel(level)


# =========================================================================== precision


def convert_precision(src: Path, dst: Path, precision: str, eight_bit: tuple[str, ...] = ()) -> dict | None:
    """Write the `precision` version of the fp32 graph at `src` to `dst`; return what was done.
    `eight_bit` (int4 only): module names (e.g. down_proj) whose MatMuls get 8-bit weights instead."""
    import onnx

    if precision == "fp32":
        for name in (MODEL_FILE, DATA_FILE):
            shutil.move(str(src.parent / name), str(dst.parent / name))
        return None
    proto = onnx.load(str(src))  # weights in memory
    if precision in ("int4", "int8"):
        bits = 4 if precision == "int4" else 8
        _fold_weight_transposes(proto)
        wider = _matmuls_of_modules(proto, eight_bit) if bits == 4 else []
        if wider:  # 8-bit first (every other MatMul excluded), then 4-bit for what is still a MatMul
            others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in set(wider)]
            proto = _quantize_matmuls(proto, 8, exclude=others)
        proto = _quantize_matmuls(proto, bits)
        shared = _share_embedding_with_lm_head(proto, bits)
        record = {"method": "MatMulNBits weight-only (onnxruntime MatMulNBitsQuantizer, round-to-nearest)",
                  "bits": bits, **WEIGHT_ONLY,
                  "embedding": "the lm_head's quantized weight (GatherBlockQuantized)" if shared
                  else "float (untied from the lm_head)"}
        if wider:
            record["eight_bit"] = {"modules": list(eight_bit), "matmuls": len(wider)}
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = convert_float_to_float16(
            proto, keep_io_types=False, disable_shape_infer=True,
            op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32_OPS,
            node_block_list=_rotary_angle_nodes(proto),
        )
        _drop_fp16_round_trips(proto)
        del proto.graph.value_info[:]  # recorded before conversion, the intermediate types are stale
        record = {"method": "onnxruntime.transformers.float16", "kept_fp32_ops": FP16_KEEP_FP32_OPS,
                  "io": "KV cache and logits in float16"}
    else:
        raise UserError(f"unknown precision '{precision}'")
    onnx.save(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=1024)
    return record


def _mixed_int4(model, fp32_dir: Path, tmp: Path, reference, limits, plain_failure: str) -> tuple[dict, dict]:
    """Pruned models tolerate 4-bit rounding worse than dense ones; before the gate gives up, the
    projections that suffer most get 8-bit weights (as llama.cpp's Q4_K_M keeps some at 6 bits)."""
    for name in (MODEL_FILE, DATA_FILE):
        (tmp / name).unlink(missing_ok=True)  # onnx appends external data to an existing file
    modules = int4_eight_bit_modules(model)
    quantization = convert_precision(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, "int4", eight_bit=modules)
    parity = check_parity(tmp / MODEL_FILE, reference, limits)
    parity["plain_int4_failure"] = plain_failure
    outcome = "passed" if parity["passed"] else f"failed too ({parity['failure']})"
    quantization["fallback"] = (f"plain int4 failed parity ({plain_failure}); 8-bit {'/'.join(modules)} "
                                f"with 4-bit elsewhere {outcome}")
    return quantization, parity


def _quantize_matmuls(proto, bits: int, exclude: list[str] | None = None):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        proto, bits=bits, block_size=WEIGHT_ONLY["block_size"], is_symmetric=WEIGHT_ONLY["symmetric"],
        accuracy_level=WEIGHT_ONLY["accuracy_level"], op_types_to_quantize=("MatMul",), nodes_to_exclude=exclude,
    )
    with _quiet():
        quantizer.process()
    return quantizer.model.model


def int4_eight_bit_modules(model) -> tuple[str, ...]:
    """The projections a mixed int4 export keeps at 8 bits: the MLP's down projection and the attention's
    q/k/v (packed into one MatMul named '<q>.qkv' by the exporter). On a 35%-pruned SmolLM2 expert they
    took int4 KL from 2.30 to 0.78 for 25% more weight bytes (8-bit down alone: 1.43; lm_head: 1.98)."""
    spec = arch.spec_for(model)
    return (spec.down_proj, spec.q_proj, spec.k_proj, spec.v_proj, "qkv")


def _matmuls_of_modules(proto, modules: tuple[str, ...]) -> list[str]:
    """MatMul nodes that belong to any of `modules`, by path segment: the dynamo exporter records each
    node's module scopes in its metadata, TorchScript puts the module path in the node name."""
    wanted = set(modules)
    found = []
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        text = node.name + " " + " ".join(p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes")
        if wanted & set(re.split(r"[\s./'\[\],]+", text)):
            found.append(node.name)
    return found


def _fold_weight_transposes(proto) -> None:
    """Transpose(initializer) -> a transposed initializer, so the quantizer sees a constant weight.

    A tied lm_head exports as MatMul(x, Transpose(embedding)). (fp32/fp16 exports keep the Transpose,
    which ONNX Runtime folds when it loads the model, instead of storing the embedding twice.)"""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        array = numpy_helper.to_array(initializers[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        folded = np.ascontiguousarray(array.transpose(perm))
        folded = numpy_helper.from_array(folded, f"{node.input[0]}.transposed")
        graph.initializer.append(folded)
        for consumer in graph.node:
            for i, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[i] = folded.name
        graph.node.remove(node)


def _share_embedding_with_lm_head(proto, bits: int) -> bool:
    """Tied embeddings: gather token rows from the lm_head's quantized weight instead of a float copy.

    MatMulNBits stores its weight as [N, blocks, block * bits / 8] bytes, so for an lm_head that is the
    transposed embedding, row v holds token v's embedding, quantized in blocks along the hidden size:
    exactly what com.microsoft.GatherBlockQuantized reads (same default zero point, 8 or 128). This is
    how GenAI's own builder shares them; it saves vocab * hidden * ~3.5 bytes at int4."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    shared = False
    for gather in list(graph.node):
        table = initializers.get(gather.input[0]) if gather.op_type == "Gather" else None
        if table is None or len(table.dims) != 2:
            continue
        quantized = next((n for n in graph.node if n.op_type == "MatMulNBits"
                          and n.input[1] == f"{table.name}.transposed_Q{bits}" and len(n.input) == 3), None)
        block = next((a.i for a in quantized.attribute if a.name == "block_size"), 0) if quantized else 0
        vocab, hidden = table.dims
        if not block or hidden % block:
            continue
        shapes = {"data": [vocab, hidden * bits // 8], "scales": [vocab, hidden // block]}
        nodes = []
        for (part, shape), source in zip(shapes.items(), quantized.input[1:3]):
            shape_name = f"{table.name}.{part}_shape"
            graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
            nodes.append(helper.make_node("Reshape", [source, shape_name],
                                          [f"{table.name}.{part}_rows"], name=f"{table.name}.{part}_rows"))
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [f"{table.name}.data_rows", gather.input[1], f"{table.name}.scales_rows"],
            list(gather.output), name=gather.name, domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=block, bits=bits,
        ))
        position = [n.name for n in graph.node].index(gather.name)
        graph.node.remove(gather)
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)
        if not any(table.name in n.input for n in graph.node):
            graph.initializer.remove(table)
        shared = True
    return shared


def _rotary_angle_nodes(proto) -> list[str]:
    """Nodes computing the inputs of Cos/Sin (position * inverse frequency): they stay fp32."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    keep, stack = set(), [n for n in proto.graph.node if n.op_type in ("Cos", "Sin")]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return sorted(keep)


def _drop_fp16_round_trips(proto) -> None:
    """Cast(fp32->fp16) feeding only Cast(fp16->fp32): the converter puts one between two fp32 nodes,
    which overflows (x**2 of an RMSNorm) and rounds for nothing. Connect the fp32 value directly."""
    from onnx import TensorProto

    nodes = proto.graph.node
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename, dead = {}, set()
    for back in nodes:
        if cast_to(back) != TensorProto.FLOAT or back.input[0] not in producer:
            continue
        down = producer[back.input[0]]
        if cast_to(down) != TensorProto.FLOAT16 or back.output[0] in graph_outputs:
            continue
        rename[back.output[0]] = down.input[0]
        dead.add(id(back))
        if all(id(c) in dead for c in consumers[down.output[0]]) and down.output[0] not in graph_outputs:
            dead.add(id(down))
    kept = [n for n in nodes if id(n) not in dead]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


# =========================================================================== parity


def reference_logits(model, tokenizer, prompts=PARITY_PROMPTS, steps: int = DECODE_STEPS) -> list[dict]:
    """Each prompt extended by `steps` greedy tokens, with PyTorch's logits at every position."""
    cases = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            for _ in range(steps):
                next_token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_token], dim=1)
            logits = model(ids).logits[0].float().numpy()
            cases.append({"ids": ids.numpy(), "prompt_len": ids.shape[1] - steps, "logits": logits})
    return cases


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Runner:
    """Feeds the exported decoder the way GenAI does: prefill with an empty past, then one token a step."""

    def __init__(self, session):
        self.session = session
        self.past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.dtype = np.float16 if self.past and self.past[0].type == "tensor(float16)" else np.float32
        self.outputs = [o.name for o in session.get_outputs()]
        self.inputs = {i.name for i in session.get_inputs()}

    def run(self, ids: np.ndarray, past: list[np.ndarray] | None, past_len: int):
        batch, new = ids.shape
        if past is None:
            past = [np.zeros((batch, i.shape[1], 0, i.shape[3]), self.dtype) for i in self.past]
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((batch, past_len + new), np.int64),
                "position_ids": np.arange(past_len, past_len + new, dtype=np.int64)[None].repeat(batch, 0)}
        feed.update({i.name: p for i, p in zip(self.past, past)})
        feed = {name: value for name, value in feed.items() if name in self.inputs}
        logits, *present = self.session.run(self.outputs, feed)
        return logits.astype(np.float32), present


def check_parity(path: Path, reference: list[dict], limits: dict[str, float]) -> dict:
    """Run the graph at `path` on the reference prompts, without and with the cache; compare to PyTorch."""
    try:
        rows = _run_reference(_Runner(_session(path)), reference)
    except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime rejects fails the gate, with the reason
        return {"passed": False, "ran": False, "failure": f"onnxruntime cannot run it ({_one_line(exc)})"}
    report = {mode: _compare(np.concatenate(got), np.concatenate(want)) for mode, (got, want) in rows.items()}
    overall = {key: (max if key != "top1_agreement" else min)(r[key] for r in report.values())
               for key in ("max_abs_diff", "rel_rms", "kl_divergence", "top1_agreement")}
    failure = _first_failure(overall, limits)
    return {**overall, **report, "passed": failure is None, "failure": failure}


def _run_reference(runner: _Runner, reference: list[dict]) -> dict:
    """ONNX and PyTorch logits, row by row: the whole sequence in one pass, and prefill + cached steps."""
    rows = {"no_cache": ([], []), "with_cache": ([], [])}
    for case in reference:
        ids, n, ref = case["ids"], case["prompt_len"], case["logits"]
        full, _ = runner.run(ids, None, 0)  # whole sequence in one pass
        rows["no_cache"][0].append(full[0])
        rows["no_cache"][1].append(ref)
        logits, present = runner.run(ids[:, :n], None, 0)  # prefill, then decode token by token
        cached = [logits[0, -1]]
        for t in range(n, ids.shape[1]):
            logits, present = runner.run(ids[:, t:t + 1], present, t)
            cached.append(logits[0, -1])
        rows["with_cache"][0].append(np.stack(cached))
        rows["with_cache"][1].append(ref[n - 1:])
    return rows


def _compare(got: np.ndarray, want: np.ndarray) -> dict:
    diff = got - want
    spread = want - want.mean(axis=-1, keepdims=True)
    agree = got.argmax(-1) == want.argmax(-1)
    log_p, log_q = _log_softmax(want), _log_softmax(got)
    return {
        "max_abs_diff": float(np.abs(diff).max()),
        "rel_rms": float(np.sqrt((diff ** 2).mean()) / max(np.sqrt((spread ** 2).mean()), 1e-12)),
        "kl_divergence": float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()),
        "top1_agreement": float(agree.mean()),
        "positions": int(got.shape[0]),
    }


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _first_failure(overall: dict, limits: dict[str, float]) -> str | None:
    if not np.isfinite(overall["max_abs_diff"]):
        return "logits are not finite"
    checks = (("max_abs_diff", "max_abs_diff", 1), ("max_rel_rms", "rel_rms", 1),
              ("max_kl", "kl_divergence", 1), ("min_top1", "top1_agreement", -1))
    for limit_name, metric, sign in checks:
        if limit_name in limits and sign * overall[metric] > sign * limits[limit_name]:
            word = "above" if sign > 0 else "below"
            return f"{metric} {overall[metric]:.4g} is {word} the limit {limits[limit_name]:.4g}"
    return None


# =========================================================================== GenAI config


def write_genai_config(model, tokenizer, profile: TargetProfile, attention: str, out: Path) -> dict:
    """Write genai_config.json so `onnxruntime_genai.Model(out)` runs the export; returns what was written."""
    cfg = model.config
    kv_heads, head_dim = _kv_layout(model)
    if len(set(kv_heads)) != 1:
        return {"skipped": "genai_config.json not written: layers have different KV head counts "
                           f"({sorted(set(kv_heads))}) and ONNX Runtime GenAI sizes every layer's cache "
                           "alike; run model.onnx with onnxruntime directly"}
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None) or cfg.eos_token_id or tokenizer.eos_token_id
    pad = getattr(generation, "pad_token_id", None) or cfg.pad_token_id or tokenizer.pad_token_id
    bos = getattr(generation, "bos_token_id", None) or cfg.bos_token_id or tokenizer.bos_token_id
    context = context_length(model, profile)
    session = {"log_id": "cusprun-edge", "provider_options": _genai_providers(profile),
               "graph_optimization_level": ORT_LEVELS[profile.graph_optimization_level]}
    if profile.intra_op_threads:
        session["intra_op_num_threads"] = profile.intra_op_threads
    if profile.inter_op_threads:
        session["inter_op_num_threads"] = profile.inter_op_threads
    n_layers = len(kv_heads)
    config = {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": max(structure_of(model).num_attention_heads),
                "num_hidden_layers": n_layers,
                "num_key_value_heads": kv_heads[0],
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
            "type": arch.spec_for(model).genai_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1,
            # GroupQueryAttention appends into a cache GenAI preallocates once; plain attention concatenates.
            "past_present_share_buffer": attention == "gqa",
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
        },
    }
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return {"config": "genai_config.json", "type": config["model"]["type"], "context_length": context,
            "past_present_share_buffer": attention == "gqa"}


def context_length(model, profile: TargetProfile) -> int:
    """Tokens a sequence may reach on the target: its planned length, within the model's positions."""
    return min(profile.max_sequence_length, getattr(model.config, "max_position_embeddings", None) or 1 << 30)


def _genai_providers(profile: TargetProfile) -> list[dict]:
    """GenAI names one accelerator (it has no TensorRT provider; CPU is its default): the first it knows."""
    for provider in profile.providers:
        if provider.name in GENAI_PROVIDERS:
            options = {key: ("1" if value is True else "0" if value is False else str(value))
                       for key, value in provider.options.items()}
            return [{GENAI_PROVIDERS[provider.name]: options}]
    return []


# =========================================================================== manifest


def estimate_memory(model, precision: str, profile: TargetProfile) -> dict:
    """Runtime memory in MB: weights at `precision` (embeddings stay float), KV cache, 10% for activations."""
    params = count_params(model)
    scale_bytes = 4 / WEIGHT_ONLY["block_size"]  # one fp32 scale per block
    weight_bytes = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + scale_bytes, "int4": 0.5 + scale_bytes}[precision]
    float_bytes = 2.0 if precision == "fp16" else 4.0
    weights = params["prunable"] * weight_bytes + params["embedding"] * float_bytes
    if precision in ("int8", "int4") and model.config.tie_word_embeddings:
        weights += model.config.vocab_size * model.config.hidden_size * weight_bytes  # quantized lm_head copy
    kv_heads, head_dim = _kv_layout(model)
    kv = 2 * sum(kv_heads) * head_dim * profile.max_sequence_length * profile.batch_size * float_bytes
    mb = 1024 * 1024
    return {"weights_mb": round(weights / mb, 1), "kv_cache_mb": round(kv / mb, 1),
            "total_mb": round((weights + kv) * 1.1 / mb, 1)}


def _io_record(model, attention: str, rotary_fused: bool) -> dict:
    kv_heads, head_dim = _kv_layout(model)
    positions = ("past length + i (GroupQueryAttention rotates; position_ids is accepted, unused): "
                 "batches must be right-padded, as GenAI feeds them") if rotary_fused else "position_ids"
    record = {"inputs": ["input_ids", "attention_mask", "position_ids", "past_key_values.%d.key",
                         "past_key_values.%d.value"],
              "outputs": ["logits", "present.%d.key", "present.%d.value"],
              "layers": len(kv_heads), "kv_heads_per_layer": kv_heads, "head_dim": head_dim,
              "kv_layout": "[batch_size, kv_heads, sequence, head_dim]", "rotary_positions": positions}
    if attention == "gqa":
        record["limits"] = "after a past, several new tokens at once need batch size 1 (GroupQueryAttention)"
    return record


def _source_record(model, source: str | None) -> dict:
    record = {"source": source, "model_type": model.config.model_type,
              "name_or_path": getattr(model.config, "_name_or_path", None)}
    if source:
        from .expert_io import expert_record

        path = Path(source)
        if path.is_dir() and expert_record(path):
            record["expert"] = expert_record(path)
    return record


def _tool_version() -> str:
    from . import __version__

    return __version__


def _library_versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxruntime_genai

        versions["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        versions["onnxruntime_genai"] = None
    return versions


def _write_manifest(directory: Path, manifest: dict, started: float) -> None:
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)  # mkdtemp and the quantizers create owner-only entries
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        path.chmod(0o666 & ~umask)
        name = path.relative_to(directory).as_posix()
        files[name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["files"] = files
    manifest["total_bytes"] = sum(f["bytes"] for f in files.values())
    manifest["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str))


def verify_manifest(directory) -> list[str]:
    """Files whose size or sha256 no longer match the manifest (empty when the export is intact)."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    problems = []
    for name, record in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != record["bytes"] or sha256_file(path) != record["sha256"]:
            problems.append(f"{name}: changed")
    return problems
