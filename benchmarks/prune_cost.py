"""What the prune stage costs: wall time and peak memory of cusprun's default recipe (damage probes, then the
sequential refit) for the default expert (en+general) at 25%, per model and device.

`python -m benchmarks prune-cost --model gemma3-270m [--device cuda]` measures one entry and replaces the
entry of the same model and device in results/prune_cost.json. On `--device cuda` the model stays on the CPU
and one decoder layer at a time visits the GPU, as `cusprun-edge prune --device cuda` does.
"""

from __future__ import annotations

import json
import time

from cusprun_edge import load_model
from cusprun_edge.config.corpora import ExpertSpec
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import score_model

from .common import RESULTS, machine, write_json

NAME = "prune_cost.json"
EXPERT = "language=en,domain=general"
RATIO = 0.25


def entry_from_record(record: dict, model_name: str, device: str, where: dict, note: str = "") -> dict:
    """The figures of one prune record (prune.prune_model's) that say what the stage cost."""
    recon, damage = record.get("reconstruction", {}), record.get("layer_damage", {})
    return {
        "model": model_name, "device": device, "expert": EXPERT, "ratio": record["target_ratio"],
        "allocation": record.get("allocation"), "prune_seconds": record["seconds"],
        "damage_seconds": damage.get("seconds"), "refit_seconds": recon.get("seconds"),
        "peak_rss_mb": record.get("peak_rss_mb"), "peak_cuda_mb": record.get("peak_cuda_mb"),
        "statistics_mb": recon.get("stats_mb"), "statistics_alive_at_once": recon.get("peak_statistics_alive"),
        "params_before": record["params_before"]["total"], "params_after": record["params_after"]["total"],
        "machine": where, "note": note,
    }


def save_entry(entry: dict) -> None:
    path = RESULTS / NAME
    old = json.loads(path.read_text()) if path.exists() else {}
    entries = [e for e in old.get("entries", []) if (e["model"], e["device"]) != (entry["model"], entry["device"])]
    write_json(NAME, {"benchmark": "prune-cost", "entries": entries + [entry]})


def run(model_name: str, device: str = "cpu", note: str = "") -> dict:
    model, tok = load_model(model_name)
    corpora = ExpertSpec.parse(EXPERT).corpora()
    t = time.time()
    scores = score_model(model, tok, corpora, show_progress=False)
    scoring = round(time.time() - t, 1)
    record = prune_model(model, scores, list(corpora), "cusprun", RATIO, tokenizer=tok, corpora=corpora,
                         device=device)
    entry = entry_from_record(record, model_name, device, machine(), note) | {"scoring_seconds_cpu": scoring}
    save_entry(entry)
    print(f"[prune-cost] {model_name} on {device}: {entry['prune_seconds']} s, peak RSS {entry['peak_rss_mb']} MB",
          flush=True)
    return entry
