"""The speed/quality frontier: every point is one int4 artifact, measured as it ships.

For each expert setting and ratio (with and without vocabulary pruning) the expert is pruned with the
default method (Cus-Prun with its default reconstruction), exported for x86-cpu int4, and that same
artifact gives both numbers: held-out perplexity on the eval split through ONNX Runtime, and decode and
prefill (time to first token) speed-ups against the dense int4 artifact, measured as a pair in one bench
call right after each other. The weights one generated token reads give the speed-up the memory traffic
predicts. Finished points are kept in the results file; a re-run measures only what is missing.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from cusprun_edge import load_model
from cusprun_edge.config.corpora import ExpertSpec, calibration_documents
from cusprun_edge.export import export_model
from cusprun_edge.measure.bench import bench
from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
from cusprun_edge.measure.runtime import OnnxCausalLM
from cusprun_edge.model.weights_read import weight_bytes_per_token
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import ScoreSet, score_model
from cusprun_edge.prune.vocab import trim_vocab_for_corpora, vocab_held_out

from .common import RESULTS, machine, write_json
from .quality import SETTINGS

# the quality settings, plus the default build's expert (not in `make bench`: for other models, e.g. Gemma)
FRONTIER_SETTINGS = SETTINGS | {"en+general": "language=en,domain=general"}

WORK = Path(__file__).resolve().parent / "work" / "frontier"
RATIOS = [0.10, 0.15, 0.20, 0.25, 0.35, 0.45]
TARGET = "x86-cpu"
# one pair measurement: TTFT on a 128-token prompt, decode over 64 new tokens
BENCH = {"prompt_lengths": [128], "new_tokens": 64, "decode_prompt_tokens": 16, "reps": 3, "decode_reps": 3,
         "warmup": 1}
QUALITY_TARGETS = (1.1, 1.2)


def result_name(quick: bool) -> str:
    return "frontier-quick.json" if quick else "frontier.json"


def _load(quick: bool) -> dict:
    path = RESULTS / result_name(quick)
    if path.exists():
        return json.loads(path.read_text())
    return {"benchmark": "frontier", "dense": {}, "points": {}}


def _onnx_ppl(artifact: Path, tok, texts: list[str]) -> float:
    return perplexity(OnnxCausalLM(artifact, threads=2).logits_fn, tok, texts, batch_size=4)


def _per_dense_token(logits_fn, own_tok, dense_tok, texts: list[str]) -> float:
    """A trimmed vocabulary's perplexity per dense token on the texts dense reads (first 512 dense tokens)."""
    from cusprun_edge.measure.evaluate import clip_to_tokens, text_quality

    return text_quality(logits_fn, own_tok, clip_to_tokens(dense_tok, texts, 512), dense_tok,
                        batch_size=4)["ppl_per_dense_token"]


def _export(model, tok, dest: Path, expert: str | None = None) -> dict:
    """int4 as `build` exports it: gated on the expert's eval split too, off-grid weights quantized on its
    calibration documents."""
    if (dest / "manifest.json").exists():
        return json.loads((dest / "manifest.json").read_text())
    calibration = calibration_documents(ExpertSpec.parse(expert).corpora()) if expert else None
    return export_model(model, tok, TARGET, dest, precision="int4", force=True, held_out=expert,
                        calibration=calibration)


def _pair_speed(dense_dir: Path, expert_dir: Path) -> dict:
    rec = bench([dense_dir, expert_dir], labels=["dense", "expert"], providers=["cpu"], threads=2, settings=BENCH)
    cpu = rec["providers"]["CPUExecutionProvider"]["results"]
    d, e = cpu["dense"], cpu["expert"]
    n = str(BENCH["prompt_lengths"][0])
    return {"decode_tok_s": e["decode"]["tok_s"], "dense_decode_tok_s": d["decode"]["tok_s"],
            "decode_speedup": e["decode"]["tok_s"] / d["decode"]["tok_s"],
            "ttft_ms": e["prefill"][n]["p50_ms"], "dense_ttft_ms": d["prefill"][n]["p50_ms"],
            "ttft_speedup": d["prefill"][n]["p50_ms"] / e["prefill"][n]["p50_ms"],
            "file_bytes": rec["artifacts"]["expert"]["file_bytes"],
            "dense_file_bytes": rec["artifacts"]["dense"]["file_bytes"]}


def run(quick: bool = False, model_name: str = "smollm2-135m", only: list[str] | None = None,
        vocab_modes: tuple[bool, ...] = (False, True), ratios: list[float] | None = None) -> dict:
    unknown = [s for s in only or [] if s not in FRONTIER_SETTINGS]
    if unknown:
        print(f"unknown setting {', '.join(unknown)}; choose from {', '.join(FRONTIER_SETTINGS)}", file=sys.stderr)
        raise SystemExit(2)
    data = _load(quick)
    settings = only or (["code"] if quick else list(SETTINGS))
    ratios = ratios or ([0.25] if quick else RATIOS)
    torch.manual_seed(0)
    model, tok = load_model(model_name)
    model.eval()
    work = WORK / model_name
    dense_dir = work / "dense-int4"
    dense_manifest = _export(model, tok, dense_dir)
    dense_read = weight_bytes_per_token(dense_dir / "model.onnx")
    started = time.time()
    for setting in settings:
        spec = ExpertSpec.parse(FRONTIER_SETTINGS[setting])
        corpora = spec.corpora()
        texts = [t for c in corpora.values() for t in c.eval]
        dkey = f"{model_name}/{setting}"
        if dkey not in data["dense"]:
            data["dense"][dkey] = {
                "fp32_ppl": perplexity(torch_logits_fn(model), tok, texts),
                "int4_ppl": _onnx_ppl(dense_dir, tok, texts),
                "per_token_bytes": dense_read["per_token_bytes"],
                "file_bytes": dense_manifest.get("total_bytes"),
            }
            write_json(result_name(quick), data)
        dense = data["dense"][dkey]
        score_file = work / setting / "scores.safetensors"
        if score_file.exists():
            scores = ScoreSet.load(score_file)
        else:
            scores = score_model(model, tok, corpora, show_progress=False)
            score_file.parent.mkdir(parents=True, exist_ok=True)
            scores.save(score_file)
        for vocab in vocab_modes:
            for ratio in ratios:
                key = f"{model_name}/{setting}/{ratio:.2f}/{'vocab' if vocab else 'full'}"
                if "decode_speedup" in data["points"].get(key, {}):
                    continue
                t0 = time.time()
                expert = copy.deepcopy(model)
                rec = prune_model(expert, scores, list(corpora), "cusprun", ratio, tokenizer=tok, corpora=corpora)
                point = {"model": model_name, "setting": setting, "ratio": ratio, "vocab_pruned": vocab,
                         "achieved_ratio": rec["achieved_ratio"], "params": rec["params_after"]["total"],
                         "prune_seconds": rec["seconds"], "prune_peak_rss_mb": rec.get("peak_rss_mb"),
                         "reconstruction": {k: v for k, v in rec.get("reconstruction", {}).items()
                                            if isinstance(v, (str, int, float))}}
                dest = work / setting / f"{ratio:.2f}-{'vocab' if vocab else 'full'}"
                if vocab:  # its own tokenizer: perplexity per dense token (evaluate.per_dense_token)
                    calib = [t for c in corpora.values() for t in c.calib]
                    etok, v = trim_vocab_for_corpora(expert, tok, calib, corpora=corpora,
                                                     held_out=vocab_held_out(corpora))
                    point["vocab"] = {k: v.get(k) for k in ("vocab_before", "vocab_after", "coverage")}
                    point["fp32_ppl"] = _per_dense_token(torch_logits_fn(expert), etok, tok, texts)
                    manifest = _export(expert, etok, dest, FRONTIER_SETTINGS[setting])
                    point["int4_ppl"] = _per_dense_token(OnnxCausalLM(dest, threads=2).logits_fn, etok, tok, texts)
                else:
                    point["fp32_ppl"] = perplexity(torch_logits_fn(expert), tok, texts)
                    manifest = _export(expert, tok, dest, FRONTIER_SETTINGS[setting])
                    point["int4_ppl"] = _onnx_ppl(dest, tok, texts)
                del expert
                point["ppl_ratio"] = point["int4_ppl"] / dense["fp32_ppl"]
                point["eight_bit"] = (manifest.get("quantization") or {}).get("eight_bit")
                point["fallback"] = (manifest.get("quantization") or {}).get("fallback")
                read = weight_bytes_per_token(dest / "model.onnx")
                point["per_token_bytes"] = read["per_token_bytes"]
                point["bytes_speedup"] = dense["per_token_bytes"] / read["per_token_bytes"]
                point.update(_pair_speed(dense_dir, dest))
                point["seconds"] = round(time.time() - t0, 1)
                data["points"][key] = point
                print(f"[frontier] {key}: ppl x{point['ppl_ratio']:.2f}, decode x{point['decode_speedup']:.2f} "
                      f"(bytes predict x{point['bytes_speedup']:.2f}), ttft x{point['ttft_speedup']:.2f}", flush=True)
                data.update({"machine": machine(), "target": TARGET, "bench": BENCH})
                write_json(result_name(quick), data)
                # the artifact (60-90 MB, ignored by git) stays for `--respeed` on a quiet machine
    data["summary"] = summarize(data["points"].values())
    data["seconds_last_run"] = round(time.time() - started, 1)
    write_json(result_name(quick), data)
    plot(data, RESULTS / ("frontier-quick.png" if quick else "frontier.png"))
    return data


def respeed(quick: bool = False, rounds: int = 3, only: list[str] | None = None,
            ratios: list[float] | None = None) -> dict:
    """Measure the speed pairs again for every point whose artifact is still in the work folder: `rounds`
    pair calls, dense and expert alternating, the median of each ratio kept (run it when nothing else
    shares the cores; quality figures are not touched)."""
    data = _load(quick)
    for key, point in data["points"].items():
        model_name, setting, ratio, vocab = key.split("/")
        if (only and setting not in only) or (ratios and float(ratio) not in ratios):
            continue
        dense_dir = WORK / model_name / "dense-int4"
        dest = WORK / model_name / setting / f"{ratio}-{vocab}"
        if not (dest / "manifest.json").exists() or not (dense_dir / "manifest.json").exists():
            continue
        pairs = [_pair_speed(dense_dir, dest) for _ in range(rounds)]
        median = {k: sorted(p[k] for p in pairs)[len(pairs) // 2] for k in pairs[0]}
        point.update(median)
        point["speed_rounds"] = rounds
        point["speed_date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"[frontier] {key}: decode x{point['decode_speedup']:.2f}, ttft x{point['ttft_speedup']:.2f} "
              f"({rounds} rounds)", flush=True)
        write_json(result_name(quick), data)
    data["summary"] = summarize(data["points"].values())
    write_json(result_name(quick), data)
    plot(data, RESULTS / ("frontier-quick.png" if quick else "frontier.png"))
    return data


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both decode speed-up (higher) and perplexity ratio (lower)."""
    return [p for p in points if not any(
        q["decode_speedup"] >= p["decode_speedup"] and q["ppl_ratio"] <= p["ppl_ratio"]
        and (q["decode_speedup"], q["ppl_ratio"]) != (p["decode_speedup"], p["ppl_ratio"]) for q in points)]


def summarize(points) -> dict:
    points = [p for p in points if "decode_speedup" in p]
    out = {}
    for group in sorted({(p["model"], p["setting"]) for p in points}):
        mine = [p for p in points if (p["model"], p["setting"]) == group]
        entry = {"frontier": sorted((f"{p['ratio']:.2f}/{'vocab' if p['vocab_pruned'] else 'full'}"
                                     for p in pareto(mine)))}
        for limit in QUALITY_TARGETS:
            ok = [p for p in mine if p["ppl_ratio"] <= limit]
            best = max(ok, key=lambda p: p["decode_speedup"]) if ok else None
            entry[f"fastest_within_{limit}x"] = None if best is None else {
                k: best[k] for k in ("ratio", "vocab_pruned", "decode_speedup", "ttft_speedup", "ppl_ratio")}
        out["/".join(group)] = entry
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in data["points"].values() if "decode_speedup" in p]
    if not points:
        return
    groups = sorted({(p["model"], p["setting"]) for p in points})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        mine = [p for p in points if (p["model"], p["setting"]) == g]
        for vocab, marker in ((False, "o"), (True, "^")):
            sel = [p for p in mine if p["vocab_pruned"] == vocab]
            if sel:
                ax.scatter([p["ppl_ratio"] for p in sel], [p["decode_speedup"] for p in sel], marker=marker,
                           label=f"{'/'.join(g)}{' +vocab' if vocab else ''}")
        front = sorted(pareto(mine), key=lambda p: p["ppl_ratio"])
        ax.plot([p["ppl_ratio"] for p in front], [p["decode_speedup"] for p in front], lw=1, alpha=0.6)
    for limit in QUALITY_TARGETS:
        ax.axvline(limit, ls="--", c="grey", lw=0.8)
    ax.axhline(1.0, c="grey", lw=0.8)
    ax.set_xlabel("held-out perplexity / dense fp32 (int4 artifact)")
    ax.set_ylabel("int4 CPU decode speed-up vs dense int4")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
