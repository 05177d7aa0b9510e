"""validate: dense vs shipped expert on held-out text (tiny models, real ONNX exports)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from conftest import assert_one_line_error, run_cli

from cusprun_edge.errors import UserError

EXPERT = "language=en,domain=general"
MAX_LEN = 128  # tiny models have 256 positions

_CACHE: dict = {}


def build_tiny_artifacts(root):
    """A tiny dense Llama (saved as an HF dir), its fp32 export, and a pruned expert's fp32 export.

    Cached per process: test_bench and test_report use the same artifacts."""
    if "art" in _CACHE:
        return _CACHE["art"]
    from tiny import tiny_model

    from cusprun_edge.export import export_model
    from cusprun_edge.prune.pruner import prune_model

    model, tok = tiny_model("llama")
    dense_hf = root / "dense-hf"
    model.save_pretrained(dense_hf)
    tok.save_pretrained(dense_hf)
    export_model(model, tok, "x86-cpu", root / "dense-art", precision="fp32")
    expert = copy.deepcopy(model)
    prune_model(expert, None, [], "magnitude", 0.3)
    export_model(expert, tok, "x86-cpu", root / "expert-art", precision="fp32")
    _CACHE["art"] = {"model": model, "tok": tok, "expert_model": expert, "dense_hf": dense_hf,
                     "dense_art": root / "dense-art", "expert_art": root / "expert-art"}
    return _CACHE["art"]



def _validate(art, expert_art, **kw):
    from cusprun_edge.measure.validate import validate

    kw.setdefault("expert", EXPERT)
    kw.setdefault("max_docs", 3)
    kw.setdefault("max_mc", 6)
    kw.setdefault("max_length", MAX_LEN)
    return validate((art["model"], art["tok"]), expert_art, **kw)


def test_identical_model_retains_everything(tiny_artifacts):
    """The same artifact as dense and expert: retention exactly 1, agreement 1, KL 0."""
    art = tiny_artifacts
    rec = _validate(art, art["dense_art"], dense_artifact=art["dense_art"])
    assert set(rec["categories"]) == {"language/en", "domain/general"}
    for name, cat in [*rec["categories"].items(), ("overall", rec["overall"])]:
        assert cat["retention"]["ppl"] == pytest.approx(1.0, abs=1e-12), name
        assert cat["top1_agreement"] == 1.0, name
        assert cat["kl"] == pytest.approx(0.0, abs=1e-9), name
        assert cat["dense"]["ppl"] == cat["expert"]["ppl"]
    general = rec["categories"]["domain/general"]
    assert general["mc_items"] == 6
    assert general["dense"]["acc"] == general["expert"]["acc"]
    if general["dense"]["acc"] > 0:
        assert general["retention"]["acc"] == 1.0
    assert rec["dense"]["runtime"] == "onnxruntime"


def test_pytorch_dense_matches_its_fp32_export(tiny_artifacts):
    """Dense in PyTorch vs the same weights in ONNX fp32: retention ~1 and KL ~0, and the
    perplexities equal `evaluate.perplexity` computed independently on the held-out split."""
    from cusprun_edge.config.corpora import ExpertSpec
    from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
    from cusprun_edge.measure.runtime import OnnxCausalLM

    art = tiny_artifacts
    rec = _validate(art, art["dense_art"])
    assert rec["dense"]["runtime"] == "pytorch"
    for name, cat in rec["categories"].items():
        assert cat["retention"]["ppl"] == pytest.approx(1.0, abs=1e-3), name
        assert cat["kl"] < 1e-4, name
        assert cat["top1_agreement"] > 0.95, name
    corpora = ExpertSpec.parse(EXPERT).corpora()
    onnx_fn = OnnxCausalLM(art["dense_art"]).logits_fn
    for name, corpus in corpora.items():
        docs = corpus.eval[:3]
        assert rec["categories"][name]["documents"] == len(docs)
        want_dense = perplexity(torch_logits_fn(art["model"]), art["tok"], docs, max_length=MAX_LEN)
        want_onnx = perplexity(onnx_fn, art["tok"], docs, max_length=MAX_LEN)
        assert rec["categories"][name]["dense"]["ppl"] == pytest.approx(want_dense, rel=1e-6)
        assert rec["categories"][name]["expert"]["ppl"] == pytest.approx(want_onnx, rel=1e-6)


def test_pruned_expert_numbers_are_consistent(tiny_artifacts, tmp_path):
    art = tiny_artifacts
    out = tmp_path / "v" / "validate.json"
    rec = _validate(art, art["expert_art"], out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))
    assert rec["expert"]["pruned"] is True
    total_tokens = 0
    for cat in rec["categories"].values():
        d, e, r = cat["dense"], cat["expert"], cat["retention"]
        assert math.isfinite(d["ppl"]) and math.isfinite(e["ppl"]) and d["ppl"] > 1 and e["ppl"] > 1
        assert r["ppl"] == pytest.approx(d["ppl"] / e["ppl"])
        assert 0 <= cat["top1_agreement"] <= 1
        assert cat["kl"] > 0  # a pruned model is not the dense one
        if "acc" in d:
            assert 0 <= d["acc"] <= 1 and 0 <= e["acc"] <= 1
            if d["acc"] > 0:
                assert r["acc"] == pytest.approx(e["acc"] / d["acc"])
        total_tokens += cat["tokens"]
    assert "acc" not in rec["categories"]["language/en"]["dense"]  # no mc items for a language
    assert "acc" in rec["categories"]["domain/general"]["dense"]
    overall = rec["overall"]
    assert overall["tokens"] == total_tokens
    # pooled perplexity lies between the categories' perplexities
    ppls = [c["expert"]["ppl"] for c in rec["categories"].values()]
    assert min(ppls) - 1e-9 <= overall["expert"]["ppl"] <= max(ppls) + 1e-9
    assert overall["kl"] > 0 and overall["top1_agreement"] < 1


def test_user_text_file_is_its_own_category(tiny_artifacts, tmp_path):
    art = tiny_artifacts
    text = tmp_path / "notes.md"
    text.write_text("The court held that the contract was void.\n\nInterest rates rose again.\n\n\n"
                    "The quick brown fox jumps over the lazy dog.\n")
    rec = _validate(art, art["expert_art"], expert=None, texts=[text])
    assert list(rec["categories"]) == ["user:notes.md"]
    cat = rec["categories"]["user:notes.md"]
    assert cat["documents"] == 3 and cat["split"] == "user" and cat["tokens"] > 0


def test_expert_spec_required_without_text(tiny_artifacts):
    with pytest.raises(UserError, match="--expert"):
        _validate(tiny_artifacts, tiny_artifacts["expert_art"], expert=None)


def test_cli_validate_writes_json(tiny_artifacts, tmp_path):
    art = tiny_artifacts
    text = tmp_path / "mine.txt"
    text.write_text("Le patient présente une fièvre.\n\nThe court held that the contract was void.\n")
    out = tmp_path / "validate.json"
    proc = run_cli("validate", "--dense", art["dense_hf"], "--expert-artifact", art["expert_art"],
                   "--expert", "language=en", "--max-docs", "2", "--max-length", MAX_LEN, "--text", text,
                   "--out", out, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(out.read_text())
    assert set(rec["categories"]) == {"language/en", "user:mine.txt"}
    assert rec["categories"]["user:mine.txt"]["documents"] == 2
    assert "overall" in proc.stdout and f"wrote {out}" in proc.stdout


@pytest.mark.parametrize("case", ["empty", "binary", "missing"])
def test_cli_bad_eval_file(tiny_artifacts, tmp_path, case):
    path = tmp_path / "eval.txt"
    if case == "empty":
        path.write_text("")
    elif case == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    proc = run_cli("validate", "--dense", tiny_artifacts["dense_hf"], "--expert-artifact",
                   tiny_artifacts["expert_art"], "--text", path)
    assert_one_line_error(proc, str(path.name))


def test_cli_artifact_without_manifest(tiny_artifacts, tmp_path):
    bad = tmp_path / "not-an-artifact"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(b"")
    proc = run_cli("validate", "--dense", tiny_artifacts["dense_hf"], "--expert-artifact", bad,
                   "--expert", EXPERT)
    assert_one_line_error(proc, "manifest.json")


def test_cli_different_tokenizer_is_refused(tiny_artifacts, tmp_path):
    """A dense model whose tokenizer is not the expert's: one-line error, not garbage numbers."""
    import shutil

    other = tmp_path / "other-art"
    shutil.copytree(tiny_artifacts["expert_art"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab["zz-renamed-token"] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    proc = run_cli("validate", "--dense", tiny_artifacts["dense_hf"], "--expert-artifact", other,
                   "--expert", EXPERT, "--max-docs", "1", "--max-length", MAX_LEN)
    assert_one_line_error(proc, "tokenizer")


@pytest.mark.integration
def test_real_smollm2_two_layers_validate_and_bench(smollm2, tmp_path):
    """The real tokenizer and vocabulary (49k) and GQA 9/3 heads, on SmolLM2 cut to two layers (fast):
    its own fp32 export validates as the same model and benchmarks on CPU."""
    from cusprun_edge.export import export_model
    from cusprun_edge.measure.bench import bench
    from cusprun_edge.measure.validate import validate
    from cusprun_edge.model.structure import keep_layers

    model, tok = smollm2
    small = copy.deepcopy(model)
    keep_layers(small, [0, 29])
    export_model(small, tok, "x86-cpu", tmp_path / "art", precision="fp32")
    rec = validate((small, tok), tmp_path / "art", expert="domain=medical", max_docs=2, max_mc=4)
    cat = rec["categories"]["domain/medical"]
    assert cat["retention"]["ppl"] == pytest.approx(1.0, abs=1e-3) and cat["kl"] < 1e-3
    assert cat["top1_agreement"] > 0.95 and cat["tokens"] > 100
    record = bench([tmp_path / "art"], providers=["cpu"], quick=True, labels=["two-layer"],
                   settings={"prompt_lengths": [16], "new_tokens": 8, "reps": 1, "decode_reps": 1})
    result = record["providers"]["CPUExecutionProvider"]["results"]["two-layer"]
    assert result["decode"]["tok_s"] > 0 and result["peak_rss_mb"] > 0


def test_validate_reuses_what_does_not_depend_on_the_expert(tiny_artifacts):
    """`reuse` (an earlier record's dense_side: our dense export's sums against the reference and the dense model's
    multiple-choice count) gives the record a full validate gives; the reused figures are the ones reported."""
    art = tiny_artifacts
    first = _validate(art, art["expert_art"], quantized_dense=art["dense_art"])
    side = first["dense_side"]
    assert set(side["quantized"]) == {"language/en", "domain/general"} and not first["dense_side_reused"]
    again = _validate(art, art["expert_art"], quantized_dense=art["dense_art"], reuse=side)
    assert again["dense_side_reused"] and again["dense_side"] == side
    for key in ("categories", "overall", "three_way"):
        assert again[key] == first[key], key
    # the reused sums are what the record reports: one changed by hand moves its figures
    changed = copy.deepcopy(side)
    changed["quantized"]["domain/general"]["test_nll"] += changed["quantized"]["domain/general"]["tokens"]
    changed["dense_mc"]["domain/general"] = 0
    moved = _validate(art, art["expert_art"], quantized_dense=art["dense_art"], reuse=changed)
    share = side["quantized"]["domain/general"]["tokens"] / first["three_way"]["tokens"]  # one nat more per token there
    assert moved["three_way"]["dense_quantized"]["ppl"] == pytest.approx(
        first["three_way"]["dense_quantized"]["ppl"] * math.exp(share), rel=1e-9)
    assert moved["categories"]["domain/general"]["dense"]["acc"] == 0


def test_three_way_separates_quantization_from_pruning(tiny_artifacts):
    """Dense fp32 (PyTorch) / dense export / expert export, each against the dense PyTorch model."""
    art = tiny_artifacts
    rec = _validate(art, art["expert_art"], quantized_dense=art["dense_art"])
    three = rec["three_way"]
    overall = rec["overall"]
    assert three["dense_fp32"]["ppl"] == pytest.approx(overall["dense"]["ppl"])
    assert three["expert_quantized"]["ppl"] == pytest.approx(overall["expert"]["ppl"])
    assert three["expert_quantized"]["top1_agreement"] == pytest.approx(overall["top1_agreement"])
    # the dense fp32 export is the dense model: no loss from the export itself
    assert three["dense_quantized"]["top1_agreement"] == 1.0 and three["dense_quantized"]["kl"] < 1e-6
    assert three["dense_quantized"]["ppl"] == pytest.approx(three["dense_fp32"]["ppl"], rel=1e-4)
    assert three["precision"] == "fp32" and three["tokens"] == overall["tokens"]
    for category in rec["categories"].values():
        if category["documents"]:
            assert set(category["three_way"]) >= {"dense_fp32", "dense_quantized", "expert_quantized"}
    from cusprun_edge.report.tables import three_way_table

    title, header, rows = three_way_table(three)
    assert "Quantization vs pruning" in title and len(header) == 4
    assert [r[0] for r in rows] == ["dense, fp32 (PyTorch)", "dense, fp32 (ONNX)", "expert, fp32 (ONNX)"]
