"""`build --max-memory`: each stage's peak resident memory estimated from the model's shapes before anything
loads, and a build whose estimate does not fit refused at the start (one line, exit 2), instead of dying of
out-of-memory an hour in.

The estimates add up what each stage holds, float32 unless said (P: all parameters, R: the embedding and an untied
head, Y: the largest decoder layer, F: the widest FFN, K: the FFN channels a layer keeps):
- every stage: the process itself (Python, torch, transformers, ONNX Runtime), BASE;
- load and score, one layer at a time: R and the layer three times (its stored form, float32, the forward's
  intermediates);
- prune, one layer at a time: the same, the layer's two copies (the refit's work copy, a damage probe's), and
  the refit's float64 statistics of the widest FFN input (F x K, for the calibration and the held-apart
  documents) with the K x K systems of its ridge solves (three at a time);
- export of a model over the size line (export/common.exports_layer_by_layer), one layer at a time: R, a few
  copies of the layer (read, transposed, the rounding's float64 work copy, the packed codes), its input
  statistics (float64, one per distinct input: 2 x hidden^2 + F^2), the calibration stream and ONNX Runtime's
  session of the quantized artifact (about STREAMED_ARTIFACT x P bytes) for the gate;
- a stage that holds the whole model (a ratio search or vocabulary trimming in prune, export, validate):
  WHOLE_FIXED plus WHOLE_FACTOR x P in float32 (export holds the model, its traced graph, the ONNX copy, the
  quantizer's statistics and ONNX Runtime sessions for the parity gate; validate the dense and the expert);
- bench and generate run the ONNX artifacts in a process that still holds the dense model validate loaded (the
  1B stand-in's build: bench 6.98 GB, generate 7.50; 7.2 here; SmolLM2-135M's bench 2.90, 2.9 here).
The constants were fitted to measured peaks (benchmarks/results/scale.json, 2026-12-06, one layer at a time: the
Llama-3.2-1B stand-in scored in 1.82 GB and pruned in 4.67 GB, these formulas say 1.9 and 5.4; the Llama-3.1-8B
one in 3.96 and 12.12 GB, the formulas 4.4 and 13.1; the default SmolLM2-135M build pruned in 2.3 GB, 1.9 here). The whole-model terms come from two exports: the default SmolLM2-135M
build's (int4, 4.73 GB for 0.54 GB of float32 weights; its bench 2.90 GB) and the 1B stand-in's fp32 export
(`cusprun-edge export --precision fp32`, 9.31 GB for 4.28 GB, 79 s), 2026-12-06; these formulas say 4.8 and 10.4
(the int4 plan's statistics come on top of an fp32 export). The export one layer at a time: the Llama-3.2-1B
stand-in's build exported its dense model and expert in 8.09 GB (both fell back to 8-bit projections: random
weights fail the 4-bit gate), 7.9 here; the Llama-3.1-8B stand-in's 4-bit level peaked at 12.2 GB (2026-12-07).
Estimates, not bounds: the build records every stage's real peak beside them.
"""

from __future__ import annotations

from ..errors import UserError
from ..measure.memory import format_size, parse_size
from .config import BuildConfig

GB = 2**30
BASE = 0.5 * GB
WHOLE_FIXED = 3.5 * GB  # ONNX Runtime, onnx and the exporter's own state, whatever the model
WHOLE_FACTOR = 1.5  # x the float32 model, for export and validate
# bytes per parameter the gate's ONNX Runtime session holds: an artifact that may fall back to 8 bits (random
# stand-ins do), with the kernels' prepacked copy. The 1B stand-in's build: export 8.09 GB measured, 7.9 estimated.
STREAMED_ARTIFACT = 2.0


def estimate(cfg: BuildConfig, shape: dict, layerwise_prune: bool, layerwise_export: bool | None = None) -> dict[str, int]:
    """Stage -> estimated peak bytes for this build (see the module's docstring). `layerwise_export`: None decides by
    the model's size, as the build does."""
    from ..export.common import exports_layer_by_layer

    if layerwise_export is None:
        layerwise_export = exports_layer_by_layer(shape["params"])
    r = 4 * (shape["embedding"] + shape["head"])
    y = 4 * shape["layer"]
    f = shape["ffn"]
    k = int(f * (1 - cfg.ratio))
    streamed = BASE + r + 3 * y
    whole = BASE + WHOLE_FIXED + WHOLE_FACTOR * 4 * shape["params"]
    refit = 3 * f * k * 8 + 3 * k * k * 8  # two statistics and a batch's float32 and float64 product
    slack = 1 * GB  # the prune's streams, corpora and the allocator's slack (SmolLM2-135M's prune: 2.3 GB)
    out = {"load": streamed, "score": streamed,
           "prune": streamed + 2 * y + refit + slack if layerwise_prune else whole + refit}
    hidden = shape["hidden"]
    grams = (2 * hidden * hidden + f * f) * 8
    out["export"] = (BASE + WHOLE_FIXED / 2 + r + 5 * y + grams + STREAMED_ARTIFACT * shape["params"] + slack
                     if layerwise_export else whole)
    out["validate"] = whole
    for stage in ("bench", "generate"):
        out[stage] = BASE + WHOLE_FIXED / 2 + 1.15 * 4 * shape["params"]  # validate's dense model stays loaded
    return {name: int(v) for name, v in out.items()}


def memory_limit(limit: str) -> int:
    """--max-memory in bytes; UserError naming the flag when it is no size."""
    try:
        return parse_size(limit)
    except ValueError as exc:
        raise UserError(f"--max-memory: {exc}") from None


def check_memory(cfg: BuildConfig, limit: str) -> dict:
    """Refuse (UserError) a build whose estimated peak in some stage is over `limit` ('8GB'); returns the
    estimates, in GB, for the build's record."""
    from ..model.lazy import model_shape
    from .stages import prunes_streamed

    budget = memory_limit(limit)
    peaks = estimate(cfg, model_shape(cfg.model, trust_remote_code=cfg.trust_remote_code), prunes_streamed(cfg))
    over = [(name, b) for name, b in peaks.items() if b > budget]
    if over:
        name, need = max(over, key=lambda item: item[1])
        hint = ("; score, prune and a large model's export run one layer at a time, validate still holds the whole "
                "model" if name in ("export", "validate") else "")
        raise UserError(f"--max-memory {limit}: the {name} stage needs about {format_size(need)} for {cfg.model} "
                        f"(estimated from its shapes){hint}; allow more memory or choose a smaller model")
    return {name: round(b / GB, 2) for name, b in peaks.items()}
