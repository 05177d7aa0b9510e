"""Weight-only quantization by plan: weights already on a GGUF block grid (Q4_0, Q4_1, Q8_0) are stored
exactly in MatMulNBits (checked through a real ONNX Runtime session), weights whose blocks pruning broke
are re-quantized, and the plan says which is which."""

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import quants
from onnx import helper, numpy_helper

from cusprun_edge.export import nbits, quant_plan, weight_only

Q = gguf.GGMLQuantizationType


def gguf_weight(kind, k=256, n=48, seed=0) -> np.ndarray:
    """W [K, N] as a GGUF file of `kind` stores it (quantized per row of N x K, then dequantized)."""
    rows = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return np.ascontiguousarray(quants.dequantize(quants.quantize(rows, kind), kind).T)


def run_matmul(weight: np.ndarray, entry, x: np.ndarray, stored: dict | None = None) -> np.ndarray:
    """x @ W through a one-MatMul ONNX graph quantized by `entry`, on ONNX Runtime's CPU provider
    (`stored` receives the quantized graph's initializer types by name)."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "s", k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "s", n])],
        [numpy_helper.from_array(weight, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    records = weight_only.apply_plan(proto, {"proj": entry}, accuracy_level=0)
    assert {n.op_type for n in proto.graph.node} >= {"MatMulNBits"}
    if stored is not None:
        stored.update({i.name: i.data_type for i in proto.graph.initializer})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x[None]})[0][0], records["proj"]


@pytest.mark.parametrize(("kind", "bits", "form"), [(Q.Q4_1, 4, "offset"), (Q.Q4_0, 4, "none"), (Q.Q8_0, 8, "none")])
def test_gguf_blocks_transcode_exactly(kind, bits, form):
    weight = gguf_weight(kind, n=128)  # 1,024 block scales: enough to be stored in fp16
    q = nbits.quantize(weight, bits, form)
    assert q.exact_blocks == q.blocks
    tol = 8 * np.finfo(np.float32).eps * np.abs(weight).max()
    assert q.max_abs_error <= tol
    # through ONNX Runtime: x = identity rows read the stored weight back, row by row
    stored = {}
    got, record = run_matmul(weight, quant_plan.TensorPlan(bits, form, "fit", "test"), np.eye(weight.shape[0], dtype=np.float32),
                             stored)
    assert record["exact_blocks"] == record["blocks"]
    assert np.abs(got - weight).max() <= tol
    # GGUF's fp16 block scales come back as fp16 numbers, so the file stores them in half the bytes
    assert [t for name, t in stored.items() if name.endswith("_scales_fp16")] == [onnx.TensorProto.FLOAT16]
    # and a real input gives x @ W to fp32 rounding
    x = np.random.default_rng(1).standard_normal((5, weight.shape[0])).astype(np.float32)
    got, _ = run_matmul(weight, quant_plan.TensorPlan(bits, form, "fit", "test"), x)
    np.testing.assert_allclose(got, x.astype(np.float64) @ weight, rtol=1e-4, atol=1e-5)


def test_q4_1_is_not_exact_without_offsets():
    """Q4_1's minimum is not a multiple of its step: symmetric or integer zero points must round again."""
    weight = gguf_weight(Q.Q4_1)
    for form in ("none", "uint8"):
        q = nbits.quantize(weight, 4, form)
        assert q.exact_blocks < q.blocks * 0.05 and q.rel_rms_error > 0.01


def test_broken_blocks_are_requantized_not_transcoded():
    """down_proj loses input columns when FFN channels are pruned: the remaining weights shift across
    block boundaries, so blocks mix two grids. The plan sees that and re-quantizes them."""
    weight = gguf_weight(Q.Q4_1, k=512)
    assert quant_plan.grid_share(weight) == 1.0
    broken = np.delete(weight, np.arange(0, 512, 5), axis=0)[:384]  # 384 = 12 whole blocks
    share = quant_plan.grid_share(broken)
    assert share < 0.05
    rows_dropped = weight[:, ::2]  # q/k/v/gate/up lose output rows: blocks stay intact
    assert quant_plan.grid_share(rows_dropped) == 1.0
    plan = quant_plan.make_plan({"a": ("model.layers.0.mlp.down_proj", broken, False),
                                 "b": ("model.layers.0.mlp.up_proj", rows_dropped, False),
                                 "c": ("lm_head", gguf_weight(Q.Q8_0), True)}, "int4")
    assert (plan["a"].bits, plan["a"].kind) == (4, quant_plan.OFF_GRID[0]) and "no 4-bit grid" in plan["a"].why
    assert (plan["b"].bits, plan["b"].kind) == (4, "offset") and "stored exactly" in plan["b"].why
    assert (plan["c"].bits, plan["c"].kind) == (8, "none")
    q = nbits.quantize(broken, 4, plan["a"].kind, method=plan["a"].method)
    assert q.exact_blocks < q.blocks * 0.05
    assert 0.01 < q.rel_rms_error < 0.12  # rounded once more, to a 4-bit grid of its own
    weights = {"a": ("model.layers.0.mlp.down_proj", broken, False), "d": ("model.layers.1.mlp.down_proj", broken, False)}
    # level 1: only the weights named as the worst go to 8 bits; level 2: every off-grid weight
    worst = quant_plan.make_plan(weights, "int4", level=1, worst={"model.layers.1.mlp.down_proj"})
    assert (worst["a"].bits, worst["d"].bits) == (4, 8)
    fallback = quant_plan.make_plan(weights, "int4", level=2)
    assert fallback["a"].bits == fallback["d"].bits == 8


def test_least_squares_fit_beats_min_max_rounding_on_off_grid_weights():
    weight = np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32)
    for form in ("uint8", "offset", "none"):
        rtn = nbits.quantize(weight, 4, form, method="rtn", transcode=False)
        fit = nbits.quantize(weight, 4, form, method="fit", transcode=False)
        assert fit.rel_rms_error <= rtn.rel_rms_error * 1.001, form


def test_gptq_keeps_a_pruned_layers_output_on_held_apart_inputs():
    """A refitted down_proj of a real (tiny) pruned model: quantized with its calibration inputs' statistics,
    its output on other documents moves less than with the best weight-only fit, and the tensor is stored in
    the integer zero-point form MatMulNBits reads."""
    import copy

    from tiny import TEXT, tiny_model

    from cusprun_edge.config.corpora import Corpus
    from cusprun_edge.export.calibration import input_grams, off_grid_linears
    from cusprun_edge.prune.pruner import prune_model
    from cusprun_edge.prune.score import score_model

    model, tok = tiny_model("llama")
    corpora = {"domain/a": Corpus("domain/a", TEXT[:40], tune=TEXT[40:50])}
    scores = score_model(model, tok, corpora, show_progress=False)
    expert = copy.deepcopy(model)
    prune_model(expert, scores, ["domain/a"], "cusprun", 0.3, tokenizer=tok, corpora=corpora)
    names = [n for n in off_grid_linears(expert) if n.endswith("layers.1.mlp.down_proj")]
    assert names  # random weights lie on no grid
    fit_on = input_grams(expert, tok, TEXT[:40], names)[names[0]]
    judge = input_grams(expert, tok, TEXT[50:], names)[names[0]]
    weight = dict(expert.named_modules())[names[0]].weight.detach().numpy().T.astype(np.float32)
    gptq = nbits.quantize_gptq(weight, 4, fit_on)
    diag = np.diag(fit_on) / max(np.diag(fit_on).max(), 1e-30)
    fit = nbits.quantize(weight, 4, "uint8", method="fit", importance=diag, transcode=False)
    assert gptq.kind == "uint8" and gptq.codes.max() <= 15 and gptq.zero_points.max() <= 15
    assert nbits.output_error(weight, gptq, judge) < nbits.output_error(weight, fit, judge)
    assert nbits.output_error(weight, gptq, fit_on) < 0.9 * nbits.output_error(weight, fit, fit_on)
    # the codes decode as ONNX Runtime decodes them
    assert np.allclose(gptq.dequantize(), ((gptq.codes.astype(np.float32) - gptq.zero_points[..., None])
                                           * gptq.scales[..., None]).reshape(weight.shape[1], -1)[:, :weight.shape[0]].T)
