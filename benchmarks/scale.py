"""`python -m benchmarks scale [--models llama-3.2-1b,llama-3.1-8b] [--commands score,score-whole] [--docs N]`:
peak resident memory and wall time of each command on stand-ins with real models' shapes (random bf16 weights
written shard by shard by ../shared/tools/standin.py; no hub here), into results/scale.json and RESULTS.md.

Random weights say nothing about quality: these rows measure memory and time only. Each command runs in its own
process under /usr/bin/time, so its peak is its own. "score" is the CLI (one decoder layer read from disk at a
time); "score-whole" loads the whole model first, as scoring did before the layer loop, for comparison;
"prune" is the CLI's default recipe at 25% (damage probes, refit, edits, one layer at a time); "export" is the
int4 export of the dense stand-in with the rtn plan (4-bit, rounded to nearest, one layer at a time), through the
Python API with the int4 gate's limits opened: random weights fail any 4-bit gate, and the artifact measured is the
first level's, the one a real model ships when it passes (the fallback levels rewrite it at 8 bits); "build" is the whole `build --target x86-cpu --ratio 0.25 --quant-plan rtn` (load,
score, prune, both exports one layer at a time, validate, bench, generate, report; rtn because the fast plan's
GPTQ-style rounding of two 1B models takes most of an hour on 2 cores), with each stage's own peak and time
from its stage.json.
The expert is `--docs` documents of the built-in general domain (a user corpus), so the time is stated per
calibration token; the stage's memory barely depends on it (the activations carried between layers do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import RESULTS, machine, write_json

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO.parent / "shared" / "tools" / "standin.py"
WORK = Path(os.environ.get("CUSPRUN_SCALE_WORK", REPO / "benchmarks" / "work" / "scale"))
MODELS = ("llama-3.2-1b", "llama-3.1-8b")
COMMANDS = ("score", "score-whole", "prune", "export", "build")

# standin.py imports the loader under its name before the layout move (cusprun_edge.models)
_STANDIN_SHIM = ("import runpy, sys; import cusprun_edge.model.load as m; sys.modules['cusprun_edge.models'] = m; "
                 "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")

_WHOLE = ("import sys; from cusprun_edge.model.load import load_model; from cusprun_edge.config.corpora import "
          "ExpertSpec; from cusprun_edge.prune.score import score_model; m, t = load_model(sys.argv[1]); "
          "score_model(m, t, ExpertSpec.parse(sys.argv[2]).corpora(), show_progress=False).save(sys.argv[3])")
# the rtn plan is gated by parity.THRESHOLDS["int4-fast"]: opened, the export writes and checks level 0 and keeps it
_EXPORT = ("import sys; from cusprun_edge.export import export_source; o = dict(max_kl=1e9, min_top1=0.0, "
           "held_out_max_kl=1e9, held_out_min_top1=0.0); export_source(sys.argv[1], sys.argv[2], sys.argv[3], "
           "precision='int4', quant_plan='rtn', force=True, thresholds={'int4-fast': o})")


def standin(name: str) -> Path:
    out = WORK / "standins" / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    if not STANDIN.is_file():
        sys.exit(f"{STANDIN} is not here: the stand-ins are written by the shared tool standin.py")
    subprocess.run([sys.executable, "-c", _STANDIN_SHIM, str(STANDIN), name, str(out)], check=True)
    return out


def corpus(n_docs: int) -> Path:
    from cusprun_edge.config.corpora import builtin_corpus

    path = WORK / f"general-{n_docs}.jsonl"
    docs = builtin_corpus("domain", "general").calib[:n_docs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def timed(argv: list[str]) -> dict:
    """Run argv under /usr/bin/time: its own peak resident memory and wall time."""
    proc = subprocess.run(["/usr/bin/time", "-f", "@@ %M %e", *argv], capture_output=True, text=True)
    match = re.search(r"@@ (\d+) ([\d.]+)", proc.stderr)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return {"peak_rss_gb": round(int(match.group(1)) / 2**20, 2), "seconds": round(float(match.group(2)), 1)}


def run(models: list[str], commands: list[str], n_docs: int, options: list[str] = ()) -> Path:
    from safetensors import safe_open

    path = RESULTS / "scale.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    rows = [r for r in previous.get("rows", []) if (r["model"], r["command"]) not in
            {(m, c) for m in models for c in commands}]
    docs = corpus(n_docs)
    expert = f"domain={docs}"
    cli = str(Path(sys.executable).with_name("cusprun-edge"))
    for name in models:
        model = standin(name)
        index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
        params = 0
        for file in sorted(set(index.values())):
            with safe_open(str(model / file), "pt") as f:
                params += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        scores = WORK / f"{name}-score.safetensors"
        for command in commands:
            if command == "score":
                argv = [cli, "score", "--model", str(model), "--expert", expert, "--out", str(scores), "--force"]
            elif command == "score-whole":
                argv = [sys.executable, "-c", _WHOLE, str(model), expert, str(WORK / f"{name}-score-whole.st")]
            elif command == "export":  # x86-cpu's 8 GB budget refuses an 8B int4 model: a 16 GB host's copy
                argv = [sys.executable, "-c", _EXPORT, str(model), str(_host_target(16000)), str(WORK / f"{name}-int4")]
            elif command == "build":
                build_dir = WORK / f"{name}-build"
                shutil.rmtree(build_dir, ignore_errors=True)  # ours: a fresh build, not a resumed one
                argv = [cli, "build", "--model", str(model), "--expert", expert, "--target", "x86-cpu",
                        "--ratio", "0.25", "--quant-plan", "rtn", "--out", str(build_dir)]
            else:  # the default recipe (damage probes, refit) at 25%, on the scores of the "score" row
                argv = [cli, "prune", "--model", str(model), "--expert", expert, "--scores", str(scores),
                        "--ratio", "0.25", "--out", str(WORK / f"{name}-expert"), "--force",
                        *[x for o in options for x in ("--option", o)]]
            print(f"{name}: {command} ...", flush=True)
            row = {"model": name, "command": command, "params_b": round(params / 1e9, 2),
                   "bf16_gb_on_disk": round(sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30, 2),
                   **timed(argv), "docs": n_docs, **({"options": options} if command == "prune" and options else {})}
            if command == "export":
                row["options"] = ["--quant-plan rtn", "int4 gate opened (random weights)"]
            if command == "build":
                row["stages"] = _stage_figures(WORK / f"{name}-build")
                # each stage resets the kernel's high-water mark (measure/memory.py), and the one /usr/bin/time reads
                # at exit then misses an earlier stage's peak: the build's peak is the largest of them all
                row["peak_rss_gb"] = max([row["peak_rss_gb"]] + [v["peak_rss_gb"] for v in row["stages"].values()])
            from cusprun_edge.prune.score import ScoreSet

            row["tokens"] = sum(c.n_tokens for c in ScoreSet.load(scores).corpora.values())
            print(f"  {row}", flush=True)
            rows.append(row)
            # rows another run wrote meanwhile are kept (two runs may share the file)
            now = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
            keys = {(r["model"], r["command"]) for r in rows}
            rows = [r for r in now if (r["model"], r["command"]) not in keys] + rows
            write_json("scale.json", {"machine": machine(), "rows": rows})
    from .results_md import write_results_md

    write_results_md()
    return path


def _host_target(budget_mb: int) -> Path:
    """The x86-cpu profile with another memory budget (a larger host), as a profile file a user would write."""
    from importlib.resources import files

    text = (files("cusprun_edge") / "data" / "targets" / "x86-cpu.toml").read_text()
    text = re.sub(r'(?m)^name = .*$', f'name = "x86-cpu-{budget_mb // 1000}gb"', text, count=1)
    text = re.sub(r'(?m)^aliases = .*$', "aliases = []", text)
    text = re.sub(r'(?m)^memory_budget_mb = .*$', f"memory_budget_mb = {budget_mb}", text)
    path = WORK / f"x86-cpu-{budget_mb // 1000}gb.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _stage_figures(build_dir: Path) -> dict:
    """Each stage's own time and peak resident memory, as its stage.json recorded them."""
    figures = {}
    for record in sorted(build_dir.glob("*/stage.json")):
        data = json.loads(record.read_text())
        figures[record.parent.name] = {"seconds": data.get("seconds"),
                                       "peak_rss_gb": round((data.get("peak_rss_mb") or 0) / 1024, 2)}
    return figures


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks scale")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS) + ", qwen2.5-1.5b")
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
    p.add_argument("--docs", type=int, default=16, help="calibration documents of the general domain")
    p.add_argument("--prune-option", action="append", default=[], help="KEY=VALUE for the prune's recipe "
                   "(e.g. ridge=0.01: one ridge instead of choosing among five, a fifth of the refit's solves)")
    a = p.parse_args(argv)
    t0 = time.time()
    path = run([m for m in a.models.split(",") if m], [c for c in a.commands.split(",") if c], a.docs,
               a.prune_option)
    print(f"{path} in {time.time() - t0:.0f} s")
