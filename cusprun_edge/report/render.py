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
import datetime
import html
import io
import json
from pathlib import Path

from .errors import UserError
from .stages import Stage

STAGE_NAMES = ("load", "score", "prune", "export", "validate", "bench", "generate", "report")
PLOTS = ("latency", "structure", "quality_vs_ratio")


# --------------------------------------------------------------------------- reading a build


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def read_build(build_dir) -> dict:
    """Everything the stages of `build_dir` recorded; UserError when it is no build directory."""
    root = Path(build_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a build directory (`cusprun-edge build --out`)")
    if not root.is_dir():
        raise UserError(f"build directory {root} does not exist")
    stages = {name: rec for name in STAGE_NAMES if (rec := _read_json(root / name / "stage.json")) is not None}
    if not stages or not any(s in stages for s in ("export", "validate", "bench")):
        raise UserError(f"{root} is not a build directory (no finished export, validate or bench stage); "
                        "run `cusprun-edge build` first")
    build = {
        "root": root,
        "config": _read_json(root / "build.json") or {},
        "stages": stages,
        "manifests": {k: _read_json(root / "export" / k / "manifest.json") for k in ("dense", "expert")},
        "validate": _read_json(root / "validate" / "validate.json"),
        "bench": _read_json(root / "bench" / "bench.json"),
        "generations": _read_json(root / "generate" / "generations.json"),
    }
    return build


def _file_bytes(manifest: dict | None) -> int | None:
    if not manifest:
        return None
    files = manifest.get("files") or {}
    return sum(f["bytes"] for name, f in files.items()
               if name.endswith((".onnx", ".onnx.data", ".onnx_data"))) or manifest.get("total_bytes")


def _parity(manifest: dict | None) -> dict | None:
    if not manifest or "parity" not in manifest:
        return None
    parity = manifest["parity"]
    out = {}
    for precision in ("fp32", "fp16", "int8", "int4"):
        if isinstance(parity.get(precision), dict):
            p = parity[precision]
            out[precision] = {k: p.get(k) for k in ("passed", "max_abs_diff", "rel_rms", "top1_agreement")}
    return out


def _latency(bench: dict | None, label: str) -> dict:
    out = {}
    if not bench:
        return out
    for provider, entry in bench.get("providers", {}).items():
        if entry.get("status") != "measured":
            continue
        r = entry["results"].get(label)
        if not r or "error" in r:
            continue
        out[provider] = {
            "engine": entry.get("engine"),
            "prefill_ms": {n: v["p50_ms"] for n, v in r.get("prefill", {}).items()},
            "prefill_p90_ms": {n: v["p90_ms"] for n, v in r.get("prefill", {}).items()},
            "decode_tok_s": r["decode"]["tok_s"],
            "decode_ms_p50": r["decode"]["per_token"]["p50_ms"],
            "decode_ms_p90": r["decode"]["per_token"]["p90_ms"],
            "peak_rss_mb": r.get("peak_rss_mb"),
            "session_s": r.get("session_s"),
        }
    return out


def _eval(validate: dict | None, side: str) -> dict:
    if not validate:
        return {}
    out = {cat: dict(rec[side]) for cat, rec in validate.get("categories", {}).items()}
    if validate.get("overall"):
        out["overall"] = dict(validate["overall"][side])
    return out


def _retention(validate: dict | None) -> dict:
    if not validate:
        return {}
    out = {cat: dict(rec.get("retention", {})) for cat, rec in validate.get("categories", {}).items()}
    overall = validate.get("overall") or {}
    out["overall"] = dict(overall.get("retention", {}))
    for key in ("top1_agreement", "kl"):
        if key in overall:
            out[key] = overall[key]
    return out


def _precision_label(manifest: dict | None) -> str | None:
    """The precision, and which projections a mixed int4 export kept at 8 bits (export's fallback)."""
    if not manifest:
        return None
    eight_bit = (manifest.get("quantization") or {}).get("eight_bit")
    if not eight_bit:
        return manifest.get("precision")
    some = f"{eight_bit['matmuls']} of {eight_bit['of']} " if eight_bit.get("of", 0) > eight_bit["matmuls"] else ""
    return f"{manifest.get('precision')} ({some}{'/'.join(eight_bit['modules'])} at 8 bits)"


def _model_side(build: dict, side: str, label: str) -> dict:
    manifest = build["manifests"].get(side)
    bench = build["bench"]
    params = (manifest or {}).get("parameters")
    if params is None:
        prune = build["stages"].get("prune", {}).get("result", {})
        params = prune.get("params_before" if side == "dense" else "params_after") \
            or (build["stages"].get("load", {}).get("result", {}).get("params") if side == "dense" else None)
    file_bytes = _file_bytes(manifest)
    if file_bytes is None and bench and label in bench.get("artifacts", {}):
        file_bytes = bench["artifacts"][label].get("file_bytes")
    return {
        "params": params,
        "file_bytes": file_bytes,
        "precision": _precision_label(manifest),
        "eval": _eval(build["validate"], side),
        "latency": _latency(bench, label),
        "structure": (manifest or {}).get("structure"),
    }


def _baseline_side(build: dict) -> dict | None:
    """What a user would ship without us (bench and validate measured it beside ours): the GenAI builder's int4
    of the dense model. None when neither stage measured it; {"missing": why} when they could not."""
    from .baseline import LABEL

    bench, validate = build["bench"] or {}, build["validate"] or {}
    measured = validate.get("baseline") or {}
    latency = _latency(bench, LABEL)
    missing = bench.get("no_baseline") or build["stages"].get("validate", {}).get("result", {}).get("no_baseline")
    if not measured and not latency:
        return {"missing": missing} if missing else None
    return {"label": "ONNX Runtime GenAI builder int4 (dense)", "artifact": measured.get("artifact"),
            "file_bytes": bench.get("artifacts", {}).get(LABEL, {}).get("file_bytes"),
            "ppl": measured.get("ppl"), "top1_agreement": measured.get("top1_agreement"), "kl": measured.get("kl"),
            "latency": latency}


def _speedup(bench: dict | None, label: str = "expert") -> dict:
    if not bench:
        return {}
    return {p: s[label] for p, s in bench.get("speedup", {}).items() if label in s}


def _ratio_point(build: dict) -> dict | None:
    """One point of quality vs ratio: the build's achieved ratio and its overall retention."""
    validate = build["validate"]
    prune = build["stages"].get("prune", {}).get("result", {})
    config = build["config"]
    if not validate or "achieved_ratio" not in prune:
        return None
    overall = validate.get("overall", {})
    return {"build": str(build["root"]), "method": prune.get("method") or config.get("method"),
            "target_ratio": prune.get("target_ratio", config.get("ratio")), "achieved_ratio": prune["achieved_ratio"],
            "ppl_retention": overall.get("retention", {}).get("ppl"),
            "acc_retention": overall.get("retention", {}).get("acc"),
            "top1_agreement": overall.get("top1_agreement")}


def _related_builds(build: dict, compare) -> list[dict]:
    """Sibling builds of the same model and expert, plus explicitly compared directories."""
    found, seen = [], {build["root"].resolve()}
    config = build["config"]
    candidates = []
    parent = build["root"].resolve().parent
    if config:
        for d in sorted(parent.iterdir()):
            other = _read_json(d / "build.json") if d.is_dir() else None
            if other and other.get("model") == config.get("model") and other.get("expert") == config.get("expert"):
                candidates.append(d)
    candidates.extend(Path(c).expanduser() for c in compare or ())
    for d in candidates:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        try:
            found.append(read_build(d))
        except UserError:
            if d in [Path(c).expanduser() for c in compare or ()]:
                raise
    return found


def collect(build_dir, compare=()) -> dict:
    """The report as data (what report.json holds)."""
    from .bench import machine

    build = read_build(build_dir)
    bench = build["bench"]
    points = [p for b in [build, *_related_builds(build, compare)] if (p := _ratio_point(b))]
    points.sort(key=lambda p: (p["achieved_ratio"], p["method"] or ""))
    prune = build["stages"].get("prune", {}).get("result", {})
    skipped = {p: e["reason"] for p, e in (bench or {}).get("providers", {}).items() if e.get("status") == "skipped"}
    expert = _model_side(build, "expert", "expert")
    expert.update({k: prune.get(k) for k in ("method", "target_ratio", "achieved_ratio") if k in prune})
    return {
        "format": "cusprun-edge-report",
        "format_version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_dir": str(build["root"]),
        "config": build["config"],
        "machine": (bench or {}).get("machine") or machine(),
        "bench_date": (bench or {}).get("date"),
        "bench_settings": (bench or {}).get("settings"),
        "dense": _model_side(build, "dense", "dense"),
        "expert": expert,
        "retention": _retention(build["validate"]),
        "speedup": _speedup(bench),
        "skipped_providers": skipped,
        "parity": {side: _parity(m) for side, m in build["manifests"].items()},
        "validation": {k: (build["validate"] or {}).get(k) for k in ("expert_spec", "dense", "expert", "settings")},
        "three_way": (build["validate"] or {}).get("three_way"),
        "ratio_search": prune.get("ratio_search"),
        "vocab": prune.get("vocab"),
        "weights_read": _weights_read(build["root"]),
        "quality_vs_ratio": points,
        "stages": {name: {"seconds": rec.get("seconds")} for name, rec in build["stages"].items()},
        "generations": build["generations"],
        "baseline": _baseline_side(build),
    }


# --------------------------------------------------------------------------- verdict and generations


def _expert_text(config: dict) -> str:
    """'en/general' for language=en,domain=general (a user path stays as given)."""
    spec = str(config.get("expert") or "")
    values = [part.split("=", 1)[1] for part in spec.split(",") if "=" in part]
    return "/".join(values) or "the expert's"


def _decode(side: dict, provider: str) -> float | None:
    return ((side or {}).get("latency") or {}).get(provider, {}).get("decode_tok_s")


def _artifact_ppl(data: dict, side: str) -> float | None:
    """Held-out perplexity of an artifact as it ships: the expert's, our dense export's (validate's three-way
    comparison) or the baseline's."""
    if side == "expert":
        return ((data["expert"].get("eval") or {}).get("overall") or {}).get("ppl")
    if side == "dense":
        return ((data.get("three_way") or {}).get("dense_quantized") or {}).get("ppl")
    return (data.get("baseline") or {}).get("ppl")


def shipping_baseline(data: dict) -> dict | None:
    """The dense artifact a user would otherwise ship, with the figures the verdict compares: the GenAI builder's
    int4, or our own dense export where it is better on both decode speed and held-out perplexity.
    {side, label, provider, decode_tok_s, ppl, file_bytes}; None when the builder was not measured."""
    base = data.get("baseline") or {}
    provider = next((p for p in (base.get("latency") or {}) if _decode(data["expert"], p)), None)
    if provider is None or not _artifact_ppl(data, "baseline"):
        return None
    builder = {"side": "baseline", "label": base["label"], "provider": provider,
               "decode_tok_s": _decode(base, provider), "ppl": _artifact_ppl(data, "baseline"),
               "file_bytes": base.get("file_bytes")}
    ours = {"side": "dense", "label": f"our dense {data['dense'].get('precision') or ''} export".replace("  ", " "),
            "provider": provider, "decode_tok_s": _decode(data["dense"], provider), "ppl": _artifact_ppl(data, "dense"),
            "file_bytes": data["dense"].get("file_bytes")}
    if ours["decode_tok_s"] and ours["ppl"] and ours["decode_tok_s"] > builder["decode_tok_s"] \
            and ours["ppl"] < builder["ppl"]:
        return ours
    return builder


def _answers_sentence(data: dict) -> str:
    """Looping answers and checked answers, when the generate stage measured them."""
    gens = data.get("generations") or {}
    parts = []
    rows = _generation_rows(data)
    if rows and all("loops" in p["expert"] for p in rows):
        expert_loops = sum(p["expert"]["loops"] for p in rows)
        dense_loops = sum(p["dense"]["loops"] for p in rows)
        if expert_loops > dense_loops:
            parts.append(f"Warning: the expert's answers loop in {expert_loops} of {len(rows)} prompts "
                         f"(dense: {dense_loops})")
    checks = gens.get("checks")
    if checks and checks.get("right"):
        right = checks["right"]
        parts.append("checked answers right: " + ", ".join(f"{label} {n}/{checks['of']}" for label, n in right.items()))
    return ("; ".join(parts) + ".") if parts else ""


def verdict(data: dict) -> str | None:
    """One line of facts a user decides on: decode speed, weight size and held-out perplexity of the expert
    against what the user would otherwise ship (shipping_baseline: the GenAI builder's int4 or our dense export,
    whichever is better), each as a ratio with both figures; then looping and checked answers. Without a measured
    baseline, against our own dense export. None without any figure."""
    base = shipping_baseline(data)
    if base is None:
        line = _verdict_vs_dense(data)
        return " ".join(x for x in (line, _answers_sentence(data)) if x) or None
    e = data["expert"]
    provider, where = base["provider"], base["provider"].replace("ExecutionProvider", "")
    fast, mine = _decode(e, provider) / base["decode_tok_s"], _decode(e, provider)
    facts = [f"{fast:.2f}x {'faster' if fast >= 1 else 'the'} decode ({mine:.1f} vs {base['decode_tok_s']:.1f} "
             f"tokens/s on {where})"]
    if e.get("file_bytes") and base.get("file_bytes"):
        facts.append(f"{e['file_bytes'] / base['file_bytes']:.2f}x the weights "
                     f"({_mb(e['file_bytes'])} vs {_mb(base['file_bytes'])})")
    ppl = _artifact_ppl(data, "expert")
    if ppl:
        facts.append(f"perplexity {ppl / base['ppl']:.2f}x ({ppl:.1f} vs {base['ppl']:.1f}) on held-out "
                     f"{_expert_text(data.get('config') or {})} text")
    line = f"Expert vs {base['label']}, what a user would otherwise ship: " + ", ".join(facts) + "."
    if not (fast > 1 and ppl and ppl <= base["ppl"]):
        line += (f" The expert does not beat it on both speed and quality: {base['label']} is the better thing "
                 "to ship.")
    return " ".join(x for x in (line, _answers_sentence(data)) if x)


def _verdict_vs_dense(data: dict) -> str | None:
    """Expert vs our own dense export (when no baseline was measured)."""
    d, e = data["dense"], data["expert"]
    facts = []
    provider = next((p for p, s in data.get("speedup", {}).items()
                     if "decode" in s and p in d.get("latency", {}) and p in e.get("latency", {})), None)
    if provider:
        x = data["speedup"][provider]["decode"]
        rates = f"{e['latency'][provider]['decode_tok_s']:.1f} vs {d['latency'][provider]['decode_tok_s']:.1f} tokens/s"
        where = provider.replace("ExecutionProvider", "")
        facts.append(f"{x:.2f}x faster decode ({rates} on {where})" if x >= 1
                     else f"{1 / x:.2f}x slower decode ({rates} on {where})")
    sizes = (e.get("file_bytes"), d.get("file_bytes"))
    if all(sizes):
        facts.append(f"{sizes[0] / sizes[1]:.2f}x the weights ({_mb(sizes[0])} vs {_mb(sizes[1])})")
    ppl = ((e.get("eval") or {}).get("overall", {}).get("ppl"), (d.get("eval") or {}).get("overall", {}).get("ppl"))
    if all(ppl):
        facts.append(f"perplexity {ppl[0] / ppl[1]:.2f}x dense ({ppl[0]:.1f} vs {ppl[1]:.1f}) on held-out "
                     f"{_expert_text(data.get('config') or {})} text")
    if not facts:
        return None
    precision = e.get("precision") or d.get("precision")
    return f"Expert vs dense{f' ({precision})' if precision else ''}: " + ", ".join(facts) + "."


def _generation_rows(data: dict) -> list[dict]:
    gens = data.get("generations") or {}
    return [p for p in gens.get("prompts", []) if "dense" in p and "expert" in p]


def _rate(result: dict) -> str:
    return f"{result['tok_s']:.1f} tok/s" if result.get("tok_s") else "- tok/s"


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
    for n, p in enumerate(_generation_rows(data), 1):
        lines += [f"### Prompt {n} ({p['source']})", "", FENCE, p["prompt"], FENCE, ""]
        for side in ("dense", "expert"):
            lines += [f"**{side}** ({_rate(p[side])}, {p[side]['tokens']} tokens):", "", FENCE,
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
    for p in _generation_rows(data):
        cells = [f"<td class='prompt'><pre>{esc(p['prompt'])}</pre><span class='note'>{esc(p['source'])}</span></td>"]
        for side in ("dense", "expert"):
            cells.append(f"<td class='{side}'><pre>{esc(p[side]['text'])}</pre>"
                         f"<span class='note'>{esc(_rate(p[side]))}, {p[side]['tokens']} tokens</span></td>")
        parts.append("<tr class='generation'>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return parts


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_latency(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt
    import numpy as np

    providers = [p for p in data["dense"]["latency"] if p in data["expert"]["latency"]]
    if not providers:
        return None
    fig, axes = plt.subplots(len(providers), 2, figsize=(10, 3.4 * len(providers)), squeeze=False)
    colours = {"dense": "#8c8c8c", "expert": "#1f77b4"}
    for row, provider in enumerate(providers):
        d, e = data["dense"]["latency"][provider], data["expert"]["latency"][provider]
        lengths = [n for n in d["prefill_ms"] if n in e["prefill_ms"]]
        x = np.arange(len(lengths))
        ax = axes[row][0]
        for k, (side, lat) in enumerate((("dense", d), ("expert", e))):
            values = [lat["prefill_ms"][n] for n in lengths]
            errors = [lat["prefill_p90_ms"][n] - lat["prefill_ms"][n] for n in lengths]
            ax.bar(x + (k - 0.5) * 0.38, values, 0.38, yerr=[[0] * len(values), errors], capsize=3,
                   label=side, color=colours[side])
        ax.set_xticks(x, [f"{n} tok" for n in lengths])
        ax.set_ylabel("prefill p50 (ms), bar to p90")
        ax.set_title(f"time to first token - {provider.replace('ExecutionProvider', '')}")
        ax.legend()
        ax = axes[row][1]
        sides = ["dense", "expert"]
        rates = [d["decode_tok_s"], e["decode_tok_s"]]
        bars = ax.bar(sides, rates, color=[colours[s] for s in sides])
        for bar, rate in zip(bars, rates):
            ax.annotate(f"{rate:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
        ax.set_ylim(0, max(rates) * 1.15)
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"decode throughput - {provider.replace('ExecutionProvider', '')}")
    fig.tight_layout()
    return _png(fig)


def plot_structure(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt
    import numpy as np

    dense, expert = data["dense"].get("structure"), data["expert"].get("structure")
    if not dense or not expert:
        return None
    n = len(dense["intermediate_sizes"])
    layers = np.arange(n)
    kept_ffn, kept_q, kept_kv = np.zeros(n), np.zeros(n), np.zeros(n)
    for i, src in enumerate(expert["source_layers"]):
        kept_ffn[src] = expert["intermediate_sizes"][i]
        kept_q[src] = expert["num_attention_heads"][i]
        kept_kv[src] = expert["num_key_value_heads"][i]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    ax1.bar(layers, dense["intermediate_sizes"], color="#d9d9d9", label="dense")
    ax1.bar(layers, kept_ffn, color="#1f77b4", label="expert (kept)")
    ax1.set_ylabel("FFN width")
    ax1.set_title("kept FFN channels per layer")
    ax1.set_ylim(0, max(dense["intermediate_sizes"]) * 1.3)  # headroom for the legend
    ax1.legend(loc="upper right", ncol=2)
    ax2.bar(layers - 0.2, dense["num_attention_heads"], 0.4, color="#d9d9d9", label="dense query heads")
    ax2.bar(layers - 0.2, kept_q, 0.4, color="#ff7f0e", label="kept query heads")
    ax2.bar(layers + 0.2, dense["num_key_value_heads"], 0.4, color="#eeeeee", label="dense KV heads")
    ax2.bar(layers + 0.2, kept_kv, 0.4, color="#2ca02c", label="kept KV heads")
    ax2.set_ylabel("heads")
    ax2.set_xlabel("layer (original index)")
    ax2.set_xticks(layers if n <= 32 else layers[::2])
    ax2.set_title("kept attention heads per layer")
    ax2.set_ylim(0, max(dense["num_attention_heads"]) * 1.45)
    ax2.legend(fontsize=8, ncol=4, loc="upper right")
    fig.tight_layout()
    return _png(fig)


def plot_quality(data: dict) -> bytes | None:
    import matplotlib.pyplot as plt

    points = data["quality_vs_ratio"]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, marker, name in (("ppl_retention", "o", "perplexity retention"), ("acc_retention", "s", "accuracy retention")):
        methods = sorted({p["method"] or "?" for p in points if p.get(key) is not None})
        for method in methods:
            pts = [p for p in points if (p["method"] or "?") == method and p.get(key) is not None]
            xs = [0.0] + [p["achieved_ratio"] for p in pts]
            ys = [1.0] + [p[key] for p in pts]
            ax.plot(xs, ys, marker=marker, label=f"{name} ({method})")
    ax.axhline(1.0, color="#999999", linewidth=0.8, linestyle="--")
    ax.set_xlabel("achieved pruning ratio (share of prunable parameters removed)")
    ax.set_ylabel("retention vs dense (1.0 = no loss)")
    ax.set_title("held-out quality vs pruning ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _r(value) -> str:
    """A retention or agreement: three decimals, so 0.998 does not print as 1."""
    return "-" if value is None else f"{value:.3f}"


def _mb(n) -> str:
    # decimal megabytes, as file managers, README and benchmarks/results state sizes
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the report (markdown and HTML alike)."""
    d, e = data["dense"], data["expert"]
    out = []

    def params(side):
        return (side.get("params") or {}).get("total")

    summary = [
        ["parameters", _fmt(params(d)), _fmt(params(e)), _fmt(_ratio(params(e), params(d)))],
        ["model files", _mb(d.get("file_bytes")), _mb(e.get("file_bytes")), _fmt(_ratio(e.get("file_bytes"), d.get("file_bytes")))],
        ["precision", _fmt(d.get("precision")), _fmt(e.get("precision")), ""],
    ]
    if e.get("achieved_ratio") is not None:
        summary.append(["pruned (method, achieved ratio)", "", f"{e.get('method')}, {e['achieved_ratio']:.1%}", ""])
    out.append(("Summary", ["", "dense", "expert", "expert / dense"], summary))

    rows = []
    for cat in e.get("eval", {}):
        de, ee, ret = d["eval"].get(cat, {}), e["eval"][cat], data["retention"].get(cat, {})
        rows.append([cat, _fmt(de.get("ppl"), 4), _fmt(ee.get("ppl"), 4), _r(ret.get("ppl")),
                     _r(de.get("acc")), _r(ee.get("acc")), _r(ret.get("acc"))])
    if rows:
        out.append(("Held-out quality (eval split, never used for scoring)",
                    ["category", "dense ppl", "expert ppl", "ppl retention", "dense acc", "expert acc", "acc retention"],
                    rows))
        ret = data["retention"]
        out.append(("Agreement with dense", ["top-1 next-token agreement", "mean KL(dense || expert)"],
                    [[_r(ret.get("top1_agreement")), _fmt(ret.get("kl"))]]))

    for extra in (_baseline_table(data), _checks_table(data), _three_way_table(data.get("three_way")),
                  _search_table(data), _vocab_table(data), _speed_limit_table(data)):
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
                         _fmt(lat.get("peak_rss_mb")), _fmt(lat.get("session_s"))])
    for provider, reason in data.get("skipped_providers", {}).items():
        rows.append([provider.replace("ExecutionProvider", ""), "skipped", reason, "", "", "", "", ""])
    if rows:
        out.append(("Latency (p50 after warm-up)",
                    ["provider", "model", "engine", "prefill ms by prompt tokens", "decode ms/token p50 / p90",
                     "decode tok/s", "peak RSS MB", "session s"], rows))
    rows = []
    for provider, s in data.get("speedup", {}).items():
        prefill = ", ".join(f"{n}: {v:.2f}x" for n, v in s.get("prefill", {}).items())
        rows.append([provider.replace("ExecutionProvider", ""), prefill,
                     f"{s['decode']:.2f}x" if "decode" in s else "-",
                     _fmt(s.get("memory"))])
    if rows:
        out.append(("Speed-up of the expert (dense / expert latency; tok/s ratio)",
                    ["provider", "prefill", "decode", "peak memory expert/dense"], rows))
    rows = []
    for side, parity in data.get("parity", {}).items():
        for precision, p in (parity or {}).items():
            rows.append([side, precision, _fmt(p.get("passed")), _fmt(p.get("max_abs_diff")), _fmt(p.get("rel_rms")),
                         _fmt(p.get("top1_agreement"))])
    if rows:
        out.append(("Export parity (ONNX vs PyTorch)",
                    ["model", "precision", "passed", "max |diff|", "relative RMS", "top-1 agreement"], rows))
    points = data.get("quality_vs_ratio") or []
    if points:
        out.append(("Quality vs ratio", ["build", "method", "target", "achieved", "ppl retention", "acc retention"],
                    [[Path(p["build"]).name, _fmt(p["method"]), _fmt(p["target_ratio"]), f"{p['achieved_ratio']:.1%}",
                      _r(p["ppl_retention"]), _r(p["acc_retention"])] for p in points]))
    m = data.get("machine") or {}
    packages = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items())
    out.append(("Machine", ["cpu", "cores", "memory", "platform", "packages", "report date"],
                [[_fmt(m.get("cpu")), _fmt(m.get("cores")), f"{m.get('memory_gb')} GB", _fmt(m.get("platform")),
                  packages, data["date"]]]))
    return out


def _weights_read(root: Path) -> dict:
    """Bytes of weights each artifact reads per generated token (weights_read.py), by side."""
    from .weights_read import weight_bytes_per_token

    out = {}
    for side in ("dense", "expert"):
        path = Path(root) / "export" / side / "model.onnx"
        if path.exists():
            out[side] = weight_bytes_per_token(path)["per_token_bytes"]
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
        rate, ppl = _decode(record, provider) if provider else None, _artifact_ppl(data, side)
        rows.append([label + (" (the baseline)" if chosen and chosen["side"] == side else ""), _fmt(ppl, 4),
                     f"{rate:.1f}" if rate else "-",
                     f"{rate / chosen['decode_tok_s']:.2f}x" if rate and chosen else "-", _mb(record.get("file_bytes"))])
    where = provider.replace("ExecutionProvider", "") if provider else "-"
    return (f"What users ship today: held-out perplexity and decode on {where}, one bench run",
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
                     f"{loops} of {len(_generation_rows(data))}"])
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
            rows.append([provider.replace("ExecutionProvider", ""), _mb(read["dense"]), _mb(read["expert"]),
                         f"{predicted:.2f}x", f"{s['decode']:.2f}x", f"{gap:+.0%}"])
    if not rows:
        rows.append(["-", _mb(read["dense"]), _mb(read["expert"]), f"{predicted:.2f}x", "not measured", ""])
    return ("Decode speed against its memory-traffic limit (weights read per generated token)",
            ["provider", "dense reads", "expert reads", "speed-up the bytes predict", "measured", "measured vs predicted"],
            rows)


def _search_table(data: dict):
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


def _three_way_table(three: dict | None):
    """What quantization costs and what pruning costs, apart: each model against dense fp32 (PyTorch)."""
    if not three:
        return None
    precision = three.get("precision") or "target precision"
    rows = [[label, _fmt(three[key]["ppl"], 4), _r(three[key]["top1_agreement"]), _fmt(three[key]["kl"])]
            for key, label in (("dense_fp32", "dense, fp32 (PyTorch)"), ("dense_quantized", f"dense, {precision} (ONNX)"),
                               ("expert_quantized", f"expert, {precision} (ONNX)"))]
    return (f"Quantization vs pruning (held-out text, against dense fp32; {three.get('tokens')} tokens)",
            ["model", "ppl", "top-1 agreement", "KL(dense fp32 || model)"], rows)


def _ratio(a, b):
    return None if a is None or not b else a / b


# --------------------------------------------------------------------------- writers


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal pipe inside a Markdown table cell


def _ratio_words(data: dict) -> str:
    """The ratio the expert was pruned at: the searched one in a quality-target build, else the requested one."""
    search = data.get("ratio_search")
    if search:
        return f"ratio {search['ratio']:.3f} (searched for perplexity <= {search['max_ppl_ratio']}x dense)"
    return f"ratio {(data.get('config') or {}).get('ratio')}"


def _markdown(data: dict, images: dict[str, str]) -> str:
    cfg = data.get("config") or {}
    lines = ["# cusprun-edge build report", ""]
    if data.get("verdict"):
        lines += [f"**{data['verdict']}**", ""]
    if cfg:
        lines += [(f"Model `{cfg.get('model')}`, expert `{cfg.get('expert')}`, method `{cfg.get('method')}`, "
                   f"{_ratio_words(data)}, target `{cfg.get('target')}`."), ""]
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
                     f"method <code>{esc(str(cfg.get('method')))}</code>, {esc(_ratio_words(data))}, "
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


class ReportStage(Stage):
    """Pipeline stage: the build's report (JSON, Markdown, self-contained HTML)."""

    name = "report"
    depends = ("validate", "bench", "generate")

    def config_keys(self):
        return ()

    def run(self, ctx, work: Path) -> dict:
        ctx.progress.start("report: tables and plots")
        data = report(ctx.out, out=work)
        return {"files": ["report.json", "report.md", "report.html"], "plots": data["plots"],
                "speedup": {p: s.get("decode") for p, s in data["speedup"].items()},
                "retention": data["retention"].get("overall")}
