"""The report's headline: the expert against what a user would ship without it (the GenAI builder's int4 of
the dense model, or our dense export where its quality is better at no lower speed), in one sentence with both
figures."""

from __future__ import annotations

from .collect import artifact_ppl, decode_rate, generation_rows
from .fmt import megabytes


def _expert_text(config: dict) -> str:
    """'en/general' for language=en,domain=general (a user path stays as given)."""
    spec = str(config.get("expert") or "")
    values = [part.split("=", 1)[1] for part in spec.split(",") if "=" in part]
    return "/".join(values) or "the expert's"



# Decode rates this close are one speed: in alternating runs here our dense int4 and the builder's measured 0.99x
# and 1.01x of each other on the same artifacts, which flipped the alternative a verdict named from run to run.
SAME_SPEED = 0.05


def shipping_baseline(data: dict) -> dict | None:
    """The dense artifact a user would otherwise ship, with the figures the verdict compares: the GenAI builder's
    int4, or our own dense export where its held-out perplexity is lower and it decodes no slower (within
    SAME_SPEED). {side, label, provider, decode_tok_s, ppl, file_bytes}; None when the builder was not measured."""
    base = data.get("baseline") or {}
    provider = next((p for p in (base.get("latency") or {}) if decode_rate(data["expert"], p)), None)
    if provider is None or not artifact_ppl(data, "baseline"):
        return None
    builder = {"side": "baseline", "label": base["label"], "provider": provider,
               "decode_tok_s": decode_rate(base, provider), "ppl": artifact_ppl(data, "baseline"),
               "file_bytes": base.get("file_bytes")}
    ours = {"side": "dense", "label": f"our dense {data['dense'].get('precision') or ''} export".replace("  ", " "),
            "provider": provider, "decode_tok_s": decode_rate(data["dense"], provider), "ppl": artifact_ppl(data, "dense"),
            "file_bytes": data["dense"].get("file_bytes")}
    if ours["decode_tok_s"] and ours["ppl"] and ours["decode_tok_s"] >= builder["decode_tok_s"] * (1 - SAME_SPEED) \
            and ours["ppl"] < builder["ppl"]:
        return ours
    return builder


def _answers_sentence(data: dict) -> str:
    """Looping answers and checked answers, when the generate stage measured them."""
    gens = data.get("generations") or {}
    parts = []
    rows = generation_rows(data)
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
    fast, mine = decode_rate(e, provider) / base["decode_tok_s"], decode_rate(e, provider)
    facts = [f"{fast:.2f}x {'faster' if fast >= 1 else 'the'} decode ({mine:.1f} vs {base['decode_tok_s']:.1f} "
             f"tokens/s on {where})"]
    if e.get("file_bytes") and base.get("file_bytes"):
        facts.append(f"{e['file_bytes'] / base['file_bytes']:.2f}x the weights "
                     f"({megabytes(e['file_bytes'])} vs {megabytes(base['file_bytes'])})")
    ppl = artifact_ppl(data, "expert")
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
        facts.append(f"{sizes[0] / sizes[1]:.2f}x the weights ({megabytes(sizes[0])} vs {megabytes(sizes[1])})")
    ppl = ((e.get("eval") or {}).get("overall", {}).get("ppl"), (d.get("eval") or {}).get("overall", {}).get("ppl"))
    if all(ppl):
        facts.append(f"perplexity {ppl[0] / ppl[1]:.2f}x dense ({ppl[0]:.1f} vs {ppl[1]:.1f}) on held-out "
                     f"{_expert_text(data.get('config') or {})} text")
    if not facts:
        return None
    precision = e.get("precision") or d.get("precision")
    return f"Expert vs dense{f' ({precision})' if precision else ''}: " + ", ".join(facts) + "."



def ratio_words(data: dict) -> str:
    """The ratio the expert was pruned at: the searched one in a quality-target build, else the requested one."""
    search = data.get("ratio_search")
    if search:
        return f"ratio {search['ratio']:.3f} (searched for perplexity <= {search['max_ppl_ratio']}x dense)"
    return f"ratio {(data.get('config') or {}).get('ratio')}"
