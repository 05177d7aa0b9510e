"""Physical structure edits: slice FFN channels, attention heads (GQA-aware) and whole layers.

Coupled weights move together (torch-pruning's dependency groups): an FFN channel is a row of
gate_proj and up_proj and a column of down_proj; a query head is rows of q_proj and columns of
o_proj; a KV head is rows of k_proj and v_proj plus every query head of its group.
The resulting per-layer shape is recorded as a `Structure` in config.json so an expert reloads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import arch
from .arch import LayerParts


@dataclass
class Structure:
    """Per-layer geometry of a (possibly pruned) model, stored in config.json as `cusprun_structure`."""

    source_layers: list[int]  # original index of each remaining decoder layer
    intermediate_sizes: list[int]
    num_attention_heads: list[int]
    num_key_value_heads: list[int]
    down_proj_bias: list[bool] = field(default_factory=list)  # bias added by FLAP's compensation
    o_proj_bias: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Structure":
        return cls(**d)


def _bias(lin: nn.Linear) -> bool:
    return lin.bias is not None


def structure_of(model: nn.Module) -> Structure:
    hd = arch.head_dim(model)
    parts = arch.all_layer_parts(model)
    existing = getattr(model.config, "cusprun_structure", None)
    src = existing["source_layers"] if existing else list(range(len(parts)))
    return Structure(
        source_layers=list(src),
        intermediate_sizes=[p.down.in_features for p in parts],
        num_attention_heads=[p.o.in_features // hd for p in parts],
        num_key_value_heads=[p.k.out_features // hd for p in parts],
        down_proj_bias=[_bias(p.down) for p in parts],
        o_proj_bias=[_bias(p.o) for p in parts],
    )


def is_uniform(s: Structure, model_config) -> bool:
    """True when every layer has the dense widths (only whole layers may be missing)."""
    return (
        set(s.intermediate_sizes) == {model_config.intermediate_size}
        and set(s.num_attention_heads) == {model_config.num_attention_heads}
        and set(s.num_key_value_heads) == {model_config.num_key_value_heads}
        and not any(s.down_proj_bias) and not any(s.o_proj_bias)
    )


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total (tied weights once), embedding/lm_head, and prunable (the rest)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    spec = arch.spec_for(model)
    embed = arch.get(model, spec.embed).weight
    head = arch.get(model, spec.lm_head).weight
    emb = embed.numel() + (0 if head is embed or head.data_ptr() == embed.data_ptr() else head.numel())
    return {"total": total, "embedding": emb, "prunable": total - emb}


# --------------------------------------------------------------------------- slicing


def _new_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    w = old.weight
    return nn.Linear(in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


def _sliced(old: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = old.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = _new_linear(old, w.shape[1], w.shape[0], _bias(old))
    new.weight.data.copy_(w)
    if _bias(old):
        b = old.bias.data if rows is None else old.bias.data[rows]
        new.bias.data.copy_(b)
    return new


def _set(module: nn.Module, name: str, value: nn.Module) -> None:
    setattr(module, name.rsplit(".", 1)[-1], value)


def keep_ffn_channels(parts: LayerParts, keep: torch.Tensor, spec: arch.ArchSpec) -> None:
    """Keep only FFN channels `keep` (sorted indices into the intermediate dimension)."""
    keep = torch.as_tensor(keep, dtype=torch.long, device=parts.down.weight.device)
    _set(parts.mlp, spec.gate_proj, _sliced(parts.gate, rows=keep))
    _set(parts.mlp, spec.up_proj, _sliced(parts.up, rows=keep))
    _set(parts.mlp, spec.down_proj, _sliced(parts.down, cols=keep))
    if hasattr(parts.mlp, "intermediate_size"):
        parts.mlp.intermediate_size = int(keep.numel())


def head_rows(heads, head_dim: int, device) -> torch.Tensor:
    heads = torch.as_tensor(heads, dtype=torch.long, device=device)
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


def check_gqa(q_keep: list[int], kv_keep: list[int], n_q: int, n_kv: int) -> int:
    """Validate a head selection against the GQA grouping; return the new queries-per-KV count."""
    group = n_q // n_kv
    if not kv_keep or not q_keep:
        raise ValueError("a layer must keep at least one query head and one KV head")
    per_kv = {kv: 0 for kv in kv_keep}
    for q in q_keep:
        if q // group not in per_kv:
            raise ValueError(f"query head {q} kept but its KV head {q // group} removed")
        per_kv[q // group] += 1
    counts = set(per_kv.values())
    if len(counts) != 1:
        raise ValueError(f"every kept KV head needs the same number of query heads, got {sorted(counts)}")
    return counts.pop()


def keep_heads(parts: LayerParts, q_keep: list[int], kv_keep: list[int], head_dim: int, spec) -> None:
    """Keep query heads `q_keep` and KV heads `kv_keep` (original indices, GQA-consistent)."""
    n_q = parts.o.in_features // head_dim
    n_kv = parts.k.out_features // head_dim
    q_keep, kv_keep = sorted(q_keep), sorted(kv_keep)
    groups = check_gqa(q_keep, kv_keep, n_q, n_kv)
    dev = parts.q.weight.device
    q_rows, kv_rows = head_rows(q_keep, head_dim, dev), head_rows(kv_keep, head_dim, dev)
    _set(parts.attn, spec.q_proj, _sliced(parts.q, rows=q_rows))
    _set(parts.attn, spec.k_proj, _sliced(parts.k, rows=kv_rows))
    _set(parts.attn, spec.v_proj, _sliced(parts.v, rows=kv_rows))
    _set(parts.attn, spec.o_proj, _sliced(parts.o, cols=q_rows))
    parts.attn.num_key_value_groups = groups
    for name, value in (("num_heads", len(q_keep)), ("num_key_value_heads", len(kv_keep))):
        if hasattr(parts.attn, name):
            setattr(parts.attn, name, value)


def add_output_bias(parts: LayerParts, which: str, bias: torch.Tensor, spec) -> None:
    """Add a bias to down_proj ('mlp') or o_proj ('attn'): FLAP's compensation for removed units."""
    old, owner, name = (
        (parts.down, parts.mlp, spec.down_proj) if which == "mlp" else (parts.o, parts.attn, spec.o_proj)
    )
    new = _new_linear(old, old.in_features, old.out_features, bias=True)
    new.weight.data.copy_(old.weight.data)
    base = old.bias.data if _bias(old) else torch.zeros_like(new.bias.data)
    new.bias.data.copy_(base + bias.to(base))
    _set(owner, name, new)


def keep_layers(model: nn.Module, keep: list[int]) -> None:
    """Remove whole decoder layers (ShortGPT); `keep` are indices into the current layer list."""
    spec = arch.spec_for(model)
    layers = arch.get(model, spec.layers)
    keep = sorted(keep)
    owner = arch.get(model, spec.layers.rsplit(".", 1)[0])
    setattr(owner, spec.layers.rsplit(".", 1)[-1], nn.ModuleList([layers[i] for i in keep]))
    for new_idx, layer in enumerate(arch.get(model, spec.layers)):
        attn = arch.get(layer, spec.attn)
        attn.layer_idx = new_idx  # the KV cache is indexed by position in the list
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    cfg = model.config
    for key in spec.per_layer_config_keys:
        values = getattr(cfg, key, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(cfg, key, [values[i] for i in keep])
    existing = getattr(cfg, "cusprun_structure", None)
    src = existing["source_layers"] if existing else list(range(len(layers)))
    cfg.num_hidden_layers = len(keep)
    cfg.cusprun_structure = {**(existing or {}), "source_layers": [src[i] for i in keep]}


def record_structure(model: nn.Module) -> Structure:
    s = structure_of(model)
    model.config.cusprun_structure = s.to_dict()
    return s


def shape_like(model: nn.Module, s: Structure) -> None:
    """Give a freshly built (dense, possibly meta) model the per-layer shapes of `s`, weights unset."""
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    cfg = model.config
    n_dense = len(arch.get(model, spec.layers))
    if len(s.source_layers) != n_dense:
        # the config already lists the kept layers; nothing to drop
        raise ValueError(f"structure has {len(s.source_layers)} layers, model {n_dense}")
    for i, parts in enumerate(arch.all_layer_parts(model)):
        ffn, n_q, n_kv = s.intermediate_sizes[i], s.num_attention_heads[i], s.num_key_value_heads[i]
        down_bias = s.down_proj_bias[i] if s.down_proj_bias else _bias(parts.down)
        o_bias = s.o_proj_bias[i] if s.o_proj_bias else _bias(parts.o)
        h = cfg.hidden_size
        _set(parts.mlp, spec.gate_proj, _new_linear(parts.gate, h, ffn, _bias(parts.gate)))
        _set(parts.mlp, spec.up_proj, _new_linear(parts.up, h, ffn, _bias(parts.up)))
        _set(parts.mlp, spec.down_proj, _new_linear(parts.down, ffn, h, down_bias))
        _set(parts.attn, spec.q_proj, _new_linear(parts.q, h, n_q * hd, _bias(parts.q)))
        _set(parts.attn, spec.k_proj, _new_linear(parts.k, h, n_kv * hd, _bias(parts.k)))
        _set(parts.attn, spec.v_proj, _new_linear(parts.v, h, n_kv * hd, _bias(parts.v)))
        _set(parts.attn, spec.o_proj, _new_linear(parts.o, n_q * hd, h, o_bias))
        parts.attn.num_key_value_groups = n_q // n_kv
