"""Load a cusprun-edge expert in transformers:

    AutoModelForCausalLM.from_pretrained(expert_dir, trust_remote_code=True)

Every expert directory carries a copy of this file as `modeling_cusprun.py`, named by `auto_map` in its
config.json. An expert keeps its architecture (config.json's model_type) but each decoder layer has its
own FFN width and its own query and KV head counts (`cusprun_structure` in config.json), which stock
transformers, one width for every layer, cannot hold. These classes build the stock model and give each
layer its recorded shapes before the weights load; the forward pass is transformers' own. Standalone on
purpose: it imports only torch and transformers, so a user needs no cusprun-edge to load an expert.
"""

from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)


def _linear(like: nn.Linear, n_in: int, n_out: int, bias: bool) -> nn.Linear:
    # on the device of the module it replaces: the meta device while from_pretrained builds the model
    return nn.Linear(n_in, n_out, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def _flag(shapes: dict, key: str, i: int, default: bool) -> bool:
    flags = shapes.get(key) or []
    return bool(flags[i]) if flags else default


class PerLayerShapes:
    """Mixin: after the stock model is built, each decoder layer takes its shapes from `cusprun_structure`
    (whole removed layers need nothing: config.json already counts only the kept ones)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        shapes = getattr(config, "cusprun_structure", None) or {}
        if "intermediate_sizes" not in shapes:
            return
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        hidden = config.hidden_size
        for i, layer in enumerate(self.model.layers):
            ffn = shapes["intermediate_sizes"][i]
            n_q, n_kv = shapes["num_attention_heads"][i], shapes["num_key_value_heads"][i]
            mlp, attn = layer.mlp, layer.self_attn
            # FLAP's compensation may give down_proj / o_proj a bias the stock layer lacks
            down_bias = _flag(shapes, "down_proj_bias", i, mlp.down_proj.bias is not None)
            o_bias = _flag(shapes, "o_proj_bias", i, attn.o_proj.bias is not None)
            mlp.gate_proj = _linear(mlp.gate_proj, hidden, ffn, mlp.gate_proj.bias is not None)
            mlp.up_proj = _linear(mlp.up_proj, hidden, ffn, mlp.up_proj.bias is not None)
            mlp.down_proj = _linear(mlp.down_proj, ffn, hidden, down_bias)
            attn.q_proj = _linear(attn.q_proj, hidden, n_q * head_dim, attn.q_proj.bias is not None)
            attn.k_proj = _linear(attn.k_proj, hidden, n_kv * head_dim, attn.k_proj.bias is not None)
            attn.v_proj = _linear(attn.v_proj, hidden, n_kv * head_dim, attn.v_proj.bias is not None)
            attn.o_proj = _linear(attn.o_proj, n_q * head_dim, hidden, o_bias)
            # the attention reshapes by head_dim (-1 heads); only the GQA repeat needs the layer's count
            attn.num_key_value_groups = n_q // n_kv


class LlamaExpertForCausalLM(PerLayerShapes, LlamaForCausalLM):
    pass


class MistralExpertForCausalLM(PerLayerShapes, MistralForCausalLM):
    pass


class Qwen2ExpertForCausalLM(PerLayerShapes, Qwen2ForCausalLM):
    pass


class Qwen3ExpertForCausalLM(PerLayerShapes, Qwen3ForCausalLM):
    pass


class Gemma2ExpertForCausalLM(PerLayerShapes, Gemma2ForCausalLM):
    pass


class Gemma3ExpertForCausalLM(PerLayerShapes, Gemma3ForCausalLM):
    pass


# config.json's model_type -> the class its auto_map names
CLASSES = {
    "llama": "LlamaExpertForCausalLM",
    "mistral": "MistralExpertForCausalLM",
    "qwen2": "Qwen2ExpertForCausalLM",
    "qwen3": "Qwen3ExpertForCausalLM",
    "gemma2": "Gemma2ExpertForCausalLM",
    "gemma3_text": "Gemma3ExpertForCausalLM",
}
