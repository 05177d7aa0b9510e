"""The accelerator paths prune like the CPU: a model held on the GPU (the benchmarks' --device cuda), and a model
on the CPU with one layer at a time on the GPU (`prune --device cuda`). Skipped where there is no CUDA device;
run on the GPU machine by benchmarks/gpu_run.sh."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import TEXT, tiny_model

from cusprun_edge.config.corpora import Corpus
from cusprun_edge.measure.evaluate import mc_accuracy, perplexity, torch_logits_fn
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CORPORA = {"domain/a": Corpus("domain/a", TEXT[:40], tune=TEXT[40:55])}
EVAL = TEXT[55:70]
ITEMS = [{"question": "Which animal jumps over the lazy dog?", "options": ["the fox", "the court"], "answer": 0},
         {"question": "What did the court hold?", "options": ["a fever", "the contract was void"], "answer": 1}]
CASES = [("cusprun", {}), ("cusprun", {"reconstruct": "none"}), ("flap", {}),
         ("wanda-sp", {"reconstruct": "sequential"}), ("magnitude", {}), ("shortgpt", {})]


@pytest.mark.parametrize("method,options", CASES)
def test_pruning_on_cuda_matches_the_cpu(method, options):
    model, tok = tiny_model("llama")
    scores = score_model(model, tok, CORPORA, show_progress=False)
    kw = dict(tokenizer=tok, corpora=CORPORA)
    cpu = copy.deepcopy(model)
    rec_cpu = prune_model(cpu, scores, ["domain/a"], method, 0.3, dict(options), **kw)
    want = perplexity(torch_logits_fn(cpu), tok, EVAL)

    held = copy.deepcopy(model).cuda()  # the whole model on the GPU, scored there too
    rec_held = prune_model(held, score_model(held, tok, CORPORA, show_progress=False), ["domain/a"], method, 0.3,
                           dict(options), **kw)
    layerwise = copy.deepcopy(model)  # on the CPU, its layers visiting the GPU one at a time
    rec_lw = prune_model(layerwise, scores, ["domain/a"], method, 0.3, dict(options), device="cuda", **kw)

    assert all(p.device.type == "cpu" for p in layerwise.parameters())
    assert rec_lw["peak_cuda_mb"] > 0 and rec_held["peak_cuda_mb"] > 0
    for rec, m in ((rec_held, held), (rec_lw, layerwise)):
        assert rec["achieved_ratio"] == pytest.approx(rec_cpu["achieved_ratio"], abs=0.01)
        assert rec["reconstruction"].get("mode") == rec_cpu["reconstruction"].get("mode")
        got = perplexity(torch_logits_fn(m, on_device=True), tok, EVAL)
        assert got == pytest.approx(want, rel=0.02)
    # the measures reduce logits where the model is: the same expert scores the same on either device
    on_gpu = copy.deepcopy(cpu).cuda()
    assert perplexity(torch_logits_fn(on_gpu, on_device=True), tok, EVAL) == pytest.approx(want, rel=1e-4)
    assert mc_accuracy(torch_logits_fn(on_gpu, on_device=True), tok, ITEMS) == mc_accuracy(
        torch_logits_fn(cpu), tok, ITEMS)
