"""The speed/quality frontier against what a user would otherwise ship: every point is one int4 artifact, measured as
it ships, beside ONNX Runtime GenAI's builder int4 of the same dense model and our own dense fast-plan int4.

For each expert setting and ratio (and, for chosen ratios, trimmed vocabularies of fixed sizes) the expert is pruned
with the default method (Cus-Prun, damage budgets, its refit), exported for x86-cpu with the build's default int4
plan (`fast`), and that artifact gives both numbers:
- quality: perplexity per dense token on the eval split through ONNX Runtime (the same text, cut at 512 dense
  tokens, for every artifact: a trimmed tokenizer splits some words into more tokens, and per dense token is the
  only fair figure then), against dense PyTorch fp32 and the builder;
- speed: decode tokens/s and time to first token through onnxruntime_genai at 2 threads, in rounds that alternate
  between the builder, our dense int4 and the expert (benchmarks/builder.speed), so every ratio is within one run.
The weights one generated token reads give the speed-up the memory traffic predicts. Finished points are kept in
the results file; a re-run measures only what is missing.
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
from cusprun_edge.measure.baseline import builder_artifact
from cusprun_edge.measure.evaluate import clip_to_tokens, text_quality, torch_logits_fn
from cusprun_edge.measure.runtime import OnnxCausalLM
from cusprun_edge.model.weights_read import weight_bytes_per_token
from cusprun_edge.prune.pruner import prune_model
from cusprun_edge.prune.score import ScoreSet, score_model
from cusprun_edge.prune.vocab import trim_vocab_for_corpora, vocab_held_out

from .builder import file_bytes, speed
from .common import RESULTS, machine, write_json
from .quality import SETTINGS

# the default build's expert first, then the quality settings
FRONTIER_SETTINGS = {"en+general": "language=en,domain=general"} | SETTINGS

WORK = Path(__file__).resolve().parent / "work" / "frontier"
RATIOS = [0.05, 0.10, 0.15, 0.20, 0.25]
# trimmed vocabularies measured at the default ratio: SmolLM2's 49,152 ids follow merge order, and 32,768 of them
# (with the calibration tokens) cover about 97% of English prose, 16,384 about 92% (issue figures)
VOCAB_SIZES = [32768, 16384]
VOCAB_RATIOS = [0.10]
TARGET = "x86-cpu"
PLAN = "fast"
MAX_TOKENS = 512  # each eval document cut at this many dense tokens
# per point: 3 alternating rounds of builder, our dense and the expert
SPEED = {"prompt_tokens": 32, "new_tokens": 128, "ttft_prompt_tokens": 512, "rounds": 3, "threads": 2}
QUALITY_TARGETS = (1.1, 1.2)
BUILDER, DENSE, EXPERT = "genai-builder int4", "cusprun-edge dense", "expert"


def result_name(quick: bool) -> str:
    return "frontier-quick.json" if quick else "frontier.json"


def _load(quick: bool) -> dict:
    path = RESULTS / result_name(quick)
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("baseline") == BUILDER:
            return data
    # an older frontier measured against our exact dense int4: its points answer another question
    return {"benchmark": "frontier", "baseline": BUILDER, "dense": {}, "points": {}}


def _ppl(logits_fn, own_tok, dense_tok, texts: list[str]) -> float:
    """Perplexity per dense token on `texts` (already cut at MAX_TOKENS dense tokens)."""
    return text_quality(logits_fn, own_tok, texts, dense_tok, batch_size=4)["ppl_per_dense_token"]


def _export(model, tok, dest: Path, expert: str) -> dict:
    """int4 as `build` exports it: the fast plan rounded on the expert's scoring documents, gated on held-apart ones."""
    if (dest / "manifest.json").exists():
        return json.loads((dest / "manifest.json").read_text())
    calibration = calibration_documents(ExpertSpec.parse(expert).corpora())
    return export_model(model, tok, TARGET, dest, precision="int4", force=True, held_out=expert,
                        calibration=calibration, quant_plan=PLAN)


def _speed(builder: Path, dense: Path, experts: dict[str, Path], rounds: int = SPEED["rounds"]) -> dict[str, dict]:
    """Decode and TTFT of each expert ({key: directory}) against the builder and our dense int4, all in one run
    whose rounds alternate between every artifact (so a busy machine slows them alike)."""
    s = speed({BUILDER: builder, DENSE: dense, **experts}, {**SPEED, "rounds": rounds})
    b, d = s[BUILDER], s[DENSE]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return {key: {"decode_tok_s": s[key]["decode_tok_s"], "builder_decode_tok_s": b["decode_tok_s"],
                  "dense_decode_tok_s": d["decode_tok_s"],
                  "decode_vs_builder": s[key]["decode_tok_s"] / b["decode_tok_s"],
                  "decode_vs_dense": s[key]["decode_tok_s"] / d["decode_tok_s"],
                  "dense_decode_vs_builder": d["decode_tok_s"] / b["decode_tok_s"],
                  "ttft_ms": s[key]["ttft_ms"], "builder_ttft_ms": b["ttft_ms"],
                  "ttft_vs_builder": b["ttft_ms"] / s[key]["ttft_ms"], "speed_rounds": rounds,
                  "speed_run": f"{len(experts)} expert{'s' if len(experts) > 1 else ''}, the builder and our dense", "speed_date": date}
            for key in experts}


def run(quick: bool = False, model_name: str = "smollm2-135m", only: list[str] | None = None,
        vocab_modes: tuple[bool, ...] = (False, True), ratios: list[float] | None = None) -> dict:
    unknown = [s for s in only or [] if s not in FRONTIER_SETTINGS]
    if unknown:
        print(f"unknown setting {', '.join(unknown)}; choose from {', '.join(FRONTIER_SETTINGS)}", file=sys.stderr)
        raise SystemExit(2)
    data = _load(quick)
    settings = only or ["en+general"]
    ratios = ratios or ([0.10] if quick else RATIOS)
    torch.manual_seed(0)
    model, tok = load_model(model_name)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    work = WORK / model_name
    builder_dir = builder_artifact(model_name)
    started = time.time()
    for setting in settings:
        spec = FRONTIER_SETTINGS[setting]
        corpora = ExpertSpec.parse(spec).corpora()
        texts = clip_to_tokens(tok, [t for c in corpora.values() for t in c.eval], MAX_TOKENS)
        dense_dir = work / setting / "dense-int4"
        _export(model, tok, dense_dir, spec)
        dkey = f"{model_name}/{setting}"
        if dkey not in data["dense"]:
            data["dense"][dkey] = {
                "fp32_ppl": _ppl(torch_logits_fn(model), tok, tok, texts),
                "builder_ppl": _ppl(OnnxCausalLM(builder_dir, threads=2).logits_fn, tok, tok, texts),
                "int4_ppl": _ppl(OnnxCausalLM(dense_dir, threads=2).logits_fn, tok, tok, texts),
                "per_token_bytes": weight_bytes_per_token(dense_dir / "model.onnx")["per_token_bytes"],
                "builder_per_token_bytes": weight_bytes_per_token(builder_dir / "model.onnx")["per_token_bytes"],
                "file_bytes": file_bytes(dense_dir), "builder_file_bytes": file_bytes(builder_dir),
                "documents": len(texts),
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
        grid = [(r, None) for r in ratios if False in vocab_modes]
        grid += [(r, v) for r in ratios if r in VOCAB_RATIOS for v in VOCAB_SIZES if True in vocab_modes]
        for ratio, size in grid:
            vocab = "full" if size is None else str(size)
            key = f"{model_name}/{setting}/{ratio:.2f}/{vocab}"
            if "decode_vs_builder" in data["points"].get(key, {}):
                continue
            t0 = time.time()
            expert = copy.deepcopy(model)
            rec = prune_model(expert, scores, list(corpora), "cusprun", ratio, tokenizer=tok, corpora=corpora)
            point = {"model": model_name, "setting": setting, "ratio": ratio, "vocab": vocab,
                     "achieved_ratio": rec["achieved_ratio"], "params": rec["params_after"]["total"],
                     "prune_seconds": rec["seconds"]}
            dest = work / setting / f"{ratio:.2f}-{vocab}"
            etok = tok
            if size is not None:  # its own tokenizer and rows: quality per dense token
                calib = [t for c in corpora.values() for t in c.calib]
                etok, v = trim_vocab_for_corpora(expert, tok, calib, corpora=corpora, size=size,
                                                 held_out=vocab_held_out(corpora))
                point["vocab_detail"] = {k: v.get(k) for k in ("vocab_before", "vocab_after", "coverage",
                                                               "tokens_per_word")}
            point["fp32_ppl"] = _ppl(torch_logits_fn(expert), etok, tok, texts)
            manifest = _export(expert, etok, dest, spec)
            del expert
            point["int4_ppl"] = _ppl(OnnxCausalLM(dest, threads=2).logits_fn, etok, tok, texts)
            point["ppl_ratio"] = point["int4_ppl"] / dense["fp32_ppl"]
            point["ppl_vs_builder"] = point["int4_ppl"] / dense["builder_ppl"]
            point["fallback"] = (manifest.get("quantization") or {}).get("fallback")
            point["per_token_bytes"] = weight_bytes_per_token(dest / "model.onnx")["per_token_bytes"]
            point["bytes_vs_builder"] = dense["builder_per_token_bytes"] / point["per_token_bytes"]
            point["file_bytes"] = file_bytes(dest)
            point.update(_speed(builder_dir, dense_dir, {key: dest})[key])
            point["seconds"] = round(time.time() - t0, 1)
            data["points"][key] = point
            print(f"[frontier] {key}: ppl x{point['ppl_ratio']:.2f} fp32 ({point['ppl_vs_builder']:.2f}x the builder's), "
                  f"decode x{point['decode_vs_builder']:.2f} the builder (bytes predict x{point['bytes_vs_builder']:.2f}), "
                  f"x{point['decode_vs_dense']:.2f} our dense", flush=True)
            data.update({"machine": machine(), "target": TARGET, "plan": PLAN, "speed": SPEED})
            write_json(result_name(quick), data)
            # the artifact (60-90 MB, ignored by git) stays for `--respeed` on a quiet machine
    data["summary"] = summarize(data)
    data["seconds_last_run"] = round(time.time() - started, 1)
    write_json(result_name(quick), data)
    plot(data, RESULTS / ("frontier-quick.png" if quick else "frontier.png"))
    return data


def respeed(quick: bool = False, rounds: int = 7, only: list[str] | None = None,
            ratios: list[float] | None = None) -> dict:
    """Measure the speeds again, every point of a model and setting whose artifact is still in the work folder in
    one run of `rounds` rounds that alternate between all of them, the builder and our dense int4 (run it when
    nothing else shares the cores; quality figures are not touched)."""
    data = _load(quick)
    groups: dict[tuple[str, str], dict[str, Path]] = {}
    for key in data["points"]:
        model_name, setting, ratio, vocab = key.split("/")
        if (only and setting not in only) or (ratios and float(ratio) not in ratios):
            continue
        dest = WORK / model_name / setting / f"{ratio}-{vocab}"
        if (dest / "manifest.json").exists():
            groups.setdefault((model_name, setting), {})[key] = dest
    for (model_name, setting), experts in groups.items():
        dense_dir = WORK / model_name / setting / "dense-int4"
        if not (dense_dir / "manifest.json").exists():
            continue
        for key, measured in _speed(builder_artifact(model_name), dense_dir, experts, rounds).items():
            point = data["points"][key]
            point.update(measured)
            print(f"[frontier] {key}: decode x{point['decode_vs_builder']:.2f} the builder, "
                  f"x{point['decode_vs_dense']:.2f} our dense ({rounds} rounds, one run)", flush=True)
        write_json(result_name(quick), data)
    data["summary"] = summarize(data)
    write_json(result_name(quick), data)
    plot(data, RESULTS / ("frontier-quick.png" if quick else "frontier.png"))
    return data


def _measured(data: dict) -> list[dict]:
    return [p for p in data["points"].values() if "decode_vs_builder" in p]


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both decode speed against the builder (higher) and perplexity (lower)."""
    return [p for p in points if not any(
        q["decode_vs_builder"] >= p["decode_vs_builder"] and q["ppl_ratio"] <= p["ppl_ratio"]
        and (q["decode_vs_builder"], q["ppl_ratio"]) != (p["decode_vs_builder"], p["ppl_ratio"]) for q in points)]


def summarize(data: dict) -> dict:
    """Per model and setting: the frontier, and the fastest point within each quality limit, the builder's
    perplexity among them (what `build --beat-baseline` asks for)."""
    points = _measured(data)
    out = {}
    for group in sorted({(p["model"], p["setting"]) for p in points}):
        mine = [p for p in points if (p["model"], p["setting"]) == group]
        dense = data["dense"]["/".join(group)]
        limits = {f"{x}x fp32": x * dense["fp32_ppl"] for x in QUALITY_TARGETS}
        limits["the builder's perplexity"] = dense["builder_ppl"]
        entry = {"frontier": sorted(f"{p['ratio']:.2f}/{p['vocab']}" for p in pareto(mine)), "fastest_within": {}}
        for name, limit in limits.items():
            ok = [p for p in mine if p["int4_ppl"] <= limit]
            best = max(ok, key=lambda p: p["decode_vs_builder"]) if ok else None
            entry["fastest_within"][name] = None if best is None else {
                k: best[k] for k in ("ratio", "vocab", "decode_vs_builder", "decode_vs_dense", "ppl_ratio",
                                     "ppl_vs_builder")}
        out["/".join(group)] = entry
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _measured(data)
    if not points:
        return
    groups = sorted({(p["model"], p["setting"]) for p in points})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in groups:
        mine = [p for p in points if (p["model"], p["setting"]) == g]
        dense = data["dense"]["/".join(g)]
        for trimmed, marker in ((False, "o"), (True, "^")):
            sel = [p for p in mine if (p["vocab"] != "full") == trimmed]
            if sel:
                ax.scatter([p["ppl_ratio"] for p in sel], [p["decode_vs_builder"] for p in sel], marker=marker,
                           label=f"{'/'.join(g)} expert{' +trimmed vocabulary' if trimmed else ''}")
                for p in sel:
                    ax.annotate(f"{p['ratio']:.2f}" + ("" if p["vocab"] == "full" else f"/{p['vocab']}"),
                                (p["ppl_ratio"], p["decode_vs_builder"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        front = sorted(pareto(mine), key=lambda p: p["ppl_ratio"])
        ax.plot([p["ppl_ratio"] for p in front], [p["decode_vs_builder"] for p in front], lw=1, alpha=0.6)
        dense_speed = sorted(p["dense_decode_vs_builder"] for p in mine)[len(mine) // 2]
        ax.scatter([dense["int4_ppl"] / dense["fp32_ppl"]], [dense_speed], marker="s", c="k",
                   label="our dense int4 (fast plan)")
        ax.scatter([dense["builder_ppl"] / dense["fp32_ppl"]], [1.0], marker="x", c="r", s=60,
                   label="GenAI builder int4 (baseline)")
    for limit in QUALITY_TARGETS:
        ax.axvline(limit, ls="--", c="grey", lw=0.8)
    ax.axhline(1.0, c="grey", lw=0.8)
    ax.set_xlabel("held-out perplexity per dense token / dense PyTorch fp32 (int4 artifact)")
    ax.set_ylabel("decode speed vs the GenAI builder's int4 (2 threads)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
