"""torch -> ONNX: the model wrapped as a decoder whose KV cache is flat tensors, traced by the dynamo
exporter (TorchScript as a fallback), with per-layer pruned widths and head counts as they are."""

from __future__ import annotations

import contextlib
import inspect
import sys
import tempfile
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn
from transformers import DynamicCache

from ..model import arch
from .attention import ATTENTION_STATE, FUSED_ATTENTION, gqa_translation
from .common import MODEL_FILE, kv_layout, one_line, quiet
from .passes import finish_graph, lower_to_opset_17


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
        token = ATTENTION_STATE.set(state)
        try:
            with _rotary_bypassed(self.model) if rotary else contextlib.nullcontext():
                out = self.model(**kwargs, past_key_values=_PastOnlyCache(ddp_cache_data=pairs))
        finally:
            ATTENTION_STATE.reset(token)
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

def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _example_inputs(model):
    kv_heads, head_dim = kv_layout(model)
    # Distinct sizes, none 0 or 1, so the tracer specialises no dynamic axis by accident.
    batch, new, past_len = 2, 3, 5
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, new))
    attention_mask = torch.ones(batch, past_len + new, dtype=torch.long)
    position_ids = torch.arange(past_len, past_len + new).expand(batch, new).contiguous()
    past = [torch.randn(batch, kv, past_len, head_dim) * 0.1 for kv in kv_heads for _ in range(2)]
    return input_ids, attention_mask, position_ids, past


def export_onnx(model, attention: str, opset: int, max_positions: int = 0, on_passes=None, bind_weights=None):
    """Trace the cached decoder to an onnx_ir.Model; returns (model, exporter description).

    `max_positions` sizes the rotary tables of fused attention (0: rotary stays in plain ops). `bind_weights`
    (export/streamed.py): the model's decoder layers hold placeholders; it is called on the unoptimized graph to
    point their initializers at the weights on disk and optimize around them, before the graph passes."""
    decoder = CachedDecoder(model, fused_attention=attention == "gqa", max_positions=max_positions).eval()
    args = _example_inputs(model)
    input_names, output_names = io_names(len(args[3]) // 2)
    dyn = torch.export.Dim.DYNAMIC
    tokens = {0: dyn, 1: dyn}
    dynamic_shapes = (tokens, tokens, tokens, [{0: dyn, 2: dyn} for _ in args[3]])
    implementation = FUSED_ATTENTION if attention == "gqa" else "sdpa"
    table = {torch.ops.cusprun_edge.group_query_attention.default: gqa_translation()}
    try:
        with torch.no_grad(), attention_implementation(model, implementation), quiet():
            program = torch.onnx.export(
                decoder, args, dynamo=True, dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=max(opset, 18), optimize=bind_weights is None,
                custom_translation_table=table, verbose=False,
            )
        onnx_model, exporter = program.model, "torch.onnx.export(dynamo=True)"
    except Exception as exc:
        if attention == "gqa" or bind_weights is not None:
            raise  # the fused op exists only for the dynamo exporter; the caller retries plain attention
        with attention_implementation(model, implementation):
            onnx_model = _export_torchscript(decoder, args, input_names, output_names, opset)
        exporter = f"torch.onnx.export(dynamo=False) (TorchScript fallback; dynamo failed: {one_line(exc)})"
    if bind_weights is not None:
        bind_weights(onnx_model)
    if opset < 18 and onnx_model.opset_imports.get("", 18) >= 18:
        lower_to_opset_17(onnx_model)  # before the fusions: they add ops no ONNX converter knows
    if on_passes:
        on_passes()
    finish_graph(onnx_model, model, ort_fusions=attention == "gqa")
    return onnx_model, exporter


def _export_torchscript(decoder, args, input_names, output_names, opset):
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in input_names[3:]})
    axes.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in output_names[1:]})
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad(), quiet():
        path = Path(scratch) / MODEL_FILE
        torch.onnx.export(
            _VarArgsDecoder(decoder), (*args[:3], *args[3]), str(path), dynamo=False,
            input_names=input_names, output_names=output_names, dynamic_axes=axes,
            opset_version=min(opset, 20),
        )
        model = ir.load(path)
        ir.external_data.load_to_model(model)
    return model

