"""bench and the ONNX Runtime runner it measures with (tiny exports; quick settings)."""

from __future__ import annotations

import importlib.metadata
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import assert_one_line_error, run_cli

from cusprun_edge.errors import UserError

SMALL = {"prompt_lengths": [8, 32], "new_tokens": 12, "reps": 2, "decode_reps": 2, "warmup": 1}



def _gpu_package_installed() -> bool:
    try:
        importlib.metadata.version("onnxruntime-gpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# --------------------------------------------------------------------------- runtime


def test_onnx_logits_fn_matches_pytorch_with_padding(tiny_artifacts):
    """Rows of a padded batch (left or right) get the logits of their real tokens, as in PyTorch."""
    from cusprun_edge.measure.runtime import OnnxCausalLM

    art = tiny_artifacts
    fn = OnnxCausalLM(art["dense_art"]).logits_fn
    torch.manual_seed(1)
    ids = torch.randint(3, 300, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    got = fn(ids, mask)
    assert got.shape == (3, 10, 300)
    with torch.no_grad():
        for b in range(3):
            keep = mask[b].bool()
            want = art["model"](ids[b][keep][None]).logits[0]
            assert torch.allclose(got[b][keep], want, atol=1e-4), b
            assert torch.count_nonzero(got[b][~keep]) == 0


def test_kv_cache_decode_matches_full_recompute(tiny_artifacts):
    """Greedy decoding with the cache picks, at every step, the argmax of a cache-free full forward."""
    from cusprun_edge.measure.runtime import OnnxCausalLM

    lm = OnnxCausalLM(tiny_artifacts["expert_art"])
    prompt = list(range(20, 40))
    steps: list[float] = []
    new = lm.generate(prompt, 10, step_seconds=steps)
    assert len(new) == 10 and len(steps) == 10
    logits, _ = lm.forward(np.array([prompt + new]))
    want = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert new == want


def test_genai_and_onnxruntime_decode_agree(tiny_artifacts):
    from cusprun_edge.measure.runtime import GenaiCausalLM, OnnxCausalLM, genai_support

    path = tiny_artifacts["expert_art"]
    assert genai_support(path) is None
    prompt = list(range(50, 66))
    steps: list[float] = []
    via_genai = GenaiCausalLM(path).generate(prompt, 8, step_seconds=steps)
    assert len(via_genai) == 8 and len(steps) == 8
    assert via_genai == OnnxCausalLM(path).generate(prompt, 8)


def test_provider_names():
    from cusprun_edge.measure.runtime import provider_name

    assert provider_name("cpu") == "CPUExecutionProvider"
    assert provider_name("CUDA") == "CUDAExecutionProvider"
    assert provider_name("trt") == "TensorrtExecutionProvider"
    assert provider_name("OpenVINOExecutionProvider") == "OpenVINOExecutionProvider"
    with pytest.raises(UserError, match="warp9"):
        provider_name("warp9")


# --------------------------------------------------------------------------- bench


@pytest.fixture(scope="module")
def bench_record(tiny_artifacts, tmp_path_factory):
    from cusprun_edge.measure.bench import bench

    out = tmp_path_factory.mktemp("bench") / "bench.json"
    art = tiny_artifacts
    record = bench([art["dense_art"], art["expert_art"]], providers=["cpu", "cuda", "tensorrt"], quick=True,
                   settings=SMALL, threads=1, out=out)
    return record, out


def test_bench_report_structure(bench_record, tiny_artifacts):
    record, out = bench_record
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert set(record["artifacts"]) == {"dense", "expert"}  # labels from the manifests' pruned flag
    assert record["baseline"] == "dense"
    for label, key in (("dense", "dense_art"), ("expert", "expert_art")):
        path = tiny_artifacts[key]
        on_disk = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("model.onnx"))
        assert record["artifacts"][label]["file_bytes"] == on_disk
    assert record["artifacts"]["expert"]["params"] < record["artifacts"]["dense"]["params"]
    assert record["settings"]["threads"] == 1 and record["settings"]["prompt_lengths"] == [8, 32]
    assert record["machine"]["cores"] >= 1 and record["machine"]["packages"]["onnxruntime"] == ort.__version__

    cpu = record["providers"]["CPUExecutionProvider"]
    assert cpu["status"] == "measured"
    assert cpu["engine"] == "onnxruntime-genai"  # both artifacts have a genai_config.json
    for label in ("dense", "expert"):
        r = cpu["results"][label]
        assert r["provider_active"] is True and r["engine"] == cpu["engine"]
        assert set(r["prefill"]) == {"8", "32"}
        for stats in r["prefill"].values():
            assert 0 < stats["p50_ms"] <= stats["p90_ms"] and stats["n"] == SMALL["reps"]
        d = r["decode"]
        assert d["new_tokens"] == SMALL["new_tokens"]
        assert d["per_token"]["n"] == SMALL["decode_reps"] * (SMALL["new_tokens"] - 1)
        assert 0 < d["per_token"]["p50_ms"] <= d["per_token"]["p90_ms"]
        assert len(d["tok_s_runs"]) == SMALL["decode_reps"] and d["tok_s"] > 0
        assert r["session_s"] > 0
        assert r["peak_rss_mb"] >= r["rss_loaded_mb"] > 0
    # the decode ratio comes from one process that alternated both artifacts round by round
    from cusprun_edge.measure.bench import SIDE_BY_SIDE_QUICK

    side = cpu["side_by_side"]
    assert side["rounds"] == SIDE_BY_SIDE_QUICK["rounds"] and side["new_tokens"] == SIDE_BY_SIDE_QUICK["new_tokens"]
    for label in ("dense", "expert"):
        runs = side["tok_s_runs"][label]
        assert len(runs) == side["rounds"] and all(r > 0 for r in runs)
        assert side["decode_tok_s"][label] == pytest.approx(sorted(runs)[len(runs) // 2])
    s = record["speedup"]["CPUExecutionProvider"]["expert"]
    dense, expert = cpu["results"]["dense"], cpu["results"]["expert"]
    assert s["decode"] == pytest.approx(side["decode_tok_s"]["expert"] / side["decode_tok_s"]["dense"])
    assert s["decode_alone"] == pytest.approx(expert["decode"]["tok_s"] / dense["decode"]["tok_s"])
    assert s["prefill"]["32"] == pytest.approx(dense["prefill"]["32"]["p50_ms"] / expert["prefill"]["32"]["p50_ms"])


def test_bench_skips_missing_gpu_providers_with_reason(bench_record):
    record, _ = bench_record
    available = ort.get_available_providers()
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        entry = record["providers"][provider]
        if provider not in available:
            assert entry["status"] == "skipped"
            if not _gpu_package_installed():
                assert "onnxruntime-gpu not installed" in entry["reason"]
            assert provider not in record["speedup"]
        else:  # a GPU machine: measured, or skipped because the device did not initialise
            assert entry["status"] in ("measured", "skipped")


def test_bench_falls_back_to_onnxruntime_for_both(tiny_artifacts, tmp_path):
    """When GenAI cannot run one artifact, every artifact is measured with the same engine."""
    from cusprun_edge.measure.bench import bench

    no_genai = tmp_path / "expert-no-genai"
    shutil.copytree(tiny_artifacts["expert_art"], no_genai)
    (no_genai / "genai_config.json").unlink()
    record = bench([tiny_artifacts["dense_art"], no_genai], providers=["cpu"], quick=True,
                   settings={**SMALL, "prompt_lengths": [8]})
    cpu = record["providers"]["CPUExecutionProvider"]
    assert cpu["engine"] == "onnxruntime" and "genai_config.json" in cpu["engine_note"]
    assert {r["engine"] for r in cpu["results"].values()} == {"onnxruntime"}
    assert all(r["decode"]["tok_s"] > 0 for r in cpu["results"].values())


def test_bench_peak_memory_is_the_workers_own(tiny_artifacts):
    """The worker's peak RSS must not include the parent's memory (fork + exec inherits ru_maxrss)."""
    from cusprun_edge.measure.bench import bench

    ballast = np.ones(600 * 2**20 // 8)  # 600 MB touched in this process
    record = bench([tiny_artifacts["expert_art"]], providers=["cpu"], quick=True,
                   settings={**SMALL, "prompt_lengths": [8], "new_tokens": 4})
    peak = record["providers"]["CPUExecutionProvider"]["results"]["expert"]["peak_rss_mb"]
    assert 0 < peak < 600
    del ballast


def test_bench_target_providers(tiny_artifacts):
    """Without --providers the target profile's providers are benchmarked (CPU always)."""
    from cusprun_edge.measure.bench import bench

    record = bench([tiny_artifacts["expert_art"]], target="cuda-gpu", quick=True,
                   settings={**SMALL, "prompt_lengths": [8], "new_tokens": 4, "reps": 1, "decode_reps": 1})
    assert list(record["providers"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert record["providers"]["CPUExecutionProvider"]["status"] == "measured"


def test_cli_bench_quick(tiny_artifacts, tmp_path):
    out = tmp_path / "b.json"
    proc = run_cli("bench", "--artifact", tiny_artifacts["dense_art"], "--artifact", tiny_artifacts["expert_art"],
                   "--providers", "cpu,cuda", "--quick", "--threads", "1", "--out", out, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    assert record["settings"]["quick"] is True and record["settings"]["threads"] == 1
    assert record["providers"]["CPUExecutionProvider"]["status"] == "measured"
    assert "expert vs dense on CPUExecutionProvider: decode" in proc.stdout


def test_cli_bench_unknown_provider(tiny_artifacts):
    proc = run_cli("bench", "--artifact", tiny_artifacts["expert_art"], "--providers", "cpu,warp9")
    assert_one_line_error(proc, "warp9")


def test_cli_bench_artifact_without_manifest(tmp_path):
    proc = run_cli("bench", "--artifact", tmp_path)
    assert_one_line_error(proc, "manifest.json")


def test_cli_bench_bad_threads(tiny_artifacts):
    proc = run_cli("bench", "--artifact", tiny_artifacts["expert_art"], "--threads", "0")
    assert_one_line_error(proc, "--threads")


@pytest.mark.integration
def test_onnx_logits_fn_runs_the_builders_sliding_window_graph_from_an_empty_cache(tmp_path, monkeypatch):
    """The GenAI builder's Gemma 3 graph shares past and present buffers in its sliding-window layers, and ONNX
    Runtime refuses it buffers shorter than the window (an empty past; GenAI's max_length-sized ones). The
    runtimes size them to the window, zeros the attention mask leaves unread: logits equal PyTorch's."""
    from tiny import tiny_model

    from cusprun_edge.measure.baseline import builder_artifact
    from cusprun_edge.measure.runtime import GenaiCausalLM, OnnxCausalLM

    monkeypatch.setenv("CUSPRUN_EDGE_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_model("gemma3")
    model.save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    artifact = builder_artifact(str(tmp_path / "gemma"), precision="fp32")
    lm = OnnxCausalLM(artifact)
    torch.manual_seed(2)
    ids = torch.randint(3, 300, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    got = lm.logits_fn(ids, mask)
    assert lm.past_capacity == model.config.sliding_window  # the builder's graph needed the window
    with torch.no_grad():
        for b in range(2):
            keep = mask[b].bool()
            want = model(ids[b][keep][None]).logits[0]
            assert torch.allclose(got[b][keep], want, atol=1e-3), b
    # GenAI sizes the buffers by max_length, so a short generation there needs them as long as the window too
    genai = GenaiCausalLM(artifact)
    steps: list[float] = []
    new = genai.generate(list(range(20, 30)), 6, step_seconds=steps)
    assert genai.buffer_length == model.config.sliding_window and len(steps) == 6
    assert new == lm.generate(list(range(20, 30)), 6)
    assert genai.prefill(list(range(20, 30))) > 0
    from cusprun_edge.measure.generate import generate_texts

    answers = generate_texts(artifact, ["def add(a, b):"], max_new_tokens=5)
    assert 1 <= answers[0]["tokens"] <= 5
