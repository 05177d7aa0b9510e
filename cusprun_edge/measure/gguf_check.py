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


def check_in_llama_cpp(model, tokenizer, expert_gguf: Path, dense_gguf: Path, eval_texts: list[str],
                       prompts: list[str], *, threads: int = 2, rounds: int = SPEED_ROUNDS, on_step=None) -> dict:
    """Parity, greedy answers, held-out perplexity and speed of the expert GGUF (see the module docstring)."""
    from .llamacpp import alternating_speed, greedy_agreement, held_out_nll, parity

    def step(name):
        if on_step:
            on_step(name)

    step("parity")
    docs = [tokenizer(t)["input_ids"][:512] for t in eval_texts[:PARITY_DOCS]]
    par = parity(model, expert_gguf, docs, threads=threads, exact=True)
    step("greedy answers")
    greedy = greedy_agreement(model, tokenizer, expert_gguf, prompts, threads=threads)
    step("perplexity")
    ppl = {"expert": held_out_nll(expert_gguf, eval_texts, threads=threads),
           "dense": held_out_nll(dense_gguf, eval_texts, threads=threads)}
    step("speed")
    speed = alternating_speed({"dense": dense_gguf, "expert": expert_gguf}, "\n\n".join(eval_texts),
                              rounds=rounds, threads=threads)
    d, e = speed["models"]["dense"], speed["models"]["expert"]
    return {"parity": {**par, "settings": "flash attention off, fp32 KV cache"}, "greedy": greedy,
            "ppl": {**ppl, "ratio": ppl["expert"]["ppl"] / ppl["dense"]["ppl"]},
            "speed": {**speed, "decode_speedup": e["decode_tok_s"] / d["decode_tok_s"],
                      "prefill_speedup": e["prefill_tok_s"] / d["prefill_tok_s"]}}


