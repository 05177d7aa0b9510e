"""Speed of experts against the dense model on ONNX Runtime, plus the pipeline's own stage times.

First a real build (`cusprun_edge.pipeline.build.build`, x86-cpu int4, cusprun at 0.25) from scratch, whose
per-stage seconds are the pipeline's own cost. Then dense and experts at each ratio (the build's scores
reused) are exported for x86-cpu (int4 and fp32) and measured side by side in one `bench` run per
precision, so each speed-up is a ratio measured in the same run. The reference a user starts from, dense
PyTorch eager greedy generation, is measured too. The GGUF conversion (first load) and the cached second
load are timed in fresh processes with an empty cache.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cusprun_edge import load_expert, load_model
from cusprun_edge.config.corpora import ExpertSpec
from cusprun_edge.export import export_model
from cusprun_edge.measure.bench import bench
from cusprun_edge.pipeline.build import build
from cusprun_edge.pipeline.config import BuildConfig
from cusprun_edge.prune.pruner import prune_and_save
from cusprun_edge.prune.score import ScoreSet

from .common import machine, write_json

WORK = Path(__file__).resolve().parent / "work"
EXPERT = "language=en,domain=general"
LOAD_SNIPPET = "import time,sys; t=time.time(); from cusprun_edge import load_model; load_model('{m}'); print(time.time()-t)"


def _timed_load(model_name: str, cache: str) -> float:
    env = {**os.environ, "CUSPRUN_EDGE_CACHE": cache}
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET.format(m=model_name)], env=env, check=True,
                         capture_output=True, text=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 2)


def load_times(model_name: str) -> dict:
    """First load (GGUF dequantized and cached) and second load (from the cache), in fresh processes."""
    with tempfile.TemporaryDirectory() as cache:
        first = _timed_load(model_name, cache)
        second = _timed_load(model_name, cache)
    return {"first_load_s": first, "second_load_s": second}


@torch.no_grad()
def eager_tok_s(model, tok, new_tokens: int) -> dict:
    ids = tok("The history of the printing press", return_tensors="pt").input_ids
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - t
    return {"new_tokens": int(out.shape[1] - ids.shape[1]), "tok_s": round((out.shape[1] - ids.shape[1]) / seconds, 2)}


def pipeline_build() -> tuple[Path, dict]:
    """A real `cusprun-edge build` (Python API) from scratch: its per-stage seconds are what a user waits."""
    out = WORK / "build"
    if out.exists():
        shutil.rmtree(out)  # a finished build would be resumed, and its stages skipped
    config = BuildConfig(target="x86-cpu", expert=EXPERT, ratio=0.25, method="cusprun", precision="int4",
                         threads=2, quick_bench=True)
    t = time.time()
    records = build(config, out)
    stage_s = {name: rec["seconds"] for name, rec in records.items()}
    return out, {"stages_s": stage_s, "total_s": round(time.time() - t, 2),
                 "config": {k: v for k, v in asdict(config).items() if k in ("target", "expert", "ratio", "precision")}}


def run(quick: bool = False, model_name: str = "smollm2-135m") -> dict:
    ratios = [0.25] if quick else [0.25, 0.35, 0.45]
    precisions = ["int4"] if quick else ["int4", "fp32"]
    WORK.mkdir(parents=True, exist_ok=True)
    loads = load_times(model_name)
    build_dir, pipeline = pipeline_build()
    print(f"[speed] pipeline stages (s): {pipeline['stages_s']}", flush=True)
    model, tok = load_model(model_name)
    eager = eager_tok_s(model, tok, 32 if quick else 128)
    scores = ScoreSet.load(build_dir / "score" / "scores.safetensors")
    names = list(ExpertSpec.parse(EXPERT).corpora())
    prune_record = json.loads((build_dir / "prune" / "stage.json").read_text())["result"]
    experts = {0.25: {"dir": build_dir / "prune" / "expert", "achieved_ratio": prune_record["achieved_ratio"],
                      "params": prune_record["params_after"]["total"]}}
    for ratio in ratios[1:]:
        out = WORK / f"expert-{ratio:.2f}"
        rec = prune_and_save(copy.deepcopy(model), tok, scores, names, "cusprun", ratio, out, force=True,
                             corpora=ExpertSpec.parse(EXPERT).corpora())
        experts[ratio] = {"dir": out, "achieved_ratio": rec["achieved_ratio"], "params": rec["params_after"]["total"]}
    export_s, results = {}, {}
    for precision in precisions:
        artifacts, labels = [], []
        for label, source in [("dense", None)] + [(f"expert-{r:.2f}", experts[r]["dir"]) for r in ratios]:
            built = {"dense": "dense", "expert-0.25": "expert"}.get(label)
            if precision == "int4" and built:  # the pipeline build above exported these already
                artifacts.append(build_dir / "export" / built)
                labels.append(label)
                continue
            m, mtok = (model, tok) if source is None else load_expert(source)
            dest = WORK / f"onnx-{label}-{precision}"
            t = time.time()
            export_model(m, mtok, "x86-cpu", dest, precision=precision, force=True)
            export_s[f"{label}_{precision}"] = round(time.time() - t, 2)
            artifacts.append(dest)
            labels.append(label)
        record = bench(artifacts, labels=labels, providers=["cpu"], quick=quick, threads=2)
        results[precision] = {"bench": record}
        print(f"[speed] {precision}: " + json.dumps(record["speedup"]), flush=True)
    payload = {"benchmark": "speed", "quick": quick, "model": model_name, "machine": machine(),
               "expert": EXPERT, "method": "cusprun",
               "experts": {f"{r:.2f}": {k: v for k, v in e.items() if k != "dir"} for r, e in experts.items()},
               "load": loads, "eager_pytorch": eager, "pipeline": pipeline, "export_s": export_s, "results": results}
    write_json("speed-quick.json" if quick else "speed.json", payload)
    return payload


def _mb(value) -> str:
    return str(round(value)) if value else "-"


def speed_markdown(s: dict) -> list[str]:
    m = s["machine"]
    lines = [f"Model: {s['model']}, expert `{s['expert']}` pruned with {s['method']}. Machine: {m['date']}, "
             f"{m['cpu']} ({m['cores']} cores), onnxruntime {m['onnxruntime']}, onnxruntime-genai "
             f"{m['onnxruntime_genai']}. CPU execution provider, 2 intra-op threads. Each table is one run: "
             "dense and experts side by side. RSS loaded: the benchmark process after the model is loaded; peak "
             "RSS also holds the runtime's generation buffers (KV cache, logits), which the pruning does not shrink. "
             "int4 artifacts follow export.quant_plan (8-bit lm_head, grid weights stored exactly); those marked "
             "8-bit failed the int4 gate at 4 bits and were exported with the named projections at 8 bits.", ""]
    lines += [f"Reference: dense PyTorch fp32 eager greedy generation {s['eager_pytorch']['tok_s']} tokens/s. "
              f"First load of the embedded model (GGUF dequantized and cached) {s['load']['first_load_s']} s; "
              f"second load {s['load']['second_load_s']} s.", ""]
    for precision, res in s["results"].items():
        rec = res["bench"]
        cpu = rec["providers"].get("CPUExecutionProvider", {})
        if cpu.get("status") != "measured":
            lines += [f"{precision}: CPU not measured ({cpu.get('reason')})", ""]
            continue
        prompt_lengths = rec["settings"]["prompt_lengths"]
        head = " | ".join(f"prefill {n} ms" for n in prompt_lengths)
        lines += [f"### {precision}", "",
                  f"| artifact | params | file MB | {head} | decode ms/token | decode tok/s | speed-up | RSS loaded MB | peak RSS MB |",
                  "|---|---|---|" + "---|" * len(prompt_lengths) + "---|---|---|---|---|"]
        speed = rec["speedup"].get("CPUExecutionProvider", {})
        for label, r in cpu["results"].items():
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} |")
                continue
            art = rec["artifacts"][label]
            pre = " | ".join(f"{r['prefill'][str(n)]['p50_ms']:.1f}" if str(n) in r["prefill"] else "-"
                             for n in prompt_lengths)
            sp = speed.get(label, {}).get("decode")
            if art.get("eight_bit_modules"):
                label += f" (8-bit {'/'.join(art['eight_bit_modules'])})"
            lines.append(f"| {label} | {art['params']:,} | {art['file_bytes'] / 2**20:.1f} | {pre} | "
                         f"{r['decode']['per_token']['p50_ms']:.2f} | {r['decode']['tok_s']:.1f} | "
                         f"{'%.2fx' % sp if sp else '-'} | {_mb(r.get('rss_loaded_mb'))} | {_mb(r.get('peak_rss_mb'))} |")
        lines.append("")
    p = s["pipeline"]
    cfg = p["config"]
    lines += ["### The pipeline itself", "",
              f"One `build` from scratch ({cfg['target']}, {cfg['precision']}, `{cfg['expert']}`, ratio "
              f"{cfg['ratio']}, quick bench), {p['total_s']:.0f} s in all:", "",
              "| " + " | ".join(p["stages_s"]) + " |", "|" + "---|" * len(p["stages_s"]),
              "| " + " | ".join(f"{v:.1f} s" for v in p["stages_s"].values()) + " |", ""]
    if s["export_s"]:
        lines += ["Each further export above (model to ONNX, quantized, parity-checked), s: "
                  + ", ".join(f"{k} {v}" for k, v in s["export_s"].items()), ""]
    return lines
