"""What ships beside the graph: genai_config.json (so onnxruntime_genai runs the directory), the memory
estimate, and manifest.json (profile, versions, hashes, parity, structure) and its verification."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config.targets import TargetProfile
from ..fsutil import sha256_file
from ..model import arch
from ..model.structure import count_params, structure_of
from .common import MANIFEST_FILE, MODEL_FILE, kv_layout

GENAI_PROVIDERS = {"CUDAExecutionProvider": "cuda", "NvTensorRTRTXExecutionProvider": "NvTensorRtRtx",
                   "DmlExecutionProvider": "dml", "WebGpuExecutionProvider": "webgpu",
                   "QNNExecutionProvider": "qnn", "OpenVINOExecutionProvider": "OpenVINO"}
ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}

def artifact_threads(profile) -> int:
    """Intra-op threads the artifact asks for: the target profile's, or (0 in the profile: a target of the build
    host's kind) the build host's physical cores."""
    if profile.intra_op_threads:
        return profile.intra_op_threads
    import psutil

    return max(1, psutil.cpu_count(logical=False) or 1)


def write_genai_config(model, tokenizer, profile: TargetProfile, attention: str, out: Path) -> dict:
    """Write genai_config.json so `onnxruntime_genai.Model(out)` runs the export; returns what was written."""
    cfg = model.config
    kv_heads, head_dim = kv_layout(model)
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
    # ONNX Runtime GenAI runs one intra-op thread unless told otherwise (2 threads: 102 -> 130 tokens/s for
    # SmolLM2's int4 on a 2-core x86): the artifact says how many the target has
    session["intra_op_num_threads"] = artifact_threads(profile)
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
    """Runtime memory in MB: weights at `precision` (embeddings stay float unless tied to a quantized
    lm_head), KV cache, 10% for activations. int4 projections carry an fp32 scale and an fp32 offset per
    block of 32 (quant_plan's exact form); the lm_head is 8-bit."""
    params = count_params(model)
    per_block = 4 / 32
    weight_bytes = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0 + per_block, "int4": 0.5 + 2 * per_block}[precision]
    float_bytes = 2.0 if precision == "fp16" else 4.0
    weights = params["prunable"] * weight_bytes + params["embedding"] * float_bytes
    if precision in ("int8", "int4") and model.config.tie_word_embeddings:
        weights += model.config.vocab_size * model.config.hidden_size * (1.0 + per_block)  # 8-bit lm_head
    kv_heads, head_dim = kv_layout(model)
    kv = 2 * sum(kv_heads) * head_dim * profile.max_sequence_length * profile.batch_size * float_bytes
    mb = 1024 * 1024
    return {"weights_mb": round(weights / mb, 1), "kv_cache_mb": round(kv / mb, 1),
            "total_mb": round((weights + kv) * 1.1 / mb, 1)}


def opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def io_record(model, attention: str, rotary_fused: bool) -> dict:
    kv_heads, head_dim = kv_layout(model)
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


def source_record(model, source: str | None) -> dict:
    record = {"source": source, "model_type": model.config.model_type,
              "name_or_path": getattr(model.config, "_name_or_path", None)}
    if source:
        from ..model.expert_io import expert_record

        path = Path(source)
        if path.is_dir() and expert_record(path):
            record["expert"] = expert_record(path)
    return record


def tool_version() -> str:
    from .. import __version__

    return __version__


def library_versions() -> dict:
    """The libraries that trace, rewrite, quantize and run an export (its manifest records them; the build's
    dense-export cache keys on them)."""
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "onnx": onnx.__version__, "onnxscript": onnxscript.__version__, "onnx_ir": onnx_ir.__version__,
                "onnxruntime": onnxruntime.__version__}
    try:
        import onnxruntime_genai

        versions["onnxruntime_genai"] = onnxruntime_genai.__version__
    except ImportError:
        versions["onnxruntime_genai"] = None
    return versions


def write_manifest(directory: Path, manifest: dict, started: float) -> None:
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
