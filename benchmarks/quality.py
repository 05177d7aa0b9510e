"""Quality retention of every pruning method against the dense model, at several ratios and experts.

One scoring pass over all built-in corpora serves every method, setting and ratio. For each expert we
measure on held-out text only (the `eval` parts, never used for scoring): expert perplexity (the expert's
own categories), multiple-choice accuracy (its domain/task items), general perplexity (a category the
expert does not cover), retention against dense, and the achieved parameter ratio.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from cusprun_edge import load_model
from cusprun_edge.config.corpora import ExpertSpec, all_builtin_corpora, builtin_corpus
from cusprun_edge.measure.evaluate import mc_accuracy, perplexity, torch_logits_fn
from cusprun_edge.model.structure import structure_of
from cusprun_edge.prune.methods import METHODS
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

from .common import RESULTS, machine, write_json

SETTINGS = {
    "code": "domain=code",
    "fr+medical": "language=fr,domain=medical",
    "en+legal+qa": "language=en,domain=legal,task=qa",
}
RATIOS = [0.25, 0.35, 0.45]
# The table's MC column reads each category's first 40 items (all there were when its rows were measured), so rows
# measured at different times stay comparable; benchmarks/mc.py measures retention on every item, with its error.
TABLE_MC_ITEMS = 40
# Ablations: each method as published, plus the head policy swapped both ways, so the table separates
# what Cus-Prun's scores bring from what sparing attention heads brings (see methods.MethodSpec.head_policy),
# and every method with reconstruction switched the other way (on for the baselines, off for cusprun), so the
# table shows what the refit adds and whether Cus-Prun's selection still matters once every method is refitted.
ABLATIONS = {
    "cusprun[head_policy=fraction]": ("cusprun", {"head_policy": "fraction"}),
    "wanda-sp[head_policy=ffn_first]": ("wanda-sp", {"head_policy": "ffn_first"}),
    # statistics from the dense model in one pass instead of the pruned earlier layers (sequential)
    "cusprun[reconstruct=one-shot]": ("cusprun", {"reconstruct": "one-shot"}),
    # the same share of every layer instead of budgets that follow each layer's measured output damage
    "cusprun[allocation=uniform]": ("cusprun", {"allocation": "uniform"}),
    # damage budgets that follow the damage less steeply (the default before the defaults table chose 1)
    "cusprun[damage_power=0.5]": ("cusprun", {"damage_power": 0.5}),
    # FFN channels chosen by what the refit can compensate (OBS) among the least relevant, instead of the lowest
    "cusprun[select=obs]": ("cusprun", {"select": "obs"}),
}
# Ablations measured at some ratios only: OBS's greedy selection costs 5-8 minutes a row on 2 CPU cores, so it is
# measured at the lowest and the highest ratio.
ABLATION_RATIOS = {"cusprun[select=obs]": (0.25, 0.45)}


def _measured_at(label: str, ratio: float) -> bool:
    return ratio in ABLATION_RATIOS.get(label, (ratio,))


def expected_rows(quick: bool = False, settings=None) -> set[tuple[str, str, float]]:
    """(setting, row label, ratio) of every row a complete table has."""
    return {(n, label, r) for n in (settings or SETTINGS) for r in ([0.25] if quick else RATIOS)
            for label in variants(quick) if _measured_at(label, r)}


def _reconstruction_ablations(methods) -> dict[str, tuple[str, dict]]:
    out = {}
    for m in methods:
        spec = METHODS[m]
        if spec.allocation == "layers":  # whole layers: no kept columns to refit
            continue
        flip = "none" if spec.reconstruct != "none" else "sequential"
        out[f"{m}[reconstruct={flip}]"] = (m, {"reconstruct": flip})
    return out


def variants(quick: bool) -> dict[str, tuple[str, dict]]:
    """Row label -> (method, recipe overrides); cusprun and its reconstruction ablation first, so a run that
    stops early has the rows that matter most."""
    # quick: Cus-Prun with and without its reconstruction, and Wanda-SP as published (a smoke run under 10 min)
    methods = ("cusprun", "wanda-sp") if quick else tuple(METHODS)
    base = {m: (m, {}) for m in methods}
    recon = _reconstruction_ablations(methods)
    if quick:
        recon = {k: v for k, v in recon.items() if v[0] == "cusprun"}
    first = {"cusprun": base.pop("cusprun"), "cusprun[reconstruct=none]": recon.pop("cusprun[reconstruct=none]")}
    return first | base | recon | ({} if quick else ABLATIONS)


def _eval_sets(spec: ExpertSpec):
    corpora = spec.corpora()
    texts = [t for c in corpora.values() for t in c.eval]
    mc = [item for c in corpora.values() for item in c.mc[:TABLE_MC_ITEMS]]
    general_name = "domain/general" if "domain/general" not in corpora else "language/de"
    general = builtin_corpus(*general_name.split("/")).eval
    return list(corpora), texts, mc, general_name, general


def _measure(model, tok, texts, mc, general) -> dict:
    fn = torch_logits_fn(model, on_device=True)
    # logits are [batch, tokens, vocab] in fp32: Gemma's 262k vocabulary needs smaller batches than SmolLM2's 49k
    batch = max(1, int(8 * 49152 / model.config.vocab_size))
    out = {"expert_ppl": perplexity(fn, tok, texts, batch_size=batch),
           "general_ppl": perplexity(fn, tok, general, batch_size=batch)}
    if mc:
        out["mc_acc"] = mc_accuracy(fn, tok, mc)
    return out


DEFAULT_MODEL = "smollm2-135m"


def results_name(quick: bool, model_name: str) -> str:
    """quality.json for the default full run; other models and quick mode get their own file."""
    suffix = ("" if model_name == DEFAULT_MODEL else f"-{model_name}") + ("-quick" if quick else "")
    return f"quality{suffix}.json"


def _subset(table: dict, names: list[str], what: str) -> dict:
    """The entries of `table` named in `names`; an unknown name is one line on stderr and exit 2."""
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(table)}", file=sys.stderr)
        raise SystemExit(2)
    return {n: table[n] for n in names}


def device_name(device: str) -> str:
    """What a row was measured on: "cpu", or the accelerator's name (results from both can share a table)."""
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def run(quick: bool = False, model_name: str = DEFAULT_MODEL, only: list[str] | None = None,
        rows_only: list[str] | None = None, ratios: list[float] | None = None, device: str = "cpu") -> dict:
    """`rows_only`: only these rows (e.g. "cusprun[allocation=uniform]"), `ratios`: only these ratios,
    `device`: where the whole model runs (scoring, pruning, refit and evaluation)."""
    torch.manual_seed(0)
    if only:
        settings = _subset(SETTINGS, only, "setting")
    else:
        settings = {"fr+medical": SETTINGS["fr+medical"]} if quick else SETTINGS
    ratios = ratios or ([0.25] if quick else RATIOS)
    methods = variants(quick)
    if rows_only:
        methods = _subset(methods, rows_only, "row")
    # resume: rows already in the results file are kept and not measured again
    path = RESULTS / results_name(quick, model_name)
    old = json.loads(path.read_text()) if path.exists() else {}
    # (rows from before reconstruction existed, which scored on all calibration documents, are measured again)
    rows = [r for r in old.get("rows", []) if "reconstruction" in r] if old.get("model") == model_name else []
    done = {(r["setting"], r["method"], r["target_ratio"]) for r in rows}
    dense = old.get("dense", {}) if rows else {}
    todo = [(n, r, label) for n in settings for r in ratios for label in methods
            if (n, label, r) not in done and _measured_at(label, r)]
    if not todo:
        print(f"[quality] every row is already in {path.name}", flush=True)
    model, tok = load_model(model_name)
    model.to(device)
    t0 = time.time()
    needed = {n for s in settings.values() for n in ExpertSpec.parse(s).corpora()}
    corpora = {k: v for k, v in all_builtin_corpora().items() if k in needed}
    scores = score_model(model, tok, corpora, show_progress=False) if todo else None
    score_seconds = round(time.time() - t0, 1) if todo else old.get("scoring_seconds")
    payload = {"benchmark": "quality", "quick": quick, "model": model_name, "machine": machine(),
               "scoring_seconds": score_seconds, "dense": dense, "rows": rows}
    evals = {}
    for name, expert in settings.items():
        if any(t[0] == name for t in todo):
            evals[name] = _eval_sets(ExpertSpec.parse(expert))
            if name not in dense:
                texts, mc, general_name, general = evals[name][1:]
                dense[name] = _measure(model, tok, texts, mc, general) | {"general_corpus": general_name}
            print(f"[quality] {name} dense {dense[name]}", flush=True)
    # cusprun with and without reconstruction in every cell before the baselines; the lowest and the highest
    # ratio before the middle ones, so a run that stops early has the rows that matter most
    labels, order = list(methods), [ratios[0], *ratios[-1:0:-1]]
    # (the head-policy and one-shot ablations come after every method's rows)
    # and the data-driven baselines both ways in every cell before magnitude and random
    def group(label):
        if labels.index(label) < 2:
            return 0
        if label in ABLATIONS:
            return 3
        return 2 if methods[label][0] in ("magnitude", "random") else 1

    todo.sort(key=lambda t: (group(t[2]), order.index(t[1]), list(settings).index(t[0]), labels.index(t[2])))
    for name, ratio, label in todo:
        method, options = methods[label]
        expert = settings[name]
        names, texts, mc, general_name, general = evals[name]
        m = copy.deepcopy(model)
        t = time.time()
        rec = prune_model(m, scores, names, method, ratio, options=dict(options), tokenizer=tok,
                          corpora={n: corpora[n] for n in names})
        prune_seconds = time.time() - t
        q = _measure(m, tok, texts, mc, general)
        d = dense[name]
        recon = rec["reconstruction"]
        row = {
            "setting": name, "expert": expert, "method": label, "base_method": method,
            "options": options, "ablation": "[" in label, "target_ratio": ratio,
            "achieved_ratio": round(rec["achieved_ratio"], 4), **{k: round(v, 4) for k, v in q.items()},
            "ppl_retention": round(d["expert_ppl"] / q["expert_ppl"], 4),
            "general_ppl_retention": round(d["general_ppl"] / q["general_ppl"], 4),
            "params": rec["params_after"]["total"], "seconds": round(time.time() - t, 1),
            "prune_seconds": round(prune_seconds, 1), "prune_peak_rss_mb": rec.get("peak_rss_mb"),
            **({"prune_peak_cuda_mb": rec["peak_cuda_mb"]} if "peak_cuda_mb" in rec else {}),
            "device": device_name(device), "allocation": rec.get("allocation"),
            "reconstruction": {k: recon.get(k) for k in ("mode", "target", "ridge", "ridge_counts",
                                                          "tried", "note", "select") if k in recon},
            "ffn_widths": structure_of(m).intermediate_sizes,
        }
        if "mc_acc" in q and d.get("mc_acc"):
            row["acc_retention"] = round(q["mc_acc"] / d["mc_acc"], 4)
        rows.append(row)
        write_json(path.name, payload | {"partial": True,
                                         "note": f"{len(rows)} rows so far; the run resumes from here"})
        print(f"[quality] {name} r={ratio} {label}: ppl {q['expert_ppl']:.2f} "
              f"general {q['general_ppl']:.2f} acc {q.get('mc_acc', float('nan')):.3f} "
              f"refit {recon.get('mode')} prune {prune_seconds:.0f} s", flush=True)
        del m
    # a run restricted to some rows, settings or ratios leaves the full table partial
    measured = {(r["setting"], r["method"], r["target_ratio"]) for r in rows}
    missing = expected_rows(quick, settings if quick else None) - measured
    if missing:
        payload |= {"partial": True, "note": f"{len(rows)} rows so far, {len(missing)} to measure; the run resumes "
                    "from here"}
    write_json(path.name, payload)
    return payload
