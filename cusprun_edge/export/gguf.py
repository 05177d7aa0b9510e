"""GGUF export for llama.cpp: a pruned Llama-family expert with its own width in every layer.

llama.cpp's loader reads `feed_forward_length`, `attention.head_count` and `attention.head_count_kv` as one
number or one per layer, but its `llama` graph builds every layer with layer 0's widths. Its `deci` graph
(Llama-shaped layers, Nemotron-NAS) reads each layer's own widths, so a pruned expert is written as `deci`,
and a model whose layers all share one width as plain `llama`. What `deci` needs, measured on a tiny model
(../shared/measurements/gguf_deci/):
  - `attention.key_length` / `value_length` always (else the head size comes from layer 0);
  - each layer's query heads a whole multiple of its KV heads (our GQA-consistent pruning guarantees it);
  - a layer with attention but no FFN skips its whole residual step in llama.cpp, so it gets a 32-wide
    all-zero FFN (exact: silu(0) * 0 = 0); a layer without attention is written with 0 heads.

Weights respect the source GGUF: a kept weight whose rows (q/k/v/gate/up, the embedding) or whole input
blocks (o_proj with whole heads removed) are the source's, unchanged, is written as the source's own
blocks, byte for byte. Only what pruning or the refit changed is quantized again (`requant`, Q8_0 by
default). An FFN width that is not a multiple of 32 is padded with zero channels (exact: a zero gate/up row
gives silu(0) * 0 = 0 whatever the zero down_proj column multiplies), so down_proj can still be quantized in
blocks; a tensor that still cannot be (an odd input width) falls back to F16, and the manifest lists it.

Gemma, Qwen and the other architectures have no per-layer graph in llama.cpp; padding pruned units back
to full width would be exact but save nothing, so they are refused (`check_supported`).
"""

from __future__ import annotations

import datetime
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fsutil import atomic_directory, check_replaceable, sha256_file
from ..model import arch
from ..model.structure import structure_of
from .common import MANIFEST_FILE

GGUF_FILE = "model.gguf"
FFN_BLOCK = 32  # the block size of Q4_0/Q4_1/Q8_0: FFN widths are padded to a multiple of it
ZERO_FFN = FFN_BLOCK  # width of the all-zero FFN an attention-only layer gets
REQUANT_TYPES = ("q8_0", "q4_0", "q4_1", "f16", "f32")
DEFAULT_REQUANT = "q8_0"
# model_type -> why llama.cpp cannot run it pruned (see the module docstring)
UNSUPPORTED = {
    "gemma3_text": "llama.cpp's gemma3 graph builds every layer with layer 0's widths and it has no per-layer "
                   "Gemma architecture; padding pruned units back to full width would be exact but save nothing",
    "gemma2": "llama.cpp's gemma2 graph builds every layer with layer 0's widths and it has no per-layer "
              "Gemma architecture",
    "qwen2": "llama.cpp's per-layer architecture (deci) has no q/k/v biases and qwen2's graph builds every layer "
             "with layer 0's widths",
    "qwen3": "llama.cpp's per-layer architecture (deci) has no q/k norms and qwen3's graph builds every layer "
             "with layer 0's widths",
}
SUPPORTED = ("llama", "mistral")


def check_supported(model_or_config) -> None:
    """Refuse (UserError) a model llama.cpp cannot run with per-layer widths; name the reason."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = cfg.model_type
    if mt in UNSUPPORTED:
        raise UserError(f"GGUF export does not support '{mt}': {UNSUPPORTED[mt]}; export it to ONNX instead "
                        "(--format onnx)")
    if mt not in SUPPORTED:
        raise UserError(f"GGUF export supports {', '.join(SUPPORTED)} models, not '{mt}'; export it to ONNX "
                        "instead (--format onnx)")
    if getattr(cfg, "sliding_window", None):
        raise UserError(f"GGUF export of '{mt}' with a sliding window is not supported (llama.cpp's per-layer "
                        "architecture has none); export it to ONNX instead (--format onnx)")
    rope = _rope(cfg)
    if rope["type"] not in ("default", "linear"):
        raise UserError(f"GGUF export does not support rope scaling '{rope['type']}' yet; export it to ONNX "
                        "instead (--format onnx)")


def _rope(cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    return {"theta": float(theta), "type": kind, "factor": params.get("factor")}


# --------------------------------------------------------------------------- the source GGUF


class SourceGGUF:
    """The GGUF the model was converted from: its tensors' raw blocks and its tokenizer fields."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.field("general.architecture")

    def field(self, key, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def tensor(self, name):
        """(raw uint8 rows, dequantized float32 rows, type) of a 2-D tensor, or None."""
        from gguf import quants

        t = self.tensors.get(name)
        if t is None or len(t.shape) != 2:
            return None
        raw = np.asarray(t.data)
        if raw.dtype != np.uint8:  # F32/F16 tensors come typed; their bytes are the blocks
            raw = raw.view(np.uint8).reshape(raw.shape[0], -1)
        values = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
        return raw, values.astype(np.float32, copy=False), t.tensor_type


def source_gguf_for(source: str | None) -> Path | None:
    """The GGUF behind a model source (an embedded name, a .gguf path, or an expert directory built from
    one), or None when the model did not come from a GGUF."""
    if not source:
        return None
    from ..model.expert_io import expert_record
    from ..model.load import EMBEDDED, resolve_source

    seen = set()
    while source and source not in seen:
        seen.add(source)
        try:
            kind, where = resolve_source(str(source))
        except UserError:
            return None
        if kind == "embedded":
            return EMBEDDED[where].locate()
        if kind == "gguf":
            return Path(where)
        if kind != "expert":
            return None
        source = expert_record(where).get("base_model")
    return None


# --------------------------------------------------------------------------- copying intact blocks


def _row_index(values: np.ndarray) -> dict[int, list[int]]:
    index: dict[int, list[int]] = defaultdict(list)
    for i, row in enumerate(values):
        index[hash(row.tobytes())].append(i)
    return index


def _find(index, values, item: np.ndarray) -> int | None:
    for j in index.get(hash(item.tobytes()), ()):
        if np.array_equal(values[j], item):
            return j
    return None


def copy_rows(w: np.ndarray, src_raw: np.ndarray, src_values: np.ndarray) -> np.ndarray | None:
    """The source's raw rows when every row of `w` is a source row, unchanged (a GGUF block runs along a row,
    so a kept row keeps its blocks); else None."""
    if w.shape[1] != src_values.shape[1]:
        return None
    index = _row_index(src_values)
    rows = []
    for row in w:
        j = _find(index, src_values, row)
        if j is None:
            return None
        rows.append(j)
    return src_raw[rows]


def copy_blocks(w: np.ndarray, src_raw: np.ndarray, src_values: np.ndarray, block: int) -> np.ndarray | None:
    """The source's raw blocks when `w` keeps all of the source's rows and whole, unchanged blocks of its input
    columns (o_proj with whole heads removed); else None."""
    n, width = w.shape
    if n != src_values.shape[0] or width % block or src_values.shape[1] % block:
        return None
    nb, src_nb = width // block, src_values.shape[1] // block
    src_blocks = np.ascontiguousarray(src_values.reshape(n, src_nb, block).transpose(1, 0, 2))
    blocks = np.ascontiguousarray(w.reshape(n, nb, block).transpose(1, 0, 2))
    index = _row_index(src_blocks)
    picked = []
    for b in blocks:
        j = _find(index, src_blocks, b)
        if j is None:
            return None
        picked.append(j)
    per_block = src_raw.shape[1] // src_nb
    return np.ascontiguousarray(src_raw.reshape(n, src_nb, per_block)[:, picked].reshape(n, nb * per_block))


# --------------------------------------------------------------------------- layout


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face's rotate-half q/k rows -> GGML's interleaved rope layout (what llama.cpp's converter writes)."""
    if n_head == 0:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
    return w if w.shape[0] == rows else np.concatenate([w, np.zeros((rows - w.shape[0], w.shape[1]), w.dtype)])


def _pad_cols(w: np.ndarray, cols: int) -> np.ndarray:
    return w if w.shape[1] == cols else np.concatenate([w, np.zeros((w.shape[0], cols - w.shape[1]), w.dtype)], 1)


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def layer_plan(model) -> list[dict]:
    """Per layer: query heads, KV heads, FFN width in the model, and FFN width written (padded / zero FFN)."""
    s = structure_of(model)
    plan = []
    for i, (n_q, n_kv, n_ff) in enumerate(zip(s.num_attention_heads, s.num_key_value_heads, s.intermediate_sizes)):
        if n_q and (not n_kv or n_q % n_kv):
            raise UserError(f"layer {i} has {n_q} query heads on {n_kv} KV heads; llama.cpp needs a whole number "
                            "of query heads per KV head")
        written = _round_up(n_ff, FFN_BLOCK) if n_ff else (ZERO_FFN if n_q else 0)
        plan.append({"n_head": n_q, "n_head_kv": n_kv if n_q else 0, "n_ff": n_ff, "n_ff_written": written})
    return plan


# --------------------------------------------------------------------------- the writer


class _Tensors:
    """Collects tensors in GGUF form and how each was stored."""

    def __init__(self, writer, source: SourceGGUF | None, requant: str):
        import gguf

        self.gguf = gguf
        self.writer = writer
        self.source = source
        self.requant = gguf.GGMLQuantizationType[requant.upper()]
        self.record: dict[str, dict] = {}
        self.fallbacks: list[dict] = []

    def vector(self, name: str, v: torch.Tensor) -> None:
        self.writer.add_tensor(name, _np(v))
        self.record[name] = {"type": "F32", "how": "f32"}

    def matrix(self, name: str, w: np.ndarray, source_name: str | None = None, pad_rows: int | None = None) -> None:
        """Write a 2-D weight (rows = outputs): the source's blocks where intact, else `requant`.
        `pad_rows`: append zero rows up to this count (zero bytes are zero in every GGML type)."""
        gguf = self.gguf
        rows = pad_rows or w.shape[0]
        src = self.source.tensor(source_name) if (self.source and source_name) else None
        if src is not None:
            src_raw, src_values, src_type = src
            block = gguf.GGML_QUANT_SIZES[src_type][0]
            raw = copy_rows(w, src_raw, src_values)
            if raw is None:
                raw = copy_blocks(w, src_raw, src_values, block)
            if raw is not None:
                raw = _pad_rows(raw, rows)
                self.writer.add_tensor(name, raw, raw_dtype=src_type)
                self.record[name] = {"type": src_type.name, "how": "copied from the source GGUF"}
                return
        w = _pad_rows(w, rows)
        qtype = self.requant
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if w.shape[1] % block:
            qtype = gguf.GGMLQuantizationType.F16
            self.fallbacks.append({"tensor": name, "type": "F16", "reason": f"input width {w.shape[1]} is not a "
                                   f"multiple of {block} ({self.requant.name} blocks)"})
        if qtype == gguf.GGMLQuantizationType.F32:
            self.writer.add_tensor(name, w)
        else:
            data = gguf.quants.quantize(w, qtype)
            self.writer.add_tensor(name, data, raw_dtype=qtype)
        how = "kept in F32" if qtype == gguf.GGMLQuantizationType.F32 else f"quantized to {qtype.name}"
        self.record[name] = {"type": qtype.name, "how": how if src is None else how + " (changed by pruning)"}


def _vocab_trim(model, head, n_vocab: int) -> tuple[list[int] | None, int, int]:
    """(original id of each kept row or None, the original vocabulary size, the HF tokenizer's size).
    Two layouts exist (vocab.py): rows kept under the original ids (`kept_ids` on the lm_head; the tokenizer is
    the original one) and a trimmed vocabulary with its own trimmed tokenizer (config `cusprun_trimmed_vocab`)."""
    kept = getattr(head, "kept_ids", None)
    if kept is not None:
        return [int(i) for i in kept.tolist()], int(head.vocab_size), int(head.vocab_size)
    trimmed = getattr(model.config, "cusprun_trimmed_vocab", None)
    if trimmed:
        return [int(i) for i in trimmed["original_ids"]], int(trimmed["original_vocab_size"]), n_vocab
    return None, n_vocab, n_vocab


def _tokenizer_fields(tokenizer, source: SourceGGUF | None, full_vocab: int, hf_vocab: int) -> dict:
    """tokenizer.ggml.* fields: the source GGUF's when it holds the original vocabulary (what llama.cpp users
    run today, trimmed afterwards if the expert's is), else built from the Hugging Face tokenizer
    (byte-level BPE only), which has `hf_vocab` ids."""
    if source is not None and len(source.field("tokenizer.ggml.tokens", [])) == full_vocab:
        fields = {k: source.field(k) for k in source.reader.fields if k.startswith("tokenizer.")}
        return {k: v for k, v in fields.items() if v is not None}, "the source GGUF's"
    vocab_size = hf_vocab
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model", {})
    byte_level = "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or \
        (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise UserError("GGUF export writes byte-level BPE tokenizers only (this one is "
                        f"{model.get('type')}); export it to ONNX instead (--format onnx)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # UNUSED until a token fills the id
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, 1  # NORMAL
    for added in data.get("added_tokens", []):
        if added["id"] < vocab_size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = data.get("pre_tokenizer") or {}
    # a plain byte-level pre-tokenizer splits with GPT-2's regex, which llama.cpp calls "gpt-2"; others (a Split
    # regex of their own) cannot be named here and get llama.cpp's default split
    pre_name = "gpt-2" if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) else "default"
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_name, "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = int(value)
    bos = getattr(tokenizer, "bos_token_id", None)
    fields["tokenizer.ggml.add_bos_token"] = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    if getattr(tokenizer, "chat_template", None):
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields, f"built from tokenizer.json (pre-tokenizer '{pre_name}')"


ID_FIELDS = ("bos", "eos", "unknown", "padding", "eot", "eom", "sep", "mask")


def _trim_tokenizer(fields: dict, kept: list[int]) -> dict:
    """Keep only the expert's tokens: ids renumbered in order, merges whose parts and result all stay."""
    new_id = {old: new for new, old in enumerate(kept)}
    tokens = [fields["tokenizer.ggml.tokens"][i] for i in kept]
    out = dict(fields)
    out["tokenizer.ggml.tokens"] = tokens
    if "tokenizer.ggml.token_type" in fields:
        out["tokenizer.ggml.token_type"] = [fields["tokenizer.ggml.token_type"][i] for i in kept]
    if "tokenizer.ggml.scores" in fields:
        out["tokenizer.ggml.scores"] = [fields["tokenizer.ggml.scores"][i] for i in kept]
    if "tokenizer.ggml.merges" in fields:
        have = set(tokens)
        out["tokenizer.ggml.merges"] = [
            m for m in fields["tokenizer.ggml.merges"]
            if (parts := m.split(" ", 1)) and len(parts) == 2 and parts[0] in have and parts[1] in have
            and parts[0] + parts[1] in have]
    for key in ID_FIELDS:
        name = f"tokenizer.ggml.{key}_token_id"
        if name in fields:
            if fields[name] in new_id:
                out[name] = new_id[fields[name]]
            else:
                del out[name]
    return out


def _add_tokenizer(writer, fields: dict) -> None:
    import gguf

    T = gguf.GGUFValueType
    for key, value in fields.items():
        if key == "tokenizer.ggml.token_type":
            writer.add_array(key, [int(v) for v in value])
        elif key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(v) for v in value])
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(key, int(value))
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, T.STRING)


def write_gguf(model, tokenizer, path, *, source_gguf=None, requant: str = DEFAULT_REQUANT, name: str | None = None,
               context_length: int | None = None) -> dict:
    """Write `model` (a pruned or dense Llama-family causal LM) to one GGUF file; return its record."""
    import gguf

    check_supported(model)
    if requant not in REQUANT_TYPES:
        raise UserError(f"GGUF re-quantization type '{requant}' is unknown; choose one of {', '.join(REQUANT_TYPES)}")
    cfg = model.config
    spec = arch.spec_for(model)
    hd = arch.head_dim(model)
    plan = layer_plan(model)
    source = SourceGGUF(source_gguf) if source_gguf else None
    if source is not None and (source.arch != "llama"
                               or source.field("llama.embedding_length") != cfg.hidden_size):
        source = None  # not this model's GGUF: nothing to copy from it
    uniform = (len({(p["n_head"], p["n_head_kv"], p["n_ff_written"]) for p in plan}) == 1
               and plan[0]["n_head"] > 0 and plan[0]["n_ff"] > 0)
    arch_name = "llama" if uniform else "deci"

    embed = arch.get(model, spec.embed)
    head = arch.get(model, spec.lm_head)
    embed_w = embed.weight
    tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
    n_vocab = int(embed_w.shape[0])
    kept, full_vocab, hf_vocab = _vocab_trim(model, head, n_vocab)

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_name(name or getattr(cfg, "_name_or_path", None) or "cusprun-edge expert")
    writer.add_block_count(len(plan))
    writer.add_context_length(int(context_length or cfg.max_position_embeddings))
    writer.add_embedding_length(cfg.hidden_size)
    if uniform:
        writer.add_feed_forward_length(plan[0]["n_ff_written"])
        writer.add_head_count(plan[0]["n_head"])
        writer.add_head_count_kv(plan[0]["n_head_kv"])
    else:
        writer.add_feed_forward_length([p["n_ff_written"] for p in plan])
        writer.add_head_count([p["n_head"] for p in plan])
        writer.add_head_count_kv([p["n_head_kv"] for p in plan])
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    rope = _rope(cfg)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(n_vocab)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    fields, tokenizer_from = _tokenizer_fields(tokenizer, source, full_vocab, hf_vocab)
    if kept is not None and len(fields["tokenizer.ggml.tokens"]) == full_vocab:
        fields = _trim_tokenizer(fields, kept)
    if len(fields["tokenizer.ggml.tokens"]) != n_vocab:
        raise UserError(f"the tokenizer has {len(fields['tokenizer.ggml.tokens'])} tokens but the model's "
                        f"embedding {n_vocab} rows; pass the model's own tokenizer")
    _add_tokenizer(writer, fields)

    out = _Tensors(writer, source, requant)
    src_layers = structure_of(model).source_layers
    token_rows = _np(embed_w)
    out.matrix("token_embd.weight", token_rows, "token_embd.weight")
    out.vector("output_norm.weight", arch.get(model, spec.final_norm).weight)
    if not tied:
        out.matrix("output.weight", _np(head.weight), "output.weight")
    for i, (layer, p) in enumerate(zip(arch.decoder_layers(model), plan)):
        parts = arch.layer_parts(layer, spec)
        blk, src = f"blk.{i}", f"blk.{src_layers[i]}"
        if p["n_head"]:
            out.vector(f"{blk}.attn_norm.weight", layer.input_layernorm.weight)
            out.matrix(f"{blk}.attn_q.weight", _np(_permute(parts.q.weight, p["n_head"])), f"{src}.attn_q.weight")
            out.matrix(f"{blk}.attn_k.weight", _np(_permute(parts.k.weight, p["n_head_kv"])), f"{src}.attn_k.weight")
            out.matrix(f"{blk}.attn_v.weight", _np(parts.v.weight), f"{src}.attn_v.weight")
            out.matrix(f"{blk}.attn_output.weight", _np(parts.o.weight), f"{src}.attn_output.weight")
            if parts.o.bias is not None:
                out.vector(f"{blk}.attn_output.bias", parts.o.bias)
        if p["n_ff_written"]:
            width = p["n_ff_written"]
            norm = layer.post_attention_layernorm.weight
            if p["n_ff"] == 0:  # attention-only layer: a zero FFN keeps llama.cpp from skipping the residual
                norm = torch.ones_like(norm)
            out.vector(f"{blk}.ffn_norm.weight", norm)
            out.matrix(f"{blk}.ffn_gate.weight", _np(parts.gate.weight), f"{src}.ffn_gate.weight", pad_rows=width)
            out.matrix(f"{blk}.ffn_up.weight", _np(parts.up.weight), f"{src}.ffn_up.weight", pad_rows=width)
            out.matrix(f"{blk}.ffn_down.weight", _pad_cols(_np(parts.down.weight), width), f"{src}.ffn_down.weight")
            if parts.down.bias is not None:
                out.vector(f"{blk}.ffn_down.bias", parts.down.bias)
        if any(getattr(m, "bias", None) is not None for m in (parts.q, parts.k, parts.v, parts.gate, parts.up)):
            raise UserError("GGUF export: q/k/v/gate/up biases have no place in llama.cpp's Llama graph; "
                            "export this model to ONNX instead (--format onnx)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    how = [t["how"] for t in out.record.values()]
    return {
        "architecture": arch_name,
        "layers": {"n_head": [p["n_head"] for p in plan], "n_head_kv": [p["n_head_kv"] for p in plan],
                   "n_ff": [p["n_ff"] for p in plan], "n_ff_written": [p["n_ff_written"] for p in plan]},
        "source_layers": list(src_layers),
        "padded_ffn": [i for i, p in enumerate(plan) if p["n_ff"] and p["n_ff_written"] != p["n_ff"]],
        "zero_ffn": [i for i, p in enumerate(plan) if p["n_head"] and not p["n_ff"]],
        "vocab": {"n_vocab": n_vocab, "trimmed_from": full_vocab if kept is not None else None,
                  "tokenizer": tokenizer_from},
        "source_gguf": None if source is None else {"path": str(source.path), "sha256": sha256_file(source.path)},
        "requant": requant,
        "tensors": out.record,
        "counts": {"copied": sum(h.startswith("copied") for h in how),
                   "requantized": sum(h.startswith(("quantized", "kept in F32")) for h in how),
                   "f32_vectors": sum(h == "f32" for h in how)},
        "fallbacks": out.fallbacks,
    }


def export_gguf(model, tokenizer, out, *, source: str | None = None, source_gguf=None,
                requant: str = DEFAULT_REQUANT, force: bool = False) -> dict:
    """Write `out/model.gguf` and `out/manifest.json` (what was copied, re-quantized, padded, fell back),
    atomically: a refused or failed export leaves nothing behind. `source` names where the model came from
    (its GGUF, found through `source_gguf_for`, supplies the intact blocks unless `source_gguf` is given)."""
    out = Path(out)
    check_supported(model)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force")
    check_replaceable(out, MANIFEST_FILE, "an export directory")
    if source_gguf is None:
        source_gguf = source_gguf_for(source)
    from .. import __version__

    with atomic_directory(out) as tmp:
        record = write_gguf(model, tokenizer, tmp / GGUF_FILE, source_gguf=source_gguf, requant=requant)
        gguf_path = tmp / GGUF_FILE
        manifest = {"format": "gguf", "file": GGUF_FILE, "bytes": gguf_path.stat().st_size,
                    "sha256": sha256_file(gguf_path), "source": source, "tool_version": __version__,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    **record}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def export_gguf_source(source: str, out, *, requant: str = DEFAULT_REQUANT, force: bool = False,
                       trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Load `source` (an expert directory, embedded name, .gguf or HF directory) and export it to GGUF.
    Everything that can be refused without loading the model is refused first."""
    from ..model.load import load_model

    out = Path(out)
    if requant not in REQUANT_TYPES:
        raise UserError(f"--gguf-type '{requant}' is unknown; choose one of {', '.join(REQUANT_TYPES)}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force")
    check_replaceable(out, MANIFEST_FILE, "an export directory")
    check_source_supported(source)
    model, tokenizer = load_model(str(source), trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return export_gguf(model, tokenizer, out, source=str(source), requant=requant, force=force)


def summary_line(manifest: dict) -> str:
    c = manifest["counts"]
    fell = len(manifest["fallbacks"])
    return (f"{manifest['architecture']} GGUF, {manifest['bytes'] / 2**20:.1f} MB: {c['copied']} weights copied from "
            f"the source GGUF, {c['requantized']} re-quantized ({manifest['requant'].upper()}), {fell} fell back"
            + (f" ({', '.join(f['tensor'] for f in manifest['fallbacks'][:3])}{', ...' if fell > 3 else ''})"
               if fell else ""))


def check_source_supported(source: str) -> None:
    """Refuse a GGUF export before anything loads, where the source's architecture can be read cheaply: an
    embedded model, a model or expert directory (config.json), a .gguf file (its header)."""
    from types import SimpleNamespace

    from ..model.load import resolve_source

    kind, where = resolve_source(str(source))
    config = None
    if kind == "embedded":
        config = SimpleNamespace(model_type="gemma3_text" if where.startswith("gemma") else "llama")
    elif kind in ("expert", "hf-dir") and (Path(where) / "config.json").is_file():
        try:
            config = SimpleNamespace(**json.loads((Path(where) / "config.json").read_text()))
        except (json.JSONDecodeError, TypeError):
            return  # the loader says what is wrong with it
    elif kind == "gguf":
        try:
            arch_name = SourceGGUF(where).arch
        except Exception:
            return
        config = SimpleNamespace(model_type={"gemma3": "gemma3_text"}.get(arch_name, arch_name))
    if config is not None and hasattr(config, "model_type"):
        check_supported(config)
