"""Bytes of weights one generated token reads, from real exported graphs."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from test_export import pruned
from tiny import tiny_model

from cusprun_edge.export import export_model
from cusprun_edge.model.weights_read import weight_bytes_per_token


def test_gather_tables_cost_one_row_and_matmuls_cost_everything(tmp_path):
    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [table, weight])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    got = weight_bytes_per_token(tmp_path / "m.onnx")
    assert got["weights_bytes"] == (100 * 8 + 8 * 4) * 4
    assert got["per_token_bytes"] == (8 + 8 * 4) * 4


def test_a_weight_stored_in_fp16_and_cast_at_load_is_read_in_fp32(tmp_path):
    """ONNX Runtime folds Cast(initializer) when it loads the model: the kernel reads the fp32 result."""
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float16), "w_fp16")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w_fp16"], ["w"], to=TensorProto.FLOAT), helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [weight])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    got = weight_bytes_per_token(tmp_path / "m.onnx")
    assert got["per_token_bytes"] == got["weights_bytes"] == 8 * 4 * 4 and got["by_op"] == {"MatMul": 8 * 4 * 4}


def test_pruned_and_quantized_artifacts_read_less(tmp_path):
    dense, tok = tiny_model("llama")
    expert, _ = pruned("llama")
    read = {}
    for name, model, precision in [("dense", dense, "fp32"), ("expert", expert, "fp32"), ("dense4", dense, "int4")]:
        export_model(model, tok, "x86-cpu", tmp_path / name, precision=precision)
        read[name] = weight_bytes_per_token(tmp_path / name / "model.onnx")
    assert read["expert"]["per_token_bytes"] < read["dense"]["per_token_bytes"]
    assert read["dense4"]["per_token_bytes"] < read["dense"]["per_token_bytes"] / 2
    # the tied embedding is also the output projection: every byte of it is read per token
    assert read["dense"]["by_op"].get("Gather", 0) < 300 * 96 * 4
