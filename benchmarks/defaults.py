"""How cusprun's defaults are chosen: every candidate recipe is judged on the held-apart calibration documents
(`Corpus.tune`), never on the eval split.

For each expert setting and ratio, cusprun is pruned (with its default reconstruction) under the default
recipe and under each alternative that changes one field: the head policy, the allocation (uniform budgets,
global ranking), the damage budgets' power, Cus-Prun's tau and aggregation. The figure compared is the perplexity of the
held-apart documents of the expert as it would ship (refitted or not, whichever the refit pass kept). A field's
default changes only if an alternative lowers the geometric mean of that perplexity over the three settings.
`python -m benchmarks defaults [--ratios 0.35]` resumes where it stopped (results/defaults.json).
"""

from __future__ import annotations

import copy
import json
import math
import time

import torch

from cusprun_edge import load_model
from cusprun_edge.config.corpora import ExpertSpec, all_builtin_corpora
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

from .common import RESULTS, machine, write_json
from .quality import DEFAULT_MODEL, SETTINGS, device_name

RATIOS = [0.35]
# label -> recipe overrides of cusprun (the default recipe first)
CANDIDATES = {
    "default": {},
    "head_policy=fraction": {"head_policy": "fraction"},
    "allocation=uniform": {"allocation": "uniform"},
    "allocation=global": {"allocation": "global"},
    "damage_power=0.5": {"damage_power": 0.5},
    "tau=1.0": {"tau": 1.0},
    "aggregate=mean": {"aggregate": "mean"},
}
NAME = "defaults.json"


def _tune_ppl(rec: dict) -> float:
    """Held-apart perplexity of the expert as it ships: the refit's or no refit's, whichever was kept."""
    tried = {t["refit"]: t["tune_ppl"] for t in rec["reconstruction"].get("tried", [])}
    return tried["per-layer ridge"] if rec["reconstruction"].get("mode") != "none" else tried["none"]


def run(ratios: list[float] | None = None, model_name: str = DEFAULT_MODEL, only: list[str] | None = None,
        device: str = "cpu") -> dict:
    """`only`: these settings (default: all three); `device`: where the model runs."""
    ratios = ratios or RATIOS
    settings = [s for s in SETTINGS if not only or s in only]
    path = RESULTS / NAME
    old = json.loads(path.read_text()) if path.exists() else {}
    rows = old.get("rows", []) if old.get("model") == model_name else []
    done = {(r["setting"], r["ratio"], r["candidate"]) for r in rows}
    todo = [(s, r, c) for r in ratios for s in settings for c in CANDIDATES if (s, r, c) not in done]
    payload = {"benchmark": "defaults", "model": model_name, "machine": machine(), "rows": rows,
               "judged_on": "held-apart calibration documents (Corpus.tune); the eval split is not read"}
    if not todo:
        print(f"[defaults] every row is already in {NAME}", flush=True)
        return payload
    torch.manual_seed(0)
    model, tok = load_model(model_name)
    model.to(device)
    needed = {n for s in settings for n in ExpertSpec.parse(SETTINGS[s]).corpora()}
    corpora = {k: v for k, v in all_builtin_corpora().items() if k in needed}
    scores = score_model(model, tok, corpora, show_progress=False)
    for setting, ratio, label in todo:
        names = list(ExpertSpec.parse(SETTINGS[setting]).corpora())
        m = copy.deepcopy(model)
        t = time.time()
        rec = prune_model(m, scores, names, "cusprun", ratio, options=dict(CANDIDATES[label]), tokenizer=tok,
                          corpora={n: corpora[n] for n in names})
        row = {"setting": setting, "ratio": ratio, "candidate": label, "options": CANDIDATES[label],
               "tune_ppl": _tune_ppl(rec), "refit": rec["reconstruction"].get("mode"),
               "achieved_ratio": round(rec["achieved_ratio"], 4), "seconds": round(time.time() - t, 1),
               "device": device_name(device)}
        if "layer_damage" in rec:
            row["layer_damage"] = rec["layer_damage"]
        rows.append(row)
        write_json(NAME, payload | {"partial": True})
        print(f"[defaults] {setting} r={ratio} {label}: tune ppl {row['tune_ppl']:.3f} ({row['seconds']:.0f} s)",
              flush=True)
        del m
    write_json(NAME, payload)
    return payload


def summary(data: dict) -> list[dict]:
    """Per ratio and candidate: its held-apart perplexity per setting, and the geometric mean of its ratio to
    the default's over the settings where both were measured (below 1: better than the default)."""
    out = []
    for ratio in sorted({r["ratio"] for r in data["rows"]}):
        by = {(r["setting"], r["candidate"]): r["tune_ppl"] for r in data["rows"] if r["ratio"] == ratio}
        cands = [c for c in CANDIDATES if any(k[1] == c for k in by)]
        for c in cands:
            common = [s for s in SETTINGS if (s, c) in by and (s, "default") in by]
            vs = (math.exp(sum(math.log(by[(s, c)] / by[(s, "default")]) for s in common) / len(common))
                  if common else None)
            out.append({"ratio": ratio, "candidate": c, "vs_default": round(vs, 4) if vs else None,
                        "settings": common, "per_setting": {s: by[(s, c)] for s in SETTINGS if (s, c) in by}})
        out.sort(key=lambda r: (r["ratio"], r["vs_default"] if r["vs_default"] is not None else 9.0))
    return out
