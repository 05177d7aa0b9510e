"""ONNX Runtime's GroupQueryAttention as a torch custom op: the eager math (what PyTorch runs while
tracing and in tests), a transformers attention function that routes each layer through it, and the
op's ONNX translation (one com.microsoft.GroupQueryAttention node)."""

from __future__ import annotations

import contextvars

import onnx_ir as ir
import torch
from transformers import AttentionInterface

# The active decoder's per-layer past, mask, rotary tables and presents (set by trace.CachedDecoder).
ATTENTION_STATE: contextvars.ContextVar[dict] = contextvars.ContextVar("cusprun_attention_state")

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
    state = ATTENTION_STATE.get()
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


def gqa_translation():
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

