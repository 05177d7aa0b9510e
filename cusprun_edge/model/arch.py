"""Where each supported architecture keeps its prunable units.

Llama, Qwen2, Gemma3 and friends differ here, in one table, not in copied pruning code:
every stage reaches layers, attention and MLP projections through an `ArchSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

import torch.nn as nn

from ..errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths of one decoder-only architecture (relative to the CausalLM / a layer)."""

    family: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    mlp: str = "mlp"
    gate_proj: str = "gate_proj"
    up_proj: str = "up_proj"
    down_proj: str = "down_proj"
    # Config keys that hold one entry per layer and must follow layer removal.
    per_layer_config_keys: tuple[str, ...] = ("layer_types",)
    # The ONNX Runtime GenAI model type for genai_config.json.
    genai_type: str = "llama"


# model_type (config.json) -> spec. Supported means: separate q/k/v/o and gate/up/down projections.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(family="llama", genai_type="llama"),
    "mistral": ArchSpec(family="mistral", genai_type="mistral"),
    "qwen2": ArchSpec(family="qwen2", genai_type="qwen2"),
    "qwen3": ArchSpec(family="qwen3", genai_type="qwen3"),
    "gemma3_text": ArchSpec(family="gemma3", genai_type="gemma3_text"),
    "gemma2": ArchSpec(family="gemma2", genai_type="gemma2"),
}


def spec_for_model_type(model_type: str) -> ArchSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UserError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


def spec_for(model: nn.Module) -> ArchSpec:
    return spec_for_model_type(model.config.model_type)


def get(obj: nn.Module, path: str) -> nn.Module:
    return attrgetter(path)(obj)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return get(model, spec_for(model).layers)


@dataclass
class LayerParts:
    """The modules of one decoder layer that pruning touches."""

    attn: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear


def layer_parts(layer: nn.Module, spec: ArchSpec) -> LayerParts:
    attn = get(layer, spec.attn)
    mlp = get(layer, spec.mlp)
    return LayerParts(
        attn=attn,
        q=get(attn, spec.q_proj),
        k=get(attn, spec.k_proj),
        v=get(attn, spec.v_proj),
        o=get(attn, spec.o_proj),
        mlp=mlp,
        gate=get(mlp, spec.gate_proj),
        up=get(mlp, spec.up_proj),
        down=get(mlp, spec.down_proj),
    )


def all_layer_parts(model: nn.Module) -> list[LayerParts]:
    spec = spec_for(model)
    return [layer_parts(layer, spec) for layer in get(model, spec.layers)]


def head_dim(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
