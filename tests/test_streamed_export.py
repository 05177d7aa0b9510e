"""The export one decoder layer at a time (export/streamed.py): a lazy model, its layers read from disk one at a
time, exports to the artifact the whole-model export writes (every quantized weight byte for byte, the same parity
figures), a pruned expert with per-layer widths included, and never holds two layers' weights."""

import json
from contextlib import contextmanager

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny import TEXT, tiny_model

from cusprun_edge.export import export_model
from cusprun_edge.export.common import MODEL_FILE
from cusprun_edge.model import arch, shards
from cusprun_edge.model.lazy import lazy_model
from cusprun_edge.model.load import load_model


def _saved(family, path):
    model, tok = tiny_model(family)
    model.save_pretrained(path, max_shard_size="200KB")
    tok.save_pretrained(path)
    return path


def _weights(directory):
    """MatMulNBits / GatherBlockQuantized node name -> its constant inputs' arrays, and the op counts."""
    proto = onnx.load(str(directory / MODEL_FILE))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quantized = {n.name: [inits[x] for x in n.input[1:] if x in inits] for n in proto.graph.node
                 if n.op_type == "MatMulNBits"}
    ops = sorted(n.op_type for n in proto.graph.node)
    return quantized, ops


@contextmanager
def _counting_layers(monkeypatch, model):
    """Counts decoder layers holding weights at once, wherever the export materializes one."""
    from cusprun_edge.export import streamed

    state = {"now": 0, "most": 0, "entered": 0}
    real = shards.materialized

    @contextmanager
    def watched(m, i):
        with real(m, i) as layer:
            state["now"] += 1
            state["entered"] += 1
            state["most"] = max(state["most"], state["now"])
            try:
                yield layer
            finally:
                state["now"] -= 1

    monkeypatch.setattr(shards, "materialized", watched)
    monkeypatch.setattr(streamed, "materialized", watched)
    yield state


# the fast plan (GPTQ statistics gathered layer by layer), rtn, and the exact plan at int8 on Gemma3 (fp32: the CLI test)
@pytest.mark.parametrize("family,precision,plan", [("llama", "int4", "fast"), ("qwen2", "int4", "rtn"),
                                                   ("gemma3", "int8", "exact")])
def test_a_lazy_model_exports_layer_by_layer_to_the_whole_exports_artifact(family, precision, plan, tmp_path,
                                                                          monkeypatch):
    source = _saved(family, tmp_path / "dense")
    lazy, tok = lazy_model(str(source))
    with _counting_layers(monkeypatch, lazy) as layers:
        streamed = export_model(lazy, tok, "x86-cpu", tmp_path / "streamed", precision=precision, quant_plan=plan,
                                calibration=TEXT[:12])
    assert layers["most"] == 1 and layers["entered"] > 0  # one decoder layer's weights at a time
    assert all(p.is_meta for p in arch.decoder_layers(lazy).parameters())  # and none after
    eager, _ = load_model(str(source))
    whole = export_model(eager, tok, "x86-cpu", tmp_path / "whole", precision=precision, quant_plan=plan,
                         calibration=TEXT[:12])
    assert "one decoder layer at a time" in " ".join(streamed["notes"])
    a, b = streamed["parity"][precision], whole["parity"][precision]
    for key in ("max_abs_diff", "rel_rms", "kl_divergence", "top1_agreement"):
        assert a[key] == b[key], key
    assert a["passed"]
    qa, ops_a = _weights(tmp_path / "streamed")
    qb, ops_b = _weights(tmp_path / "whole")
    assert ops_a == ops_b
    assert qa.keys() == qb.keys() and (precision == "fp32" or qa)
    for name in qa:
        assert all(np.array_equal(x.astype(np.float32), y.astype(np.float32)) for x, y in zip(qa[name], qb[name])), name
    if precision != "fp32":
        ta, tb = streamed["quantization"]["plan"]["tensors"], whole["quantization"]["plan"]["tensors"]
        assert ta == tb
        if plan == "rtn":  # no calibration: every 4-bit weight rounded to nearest
            assert {t["method"] for t in ta.values() if t["bits"] == 4} == {"rtn"}


def test_a_pruned_expert_exports_layer_by_layer_with_its_widths(tmp_path):
    """An expert with per-layer widths, read lazily (load_expert(lazy=True)), exports to the same int4 weights
    and parity as the expert loaded whole."""
    from cusprun_edge.config.corpora import Corpus
    from cusprun_edge.model.expert_io import load_expert
    from cusprun_edge.prune.pruner import prune_and_save
    from cusprun_edge.prune.score import score_model

    source = _saved("qwen2", tmp_path / "dense")
    model, tok = load_model(str(source))
    corpora = {"domain/a": Corpus("domain/a", TEXT[:40], tune=TEXT[40:55])}
    scores = score_model(model, tok, corpora, show_progress=False)
    prune_and_save(model, tok, scores, ["domain/a"], "cusprun", 0.3, tmp_path / "expert", corpora=corpora,
                   options={"reconstruct": "none", "damage_budget": "none"})
    lazy, etok = load_expert(tmp_path / "expert", lazy=True)
    assert shards.is_lazy(lazy) and all(p.is_meta for p in arch.decoder_layers(lazy).parameters())
    widths = {p.down.in_features for p in arch.all_layer_parts(lazy)}
    streamed = export_model(lazy, etok, "x86-cpu", tmp_path / "streamed", precision="int4", quant_plan="fast",
                            calibration=TEXT[:12])
    whole = export_model(load_expert(tmp_path / "expert")[0], etok, "x86-cpu", tmp_path / "whole",
                         precision="int4", quant_plan="fast", calibration=TEXT[:12])
    assert streamed["structure"] == whole["structure"] and len(widths) > 1
    assert streamed["parity"]["int4"]["rel_rms"] == whole["parity"]["int4"]["rel_rms"]
    qa, _ = _weights(tmp_path / "streamed")
    qb, _ = _weights(tmp_path / "whole")
    assert qa.keys() == qb.keys()
    assert all(np.array_equal(x, y) for n in qa for x, y in zip(qa[n], qb[n]))


def test_layers_streamed_runs_a_whole_forward_one_layer_at_a_time(tmp_path, monkeypatch):
    source = _saved("llama", tmp_path / "dense")
    eager, tok = load_model(str(source))
    lazy, _ = lazy_model(str(source))
    ids = tok(TEXT[0], return_tensors="pt").input_ids
    with _counting_layers(monkeypatch, lazy) as layers, shards.layers_streamed(lazy), torch.no_grad():
        got = lazy(ids).logits
    assert layers["most"] == 1 and layers["entered"] == len(arch.decoder_layers(lazy))
    assert torch.equal(got, eager(ids).logits)
    assert all(p.is_meta for p in arch.decoder_layers(lazy).parameters())


def test_cli_export_layer_by_layer_and_its_refusals(tmp_path):
    from typer.testing import CliRunner

    from cusprun_edge.cli import app

    source = _saved("llama", tmp_path / "dense")
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--model", str(source), "--precision", "fp32", "--layer-by-layer",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert "one decoder layer at a time" in " ".join(manifest["notes"])
    assert manifest["parity"]["fp32"]["passed"] and manifest["parity"]["fp32"]["max_abs_diff"] < 1e-4
    assert (out / "model.onnx.data").stat().st_size > 4 * manifest["parameters"]["prunable"]  # float32 weights
    from cusprun_edge.errors import UserError

    lazy, tok = lazy_model(str(source))
    with pytest.raises(UserError, match="one layer at a time"):  # fp16's converter needs the whole graph
        export_model(lazy, tok, "cuda-gpu", tmp_path / "fp16", precision="fp16")
    assert not (tmp_path / "fp16").exists()


def test_a_build_of_a_model_over_the_size_line_exports_both_models_layer_by_layer(tiny_artifacts, tmp_path,
                                                                                  monkeypatch):
    """Past common.LAYER_BY_LAYER_ABOVE_BYTES (lowered here to take the tiny model), the build's export stage reads
    the dense model and the expert lazily and both export one layer at a time; validate and bench run on them."""
    from conftest import tiny_build_config

    from cusprun_edge.export import common
    from cusprun_edge.pipeline.build import build

    monkeypatch.setattr(common, "LAYER_BY_LAYER_ABOVE_BYTES", 0)
    cfg = tiny_build_config(tiny_artifacts["dense_hf"], 0.3)
    build(cfg.__class__(**{**cfg.__dict__, "precision": "int8"}), tmp_path / "b")
    for side in ("dense", "expert"):
        manifest = json.loads((tmp_path / "b" / "export" / side / "manifest.json").read_text())
        assert "one decoder layer at a time" in " ".join(manifest["notes"]), side
        assert manifest["parity"]["int8"]["passed"]
    assert (tmp_path / "b" / "validate" / "validate.json").is_file()
    assert (tmp_path / "b" / "report" / "report.html").is_file()
