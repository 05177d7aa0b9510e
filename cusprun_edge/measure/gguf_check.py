"""The expert's GGUF checked in llama.cpp itself, for the `gguf` stage (`build --format gguf`).

The stage writes `<out>/gguf/expert/model.gguf` (export/gguf.py) and `<out>/gguf/gguf.json`: logit parity against the
expert in PyTorch fp32 on held-out text, greedy answers to the report's prompts beside PyTorch's, held-out
perplexity of the expert GGUF and of the dense GGUF, and prefill/decode speed of both in alternating rounds.
The dense GGUF is the source GGUF the model came from (what a llama.cpp user runs today), or the dense model
written by the same exporter when it did not come from one. Without llama-cpp-python the GGUF is still
written and the record says why it was not checked.
"""

from __future__ import annotations

from pathlib import Path

RECORD_FILE = "gguf.json"
PARITY_DOCS = 8  # held-out documents for the logit comparison (first 512 tokens each)
SPEED_ROUNDS = 3
FAITHFUL_TOP1 = 0.02  # the expert GGUF's top-1 agreement with PyTorch may trail the dense pair's by this


def check_in_llama_cpp(model, tokenizer, expert_gguf: Path, dense_gguf: Path, eval_texts: list[str],
                       prompts: list[str], *, threads: int = 2, rounds: int = SPEED_ROUNDS, on_step=None,
                       dense=None) -> dict:
    """Parity, greedy answers, held-out perplexity and speed of the expert GGUF (see the module docstring).

    The same parity and greedy comparison is made for the dense GGUF against the dense model in PyTorch
    (`dense`: (model, tokenizer); loaded from `dense_gguf` when None): llama.cpp quantizes activations inside
    its matmuls, so even the GGUF a user runs today drifts from PyTorch over a long greedy answer. The expert's
    tolerance is that drift (`faithful`): its top-1 agreement on held-out positions within FAITHFUL_TOP1 of
    the dense pair's."""
    from .llamacpp import alternating_speed, greedy_agreement, held_out_nll, parity

    def step(name):
        if on_step:
            on_step(name)

    step("parity")
    docs = [tokenizer(t)["input_ids"][:512] for t in eval_texts[:PARITY_DOCS]]
    par = parity(model, expert_gguf, docs, threads=threads, exact=True)
    step("greedy answers")
    greedy = greedy_agreement(model, tokenizer, expert_gguf, prompts, threads=threads)
    step("dense: parity and greedy answers")
    if dense is None:
        from ..model.load import load_model

        dense = load_model(str(dense_gguf))
    dmodel, dtok = dense
    ddocs = [dtok(t)["input_ids"][:512] for t in eval_texts[:PARITY_DOCS]]
    dense_par = parity(dmodel, dense_gguf, ddocs, threads=threads, exact=True)
    dense_greedy = greedy_agreement(dmodel, dtok, dense_gguf, prompts, threads=threads)
    step("perplexity")
    ppl = {"expert": held_out_nll(expert_gguf, eval_texts, threads=threads),
           "dense": held_out_nll(dense_gguf, eval_texts, threads=threads)}
    step("speed")
    speed = alternating_speed({"dense": dense_gguf, "expert": expert_gguf}, "\n\n".join(eval_texts),
                              rounds=rounds, threads=threads)
    d, e = speed["models"]["dense"], speed["models"]["expert"]
    return {"parity": {**par, "settings": "flash attention off, fp32 KV cache"}, "greedy": greedy,
            "dense_vs_pytorch": {"parity": dense_par, "greedy": dense_greedy},
            "faithful": faithful(par, greedy, dense_par, dense_greedy),
            "ppl": {**ppl, "ratio": ppl["expert"]["ppl"] / ppl["dense"]["ppl"]},
            "speed": {**speed, "decode_speedup": e["decode_tok_s"] / d["decode_tok_s"],
                      "prefill_speedup": e["prefill_tok_s"] / d["prefill_tok_s"]}}


def _mean_agreed(greedy: dict) -> float:
    rows = greedy["rows"]
    return sum(r["agree_tokens"] for r in rows) / max(len(rows), 1)


def faithful(par: dict, greedy: dict, dense_par: dict, dense_greedy: dict) -> dict:
    """Does llama.cpp run the expert as faithfully as it runs the dense source GGUF? Top-1 agreement with
    PyTorch on held-out positions within FAITHFUL_TOP1 of the dense pair's; the greedy answers' agreed prefix
    is reported beside it (a greedy answer amplifies one flipped token into a different continuation)."""
    return {"passed": par["top1_agreement"] >= dense_par["top1_agreement"] - FAITHFUL_TOP1,
            "tolerance_top1": FAITHFUL_TOP1,
            "top1": {"expert": par["top1_agreement"], "dense": dense_par["top1_agreement"]},
            "greedy_identical": {"expert": f"{greedy['identical']}/{greedy['prompts']}",
                                 "dense": f"{dense_greedy['identical']}/{dense_greedy['prompts']}"},
            "greedy_mean_agreed_tokens": {"expert": _mean_agreed(greedy), "dense": _mean_agreed(dense_greedy)}}
