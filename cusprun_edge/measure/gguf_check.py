"""Pipeline stage `gguf` (`build --format gguf` registers it after the others): the expert as a GGUF for
llama.cpp, checked in llama.cpp itself.

Writes `<out>/gguf/expert/model.gguf` (export/gguf.py) and `<out>/gguf/gguf.json`: logit parity against the
expert in PyTorch fp32 on held-out text, greedy answers to the report's prompts beside PyTorch's, held-out
perplexity of the expert GGUF and of the dense GGUF, and prefill/decode speed of both in alternating rounds.
The dense GGUF is the source GGUF the model came from (what a llama.cpp user runs today), or the dense model
written by the same exporter when it did not come from one. Without llama-cpp-python the GGUF is still
written and the record says why it was not checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from .stages import Stage

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


class GGUFStage(Stage):
    name = "gguf"
    depends = ("prune",)

    def config_keys(self):
        return ("model", "expert", "prompts", "threads")

    def run(self, ctx, work: Path) -> dict:
        from .corpora import ExpertSpec
        from .expert_io import load_expert
        from .export.gguf import GGUF_FILE, export_gguf, source_gguf_for, summary_line
        from .generate import prompts_for
        from .llamacpp import missing

        ctx.progress.start("gguf: export", total=6)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
        source = source_gguf_for(ctx.config.model)
        manifest = export_gguf(expert, etok, work / "expert", source=ctx.config.model, source_gguf=source)
        ctx.progress.update(advance=1)
        if source is None:  # no source GGUF: the dense model through the same writer
            model, tok = ctx.dense()
            export_gguf(model, tok, work / "dense")
            dense_gguf = ctx.stage_dir(self.name) / "dense" / GGUF_FILE  # where it lies once the stage is renamed
            dense_now = work / "dense" / GGUF_FILE
        else:
            dense_gguf = dense_now = source
        record = {"expert_gguf": f"expert/{GGUF_FILE}", "dense_gguf": str(dense_gguf),
                  "export": {k: manifest[k] for k in ("architecture", "bytes", "counts", "fallbacks", "requant")},
                  "summary": summary_line(manifest)}
        reason = missing()
        if reason:
            record["checked"] = f"not checked in llama.cpp: {reason}"
        else:
            corpora = ExpertSpec.parse(ctx.config.expert).corpora()
            eval_texts = [t for c in corpora.values() for t in c.eval]
            prompts = [p["prompt"] for p in prompts_for(ctx.config.expert, ctx.config.prompts)]
            record["checked"] = "llama.cpp"
            record |= check_in_llama_cpp(expert, etok, work / "expert" / GGUF_FILE, dense_now, eval_texts, prompts,
                                         threads=ctx.config.threads or 2,
                                         on_step=lambda s: ctx.progress.update(description=f"gguf: {s}", advance=1))
        (work / RECORD_FILE).write_text(json.dumps(record, indent=2))
        out = {"file": RECORD_FILE, "summary": record["summary"], "checked": record["checked"]}
        if "ppl" in record:
            out |= {"ppl_ratio": record["ppl"]["ratio"], "decode_speedup": record["speed"]["decode_speedup"],
                    "greedy_identical": f"{record['greedy']['identical']}/{record['greedy']['prompts']}",
                    "max_abs_logit_diff": record["parity"]["max_abs_diff"]}
        return out
