"""The fast int4 plan: what it stores, and that its ONNX artifact computes what PyTorch computes with the same
dequantized weights (the joint search's probes rely on that)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny import TEXT, tiny_model

from cusprun_edge.config.targets import resolve_target
from cusprun_edge.export import export_model
from cusprun_edge.export.calibration import every_linear, input_grams
from cusprun_edge.export.simulate import quantized_copy
from cusprun_edge.measure.runtime import OnnxCausalLM

LOOSE = {"max_kl": 10.0, "min_top1": 0.0, "held_out_max_kl": 10.0, "held_out_min_top1": 0.0}
CALIBRATION = sorted(set(TEXT))


@pytest.fixture(scope="module")
def fast_export(tmp_path_factory):
    model, tok = tiny_model("llama")
    # accuracy_level 0: MatMulNBits computes in fp32, so only float rounding separates it from PyTorch
    profile = dataclasses.replace(resolve_target("x86-cpu"), accuracy_level=0)
    out = tmp_path_factory.mktemp("fast") / "artifact"
    manifest = export_model(model, tok, profile, out, precision="int4", quant_plan="fast",
                            calibration=CALIBRATION, thresholds={"int4-fast": LOOSE})
    return model, tok, out, manifest


def test_fast_plan_stores_every_weight_in_the_fast_forms(fast_export):
    *_, manifest = fast_export
    q = manifest["quantization"]
    assert q["plan_name"] == "fast" and q["level"] == 0
    tensors = q["plan"]["tensors"]
    assert all(t["bits"] == 4 and t["method"] == "gptq" for t in tensors.values())
    assert tensors["lm_head"]["kind"] == "none"  # symmetric, so the embedding can gather from it
    assert {t["kind"] for p, t in tensors.items() if p != "lm_head"} == {"uint8"}  # no offset path
    assert q["embedding"].startswith("the lm_head's quantized weight")
    assert manifest["genai"]["config"] == "genai_config.json"


def test_fast_plan_onnx_logits_match_pytorch_with_the_same_dequantized_weights(fast_export):
    model, tok, out, _ = fast_export
    grams = input_grams(model, tok, CALIBRATION, every_linear(model))
    twin = quantized_copy(model, "fast", grams)
    ids = tok("The court held that the quick brown fox was void.", return_tensors="pt").input_ids
    onnx_logits = OnnxCausalLM(out, threads=1).forward(ids.numpy())[0]
    with torch.no_grad():
        simulated = twin(ids).logits.numpy()
        original = model(ids).logits.numpy()
    gap = np.abs(onnx_logits - simulated).max()
    assert gap < 1e-3, gap
    # and quantization did change the model, by far more than that
    assert np.abs(original - simulated).max() > 50 * gap


def test_unknown_plan_is_refused(tmp_path):
    from cusprun_edge.errors import UserError

    model, tok = tiny_model("llama")
    with pytest.raises(UserError, match="quantization plan 'fastest' is unknown"):
        export_model(model, tok, "x86-cpu", tmp_path / "x", precision="int4", quant_plan="fastest")
    assert not (tmp_path / "x").exists()


def test_a_head_cut_for_speed_bounds_keeps_its_rows_logits_and_generates(fast_export, tmp_path):
    """benchmarks/vocab.cut_head: the copy that times a smaller vocabulary computes the first rows' logits
    unchanged, and onnxruntime_genai runs it."""
    import json

    from test_export import genai_greedy

    from benchmarks.vocab import cut_head

    _, _, out, _ = fast_export
    vocab = json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"]
    rows = vocab // 2
    cut = cut_head(out, tmp_path / "cut", rows)
    ids = np.array([[1, 5, 9, rows - 1, 7]])
    full = OnnxCausalLM(out, threads=1).forward(ids)[0]
    part = OnnxCausalLM(cut, threads=1).forward(ids)[0]
    assert part.shape[-1] == rows and full.shape[-1] == vocab
    np.testing.assert_allclose(part, full[..., :rows], atol=1e-4)
    generated = genai_greedy(cut, [1, 5, 9], 4)
    assert len(generated) == 4 and max(generated) < rows
