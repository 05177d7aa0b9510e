"""Write benchmarks/RESULTS.md (and its plots) from the JSON files in benchmarks/results/."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .common import RESULTS

OUT = Path(__file__).resolve().parent / "RESULTS.md"


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
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        by_method = defaultdict(list)
        for r in q["rows"]:
            if r["setting"] == setting:
                by_method[r["method"]].append((r["target_ratio"], r["ppl_retention"]))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            style = dict(linewidth=2.5, color="black") if method == "cusprun" else dict(linewidth=1.2)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, **style)
        ax.set_title(setting)
        ax.set_xlabel("pruning ratio (non-embedding params)")
        ax.set_ylabel("ppl retention (dense/expert)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quality_section(q: dict, plot_name: str) -> list[str]:
    scoring = (f" One scoring pass over the calibration corpora took {q['scoring_seconds']} s."
               if q.get("scoring_seconds") else "")
    lines = [f"Model: {q['model']}. Machine: {_machine_line(q['machine'])}.{scoring}", ""]
    if q.get("partial"):
        lines += [f"**Partial run.** {q['note']}", ""]
    lines.append("Held-out text only (the `eval` parts, never used for scoring). Perplexity: lower is better; "
                 "retention = dense ppl / expert ppl (1.0 = no loss). MC: multiple-choice accuracy on the "
                 "expert's domain/task items (4 options, chance 0.25).")
    lines.append("")
    for setting, dense in q["dense"].items():
        expert = next(r["expert"] for r in q["rows"] if r["setting"] == setting)
        acc = f", MC acc {dense['mc_acc']:.3f}" if "mc_acc" in dense else ""
        lines += [f"### {setting} (`{expert}`)", "",
                  f"Dense: expert ppl {dense['expert_ppl']:.2f}, general ppl ({dense['general_corpus']}) "
                  f"{dense['general_ppl']:.2f}{acc}.", "",
                  "| ratio | method | achieved | expert ppl | retention | MC acc | general ppl |",
                  "|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in q["rows"] if r["setting"] == setting),
                      key=lambda r: (r["target_ratio"], r["expert_ppl"]))
        for r in rows:
            name = f"**{r['method']}**" if r["method"] == "cusprun" else r["method"]
            achieved = "-" if r.get("achieved_ratio") is None else f"{r['achieved_ratio']:.3f}"
            lines.append(f"| {r['target_ratio']:.2f} | {name} | {achieved} | {r['expert_ppl']:.2f} | "
                         f"{r['ppl_retention']:.3f} | {r.get('mc_acc', float('nan')):.3f} | {r['general_ppl']:.2f} |")
        lines.append("")
    lines += [f"![retention vs ratio]({plot_name})", ""]
    return lines


def _verdict(q: dict) -> list[str]:
    """Where Cus-Prun wins and where it does not, computed from the rows."""
    lines = []
    groups = defaultdict(dict)
    for r in q["rows"]:
        groups[(r["setting"], r["target_ratio"])][r["method"]] = r
    wins, losses = [], []
    for (setting, ratio), methods in sorted(groups.items()):
        if "cusprun" not in methods or len(methods) < 2:
            continue
        best_other = min((r for m, r in methods.items() if m != "cusprun"), key=lambda r: r["expert_ppl"])
        c = methods["cusprun"]
        entry = (f"{setting} at {ratio:.2f}: cusprun {c['expert_ppl']:.2f} vs best other "
                 f"{best_other['method']} {best_other['expert_ppl']:.2f}")
        (wins if c["expert_ppl"] <= best_other["expert_ppl"] else losses).append(entry)
    lines.append(f"Expert perplexity, Cus-Prun against the best other method per setting and ratio: "
                 f"best in {len(wins)} of {len(wins) + len(losses)}.")
    lines.append("")
    if wins:
        lines += ["Cus-Prun is best:", ""] + [f"- {w}" for w in wins] + [""]
    if losses:
        lines += ["Cus-Prun is not best:", ""] + [f"- {x}" for x in losses] + [""]
    return lines


def _speed_section(s: dict) -> list[str]:
    from .speed import speed_markdown

    return speed_markdown(s)


def write_results_md() -> Path:
    lines = ["# Benchmark results", "",
             "Written by `make bench` (`python -m benchmarks`) from `benchmarks/results/*.json`; every figure "
             "below was measured on the machine named with it.", ""]
    for name, title in (("quality.json", "Quality"), ("quality-quick.json", "Quality (quick mode)")):
        q = _load(name)
        if q:
            plot = name.replace(".json", ".png")
            _quality_plot(q, RESULTS / plot)
            lines += [f"## {title}", ""] + _verdict(q) + _quality_section(q, f"results/{plot}")
    for name, title in (("speed.json", "Speed"), ("speed-quick.json", "Speed (quick mode)")):
        s = _load(name)
        if s:
            lines += [f"## {title}", ""] + _speed_section(s)
    OUT.write_text("\n".join(lines) + "\n")
    return OUT
