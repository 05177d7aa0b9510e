"""The report's tables as (title, header, rows) of strings, shared by the Markdown and the HTML."""

from __future__ import annotations

from pathlib import Path

from .collect import artifact_ppl, decode_rate, generation_rows
from .fmt import fmt, fmt_ratio, megabytes, ratio
from .verdict import shipping_baseline


def rate(result: dict) -> str:
    return f"{result['tok_s']:.1f} tok/s" if result.get("tok_s") else "- tok/s"



def stages_table(data: dict):
    """Each stage's wall time and peak resident memory, as the build recorded them (a stage skipped as
    unchanged shows the run that made it)."""
    rows = [[name, f"{rec['seconds']:.1f}" if rec.get("seconds") is not None else "-",
             f"{rec['peak_rss_mb'] / 1024:.2f}" if rec.get("peak_rss_mb") is not None else "-"]
            for name, rec in (data.get("stages") or {}).items()]
    if not rows:
        return None
    scope = {rec.get("peak_rss_scope") for rec in data["stages"].values()} - {None}
    title = "Stages: time and peak memory" + (" (peak of the process so far, not per stage, on this platform)"
                                               if "process" in scope else "")
    return title, ["stage", "seconds", "peak resident memory (GB)"], rows


def tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report (markdown and HTML alike)."""
    d, e = data["dense"], data["expert"]
    out = []

    def params(side):
        return (side.get("params") or {}).get("total")

    summary = [
        ["parameters", fmt(params(d)), fmt(params(e)), fmt(ratio(params(e), params(d)))],
        ["model files", megabytes(d.get("file_bytes")), megabytes(e.get("file_bytes")), fmt(ratio(e.get("file_bytes"), d.get("file_bytes")))],
        ["precision", fmt(d.get("precision")), fmt(e.get("precision")), ""],
    ]
    if e.get("achieved_ratio") is not None:
        summary.append(["pruned (method, achieved ratio)", "", f"{e.get('method')}, {e['achieved_ratio']:.1%}", ""])
    out.append(("Summary", ["", "dense", "expert", "expert / dense"], summary))

    rows = []
    for cat in e.get("eval", {}):
        de, ee, ret = d["eval"].get(cat, {}), e["eval"][cat], data["retention"].get(cat, {})
        rows.append([cat, fmt(de.get("ppl"), 4), fmt(ee.get("ppl"), 4), fmt_ratio(ret.get("ppl")),
                     fmt_ratio(de.get("acc")), fmt_ratio(ee.get("acc")), fmt_ratio(ret.get("acc"))])
    if rows:
        out.append(("Held-out quality (eval split, never used for scoring)",
                    ["category", "dense ppl", "expert ppl", "ppl retention", "dense acc", "expert acc", "acc retention"],
                    rows))
        ret = data["retention"]
        out.append(("Agreement with dense", ["top-1 next-token agreement", "mean KL(dense || expert)"],
                    [[fmt_ratio(ret.get("top1_agreement")), fmt(ret.get("kl"))]]))

    for extra in (_baseline_table(data), _checks_table(data), three_way_table(data.get("three_way")),
                  search_table(data), _vocab_table(data), llama_cpp_table(data), _speed_limit_table(data),
                  stages_table(data)):
        if extra:
            out.append(extra)

    rows = []
    for provider in d.get("latency", {}):
        for side_name, side in (("dense", d), ("expert", e)):
            lat = side["latency"].get(provider)
            if not lat:
                continue
            prefill = ", ".join(f"{n}: {v:.1f}" for n, v in lat["prefill_ms"].items())
            rows.append([provider.replace("ExecutionProvider", ""), side_name, lat.get("engine") or "-", prefill,
                         f"{lat['decode_ms_p50']:.2f} / {lat['decode_ms_p90']:.2f}", f"{lat['decode_tok_s']:.1f}",
                         fmt(lat.get("peak_rss_mb")), fmt(lat.get("session_s"))])
    for provider, reason in data.get("skipped_providers", {}).items():
        rows.append([provider.replace("ExecutionProvider", ""), "skipped", reason, "", "", "", "", ""])
    if rows:
        alternating = any(lat.get("decode_alternating") for side in (d, e) for lat in side["latency"].values())
        out.append(("Latency (p50 after warm-up; each artifact in its own process"
                    + ("; decode tok/s from one process alternating every artifact round by round)" if alternating
                       else ")"),
                    ["provider", "model", "engine", "prefill ms by prompt tokens", "decode ms/token p50 / p90",
                     "decode tok/s", "peak RSS MB", "session s"], rows))
    rows = []
    for provider, s in data.get("speedup", {}).items():
        prefill = ", ".join(f"{n}: {v:.2f}x" for n, v in s.get("prefill", {}).items())
        rows.append([provider.replace("ExecutionProvider", ""), prefill,
                     f"{s['decode']:.2f}x" if "decode" in s else "-",
                     fmt(s.get("memory"))])
    if rows:
        out.append(("Speed-up of the expert (dense / expert latency; tok/s ratio)",
                    ["provider", "prefill", "decode", "peak memory expert/dense"], rows))
    rows = []
    for side, parity in data.get("parity", {}).items():
        for precision, p in (parity or {}).items():
            rows.append([side, precision, fmt(p.get("passed")), fmt(p.get("max_abs_diff")), fmt(p.get("rel_rms")),
                         fmt(p.get("top1_agreement"))])
    if rows:
        out.append(("Export parity (ONNX vs PyTorch)",
                    ["model", "precision", "passed", "max |diff|", "relative RMS", "top-1 agreement"], rows))
    points = data.get("quality_vs_ratio") or []
    if points:
        out.append(("Quality vs ratio", ["build", "method", "target", "achieved", "ppl retention", "acc retention"],
                    [[Path(p["build"]).name, fmt(p["method"]), fmt(p["target_ratio"]), f"{p['achieved_ratio']:.1%}",
                      fmt_ratio(p["ppl_retention"]), fmt_ratio(p["acc_retention"])] for p in points]))
    m = data.get("machine") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items())
    out.append(("Machine", ["cpu", "cores", "memory", "platform", "packages", "report date"],
                [[fmt(m.get("cpu")), fmt(m.get("cores")), f"{m.get('memory_gb')} GB", fmt(m.get("platform")),
                  packages, data["date"]]]))
    return out



def _baseline_table(data: dict):
    """The expert beside the dense artifacts a user could ship instead, with the same figures."""
    base = data.get("baseline")
    if not base:
        return None
    if base.get("missing"):
        return ("What users ship today", ["", "why not measured"], [["GenAI builder int4", base["missing"]]])
    chosen = shipping_baseline(data)
    provider = (chosen or {}).get("provider") or next(iter(base.get("latency") or {}), None)
    rows = []
    for side, label, record in (("baseline", base["label"], base), ("dense", "our dense export", data["dense"]),
                                ("expert", "expert", data["expert"])):
        rate, ppl = decode_rate(record, provider) if provider else None, artifact_ppl(data, side)
        rows.append([label + (" (the baseline)" if chosen and chosen["side"] == side else ""), fmt(ppl, 4),
                     f"{rate:.1f}" if rate else "-",
                     f"{rate / chosen['decode_tok_s']:.2f}x" if rate and chosen else "-", megabytes(record.get("file_bytes"))])
    where = provider.replace("ExecutionProvider", "") if provider else "-"
    alternating = provider and all(((r.get("latency") or {}).get(provider) or {}).get("decode_alternating")
                                   for r in (base, data["dense"], data["expert"]))
    how = "decode alternating the three in one process" if alternating else "one bench run"
    return (f"What users ship today: held-out perplexity and decode on {where}, {how}",
            ["artifact", "held-out ppl", "decode tok/s", "decode vs baseline", "model files"], rows)


def _checks_table(data: dict):
    """Checked answers (data/calib/checks.json) and looping answers per artifact."""
    gens = data.get("generations") or {}
    checks = gens.get("checks")
    if not checks:
        return None
    rows = []
    for label, right in checks.get("right", {}).items():
        loops = (gens.get("looping") or {}).get(label)
        rows.append([label, f"{right} of {checks['of']}", "-" if loops is None else
                     f"{loops} of {len(generation_rows(data))}"])
    return ("Answers that can be checked (greedy, first "
            f"{checks.get('new_tokens')} tokens) and answers that loop (>= 30% repeated word 4-grams)",
            ["artifact", "checked answers right", "looping answers"], rows)


def _speed_limit_table(data: dict):
    """Measured decode speed-up next to the one the weight bytes read per token predict."""
    read = data.get("weights_read") or {}
    if not (read.get("dense") and read.get("expert")):
        return None
    predicted = read["dense"] / read["expert"]
    rows = []
    for provider, s in (data.get("speedup") or {}).items():
        if "decode" in s:
            gap = s["decode"] / predicted - 1
            rows.append([provider.replace("ExecutionProvider", ""), megabytes(read["dense"]), megabytes(read["expert"]),
                         f"{predicted:.2f}x", f"{s['decode']:.2f}x", f"{gap:+.0%}"])
    if not rows:
        rows.append(["-", megabytes(read["dense"]), megabytes(read["expert"]), f"{predicted:.2f}x", "not measured", ""])
    return ("Decode speed against its memory-traffic limit (weights read per generated token)",
            ["provider", "dense reads", "expert reads", "speed-up the bytes predict", "measured", "measured vs predicted"],
            rows)


def search_table(data: dict):
    """The quality-target build: the ratio the search chose on held-apart documents, and whether the
    untouched eval split confirms it."""
    search = data.get("ratio_search")
    if not search:
        return None
    limit = search["max_ppl_ratio"]
    rows = [[f"{p['ratio']:.3f}", f"{p['ppl_ratio']:.3f}", "yes" if p["passed"] else "no", f"{p['seconds']:.0f}"]
            for p in search["points"]]
    ret = ((data.get("retention") or {}).get("overall") or {}).get("ppl")
    if ret:
        got = 1 / ret
        verdict = ("confirmed" if got <= limit else f"missed by {got / limit - 1:.1%}")
        rows.append([f"chosen {search['ratio']:.3f}", f"eval split: {got:.3f}", verdict, f"search {search['seconds']:.0f} s"])
    return (f"Quality-target search: largest ratio with perplexity <= {limit}x dense on held-apart calibration text",
            ["ratio", "ppl / dense", f"within {limit}x", "seconds"], rows)


def _vocab_table(data: dict):
    vocab = data.get("vocab")
    if not vocab:
        return None
    rows = [[name, f"{cov:.4%}"] for name, cov in (vocab.get("coverage") or {}).items()]
    return (f"Vocabulary pruning ({vocab['vocab_before']:,} -> {vocab['vocab_after']:,} tokens; rule: {vocab.get('rule')}): "
            "share of held-out tokens the kept vocabulary contains", ["text", "coverage"], rows)


def llama_cpp_table(data: dict):
    """`--format gguf`: the expert's GGUF and the dense source GGUF, both run in llama.cpp in one run."""
    rec = data.get("gguf")
    if not rec or "ppl" not in rec:
        return None
    speed, ppl = rec["speed"], rec["ppl"]
    dense_par = (rec.get("dense_vs_pytorch") or {}).get("parity") or {}
    dense_greedy = (rec.get("dense_vs_pytorch") or {}).get("greedy") or {}

    def greedy(g):
        return f"{g['identical']}/{g['prompts']}" if g else "-"

    rows = [["held-out perplexity (eval split)", fmt(ppl["dense"]["ppl"], 4), fmt(ppl["expert"]["ppl"], 4),
             fmt_ratio(ppl["ratio"])],
            [f"decode tokens/s ({speed['threads']} threads, alternating)",
             fmt(speed["models"]["dense"]["decode_tok_s"], 4), fmt(speed["models"]["expert"]["decode_tok_s"], 4),
             fmt_ratio(speed["decode_speedup"])],
            ["file", megabytes(rec.get("dense_bytes")), megabytes((rec.get("export") or {}).get("bytes")), ""],
            ["top-1 agreement with PyTorch (held-out)", fmt(dense_par.get("top1_agreement")),
             fmt(rec["parity"]["top1_agreement"]), ""],
            ["greedy answers identical to PyTorch's", greedy(dense_greedy), greedy(rec.get("greedy")), ""]]
    return (f"llama.cpp: {rec.get('summary', 'GGUF')}", ["", "dense source GGUF", "expert GGUF", "expert / dense"],
            rows)


def three_way_table(three: dict | None):
    """What quantization costs and what pruning costs, apart: each model against dense fp32 (PyTorch)."""
    if not three:
        return None
    precision = three.get("precision") or "target precision"
    rows = [[label, fmt(three[key]["ppl"], 4), fmt_ratio(three[key]["top1_agreement"]), fmt(three[key]["kl"])]
            for key, label in (("dense_fp32", "dense, fp32 (PyTorch)"), ("dense_quantized", f"dense, {precision} (ONNX)"),
                               ("expert_quantized", f"expert, {precision} (ONNX)"))]
    return (f"Quantization vs pruning (held-out text, against dense fp32; {three.get('tokens')} tokens)",
            ["model", "ppl", "top-1 agreement", "KL(dense fp32 || model)"], rows)
