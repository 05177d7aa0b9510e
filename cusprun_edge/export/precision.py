"""Precision conversion of the fp32 graph: fp16 (onnxruntime's converter, numerically sensitive ops
kept fp32) and weight-only int8 / int4 (MatMulNBits by the per-tensor plan of quant_plan.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import UserError
from . import quant_plan, weight_only
from .common import DATA_FILE, MODEL_FILE
from .passes import drop_fp16_round_trips, rotary_angle_nodes

# Ops kept in fp32 in an fp16 export: rotary angles (position * frequency) lose whole radians in
# fp16, and any RMSNorm left unfused would overflow on its sum of squares past |x| ~ 256.
FP16_KEEP_FP32_OPS = ["Pow", "ReduceMean", "Sqrt", "Reciprocal", "Div", "Softmax", "Cos", "Sin", "Range",
                      "CumSum"]


def convert_precision(src: Path, dst: Path, precision: str, *, level: int = 0, accuracy_level: int = 4,
                      off_grid: tuple[str, str] | None = None, grams: dict | None = None,
                      worst: set[str] | frozenset = frozenset(), plan: str = quant_plan.DEFAULT_PLAN) -> dict | None:
    """Write the `precision` version of the fp32 graph at `src` to `dst`; return what was done.

    int4/int8: `level` is the fallback level of quant_plan.INT4_LEVELS, `accuracy_level` MatMulNBits'
    (0: fp32 arithmetic, 4: int8 activations in the CPU kernel), `off_grid` overrides quant_plan.OFF_GRID,
    `grams` (module name -> input statistics, export/calibration.py) lets off-grid weights be quantized GPTQ-style;
    `worst` are the module paths level 1 keeps at 8 bits; `plan` is one of quant_plan.PLANS (int4)."""
    import onnx

    if precision == "fp32":
        for name in (MODEL_FILE, DATA_FILE):
            shutil.move(str(src.parent / name), str(dst.parent / name))
        return None
    for name in (MODEL_FILE, DATA_FILE):
        (dst.parent / name).unlink(missing_ok=True)  # onnx appends external data to an existing file
    proto = onnx.load(str(src))  # weights in memory
    if precision in ("int4", "int8"):
        record = _weight_only(proto, precision, level, accuracy_level, off_grid, grams or {}, worst, plan)
    elif precision == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = convert_float_to_float16(
            proto, keep_io_types=False, disable_shape_infer=True,
            op_block_list=DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FP32_OPS,
            node_block_list=rotary_angle_nodes(proto),
        )
        drop_fp16_round_trips(proto)
        del proto.graph.value_info[:]  # recorded before conversion, the intermediate types are stale
        record = {"method": "onnxruntime.transformers.float16", "kept_fp32_ops": FP16_KEEP_FP32_OPS,
                  "io": "KV cache and logits in float16"}
    else:
        raise UserError(f"unknown precision '{precision}'")
    _empty_unused_norm_outputs(proto)
    onnx.save(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=1024)
    return record


def _empty_unused_norm_outputs(proto) -> None:
    """Name no output of a fused RMSNorm that nothing reads (its mean and inverse deviation): ONNX Runtime then
    skips writing them, lossless, up to 5% of a one-thread decode step on SmolLM2."""
    used = {name for node in proto.graph.node for name in node.input} | {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                            "SkipLayerNormalization", "LayerNormalization"):
            for i in range(1, len(node.output)):
                if node.output[i] and node.output[i] not in used:
                    node.output[i] = ""


def _weight_only(proto, precision: str, level: int, accuracy_level: int, off_grid, grams: dict, worst,
                 plan_name: str = quant_plan.DEFAULT_PLAN) -> dict:
    from onnx import numpy_helper

    from .calibration import gram_for

    weight_only.fold_weight_transposes(proto)
    paths = weight_only.module_paths(proto)
    weights = {}
    for name, (_, init) in weight_only.constant_matmuls(proto).items():
        path = paths.get(name, name)
        head = init.name.endswith(".transposed") or "lm_head" in path  # a tied lm_head is the transposed embedding
        weights[name] = (path, numpy_helper.to_array(init), head)
    by_matmul = {name: g for name, (path, _, _) in weights.items() if (g := gram_for(grams, path)) is not None}
    plan = quant_plan.make_plan(weights, precision, level, off_grid, calibrated=set(by_matmul), worst=worst,
                                plan_name=plan_name)
    del weights
    records = weight_only.apply_plan(proto, plan, accuracy_level, grams=by_matmul)
    shared = weight_only.share_embedding_with_lm_head(proto)
    summary = quant_plan.summarize(plan, paths, records)
    record = {"method": "MatMulNBits weight-only by a per-tensor plan (cusprun_edge.export.quant_plan)",
              "bits": 4 if precision == "int4" else 8, "block_size": quant_plan.BLOCK,
              "accuracy_level": accuracy_level, "level": level,
              "plan_name": plan_name if precision == "int4" else "int8",
              "level_description": quant_plan.levels_of(plan_name)[level] if precision == "int4" else "int8",
              "embedding": "the lm_head's quantized weight (GatherBlockQuantized)" if shared
              else "float (untied from the lm_head)",
              "plan": summary}
    wider = [n for n, e in plan.items() if e.bits == 8 and "lm_head" not in e.why]
    if precision == "int4" and wider:
        modules = sorted({paths.get(n, n).rsplit(".", 1)[-1] for n in wider})
        alike = [n for n in plan if paths.get(n, n).rsplit(".", 1)[-1] in modules]
        record["eight_bit"] = {"modules": modules, "matmuls": len(wider), "of": len(alike)}
    return record
