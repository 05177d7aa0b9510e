"""Report stage: one summary of a build directory as report.json, report.md and a self-contained report.html.

Reads what the pipeline's stages left (`<build>/<stage>/stage.json` plus their files: the export
manifests, validate.json, bench.json) and writes:
  - report.json: dense and expert side by side (params, file bytes, held-out quality per category,
    latency per provider), retention, speed-up per provider, export parity, machine and date;
  - report.md with the same tables (plots as PNG files beside it);
  - report.html with every plot embedded as a base64 PNG and no external reference, so it opens
    anywhere offline: latency dense vs expert, per-layer kept FFN width and heads, quality vs ratio.
Quality vs ratio uses every sibling build (same model and expert, in the same parent directory) and
any directories passed as `compare`.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .collect import PLOTS, collect, generation_rows
from .plots import plot_latency, plot_quality, plot_structure
from .tables import rate, tables
from .verdict import ratio_words, verdict

# --------------------------------------------------------------------------- reading a build



# --------------------------------------------------------------------------- verdict and generations




FENCE = "`" * 3


def _generations_md(data: dict) -> list[str]:
    gens = data.get("generations")
    if not gens:
        return []
    lines = ["## The expert talking", ""]
    if gens.get("skipped"):
        return lines + [f"Not generated: {gens['skipped']}", ""]
    lines += [f"Greedy continuations, at most {gens['max_new_tokens']} new tokens, through {gens['engine']} "
              f"on {gens['provider'].replace('ExecutionProvider', '')}.", ""]
    for n, p in enumerate(generation_rows(data), 1):
        lines += [f"### Prompt {n} ({p['source']})", "", FENCE, p["prompt"], FENCE, ""]
        for side in ("dense", "expert"):
            lines += [f"**{side}** ({rate(p[side])}, {p[side]['tokens']} tokens):", "", FENCE,
                      p[side]["text"].replace(FENCE, "'''"), FENCE, ""]
    return lines


def _generations_html(data: dict) -> list[str]:
    esc = html.escape
    gens = data.get("generations")
    if not gens:
        return []
    parts = ["<h2>The expert talking</h2>"]
    if gens.get("skipped"):
        return parts + [f"<p class='note'>Not generated: {esc(gens['skipped'])}</p>"]
    parts.append(f"<p>Greedy continuations, at most {gens['max_new_tokens']} new tokens, through "
                 f"{esc(gens['engine'])} on {esc(gens['provider'].replace('ExecutionProvider', ''))}.</p>")
    parts.append("<table id='generations'><thead><tr><th>prompt</th><th>dense</th><th>expert</th></tr></thead>"
                 "<tbody>")
    for p in generation_rows(data):
        cells = [f"<td class='prompt'><pre>{esc(p['prompt'])}</pre><span class='note'>{esc(p['source'])}</span></td>"]
        for side in ("dense", "expert"):
            cells.append(f"<td class='{side}'><pre>{esc(p[side]['text'])}</pre>"
                         f"<span class='note'>{esc(rate(p[side]))}, {p[side]['tokens']} tokens</span></td>")
        parts.append("<tr class='generation'>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return parts


# --------------------------------------------------------------------------- plots



# --------------------------------------------------------------------------- tables



# --------------------------------------------------------------------------- writers


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal pipe inside a Markdown table cell



def _markdown(data: dict, images: dict[str, str]) -> str:
    cfg = data.get("config") or {}
    lines = ["# cusprun-edge build report", ""]
    if data.get("verdict"):
        lines += [f"**{data['verdict']}**", ""]
    if cfg:
        lines += [(f"Model `{cfg.get('model')}`, expert `{cfg.get('expert')}`, method `{cfg.get('method')}`, "
                   f"{ratio_words(data)}, target `{cfg.get('target')}`."), ""]
    for title, header, rows in tables(data):
        lines += [f"## {title}", "", "| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
        lines.append("")
    lines += _generations_md(data)
    for name, file in images.items():
        lines += [f"![{name}]({file})", ""]
    return "\n".join(lines)


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
.note { color: #666; }
.verdict { font-size: 1.1em; font-weight: 600; background: #f4f8fc; border-left: 4px solid #1f77b4; padding: 0.5em 0.8em; }
#generations pre { white-space: pre-wrap; margin: 0 0 0.3em 0; font-size: 0.95em; max-width: 32em; }
"""

CAPTIONS = {
    "latency": "Time to first token by prompt length (p50, bar to p90) and decode throughput, dense vs expert.",
    "structure": "Per-layer kept FFN width and attention heads of the expert against the dense model.",
    "quality_vs_ratio": "Held-out retention against the achieved pruning ratio (every build of this model and expert).",
}


def _html(data: dict, pngs: dict[str, bytes]) -> str:
    esc = html.escape
    cfg = data.get("config") or {}
    parts = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
             "<title>cusprun-edge build report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>cusprun-edge build report</h1>"]
    if data.get("verdict"):
        parts.append(f"<p id='verdict' class='verdict'>{esc(data['verdict'])}</p>")
    if cfg:
        parts.append(f"<p>Model <code>{esc(str(cfg.get('model')))}</code>, expert <code>{esc(str(cfg.get('expert')))}</code>, "
                     f"method <code>{esc(str(cfg.get('method')))}</code>, {esc(ratio_words(data))}, "
                     f"target <code>{esc(str(cfg.get('target')))}</code>.</p>")
    for title, header, rows in tables(data):
        parts.append(f"<h2>{esc(title)}</h2><table><thead><tr>"
                     + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
    parts += _generations_html(data)
    parts.append("<h2>Plots</h2>")
    for name in PLOTS:
        if name in pngs:
            b64 = base64.b64encode(pngs[name]).decode("ascii")
            parts.append(f"<figure><img id='plot-{name}' alt='{esc(name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{esc(CAPTIONS[name])}</figcaption></figure>")
        else:
            parts.append(f"<p class='note'>{esc(name.replace('_', ' '))}: no data in this build.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(build_dir, out=None, compare=()) -> dict:
    """Write report.json, report.md (+ PNGs) and report.html for `build_dir` into `out`
    (default `<build_dir>/report`); returns the report data."""
    import matplotlib

    matplotlib.use("Agg")
    data = collect(build_dir, compare)
    data["verdict"] = verdict(data)
    out = Path(out) if out is not None else Path(build_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: png for name, fn in (("latency", plot_latency), ("structure", plot_structure),
                                       ("quality_vs_ratio", plot_quality)) if (png := fn(data))}
    images = {}
    for name, png in pngs.items():
        (out / f"{name}.png").write_bytes(png)
        images[name] = f"{name}.png"
    data["plots"] = sorted(pngs)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=str))
    (out / "report.md").write_text(_markdown(data, images))
    (out / "report.html").write_text(_html(data, pngs), encoding="utf-8")
    return data


