"""Speed of experts against the dense model on ONNX Runtime, plus the pipeline's own stage times.

Dense and experts at each ratio are exported for x86-cpu (int4 and fp32) and measured side by side in
one `bench` run per precision, so each speed-up is a ratio measured in the same run. The reference a
user starts from, dense PyTorch eager greedy generation, is measured too. The GGUF conversion (first
load) and the cached second load are timed in fresh processes with an empty cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cusprun_edge import load_expert, load_model
from cusprun_edge.bench import bench
from cusprun_edge.corpora import ExpertSpec
from cusprun_edge.export import export_model
from cusprun_edge.prune import prune_and_save
from cusprun_edge.score import score_model

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


def run(quick: bool = False, model_name: str = "smollm2-135m") -> dict:
    ratios = [0.25] if quick else [0.25, 0.35, 0.45]
    precisions = ["int4"] if quick else ["int4", "fp32"]
    WORK.mkdir(parents=True, exist_ok=True)
    stages: dict = {"load": load_times(model_name)}
    model, tok = load_model(model_name)
    stages["eager_pytorch"] = eager_tok_s(model, tok, 32 if quick else 128)
    corpora = ExpertSpec.parse(EXPERT).corpora()
    t = time.time()
    scores = score_model(model, tok, corpora, show_progress=False)
    stages["score_s"] = round(time.time() - t, 2)
    experts = {}
    for ratio in ratios:
        import copy

        m = copy.deepcopy(model)
        out = WORK / f"expert-{ratio:.2f}"
        t = time.time()
        rec = prune_and_save(m, tok, scores, list(corpora), "cusprun", ratio, out, force=True)
        stages[f"prune_{ratio:.2f}_s"] = round(time.time() - t, 2)
        experts[ratio] = {"dir": out, "achieved_ratio": rec["achieved_ratio"], "params": rec["params_after"]["total"]}
        del m
    results = {}
    for precision in precisions:
        artifacts, labels = [], []
        for label, source in [("dense", None)] + [(f"expert-{r:.2f}", experts[r]["dir"]) for r in ratios]:
            m, mtok = (model, tok) if source is None else load_expert(source)
            dest = WORK / f"onnx-{label}-{precision}"
            t = time.time()
            manifest = export_model(m, mtok, "x86-cpu", dest, precision=precision, force=True)
            stages[f"export_{label}_{precision}_s"] = round(time.time() - t, 2)
            artifacts.append(dest)
            labels.append(label)
            results.setdefault(precision, {}).setdefault("parity", {})[label] = manifest.get("parity")
        record = bench(artifacts, labels=labels, providers=["cpu"], quick=quick, threads=2)
        results[precision]["bench"] = record
        print(f"[speed] {precision}: " + json.dumps(record["speedup"]), flush=True)
    payload = {"benchmark": "speed", "quick": quick, "model": model_name, "machine": machine(),
               "expert": EXPERT, "method": "cusprun",
               "experts": {f"{r:.2f}": {k: v for k, v in e.items() if k != "dir"} for r, e in experts.items()},
               "stages": stages, "results": results}
    write_json("speed-quick.json" if quick else "speed.json", payload)
    return payload


def speed_markdown(s: dict) -> list[str]:
    m = s["machine"]
    lines = [f"Model: {s['model']}, expert `{s['expert']}` pruned with {s['method']}. Machine: {m['date']}, "
             f"{m['cpu']} ({m['cores']} cores), onnxruntime {m['onnxruntime']}, onnxruntime-genai "
             f"{m['onnxruntime_genai']}. CPU execution provider, 2 intra-op threads. Each table is one run: "
             "dense and experts side by side.", ""]
    st = s["stages"]
    lines += [f"Reference: dense PyTorch fp32 eager greedy generation {st['eager_pytorch']['tok_s']} tokens/s. "
              f"First load of the embedded model (GGUF dequantized and cached) {st['load']['first_load_s']} s; "
              f"second load {st['load']['second_load_s']} s.", ""]
    for precision, res in s["results"].items():
        rec = res["bench"]
        cpu = rec["providers"].get("CPUExecutionProvider", {})
        if cpu.get("status") != "measured":
            lines += [f"{precision}: CPU not measured ({cpu.get('reason')})", ""]
            continue
        prompt_lengths = rec["settings"]["prompt_lengths"]
        head = " | ".join(f"prefill {n} ms" for n in prompt_lengths)
        lines += [f"### {precision}", "",
                  f"| artifact | params | file MB | {head} | decode ms/token | decode tok/s | speed-up | peak RSS MB |",
                  "|---|---|---|" + "---|" * len(prompt_lengths) + "---|---|---|---|"]
        speed = rec["speedup"].get("CPUExecutionProvider", {})
        for label, r in cpu["results"].items():
            if "error" in r:
                lines.append(f"| {label} | error: {r['error']} |")
                continue
            art = rec["artifacts"][label]
            pre = " | ".join(f"{r['prefill'][str(n)]['p50_ms']:.1f}" if str(n) in r["prefill"] else "-"
                             for n in prompt_lengths)
            sp = speed.get(label, {}).get("decode")
            lines.append(f"| {label} | {art['params']:,} | {art['file_bytes'] / 2**20:.1f} | {pre} | "
                         f"{r['decode']['per_token']['p50_ms']:.2f} | {r['decode']['tok_s']:.1f} | "
                         f"{'%.2fx' % sp if sp else '-'} | {round(r['peak_rss_mb']) if r.get('peak_rss_mb') else '-'} |")
        lines.append("")
    lines += ["Pipeline stage times (s): " + ", ".join(f"{k} {v}" for k, v in st.items()
                                                      if isinstance(v, (int, float))), ""]
    return lines
