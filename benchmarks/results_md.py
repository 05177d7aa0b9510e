"""Write benchmarks/RESULTS.md (and its plots) from the JSON files in benchmarks/results/."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .common import RESULTS

OUT = Path(__file__).resolve().parent / "RESULTS.md"
NOTES = RESULTS / "notes.md"  # hand-written reading of the last full run, kept beside its JSON


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _machine_line(m: dict) -> str:
    return (f"{m['date']}, {m['cpu']} ({m['cores']} cores, {m['memory_gb']} GB), torch {m['torch']}, "
            f"transformers {m['transformers']}, onnxruntime {m['onnxruntime']}, "
            f"onnxruntime-genai {m['onnxruntime_genai']}")


def _quality_plot(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(q["dense"])
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings) + 2.6, 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        by_method = defaultdict(list)
        for r in q["rows"]:
            if r["setting"] == setting:
                # from the perplexities: the stored retention is rounded to 4 decimals, 0 for collapsed models
                by_method[r["method"]].append((r["target_ratio"], q["dense"][setting]["expert_ppl"] / r["expert_ppl"]))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            style = dict(linewidth=2.5, color="black") if method == "cusprun" else dict(linewidth=1.2)
            if "[" in method:  # ablations: a recipe field swapped
                style["linestyle"] = "--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, **style)
        ax.set_title(setting)
        ax.set_xlabel("pruning ratio (non-embedding params)")
        ax.set_ylabel("ppl retention (dense/expert)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.legend(handles, labels, loc="center right", fontsize=8)  # outside the panels: lines stay visible
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality_section(q: dict, plot_name: str) -> list[str]:
    scoring = (f" One scoring pass over the calibration corpora took {q['scoring_seconds']} s."
               if q.get("scoring_seconds") else "")
    machines = q.get("machines") or [q["machine"]]
    lines = [f"Model: {q['model']}. " + " ".join(f"Machine: {_machine_line(m)}." for m in machines) + scoring, ""]
    on = defaultdict(int)
    for r in q["rows"]:
        on[_device_cell(r)] += 1
    if len(on) > 1:
        lines += ["Rows by where they ran (`on` column): " + ", ".join(f"{k} {v}" for k, v in on.items()) + " "
                  "(fp32 arithmetic on both; benchmarks/gpu_run.sh ran the GPU rows; the notes above compare the "
                  "cells measured on both).", ""]
    if q.get("partial"):
        lines += [f"**Partial run.** {q['note']}", ""]
    lines.append("Held-out text only (the `eval` parts, never used for scoring). Perplexity: lower is better; "
                 "retention = dense ppl / expert ppl (1.0 = no loss). MC: multiple-choice accuracy on the "
                 "expert's domain/task items (4 options, chance 0.25; each category's first 40 items, the 'MC retention, item by item' "
                 "section below has every item and a standard error).")
    lines.append("")
    for setting, dense in q["dense"].items():
        expert = next((r["expert"] for r in q["rows"] if r["setting"] == setting), None)
        if expert is None:  # a partial run that has not reached this setting's rows yet
            continue
        acc = f", MC acc {dense['mc_acc']:.3f}" if "mc_acc" in dense else ""
        lines += [f"### {setting} (`{expert}`)", "",
                  f"Dense: expert ppl {dense['expert_ppl']:.2f}, general ppl ({dense['general_corpus']}) "
                  f"{dense['general_ppl']:.2f}{acc}.", "",
                  "| ratio | method | achieved | expert ppl | retention | MC acc | general ppl | refit | prune s | on |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in q["rows"] if r["setting"] == setting),
                      key=lambda r: (r["target_ratio"], r["expert_ppl"]))
        for r in rows:
            name = f"**{r['method']}**" if r["method"] == "cusprun" else r["method"]
            name = f"*{name}* (ablation)" if r.get("ablation") else name
            achieved = "-" if r.get("achieved_ratio") is None else f"{r['achieved_ratio']:.3f}"
            lines.append(f"| {r['target_ratio']:.2f} | {name} | {achieved} | {r['expert_ppl']:.2f} | "
                         f"{r['ppl_retention']:.3f} | {r.get('mc_acc', float('nan')):.3f} | {r['general_ppl']:.2f} | "
                         f"{_refit_cell(r)} | {r.get('prune_seconds', '-')} | {_device_cell(r)} |")
        lines.append("")
    lines += [f"![retention vs ratio]({plot_name})", ""]
    return lines


def _device_cell(r: dict) -> str:
    """cpu, or the accelerator's name (rows of one table may come from a CPU and a GPU machine)."""
    d = r.get("device", "cpu")
    return d[d.index("(") + 1:-1].replace("NVIDIA ", "") if "(" in d else d


def _refit_cell(r: dict) -> str:
    """How the row's expert was reconstructed: mode, ridge, and the held-apart perplexity it was chosen on."""
    rec = r.get("reconstruction")
    if not rec:
        return "-"
    tried = {t["refit"]: t["tune_ppl"] for t in rec.get("tried", [])}
    if rec.get("mode") == "none":
        return "none" + (f" (tune {tried['none']:.2f} vs refit {tried['per-layer ridge']:.2f})"
                         if "none" in tried and "per-layer ridge" in tried else "")
    ridge = rec.get("ridge")
    ridge = ridge if isinstance(ridge, str) else f"ridge {ridge:g}"
    tune = (f", tune {tried['none']:.2f} -> {min(tried.values()):.2f}" if "none" in tried else "")
    return f"{rec['mode']}, {ridge}{tune}"


def _best(rows: list[dict], key: str, higher: bool) -> dict:
    missing = float("-inf") if higher else float("inf")  # a row without the measure never wins
    return (max if higher else min)(rows, key=lambda r: r.get(key, missing))


def _verdict(q: dict) -> list[str]:
    """Where Cus-Prun wins and where it does not, computed from the rows: against the best other published
    method on each measure, and against the ablations that swap the head policy."""
    groups = defaultdict(dict)
    for r in q["rows"]:
        groups[(r["setting"], r["target_ratio"])][r["method"]] = r
    table = ["| setting | ratio | rows compared | expert ppl: cusprun | best other | MC acc: cusprun | best other | "
             "general ppl: cusprun | best other |", "|---|---|---|---|---|---|---|---|---|"]
    wins = {"expert ppl": 0, "MC acc": 0, "general ppl": 0}
    n, lost, compared = 0, [], set()
    same_policy = []  # (cusprun ppl, wanda-sp with cusprun's head policy ppl)
    for (setting, ratio), methods in sorted(groups.items()):
        if "cusprun" not in methods:
            continue
        # every other method as published and with reconstruction switched: each at its own best setting
        others = [r for m, r in methods.items() if not m.startswith("cusprun")
                  and (not r.get("ablation") or "[reconstruct=" in m)]
        if not others:
            continue
        n += 1
        compared |= {r["method"].split("[")[0] for r in others}
        c = methods["cusprun"]
        cells = []
        for label, key, higher in (("expert ppl", "expert_ppl", False), ("MC acc", "mc_acc", True),
                                   ("general ppl", "general_ppl", False)):
            if key not in c:
                cells += ["-", "-"]
                continue
            b = _best(others, key, higher)
            won = c[key] >= b[key] if higher else c[key] <= b[key]
            wins[label] += won
            fmt = "{:.3f}" if key == "mc_acc" else "{:.2f}"
            cells += [("**" + fmt + "**" if won else fmt).format(c[key]), f"{b['method']} " + fmt.format(b[key])]
            if key == "expert_ppl" and not won:
                lost.append(f"{setting} at {ratio:.2f} ({b['method']} {b[key]:.2f} vs {c[key]:.2f})")
        table.append(f"| {setting} | {ratio:.2f} | {len(others)} | " + " | ".join(cells) + " |")
        swapped = methods.get("wanda-sp[head_policy=ffn_first]")
        if swapped:
            same_policy.append((c["expert_ppl"], swapped["expert_ppl"]))
    if not n:
        return []
    n_methods = len(compared)
    lines = [f"Cus-Prun against the best of the other {n_methods} published methods (each with and without "
             f"reconstruction where measured) in each of {n} "
             f"setting/ratio cells: lowest expert perplexity in {wins['expert ppl']}, highest multiple-choice "
             f"accuracy in {wins['MC acc']}, lowest general (out-of-expert) perplexity in {wins['general ppl']} "
             "(ties count as wins; bold = Cus-Prun best; `rows compared`: the other methods' rows measured in "
             "that cell, each with and without reconstruction where it applies).", ""]
    if lost:
        lines += ["Cells where another method has lower expert perplexity: " + "; ".join(lost) + ".", ""]
    if same_policy:
        beat = sum(c <= w for c, w in same_policy)
        lines += [f"Same head policy (FFN first) for both: cusprun's scores give lower expert perplexity than "
                  f"wanda-sp's in {beat} of {len(same_policy)} cells (rows `wanda-sp[head_policy=ffn_first]`).", ""]
    return lines + table + [""]


def _speed_section(s: dict) -> list[str]:
    from .speed import speed_markdown

    return speed_markdown(s)


def _builder_section(b: dict) -> list[str]:
    """Our dense int4 export beside ONNX Runtime GenAI's model builder (benchmarks/builder.py)."""
    lines = [f"{b['what']}. Held-out text: {b['held_out']}. {_machine_line(b['machine'])}" if "date" in b["machine"]
             else f"{b['what']}. Held-out text: {b['held_out']}.", "",
             "| artifact | ppl | top-1 vs fp32 | KL | decode tok/s (median of rounds) | decode vs builder | TTFT ms "
             "| files MB |",
             "|---|---|---|---|---|---|---|---|"]
    base = b["speed"].get("genai-builder int4", {}).get("decode_tok_s")
    for label, q in b["quality"].items():
        sp = b["speed"].get(label, {})
        rate = sp.get("decode_tok_s")
        lines.append(f"| {label} | {q['ppl']:.3f} | {q.get('top1_agreement', 1.0):.3f} | {q.get('kl', 0.0):.4f} | "
                     f"{rate if rate is None else f'{rate:.1f}'} | "
                     f"{f'{rate / base:.2f}x' if rate and base else '-'} | {sp.get('ttft_ms', float('nan')):.0f} | "
                     f"{b['file_mb'].get(label, float('nan'))} |")
    st = b["settings"]
    lines += ["", f"Speed: {st['rounds']} alternating rounds, {st['new_tokens']} new tokens after {st['prompt_tokens']} "
              f"prompt tokens, TTFT at {st['ttft_prompt_tokens']} tokens, {st['threads']} threads; the per-round "
              "figures are in builder.json (the machine was shared while this ran, so compare within a round).", ""]
    return lines


def _frontier_section(f: dict) -> list[str]:
    from .frontier import BUILDER, _measured

    points = sorted(_measured(f) if f.get("baseline") == BUILDER else [],
                    key=lambda p: (p["model"], p["setting"], p["vocab"] != "full", p["ratio"], p["vocab"]))
    if not points:
        return []
    sp = f["speed"]
    runs = sorted({(p["speed_rounds"], p.get("speed_run", "the expert with the builder and our dense"),
                    p["speed_date"]) for p in points})
    how = "; ".join(f"{n} rounds alternating {what} ({date})" for n, what, date in runs)
    lines = [_machine_line(f["machine"]) if "machine" in f else "", "",
             f"Each row is one {f['target']} int4 artifact ({f['plan']} plan) measured as it ships: perplexity per "
             "dense token on the eval split (each document cut at 512 dense tokens) through ONNX Runtime, against "
             "dense PyTorch fp32 and against ONNX Runtime GenAI's builder int4 of the dense model; decode speed "
             f"through onnxruntime_genai at {sp['threads']} threads, the median of {how}. `bytes` is the decode "
             "speed-up over the builder that the weights read per generated token predict.", "",
             "| model | setting | dense: fp32 ppl | builder int4 ppl | our dense int4 ppl |", "|---|---|---|---|---|"]
    for key, d in f["dense"].items():
        model, setting = key.split("/")
        lines.append(f"| {model} | {setting} | {d['fp32_ppl']:.2f} | {d['builder_ppl']:.2f} | {d['int4_ppl']:.2f} |")
    lines += ["", "| model | setting | ratio | vocabulary | ppl int4 (fp32) | / fp32 | / builder | decode vs builder | "
              "vs our dense | TTFT vs builder | bytes | files MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['model']} | {p['setting']} | {p['ratio']:.2f} | {p['vocab']} | {p['int4_ppl']:.2f} "
                     f"({p['fp32_ppl']:.2f}) | {p['ppl_ratio']:.2f} | {p['ppl_vs_builder']:.2f} | "
                     f"{p['decode_vs_builder']:.2f}x | {p['decode_vs_dense']:.2f}x | {p['ttft_vs_builder']:.2f}x | "
                     f"{p['bytes_vs_builder']:.2f}x | {p['file_bytes'] / 1e6:.1f} |")
    for group, entry in (f.get("summary") or {}).items():
        text = "; ".join(f"fastest within {name}: " + (
            f"{v['ratio']:.2f}/{v['vocab']}, decode {v['decode_vs_builder']:.2f}x the builder, perplexity "
            f"{v['ppl_ratio']:.2f}x fp32" if v else "none measured") for name, v in entry["fastest_within"].items())
        lines += ["", f"{group}: frontier {', '.join(entry['frontier'])}; {text}."]
    return lines + ["", "![frontier](results/frontier.png)", ""]


def _defaults_section(d: dict) -> list[str]:
    from .defaults import summary

    rows = summary(d)
    if not rows:
        return []
    lines = [_machine_line(d["machine"]) + (" **Partial run.**" if d.get("partial") else ""), "",
             "cusprun pruned under its default recipe and under one changed field at a time, each with its default "
             "reconstruction; the figure is the perplexity of the held-apart calibration documents (never the eval "
             "split) of the expert as it would ship. `vs default`: geometric mean over the settings where both "
             "were measured of the ratio to the default recipe's perplexity (below 1: better).", "",
             "| ratio | recipe | vs default | settings compared | held-apart ppl per setting |", "|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{s} {v:.2f}" for s, v in r["per_setting"].items())
        vs = "-" if r["vs_default"] is None else f"{r['vs_default']:.3f}"
        lines.append(f"| {r['ratio']:.2f} | {r['candidate']} | {vs} | {len(r['settings'])} | {per} |")
    return lines + [""]


def _scale_section(s: dict) -> list[str]:
    """Peak memory and time per command on the 1B-8B stand-ins (benchmarks/scale.py)."""
    m = s["machine"]
    lines = [f"Stand-ins with the published shapes and random bf16 weights (memory and time only, no quality), "
             f"scored on a user corpus of general-domain documents. {m.get('cpu')}, {m.get('cores')} cores, "
             f"last run {m['date']}. The stand-ins use SmolLM2's tokenizer (49,152 tokens), so the 8B one has 7.38B "
             "parameters, not 8.03B. `score`: the CLI, one decoder layer read from disk at a time; `score-whole`: the "
             "whole model loaded first (scoring before the layer loop); `prune`: the CLI's default recipe at 25% "
             "(damage probes, refit, edits), one layer at a time, with the recipe options shown; `export`: the "
             "int4 export of the dense stand-in (Python API), one layer at a time (rtn plan: 4-bit, rounded to nearest; "
             "the others take hours at 8B on 2 cores), its gate's limits opened since random weights fail any 4-bit "
             "gate: the artifact measured is the first level's, the one a real model ships when it passes; `build`: the whole `build --target x86-cpu --quant-plan rtn --ratio "
             "0.25`, its peak the largest of its stages' own (below the table; each stage resets the kernel's high-water "
             "mark, so /usr/bin/time's figure at exit can miss an earlier stage's).", "",
             "| model | parameters (B) | bf16 on disk GB | command | options | peak RSS GB | seconds | calibration tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        lines.append(f"| {r['model']} | {r['params_b']} | {r['bf16_gb_on_disk']} | {r['command']} | "
                     f"{'; '.join(r.get('options') or []) or '-'} | {r['peak_rss_gb']} | {r['seconds']} | {r['tokens']} |")
    lines += ["", *[f"{r['model']} {r['command']}: {r['note']}" for r in s["rows"] if r.get("note")]]
    for r in s["rows"]:
        if r.get("stages"):
            lines += ["", f"`build` of {r['model']}, per stage (its own time and peak, from stage.json):", "",
                      "| stage | seconds | peak RSS GB |", "|---|---|---|"]
            lines += [f"| {name} | {v['seconds']} | {v['peak_rss_gb']} |" for name, v in r["stages"].items()]
    return lines + [""]


def _prune_cost_section(c: dict) -> list[str]:
    """The prune stage's time and peak memory per model and device (benchmarks/prune_cost.py)."""
    lines = ["cusprun's default recipe (damage probes, then the sequential refit), en+general at 25%. On cuda the "
             "model stays on the CPU and one decoder layer at a time visits the GPU.", "",
             "| model | device | prune s | damage probes s | refit s | peak RSS MB | peak GPU MB | statistics MB | "
             "machine | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in c["entries"]:
        m = e["machine"]
        where = f"{m.get('gpu', m['cpu'])}, {m['date']}"
        lines.append(f"| {e['model']} | {e['device']} | {e['prune_seconds']} | {e['damage_seconds']} | "
                     f"{e['refit_seconds']} | {e['peak_rss_mb']} | {e.get('peak_cuda_mb') or '-'} | "
                     f"{e['statistics_mb']} | {where} | {e.get('note', '')} |")
    return lines + [""]


def _mc_section(m: dict) -> list[str]:
    """Multiple-choice retention item by item with its standard error (benchmarks/mc.py)."""
    where = _machine_line(m["machine"])
    lines = [f"Every held-out multiple-choice item of each setting's domain and task categories; retention = expert "
             f"accuracy / dense accuracy; SE by a paired bootstrap over items ({m['bootstrap_rounds']:,} resamples). "
             f"Machine: {where}, on {m['device']}.", "",
             "| ratio | method | mean retention (SE) | per setting: items, dense acc, expert acc, retention (SE) |",
             "|---|---|---|---|"]
    for r in m["rows"]:
        per = "; ".join(f"{name} {s['items']}, {s['dense_acc']:.3f}, {s['expert_acc']:.3f}, {s['retention']:.3f} "
                        f"({s['retention_se']:.3f})" for name, s in r["settings"].items())
        lines.append(f"| {r['target_ratio']:.2f} | {r['method']} | {r['mean_retention']:.3f} "
                     f"({r['mean_retention_se']:.3f}) | {per} |")
    return lines + [""]


def _gguf_section(g: dict) -> list[str]:
    """The expert as a GGUF in llama.cpp beside the dense source GGUF (benchmarks/gguf.py, the gguf stage's check)."""
    ex, ppl, sp = g["export"], g["ppl"], g["speed"]
    d, e = sp["models"]["dense"], sp["models"]["expert"]
    par, gr, cp = g["parity"], g["greedy"], g["copied_blocks"]
    dense_par, dense_gr = g["dense_vs_pytorch"]["parity"], g["dense_vs_pytorch"]["greedy"]
    return [
        f"{g['what'][:1].upper()}{g['what'][1:]}: expert `{g['expert']['spec']}` ({g['expert']['method']}, "
        f"{g['expert']['achieved_ratio']:.1%} of prunable parameters removed), llama-cpp-python "
        f"{g['machine']['llama_cpp_python']}. {_machine_line(g['machine'])}", "",
        "| GGUF | held-out ppl (llama.cpp) | decode tok/s | prefill tok/s | file MB | top-1 vs PyTorch | greedy identical |",
        "|---|---|---|---|---|---|---|",
        f"| dense source (Q4_1, Q8_0 embedding) | {ppl['dense']['ppl']:.2f} | {d['decode_tok_s']:.1f} | "
        f"{d['prefill_tok_s']:.0f} | {ex['dense_bytes'] / 2**20:.1f} | {dense_par['top1_agreement']:.3f} | "
        f"{dense_gr['identical']}/{dense_gr['prompts']} |",
        f"| expert ({ex['architecture']}) | {ppl['expert']['ppl']:.2f} | {e['decode_tok_s']:.1f} | "
        f"{e['prefill_tok_s']:.0f} | {ex['bytes'] / 2**20:.1f} | {par['top1_agreement']:.3f} | "
        f"{gr['identical']}/{gr['prompts']} |", "",
        f"Expert/dense: perplexity {ppl['ratio']:.3f}x, decode {sp['decode_speedup']:.2f}x, prefill "
        f"{sp['prefill_speedup']:.2f}x ({sp['threads']} threads, {sp['rounds']} alternating rounds of "
        f"{sp['prompt_tokens']} prompt and {sp['decode_tokens']} decoded tokens, medians; per-round figures in "
        f"gguf.json). Held-out: the expert's eval split, {ppl['dense']['tokens']} tokens, each file's own "
        f"tokenizer. Export: {ex['counts']['copied']} weights copied from the source GGUF "
        f"({cp['rows']} rows checked byte for byte), {ex['counts']['requantized']} re-quantized to "
        f"{ex['requant'].upper()}, {len(ex['fallbacks'])} fell back. Each file against its own model in PyTorch "
        f"fp32 on {par['positions']} held-out positions ({par['settings']}): largest logit difference "
        f"{par['max_abs_diff']:.3f} for the expert, {dense_par['max_abs_diff']:.3f} for dense; greedy answers "
        f"({gr['max_new_tokens']} new tokens) agree for the first "
        f"{', '.join(str(r['agree_tokens']) for r in gr['rows'])} tokens (expert) and "
        f"{', '.join(str(r['agree_tokens']) for r in dense_gr['rows'])} (dense). llama.cpp runs the expert as "
        f"faithfully as the dense GGUF users run today: {'yes' if g['faithful']['passed'] else 'no'} (top-1 "
        f"within {g['faithful']['tolerance_top1']} of dense's).", ""] + ([f"**{g['note']}**", ""] if g.get("note") else [])


def write_results_md() -> Path:
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`python -m benchmarks`) from `benchmarks/results/*.json`; every figure "
             "below was measured on the machine named with it.", ""]
    runs = [r for r in (_load("run.json"), _load("run-quick.json")) if r]
    if runs:
        lines += ["Wall-clock time of the last complete runs on this machine: " + "; ".join(
            f"`{r['command']}` {r['seconds'] / 60:.1f} min ({r['date']}"
            + (", before reconstruction and the frontier were added: the benchmark is far larger now"
               if r["date"] < "2026-11-30" else "") + ")" for r in runs) + ".", ""]
    if NOTES.exists():
        lines += ["## Reading the results", "", NOTES.read_text().strip(), ""]
    quality_files = ["quality.json"] + sorted(p.name for p in RESULTS.glob("quality-*.json"))
    for name in quality_files:
        q = _load(name)
        if q:
            title = "Quality" if name == "quality.json" else f"Quality: {q['model']}" + (
                " (quick mode)" if q.get("quick") else "")
            plot = name.replace(".json", ".png")
            _quality_plot(q, RESULTS / plot)
            stale = ["**Measured 2026-11-24, before reconstruction and the held-apart split; not re-run since.**", ""] \
                if q["machine"]["date"] < "2026-11-30" else []
            lines += [f"## {title}", ""] + stale + _verdict(q) + _quality_section(q, f"results/{plot}")
    mc = _load("mc_retention.json")
    if mc:
        lines += ["## MC retention, item by item", ""] + _mc_section(mc)
    frontier = _load("frontier.json")
    if frontier:
        lines += ["## Speed/quality frontier", ""] + _frontier_section(frontier)
    defaults = _load("defaults.json")
    if defaults:
        lines += ["## How cusprun's defaults were chosen", ""] + _defaults_section(defaults)
    cost = _load("prune_cost.json")
    if cost:
        lines += ["## What the prune stage costs", ""] + _prune_cost_section(cost)
    scale = _load("scale.json")
    if scale:
        lines += ["## 1B-8B models on this host (stand-ins)", ""] + _scale_section(scale)
    builder = _load("builder.json")
    if builder:
        lines += ["## Our int4 export beside ONNX Runtime GenAI's model builder", ""] + _builder_section(builder)
    gguf = _load("gguf.json")
    if gguf and "dense_vs_pytorch" not in gguf:  # written before the check measured the dense pair: re-run it
        lines += ["## The expert in llama.cpp (GGUF)", "", "`gguf.json` predates the current check; run "
                  "`python -m benchmarks gguf` to measure it again.", ""]
    elif gguf:
        lines += ["## The expert in llama.cpp (GGUF)", ""] + _gguf_section(gguf)
    for name, title in (("speed.json", "Speed"), ("speed-quick.json", "Speed (quick mode)")):
        s = _load(name)
        if s:
            stale = s["machine"]["date"] < "2026-11-30"  # before the int4 precision plan and the reconstruction
            lines += [f"## {title}", ""] + (
                ["**Measured with the previous export (plain int4, no reconstruction); not re-run since.**", ""]
                if stale else []) + _speed_section(s)
    OUT.write_text("\n".join(lines) + "\n")
    return OUT
