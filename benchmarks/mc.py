"""Multiple-choice retention of pruned experts, item by item, with a standard error.

The quality table reports each row's multiple-choice accuracy as one share. With 40-80 items per setting and a
dense accuracy near 0.45, one item moves a retention by 0.05, so this benchmark keeps each item's outcome for the
dense model and for the expert, and gives the retention's standard error by a paired bootstrap over items (the
same resampled items for dense and expert, settings resampled independently).

`python -m benchmarks mc [--ratios 0.25] [--rows cusprun,...] [--settings ...]` writes results/mc_retention.json.
Items are the held-out `*.mc.jsonl` of each setting's domain and task categories; nothing here decides anything.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from cusprun_edge import load_model
from cusprun_edge.config.corpora import ExpertSpec, all_builtin_corpora
from cusprun_edge.measure.evaluate import mc_correct, torch_logits_fn
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

from .common import machine, write_json
from .quality import DEFAULT_MODEL, SETTINGS, _subset, device_name, variants

NAME = "mc_retention.json"
BOOTSTRAP = 10_000


def _items(corpora: dict) -> dict[str, list[dict]]:
    """Category name -> its held-out multiple-choice items, for the categories of one setting that have any."""
    return {name: c.mc for name, c in corpora.items() if c.mc}


def _correct(model, tok, items: dict[str, list[dict]]) -> dict[str, list[bool]]:
    fn = torch_logits_fn(model, on_device=True)
    return {name: mc_correct(fn, tok, its) for name, its in items.items()}


def retention_se(dense: list[np.ndarray], expert: list[np.ndarray], rounds: int = BOOTSTRAP,
                 seed: int = 0) -> tuple[list[float], float, list[float], float]:
    """Per setting, retention = expert accuracy / dense accuracy and its paired-bootstrap standard error; and the
    mean retention over settings with its standard error. `dense[i]`, `expert[i]`: setting i's per-item outcomes
    (0/1, the same items in the same order)."""
    rng = np.random.default_rng(seed)
    samples = []
    for d, e in zip(dense, expert):
        picks = rng.integers(0, len(d), (rounds, len(d)))
        dense_acc = d[picks].mean(1)
        # a resample where dense gets nothing right has no retention; it is dropped (rare at dense accuracy ~0.45)
        with np.errstate(divide="ignore", invalid="ignore"):
            samples.append(np.where(dense_acc > 0, e[picks].mean(1) / dense_acc, np.nan))
    point = [float(e.mean() / d.mean()) for d, e in zip(dense, expert)]
    per_se = [float(np.nanstd(s)) for s in samples]
    mean = np.nanmean(np.stack(samples), 0)
    return point, float(np.mean(point)), per_se, float(np.nanstd(mean))


def run(model_name: str = DEFAULT_MODEL, only: list[str] | None = None, ratios: list[float] | None = None,
        rows: list[str] | None = None, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    settings = _subset(SETTINGS, only, "setting") if only else SETTINGS
    ratios = ratios or [0.25]
    methods = _subset(variants(False), rows or ["cusprun"], "row")
    model, tok = load_model(model_name)
    model.to(device)
    by_setting = {name: ExpertSpec.parse(spec).corpora() for name, spec in settings.items()}
    items = {name: _items(c) for name, c in by_setting.items()}
    needed = {n for c in by_setting.values() for n in c}
    corpora = {k: v for k, v in all_builtin_corpora().items() if k in needed}
    scores = score_model(model, tok, corpora, show_progress=False)
    dense = {name: _correct(model, tok, items[name]) for name in settings}
    out_rows = []
    for label, (method, options) in methods.items():
        for ratio in ratios:
            per_setting = {}
            for name in settings:
                names = list(by_setting[name])
                m = copy.deepcopy(model)
                t = time.time()
                rec = prune_model(m, scores, names, method, ratio, options=dict(options), tokenizer=tok,
                                  corpora={n: corpora[n] for n in names})
                per_setting[name] = {"outcomes": _correct(m, tok, items[name]), "allocation": rec.get("allocation"),
                                     "prune_seconds": round(time.time() - t, 1)}
                del m
            flat = {name: (np.concatenate([np.array(v, float) for v in dense[name].values()]),
                           np.concatenate([np.array(v, float) for v in per_setting[name]["outcomes"].values()]))
                    for name in settings}
            point, mean, per_se, mean_se = retention_se([d for d, _ in flat.values()], [e for _, e in flat.values()])
            out_rows.append({
                "method": label, "target_ratio": ratio, "mean_retention": round(mean, 4),
                "mean_retention_se": round(mean_se, 4),
                "settings": {name: {
                    "items": int(len(flat[name][0])), "dense_acc": round(float(flat[name][0].mean()), 4),
                    "expert_acc": round(float(flat[name][1].mean()), 4), "retention": round(point[i], 4),
                    "retention_se": round(per_se[i], 4), "allocation": per_setting[name]["allocation"],
                    "prune_seconds": per_setting[name]["prune_seconds"],
                    "by_category": {cat: {"items": len(v), "dense_acc": round(float(np.mean(dense[name][cat])), 4),
                                          "expert_acc": round(float(np.mean(v)), 4)}
                                    for cat, v in per_setting[name]["outcomes"].items()},
                } for i, name in enumerate(settings)},
            })
            print(f"[mc] {label} r={ratio}: mean retention {mean:.3f} (SE {mean_se:.3f}) "
                  + ", ".join(f"{n} {p:.3f}" for n, p in zip(settings, point)), flush=True)
    payload = {"benchmark": "mc-retention", "model": model_name, "device": device_name(device),
               "bootstrap_rounds": BOOTSTRAP, "machine": machine(), "rows": out_rows,
               "how": "per-item outcomes of dense and expert on each setting's held-out multiple-choice items; "
                      "retention = expert accuracy / dense accuracy; SE by paired bootstrap over items"}
    write_json(NAME, payload)
    return payload
