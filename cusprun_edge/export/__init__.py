"""Export stage: compile a (pruned) causal LM into an ONNX decoder with a KV cache, for one target.

One module per job:
  trace.py       the model as a decoder with a flat KV cache, traced by torch.onnx (dynamo)
  attention.py   ONNX Runtime's GroupQueryAttention as a torch custom op and its ONNX translation
  passes.py      graph passes: dimension names, fused RMSNorm / attention / packed q/k/v, opset 17
  quant_plan.py  the per-tensor precision plan of an int4/int8 export and its fallback levels
  nbits.py       block quantization math: grid detection, exact transcoding, re-quantization
  weight_only.py MatMul -> MatMulNBits by the plan; the tied embedding shares the lm_head's weight
  precision.py   fp32 graph -> fp16 / int8 / int4
  parity.py      the gate: PyTorch fp32 against the exported graph on prompts and held-out text
  package.py     genai_config.json, memory estimate, manifest.json
  streamed.py    the same export one decoder layer at a time, for a model too large to hold whole
  build.py       export_model: all of the above in a temporary directory renamed into place
"""

__all__ = [
    "CachedDecoder", "DATA_FILE", "FUSED_ATTENTION", "MANIFEST_FILE", "MODEL_FILE", "PARITY_PROMPTS", "THRESHOLDS",
    "attention_implementation", "check_held_out", "check_parity", "context_length", "convert_precision",
    "estimate_memory", "export_model", "export_onnx", "export_source", "group_query_attention",
    "held_out_texts", "io_names", "reference_logits", "rotary_caches", "sha256_file", "verify_manifest",
    "write_genai_config",
]


def __getattr__(name):
    # Lazy, so that importing one light module (quant_plan's PLANS for a CLI check) does not import torch and
    # the tracer. The import statement names every submodule, so the stage fingerprints' import graph
    # (pipeline/stage.py) still sees what `from ..export import x` runs.
    if name not in __all__:  # a submodule being imported, or a wrong name
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .. import fsutil
    from . import attention, build, common, package, parity, precision, trace

    for module in (build, trace, attention, common, package, parity, precision, fsutil):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(name)
