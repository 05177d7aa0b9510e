"""Vocabulary trimming measured: `python -m benchmarks vocab [--model gemma3-270m] [--ratio 0.10] [--plan fast]`.

One model and expert setting (en+general): the keep rule and its size search on the tune split (the
smallest vocabulary within the floor of the untrimmed model's perplexity per dense token), then on the
held-out eval split: coverage (dense tokens kept whole), tokens per word, and perplexity per dense token
and bits per byte (evaluate.per_dense_token) of dense PyTorch fp32, the trimmed model in fp32 and its
int4 export; ONNX Runtime GenAI's builder int4 on the dense model (baseline.py) beside it, and decode
tokens/s of the two int4 artifacts in alternating rounds of one run (each reading the same prompt text
with its own tokenizer). `--ratio` prunes with cusprun (its defaults) before trimming; 0 isolates the
vocabulary. Writes results/vocab.json (one entry per model/setting/ratio/plan; a rerun replaces it).

`--head-bound EXPERT_DIR --dense DIR` times a built expert beside copies of it with a smaller lm_head (results/vocab.json
"head_bound": runs are appended): how much faster any vocabulary could make it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .common import RESULTS, machine, write_json

SPEC = "language=en,domain=general"
WORK = Path(__file__).resolve().parent / "work" / "vocab"
MAX_TOKENS = 512  # each eval document is scored on the text its first 512 dense tokens cover
PROMPT = "The history of the city begins with a small settlement by the river, where"
SPEED = {"new_tokens": 128, "rounds": 5, "threads": 2}


def _quality(logits_fn, own_tok, texts, dense_tok, vocab: int) -> dict:
    from cusprun_edge.measure.evaluate import text_quality
    from cusprun_edge.prune.vocab import logits_batch

    q = text_quality(logits_fn, own_tok, texts, dense_tok, batch_size=logits_batch(vocab))
    return {k: q[k] for k in ("ppl_per_dense_token", "bits_per_byte", "ppl", "tokens", "dense_tokens")}


def _speed(artifacts: dict[str, Path], settings: dict) -> dict:
    """Greedy decode tokens/s through onnxruntime_genai, alternating between the artifacts round by round; each
    generator is sized for at least 1,100 positions (a sliding-window cache, Gemma 3's, needs its window)."""
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    prompts = {k: AutoTokenizer.from_pretrained(str(d))(PROMPT)["input_ids"] for k, d in artifacts.items()}
    models = {}
    for k, d in artifacts.items():
        config = og.Config(str(d))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": settings["threads"]}}}}))
        models[k] = og.Model(config)

    def decode(k: str, new: int) -> float:
        span = max(len(prompts[k]) + new + 1, 1100)
        params = og.GeneratorParams(models[k])
        params.set_search_options(max_length=span, min_length=span, do_sample=False)
        generator = og.Generator(models[k], params)
        generator.append_tokens(prompts[k])
        generator.generate_next_token()
        t0 = time.perf_counter()
        for _ in range(new):
            generator.generate_next_token()
        return new / (time.perf_counter() - t0)

    for k in models:  # warm-up
        decode(k, 8)
    rates: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(settings["rounds"]):
        for k in models:
            rates[k].append(decode(k, settings["new_tokens"]))
    return {k: {"decode_tok_s": float(np.median(v)), "decode_tok_s_runs": v} for k, v in rates.items()}


def speed_only(model_name: str, key: str) -> dict:
    """Decode speed of an entry's cached int4 export against the builder's (after a run stopped before it)."""
    from cusprun_edge.measure.baseline import builder_artifact

    path = RESULTS / "vocab.json"
    data = json.loads(path.read_text())
    entry = data["runs"][key]
    dest = WORK / key.replace("/", "_").replace("=", "-").replace(",", "+")
    speed = _speed({"trimmed_int4": dest, "builder_int4": builder_artifact(model_name)}, SPEED)
    entry["speed"] = {**speed, "settings": SPEED, "prompt": PROMPT,
                      "trimmed_vs_builder": speed["trimmed_int4"]["decode_tok_s"] / speed["builder_int4"]["decode_tok_s"]}
    entry["done"] = "all (speed measured on its own after the run)"
    data = json.loads(path.read_text())
    data["runs"][key] = entry
    write_json("vocab.json", data)
    return entry["speed"]


def _mb(directory: Path) -> float:
    return round(sum(p.stat().st_size for p in directory.glob("model.onnx*")) / 1e6, 1)


def run(model_name: str = "gemma3-270m", ratio: float = 0.0, plan: str = "exact", floor: float | None = None,
        size: int | None = None, skip_speed: bool = False, builder_quality: bool = True) -> dict:
    from cusprun_edge import load_model
    from cusprun_edge.config.corpora import ExpertSpec, calibration_documents
    from cusprun_edge.export import export_model
    from cusprun_edge.measure.baseline import builder_or_reason
    from cusprun_edge.measure.evaluate import clip_to_tokens, torch_logits_fn
    from cusprun_edge.measure.runtime import OnnxCausalLM
    from cusprun_edge.prune.vocab import DEFAULT_FLOOR, trim_vocab_for_corpora, vocab_held_out

    started = time.time()

    def say(what):  # progress on stderr: a Gemma run is long on a busy machine
        print(f"[{time.time() - started:7.0f} s] {what}", file=sys.stderr, flush=True)

    key = f"{model_name}/{SPEC}/{ratio:.2f}/{plan}" + (f"/size={size}" if size else "")
    model, tok = load_model(model_name)
    corpora = ExpertSpec.parse(SPEC).corpora()
    calib = [t for c in corpora.values() for t in c.calib]
    texts = clip_to_tokens(tok, [t for c in corpora.values() for t in c.eval], MAX_TOKENS)
    path = RESULTS / "vocab.json"
    data = json.loads(path.read_text()) if path.exists() else {"about": __doc__.strip(), "runs": {}}
    before = data["runs"].get(key, {})
    entry: dict = {"model": model_name, "setting": SPEC, "ratio": ratio, "quant_plan": plan, "eval_documents": len(texts)}

    def save(done: str):  # after each phase: an interrupted run keeps what it measured
        entry["done"] = done
        entry["machine"] = machine()
        latest = json.loads(path.read_text()) if path.exists() else data  # other runs may have written since
        latest["runs"][key] = entry
        write_json("vocab.json", latest)

    if (before.get("dense_fp32") or {}).get("dense_tokens") == sum(max(0, len(i) - 1) for i in tok(texts)["input_ids"]):
        entry["dense_fp32"] = before["dense_fp32"]  # the dense model's figure does not change between runs
    else:
        entry["dense_fp32"] = _quality(torch_logits_fn(model), tok, texts, tok, len(tok))
    say(f"dense fp32: {entry['dense_fp32']}")
    save("dense")
    expert = copy.deepcopy(model)
    if ratio > 0:
        from cusprun_edge.prune.pruner import prune_model
        from cusprun_edge.prune.score import score_model

        scores = score_model(expert, tok, corpora, show_progress=False)
        rec = prune_model(expert, scores, list(corpora), "cusprun", ratio, tokenizer=tok, corpora=corpora)
        entry["achieved_ratio"] = rec["achieved_ratio"]
        entry["pruned_fp32"] = _quality(torch_logits_fn(expert), tok, texts, tok, len(tok))
    del model
    t0 = time.time()
    points: list[dict] = []
    etok, record = trim_vocab_for_corpora(expert, tok, calib, corpora=corpora, size=size,
                                          floor=DEFAULT_FLOOR if floor is None else floor,
                                          held_out=vocab_held_out(corpora),
                                          on_point=lambda p: (points.append(p), say(f"size search: {p}")))
    entry["trim_seconds"] = round(time.time() - t0, 1)
    entry["vocab"] = {k: record.get(k) for k in ("vocab_before", "vocab_after", "languages", "always_kept",
                                                 "size_search", "coverage", "tokens_per_word", "note")}
    entry["trimmed_fp32"] = _quality(torch_logits_fn(expert), etok, texts, tok, len(etok))
    say(f"trimmed to {len(etok)}; fp32: {entry['trimmed_fp32']}")
    save("trimmed fp32")
    dest = WORK / key.replace("/", "_").replace("=", "-").replace(",", "+")
    if not (dest / "manifest.json").exists():
        export_model(expert, etok, "x86-cpu", dest, precision="int4", force=True, held_out=SPEC,
                     calibration=calibration_documents(corpora), quant_plan=plan)
    manifest = json.loads((dest / "manifest.json").read_text())
    say("exported")
    entry["trimmed_int4"] = {**_quality(OnnxCausalLM(dest, threads=2).logits_fn, etok, texts, tok, len(etok)),
                             "files_mb": _mb(dest), "fallback_level": (manifest.get("quantization") or {}).get("level")}
    builder, why = builder_or_reason(model_name)
    artifacts = {"trimmed_int4": dest}
    say(f"trimmed int4: {entry['trimmed_int4']}; builder: {builder or why}")
    save("trimmed int4")
    if builder is not None:
        entry["builder_int4"] = {"files_mb": _mb(builder)}
        if builder_quality:
            entry["builder_int4"].update(_quality(OnnxCausalLM(builder, threads=2).logits_fn, tok, texts, tok, len(tok)))
        artifacts["builder_int4"] = builder
    else:
        entry["builder_int4"] = {"missing": why}
    dense_ppl = entry["dense_fp32"]["ppl_per_dense_token"]
    for name in ("trimmed_fp32", "trimmed_int4", "builder_int4"):
        if "ppl_per_dense_token" in entry[name]:
            entry[name]["vs_dense_fp32"] = entry[name]["ppl_per_dense_token"] / dense_ppl
    if not skip_speed:
        entry["speed"] = {**_speed(artifacts, SPEED), "settings": SPEED, "prompt": PROMPT}
        if "builder_int4" in entry["speed"]:
            entry["speed"]["trimmed_vs_builder"] = (entry["speed"]["trimmed_int4"]["decode_tok_s"]
                                                    / entry["speed"]["builder_int4"]["decode_tok_s"])
    entry["seconds"] = round(time.time() - started, 1)
    save("all")
    return entry


def coverage_table(model_name: str, sizes: list[int]) -> dict:
    """Tokenizer only (no model run): per size, the eval split's dense tokens kept whole and tokens per word."""
    from transformers import AutoTokenizer

    from cusprun_edge.config.corpora import ExpertSpec
    from cusprun_edge.measure.baseline import hf_directory
    from cusprun_edge.model.tokenizer_trim import trim_tokenizer
    from cusprun_edge.prune.vocab import KeepRule, coverage, expert_languages, tokens_per_word

    tok = AutoTokenizer.from_pretrained(str(hf_directory(model_name)))
    corpora = ExpertSpec.parse(SPEC).corpora()
    rule = KeepRule(tok, [t for c in corpora.values() for t in c.calib], expert_languages(corpora))
    texts = [t for c in corpora.values() for t in c.eval]
    rows = {"dense": {"tokens_per_word": round(tokens_per_word(tok, texts), 4)}}
    for size in sizes:
        keep = rule.keep(size)
        new_tok, _ = trim_tokenizer(tok, keep, rule.pieces)
        rows[str(size)] = {"coverage": round(coverage(tok, keep, texts), 5),
                           "tokens_per_word": round(tokens_per_word(new_tok, texts), 4)}
    path = RESULTS / "vocab.json"
    data = json.loads(path.read_text()) if path.exists() else {"about": __doc__.strip(), "runs": {}}
    data.setdefault("coverage_by_size", {})[f"{model_name}/{SPEC}/eval"] = rows
    write_json("vocab.json", data)
    return rows


def size_points(model_name: str, sizes: list[int]) -> dict:
    """The size search's measure at every size of a list, on the dense model (no pruning): perplexity per dense
    token on the held-apart tune documents (PyTorch fp32) and its ratio to the untrimmed model's, with the
    coverage of those documents. The tune split only: this is where the keep rule and floor are judged."""
    from cusprun_edge.config.corpora import ExpertSpec, calibration_documents
    from cusprun_edge.measure.evaluate import clip_to_tokens
    from cusprun_edge.model.load import load_model
    from cusprun_edge.prune.vocab import (
        KeepRule,
        coverage,
        expert_languages,
        trimmed_quality,
        untrimmed_quality,
    )

    model, tok = load_model(model_name)
    corpora = ExpertSpec.parse(SPEC).corpora()
    rule = KeepRule(tok, calibration_documents(corpora), expert_languages(corpora))
    tune = clip_to_tokens(tok, [t for c in corpora.values() for t in c.tune], MAX_TOKENS)
    dense = untrimmed_quality(model, tok, tune)
    rows = {"untrimmed": {"ppl_per_dense_token": round(dense["ppl_per_dense_token"], 4)}}
    for size in sizes:
        q = trimmed_quality(model, tok, rule, tune, size, MAX_TOKENS)
        rows[str(size)] = {"ppl_per_dense_token": round(q["ppl_per_dense_token"], 4),
                           "vs_untrimmed": round(q["ppl_per_dense_token"] / dense["ppl_per_dense_token"], 4),
                           "coverage": round(coverage(tok, rule.keep(size), tune), 5), "always_kept": len(rule.base)}
        print(size, rows[str(size)], file=sys.stderr, flush=True)
    path = RESULTS / "vocab.json"
    data = json.loads(path.read_text()) if path.exists() else {"about": __doc__.strip(), "runs": {}}
    data.setdefault("size_points", {})[f"{model_name}/{SPEC}/tune"] = {**rows, "machine": machine()}
    write_json("vocab.json", data)
    return rows


def cut_head(src: Path, dst: Path, rows: int) -> Path:
    """A copy of the int4 artifact `src` whose lm_head (and the embedding that reads its rows) keeps only its first
    `rows` rows: it generates through onnxruntime_genai at the speed of a vocabulary that size, though not the text
    of one. For speed bounds only."""
    import shutil

    import onnx_ir as ir

    from cusprun_edge.export.common import MANIFEST_FILE
    from cusprun_edge.export.package import write_manifest
    from cusprun_edge.export.passes import save_onnx

    config = json.loads((src / "genai_config.json").read_text())
    vocab = config["model"]["vocab_size"]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"), dirs_exist_ok=True)
    model = ir.load(src / "model.onnx")
    cut: set[str] = set()
    for node in model.graph:
        if node.op_type != "MatMulNBits" or node.attributes["N"].value != vocab:
            continue
        node.attributes["N"] = ir.AttrInt64("N", rows)
        for value in node.inputs[1:]:  # weight, scales, zero points: whole rows, first dimension or flattened
            if value is None or value.const_value is None or value.name in cut:
                continue
            array = value.const_value.numpy()
            per_row = array.shape[0] // vocab
            value.const_value = ir.tensor(np.ascontiguousarray(array[:rows * per_row]), name=value.name)
            value.shape = ir.Shape(value.const_value.shape)
            cut.add(value.name)
    if not cut:
        raise SystemExit(f"{src}: no lm_head MatMulNBits with N = {vocab}")
    for name, value in model.graph.initializers.items():  # the shared embedding's row view
        if name.endswith(("data_shape", "scales_shape")):
            shape = value.const_value.numpy().copy()
            shape[0] = rows
            value.const_value = ir.tensor(shape, name=name)
    model.graph.outputs[0].shape = None
    save_onnx(model, dst / "model.onnx")
    config["model"]["vocab_size"] = rows
    (dst / "genai_config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((dst / MANIFEST_FILE).read_text())
    manifest.setdefault("notes", []).append(f"lm_head cut to its first {rows} rows by benchmarks/vocab.cut_head, "
                                            "for a speed bound: it does not compute the text of any vocabulary")
    write_manifest(dst, manifest, time.perf_counter())  # the files' new sizes and hashes
    return dst


def head_bound(model_name: str, expert: Path, dense: Path, rows: list[int], rounds: int = 7) -> dict:
    """How fast the expert `expert` could decode with a smaller vocabulary: copies of it with the lm_head cut to each
    of `rows` (cut_head), beside it, the dense artifact `dense` and the GenAI builder's, in alternating rounds of one
    run (benchmarks.builder.speed). With a few hundred rows a copy bounds every vocabulary from above. Each run is
    appended to vocab.json "head_bound", and head_fit refits a step's time against the head's rows over every run of
    the same expert (one run on this machine is too noisy to read alone), which it returns."""
    from cusprun_edge.measure.baseline import builder_or_reason

    from .builder import SPEED as BUILDER_SPEED
    from .builder import speed

    vocab = json.loads((expert / "genai_config.json").read_text())["model"]["vocab_size"]
    builder, why = builder_or_reason(model_name)
    if builder is None:
        raise SystemExit(f"the GenAI builder's artifact: {why}")
    artifacts = {"genai-builder int4": Path(builder), "dense": dense, f"expert ({vocab:,} tokens)": expert}
    head_rows = {f"expert ({vocab:,} tokens)": vocab}
    for n in rows:
        label = f"expert, lm_head cut to {n:,} rows"
        artifacts[label], head_rows[label] = cut_head(expert, WORK / "head-bound" / str(n), n), n
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = speed(artifacts, {**BUILDER_SPEED, "rounds": rounds})
    rates = {k: v["decode_tok_s"] for k, v in measured.items()}
    faster_dense = max(rates["genai-builder int4"], rates["dense"])
    entry = {"date": started, "machine": machine(), "expert": str(expert), "dense": str(dense),
             "settings": {**BUILDER_SPEED, "rounds": rounds}, "head_rows": head_rows,
             "decode_tok_s": {k: round(v, 1) for k, v in rates.items()},
             "vs_faster_dense": {k: round(v / faster_dense, 3) for k, v in rates.items()},
             "rounds": {k: [round(x, 1) for x in v["decode_tok_s_runs"]] for k, v in measured.items()}}
    path = RESULTS / "vocab.json"
    data = json.loads(path.read_text()) if path.exists() else {"about": __doc__.strip(), "runs": {}}
    runs = data.setdefault("head_bound", {}).setdefault(model_name, [])
    runs.append(entry)
    data.setdefault("head_fit", {})[model_name] = head_fit([r for r in runs if r["expert"] == str(expert)])
    write_json("vocab.json", data)
    return data["head_fit"][model_name]


def head_fit(runs: list[dict], target: float = 2.0) -> dict:
    """Least squares over every run and expert copy: a decode step's time, as a share of the faster dense artifact's
    step in the same run, against the lm_head's rows. Gives the share no head can remove, the share per 10,000 rows,
    and the head size at which the expert decodes `target` x the faster dense artifact."""
    points = [(run["head_rows"][label], 1 / run["vs_faster_dense"][label]) for run in runs for label in run["head_rows"]]
    x, y = np.array(points, dtype=float).T
    slope, fixed = np.polyfit(x, y, 1)
    sizes = sorted({int(v) for v in x})
    return {"runs": len(runs), "points": len(points), "dates": [run["date"] for run in runs],
            "fixed_share": round(float(fixed), 4), "share_per_10k_rows": round(float(slope * 1e4), 4),
            "residual_sd": round(float(np.std(y - (fixed + slope * x))), 4),
            "fitted_vs_faster_dense": {str(n): round(float(1 / (fixed + slope * n)), 3) for n in [0, *sizes]},
            f"rows_for_{target:g}x": int((1 / target - fixed) / slope) if slope > 0 and fixed < 1 / target else 0}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks vocab")
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--ratio", type=float, default=0.0, help="cusprun ratio before trimming (0: the vocabulary only)")
    p.add_argument("--plan", default="exact", choices=["exact", "fast"], help="the int4 quantization plan")
    p.add_argument("--floor", type=float, default=None, help="the size search's quality floor (default vocab.py's)")
    p.add_argument("--size", type=int, default=None, help="a fixed vocabulary size instead of the search")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-builder-quality", action="store_true", help="time the builder's artifact, do not score it")
    p.add_argument("--speed-only", default="", help="only decode speed, for this entry of vocab.json")
    p.add_argument("--coverage", default="", help="only the tokenizer's coverage table at these comma-separated sizes")
    p.add_argument("--size-points", default="", help="only the size search's tune measure at these comma-separated sizes")
    p.add_argument("--head-bound", default="", metavar="EXPERT_DIR",
                   help="only the decode speed of this int4 expert with its lm_head cut to --rows, beside --dense and "
                   "the builder's artifact")
    p.add_argument("--dense", default="", help="--head-bound: our dense int4 artifact")
    p.add_argument("--rows", default="32768,256", help="--head-bound: the lm_head sizes to cut to")
    p.add_argument("--rounds", type=int, default=7, help="--head-bound: alternating rounds")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.head_bound:
        if not a.dense:
            p.error("--head-bound needs --dense DIR")
        fit = head_bound(a.model, Path(a.head_bound), Path(a.dense), [int(x) for x in a.rows.split(",")], a.rounds)
        print(json.dumps(fit, indent=1))
        return
    if a.speed_only:
        print(json.dumps(speed_only(a.model, a.speed_only), indent=1))
        return
    if a.size_points:
        print(json.dumps(size_points(a.model, [int(x) for x in a.size_points.split(",")]), indent=1))
        return
    if a.coverage:
        print(json.dumps(coverage_table(a.model, [int(x) for x in a.coverage.split(",")]), indent=1))
        return
    entry = run(a.model, a.ratio, a.plan, a.floor, a.size, a.no_speed, not a.no_builder_quality)
    print(json.dumps({k: v for k, v in entry.items() if k != "machine"}, indent=1, default=str))
