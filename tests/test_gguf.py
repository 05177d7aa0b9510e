"""GGUF export checked in llama.cpp itself (llama-cpp-python, real; skipped only when it is not installed)."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from tiny import TEXT, tiny_model

from cusprun_edge.errors import UserError
from cusprun_edge.export.gguf import GGUF_FILE, export_gguf, write_gguf
from cusprun_edge.measure.llamacpp import LlamaCpp, missing
from cusprun_edge.model.structure import keep_ffn_channels, keep_heads, record_structure

needs_llama_cpp = pytest.mark.skipif(missing() is not None, reason=missing() or "")

# llama.cpp (fp32 weights, flash attention off, fp32 KV cache) against PyTorch fp32: the tiny model's logits
# span about +-10; what differs is the order of fp32 sums.
TOL = 2e-3


def _sharpen(model, seed=1):
    """Weights large enough that attention is far from uniform: a wrong head order or rope layout shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / math.sqrt(p.shape[1])) * 2.0)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def _drop_attention(layer):
    """A layer without attention: no q/k/v/o rows, and its attention adds nothing to the residual."""
    attn = layer.self_attn
    h = attn.q_proj.in_features
    attn.q_proj, attn.k_proj = torch.nn.Linear(h, 0, bias=False), torch.nn.Linear(h, 0, bias=False)
    attn.v_proj, attn.o_proj = torch.nn.Linear(h, 0, bias=False), torch.nn.Linear(0, h, bias=False)
    attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)


def pruned_tiny_llama():
    """Uneven widths: FFN 40 (padded to 64), 128, 72 and 0 (a zero FFN keeps its attention); query heads
    4, 6, 0 (no attention) and 2 on 2, 2, 0 and 2 KV heads."""
    from cusprun_edge.model import arch

    model, tok = tiny_model("llama")
    _sharpen(model)
    spec = arch.spec_for(model)
    parts = arch.all_layer_parts(model)
    keep_ffn_channels(parts[0], torch.arange(0, 120, 3)[:40], spec)
    keep_heads(parts[0], [0, 1, 3, 4], [0, 1], 16, spec)
    keep_ffn_channels(parts[2], torch.arange(72), spec)
    _drop_attention(arch.decoder_layers(model)[2])
    keep_ffn_channels(parts[3], torch.arange(0), spec)
    keep_heads(parts[3], [2, 5], [0, 1], 16, spec)
    return model.eval(), tok


def _docs(tok, n=2):
    return [tok(t)["input_ids"][:40] for t in TEXT[:n]]


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].numpy()


@needs_llama_cpp
def test_pruned_llama_runs_in_llama_cpp_with_pytorch_logits(tmp_path):
    model, tok = pruned_tiny_llama()
    rec = write_gguf(model, tok, tmp_path / GGUF_FILE, requant="f32")
    assert rec["architecture"] == "deci"
    assert rec["layers"]["n_head"] == [4, 6, 0, 2] and rec["layers"]["n_head_kv"] == [2, 2, 0, 2]
    assert rec["layers"]["n_ff_written"] == [64, 128, 96, 32]
    assert rec["padded_ffn"] == [0, 2] and rec["zero_ffn"] == [3]
    run = LlamaCpp(tmp_path / GGUF_FILE, n_ctx=64, exact=True)
    try:
        for ids in _docs(tok):
            ref = _torch_logits(model, ids)
            assert np.abs(ref).max() > 3  # logits with a spread: a layout error cannot hide in them
            got = run.logits(ids)
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() < TOL
            # the same through the KV cache, one token at a time after a prefill
            assert np.abs(run.decode_logits(ids, 7) - ref).max() < TOL
    finally:
        run.close()


@needs_llama_cpp
def test_zero_ffn_and_attention_free_layers_are_not_dropped(tmp_path):
    """Without the zero FFN llama.cpp would skip layer 3's attention: its output must still matter."""
    model, tok = pruned_tiny_llama()
    write_gguf(model, tok, tmp_path / "a.gguf", requant="f32")
    from cusprun_edge.model import arch

    with torch.no_grad():
        arch.all_layer_parts(model)[3].o.weight.mul_(0.5)
    write_gguf(model, tok, tmp_path / "b.gguf", requant="f32")
    ids = _docs(tok, 1)[0]
    runs = [LlamaCpp(tmp_path / f, n_ctx=64, exact=True) for f in ("a.gguf", "b.gguf")]
    try:
        a, b = (r.logits(ids) for r in runs)
    finally:
        for r in runs:
            r.close()
    assert np.abs(a - b).max() > 100 * TOL
    assert np.abs(b - _torch_logits(model, ids)).max() < TOL


@needs_llama_cpp
def test_dense_export_round_trips_as_plain_llama(tmp_path):
    model, tok = tiny_model("llama")
    _sharpen(model, seed=2)
    manifest = export_gguf(model, tok, tmp_path / "out", requant="f32")
    assert manifest["architecture"] == "llama" and manifest["fallbacks"] == []
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["sha256"] == manifest["sha256"]
    run = LlamaCpp(tmp_path / "out" / GGUF_FILE, n_ctx=64, exact=True)
    try:
        assert run.n_vocab == model.config.vocab_size
        for ids in _docs(tok):
            assert np.abs(run.logits(ids) - _torch_logits(model, ids)).max() < TOL
        # the tokenizer written from tokenizer.json tokenizes like the Hugging Face one
        for text in TEXT[:5]:
            assert run.tokenize(text, add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
    finally:
        run.close()
    with pytest.raises(UserError, match="already exists"):
        export_gguf(model, tok, tmp_path / "out")


def _on_grid(tmp_path, qtype="q4_1"):
    """A tiny Llama whose weights are what its own GGUF (Q4_1 by default) dequantizes to, read back the way the
    project reads every GGUF (transformers' loader, q/k un-permuted), and that GGUF."""
    from transformers import AutoModelForCausalLM

    model, tok = tiny_model("llama")
    _sharpen(model, seed=3)
    src = tmp_path / "src.gguf"
    write_gguf(model, tok, src, requant=qtype)
    grid = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=src.name, dtype=torch.float32).eval()
    return grid, tok, src


@needs_llama_cpp
def test_intact_source_blocks_are_copied_byte_for_byte(tmp_path):
    import gguf

    from cusprun_edge.model import arch

    model, tok, src = _on_grid(tmp_path)
    spec = arch.spec_for(model)
    parts = arch.all_layer_parts(model)
    ffn_keep = torch.tensor(sorted([5, 9, 17, 40, 41, 77, 90, 127] + list(range(100, 124))))  # 32, not whole blocks
    for p in parts:
        keep_ffn_channels(p, ffn_keep, spec)
    keep_heads(parts[1], [0, 1, 3, 4], [0, 1], 16, spec)  # q rows whole; o keeps columns 0-31 and 48-79
    record_structure(model)
    rec = write_gguf(model, tok, tmp_path / "expert.gguf", source_gguf=src, requant="q8_0")
    how = {name: t["how"] for name, t in rec["tensors"].items()}
    for i in range(4):
        for kind in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            assert how[f"blk.{i}.{kind}.weight"].startswith("copied"), (i, kind)
        assert how[f"blk.{i}.ffn_down.weight"].startswith("quantized to Q8_0")
    assert how["blk.0.attn_output.weight"].startswith("copied")  # no head removed: every block intact
    assert how["blk.1.attn_output.weight"].startswith("quantized")  # head 2 removed mid-block
    assert how["token_embd.weight"].startswith("copied")

    source = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "expert.gguf")).tensors}
    # FFN rows of blk.2: the kept channels' raw Q4_1 blocks, byte for byte
    gate_src, gate_out = np.asarray(source["blk.2.ffn_gate.weight"].data), np.asarray(written["blk.2.ffn_gate.weight"].data)
    assert gate_out.tobytes() == gate_src[ffn_keep.numpy()].tobytes()
    # q rows of blk.1: whole heads 0, 1, 3, 4 of 16 rows each, in GGUF's own (permuted) row order
    q_rows = np.concatenate([np.arange(h * 16, h * 16 + 16) for h in (0, 1, 3, 4)])
    q_src, q_out = np.asarray(source["blk.1.attn_q.weight"].data), np.asarray(written["blk.1.attn_q.weight"].data)
    assert q_out.tobytes() == q_src[q_rows].tobytes()
    assert written["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_1
    assert np.asarray(written["token_embd.weight"].data).tobytes() == np.asarray(source["token_embd.weight"].data).tobytes()

    # the copied blocks hold exactly the expert's weights: they dequantize to what the same expert written in
    # F32 holds (and that file runs in llama.cpp like PyTorch, see the first test)
    write_gguf(model, tok, tmp_path / "f32.gguf", requant="f32")
    plain = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    for name, t in written.items():
        if how[name].startswith("copied"):
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.array_equal(values, np.asarray(plain[name].data)), name
    # llama.cpp loads it; its Q4_1/Q8_0 kernels round activations to 8 bits, which on this random model moves
    # logits as much as it moves the dense Q4_1 source's (max 0.7 of 9 measured), so only the argmax is checked
    run = LlamaCpp(tmp_path / "expert.gguf", n_ctx=64, exact=True)
    try:
        for ids in _docs(tok):
            assert (run.logits(ids).argmax(-1) == _torch_logits(model, ids).argmax(-1)).mean() >= 0.75
    finally:
        run.close()


def test_unaligned_widths_are_padded_or_fall_back_and_are_listed(tmp_path):
    from cusprun_edge.model import arch

    model, tok = tiny_model("llama")
    spec = arch.spec_for(model)
    parts = arch.all_layer_parts(model)
    keep_ffn_channels(parts[0], torch.arange(40), spec)  # padded to 64 with zero channels: still Q8_0 blocks
    keep_heads(parts[1], [0, 1, 2], [0], 16, spec)  # o_proj input 48 wide: no whole Q8_0 block of 32
    rec = write_gguf(model, tok, tmp_path / "m.gguf", requant="q8_0")
    assert rec["padded_ffn"] == [0] and rec["layers"]["n_ff_written"][0] == 64
    assert rec["tensors"]["blk.0.ffn_down.weight"]["type"] == "Q8_0"
    assert [f["tensor"] for f in rec["fallbacks"]] == ["blk.1.attn_output.weight"]
    assert rec["tensors"]["blk.1.attn_output.weight"]["type"] == "F16"


def test_unsupported_architecture_is_refused(tmp_path):
    model, tok = tiny_model("gemma3")
    with pytest.raises(UserError, match="gemma3_text.*no per-layer"):
        export_gguf(model, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_gguf_for_gemma_in_one_line(tmp_path):
    model, tok = tiny_model("gemma3")
    model.save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    proc = run_cli("export", "--format", "gguf", "--model", tmp_path / "gemma", "--out", tmp_path / "out")
    assert_one_line_error(proc, "gemma3_text", "per-layer")
    assert not (tmp_path / "out").exists()


@needs_llama_cpp
def test_llama_cpp_check_measures_what_pytorch_measures(tmp_path):
    """The stage's check on tiny models: its perplexity is PyTorch's on the same tokens, speed is measured for
    both files in alternating rounds, greedy answers are compared."""
    from cusprun_edge.measure.gguf_check import check_in_llama_cpp

    model, tok = pruned_tiny_llama()
    write_gguf(model, tok, tmp_path / "expert.gguf", requant="f32")
    dense, _ = tiny_model("llama")
    write_gguf(dense, tok, tmp_path / "dense.gguf", requant="q8_0")
    texts = [" ".join(TEXT[i:i + 5]) for i in range(0, 10, 5)]
    rec = check_in_llama_cpp(model, tok, tmp_path / "expert.gguf", tmp_path / "dense.gguf", texts,
                             ["The quick brown", "def add(a, b):"], rounds=2, dense=(dense, tok))
    assert rec["parity"]["max_abs_diff"] < TOL and rec["parity"]["top1_agreement"] == 1.0
    # the tolerance is the dense pair's own drift: a q8_0 dense GGUF against its fp32 weights in PyTorch
    dense_par = rec["dense_vs_pytorch"]["parity"]
    assert 0 < dense_par["max_abs_diff"] and dense_par["positions"] == rec["parity"]["positions"]
    assert rec["faithful"]["passed"] and rec["faithful"]["top1"]["dense"] == dense_par["top1_agreement"]
    nll, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"][:512]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    assert rec["ppl"]["expert"]["tokens"] == count
    assert rec["ppl"]["expert"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-3)
    assert rec["ppl"]["ratio"] == pytest.approx(rec["ppl"]["expert"]["ppl"] / rec["ppl"]["dense"]["ppl"])
    for name in ("dense", "expert"):
        s = rec["speed"]["models"][name]
        assert len(s["decode_tok_s_rounds"]) == 2 and s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0
    assert rec["greedy"]["prompts"] == 2 and all(r["tokens"] > 0 for r in rec["greedy"]["rows"])


def test_faithful_means_as_close_to_pytorch_as_the_dense_gguf_is():
    from cusprun_edge.measure.gguf_check import FAITHFUL_TOP1, faithful

    greedy = {"identical": 1, "prompts": 2, "rows": [{"agree_tokens": 32}, {"agree_tokens": 6}]}
    dense = {"top1_agreement": 0.97}
    close = faithful({"top1_agreement": 0.97 - FAITHFUL_TOP1 / 2}, greedy, dense, greedy)
    assert close["passed"] and close["greedy_mean_agreed_tokens"] == {"expert": 19.0, "dense": 19.0}
    assert not faithful({"top1_agreement": 0.97 - 2 * FAITHFUL_TOP1}, greedy, dense, greedy)["passed"]


def test_build_refuses_gguf_for_gemma_before_anything_runs(tmp_path):
    proc = run_cli("build", "--model", "gemma3-270m", "--format", "gguf", "--out", tmp_path / "b")
    assert_one_line_error(proc, "gemma3_text", "per-layer")
    assert not (tmp_path / "b").exists()


@needs_llama_cpp
def test_trimmed_vocabulary_keeps_the_source_tokenizer_for_kept_tokens(tmp_path):
    """An expert whose vocabulary was trimmed (rows removed, new ids; config cusprun_trimmed_vocab maps them to
    the original ones): the GGUF holds the source GGUF's tokenizer cut to the kept tokens and the kept rows'
    source blocks, and llama.cpp's logits are the expert's."""
    import gguf

    model, tok, src = _on_grid(tmp_path, "f32")  # F32 source rows: llama.cpp's logits can be compared tightly
    kept = [i for i in range(model.config.vocab_size) if i < 259 or i % 2 == 0]  # byte symbols and half the merges
    with torch.no_grad():
        rows = model.model.embed_tokens.weight[kept].clone()
    model.model.embed_tokens = torch.nn.Embedding.from_pretrained(rows, freeze=False)
    model.lm_head = torch.nn.Linear(rows.shape[1], len(kept), bias=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.vocab_size = len(kept)
    model.config.cusprun_trimmed_vocab = {"original_vocab_size": 300, "original_ids": kept}
    rec = write_gguf(model, tok, tmp_path / "trimmed.gguf", source_gguf=src, requant="f32")
    assert rec["vocab"] == {"n_vocab": len(kept), "trimmed_from": 300, "tokenizer": "the source GGUF's"}
    assert rec["tensors"]["token_embd.weight"]["how"].startswith("copied")
    reader = gguf.GGUFReader(str(tmp_path / "trimmed.gguf"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    source_tokens = gguf.GGUFReader(str(src)).fields["tokenizer.ggml.tokens"].contents()
    assert tokens == [source_tokens[i] for i in kept]
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    assert merges and all(a in tokens and b in tokens and a + b in tokens for a, b in (m.split(" ") for m in merges))
    run = LlamaCpp(tmp_path / "trimmed.gguf", n_ctx=64, exact=True)
    try:
        assert run.n_vocab == len(kept)
        ids = [1, 40, 100, 7, 259 - 1, 5, 60, 120, 33]
        ref = _torch_logits(model, ids)
        got = run.logits(ids)
        assert got.shape == (len(ids), len(kept))
        assert np.abs(got - ref).max() < TOL
    finally:
        run.close()


@needs_llama_cpp
def test_build_format_gguf_runs_before_the_report_which_shows_llama_cpp(tiny_builds, tmp_path):  # noqa: F811
    """A finished build resumed with --format gguf: every ONNX stage is skipped, the gguf stage runs, and the
    report (which now reads it) runs again with a llama.cpp table beside the ONNX ones."""
    import dataclasses
    import shutil

    from conftest import USER_PROMPT, tiny_build_config

    from cusprun_edge.pipeline.build import build, stages_for
    from cusprun_edge.report.tables import tables

    finished, _, _ = tiny_builds
    out = tmp_path / "r30"
    shutil.copytree(finished, out)
    dense_hf = json.loads((out / "build.json").read_text())["model"]
    cfg = dataclasses.replace(tiny_build_config(dense_hf, 0.3, [USER_PROMPT], True), formats=("onnx", "gguf"))
    assert [s.name for s in stages_for(cfg)][-2:] == ["gguf", "report"]
    seen = []
    build(cfg, out, on_stage=lambda name, state: seen.append((name, state.split(" ")[0])))
    assert [n for n, s in seen if s == "done"] == ["gguf", "report"]
    data = json.loads((out / "report" / "report.json").read_text())
    assert data["gguf"]["checked"] == "llama.cpp" and "faithful" in data["gguf"]
    title, header, rows = next(t for t in tables(data) if t[0].startswith("llama.cpp"))
    assert header[1:3] == ["dense source GGUF", "expert GGUF"] and len(rows) == 5
    assert "llama.cpp" in (out / "report" / "report.md").read_text()
