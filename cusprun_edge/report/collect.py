"""What a build left, read back: each stage's record and files, dense, expert and builder side by side."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..errors import UserError

STAGE_NAMES = ("load", "score", "prune", "export", "validate", "bench", "generate", "gguf", "report")


PLOTS = ("latency", "structure", "quality_vs_ratio")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None


def read_build(build_dir) -> dict:
    """Everything the stages of `build_dir` recorded; UserError when it is no build directory."""
    root = Path(build_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a build directory (`cusprun-edge build --out`)")
    if not root.is_dir():
        raise UserError(f"build directory {root} does not exist")
    stages = {name: rec for name in STAGE_NAMES if (rec := _read_json(root / name / "stage.json")) is not None}
    if not stages or not any(s in stages for s in ("export", "validate", "bench")):
        raise UserError(f"{root} is not a build directory (no finished export, validate or bench stage); "
                        "run `cusprun-edge build` first")
    build = {
        "root": root,
        "config": _read_json(root / "build.json") or {},
        "stages": stages,
        "manifests": {k: _read_json(root / "export" / k / "manifest.json") for k in ("dense", "expert")},
        "validate": _read_json(root / "validate" / "validate.json"),
        "bench": _read_json(root / "bench" / "bench.json"),
        "generations": _read_json(root / "generate" / "generations.json"),
        "gguf": _read_json(root / "gguf" / "gguf.json"),  # build --format gguf
    }
    return build


def _file_bytes(manifest: dict | None) -> int | None:
    if not manifest:
        return None
    files = manifest.get("files") or {}
    return sum(f["bytes"] for name, f in files.items()
               if name.endswith((".onnx", ".onnx.data", ".onnx_data"))) or manifest.get("total_bytes")


def _parity(manifest: dict | None) -> dict | None:
    if not manifest or "parity" not in manifest:
        return None
    parity = manifest["parity"]
    out = {}
    for precision in ("fp32", "fp16", "int8", "int4"):
        if isinstance(parity.get(precision), dict):
            p = parity[precision]
            out[precision] = {k: p.get(k) for k in ("passed", "max_abs_diff", "rel_rms", "top1_agreement")}
    return out


def _latency(bench: dict | None, label: str) -> dict:
    out = {}
    if not bench:
        return out
    for provider, entry in bench.get("providers", {}).items():
        if entry.get("status") != "measured":
            continue
        r = entry["results"].get(label)
        if not r or "error" in r:
            continue
        # comparisons read the rate of the run that alternated every artifact in one process, where there was one
        alternating = ((entry.get("side_by_side") or {}).get("decode_tok_s") or {}).get(label)
        out[provider] = {
            "engine": entry.get("engine"),
            "prefill_ms": {n: v["p50_ms"] for n, v in r.get("prefill", {}).items()},
            "prefill_p90_ms": {n: v["p90_ms"] for n, v in r.get("prefill", {}).items()},
            "decode_tok_s": alternating or r["decode"]["tok_s"],
            "decode_alternating": alternating is not None,
            "decode_tok_s_alone": r["decode"]["tok_s"],
            "decode_ms_p50": r["decode"]["per_token"]["p50_ms"],
            "decode_ms_p90": r["decode"]["per_token"]["p90_ms"],
            "peak_rss_mb": r.get("peak_rss_mb"),
            "session_s": r.get("session_s"),
        }
    return out


def _eval(validate: dict | None, side: str) -> dict:
    if not validate:
        return {}
    out = {cat: dict(rec[side]) for cat, rec in validate.get("categories", {}).items()}
    if validate.get("overall"):
        out["overall"] = dict(validate["overall"][side])
    return out


def _retention(validate: dict | None) -> dict:
    if not validate:
        return {}
    out = {cat: dict(rec.get("retention", {})) for cat, rec in validate.get("categories", {}).items()}
    overall = validate.get("overall") or {}
    out["overall"] = dict(overall.get("retention", {}))
    for key in ("top1_agreement", "kl"):
        if key in overall:
            out[key] = overall[key]
    return out


def _precision_label(manifest: dict | None) -> str | None:
    """The precision, and which projections a mixed int4 export kept at 8 bits (export's fallback)."""
    if not manifest:
        return None
    eight_bit = (manifest.get("quantization") or {}).get("eight_bit")
    if not eight_bit:
        return manifest.get("precision")
    some = f"{eight_bit['matmuls']} of {eight_bit['of']} " if eight_bit.get("of", 0) > eight_bit["matmuls"] else ""
    return f"{manifest.get('precision')} ({some}{'/'.join(eight_bit['modules'])} at 8 bits)"


def _model_side(build: dict, side: str, label: str) -> dict:
    manifest = build["manifests"].get(side)
    bench = build["bench"]
    params = (manifest or {}).get("parameters")
    if params is None:
        prune = build["stages"].get("prune", {}).get("result", {})
        params = prune.get("params_before" if side == "dense" else "params_after") \
            or (build["stages"].get("load", {}).get("result", {}).get("params") if side == "dense" else None)
    file_bytes = _file_bytes(manifest)
    if file_bytes is None and bench and label in bench.get("artifacts", {}):
        file_bytes = bench["artifacts"][label].get("file_bytes")
    return {
        "params": params,
        "file_bytes": file_bytes,
        "precision": _precision_label(manifest),
        "eval": _eval(build["validate"], side),
        "latency": _latency(bench, label),
        "structure": (manifest or {}).get("structure"),
    }


def _baseline_side(build: dict) -> dict | None:
    """What a user would ship without us (bench and validate measured it beside ours): the GenAI builder's int4
    of the dense model. None when neither stage measured it; {"missing": why} when they could not."""
    from ..measure.baseline import LABEL

    bench, validate = build["bench"] or {}, build["validate"] or {}
    measured = validate.get("baseline") or {}
    latency = _latency(bench, LABEL)
    missing = bench.get("no_baseline") or build["stages"].get("validate", {}).get("result", {}).get("no_baseline")
    if not measured and not latency:
        return {"missing": missing} if missing else None
    return {"label": "ONNX Runtime GenAI builder int4 (dense)", "artifact": measured.get("artifact"),
            "file_bytes": bench.get("artifacts", {}).get(LABEL, {}).get("file_bytes"),
            "ppl": measured.get("ppl"), "top1_agreement": measured.get("top1_agreement"), "kl": measured.get("kl"),
            "latency": latency}


def _speedup(bench: dict | None, label: str = "expert") -> dict:
    if not bench:
        return {}
    return {p: s[label] for p, s in bench.get("speedup", {}).items() if label in s}


def _ratio_point(build: dict) -> dict | None:
    """One point of quality vs ratio: the build's achieved ratio and its overall retention."""
    validate = build["validate"]
    prune = build["stages"].get("prune", {}).get("result", {})
    config = build["config"]
    if not validate or "achieved_ratio" not in prune:
        return None
    overall = validate.get("overall", {})
    return {"build": str(build["root"]), "method": prune.get("method") or config.get("method"),
            "target_ratio": prune.get("target_ratio", config.get("ratio")), "achieved_ratio": prune["achieved_ratio"],
            "ppl_retention": overall.get("retention", {}).get("ppl"),
            "acc_retention": overall.get("retention", {}).get("acc"),
            "top1_agreement": overall.get("top1_agreement")}


def _related_builds(build: dict, compare) -> list[dict]:
    """Sibling builds of the same model and expert, plus explicitly compared directories."""
    found, seen = [], {build["root"].resolve()}
    config = build["config"]
    candidates = []
    parent = build["root"].resolve().parent
    if config:
        for d in sorted(parent.iterdir()):
            other = _read_json(d / "build.json") if d.is_dir() else None
            if other and other.get("model") == config.get("model") and other.get("expert") == config.get("expert"):
                candidates.append(d)
    candidates.extend(Path(c).expanduser() for c in compare or ())
    for d in candidates:
        if d.resolve() in seen:
            continue
        seen.add(d.resolve())
        try:
            found.append(read_build(d))
        except UserError:
            if d in [Path(c).expanduser() for c in compare or ()]:
                raise
    return found


def collect(build_dir, compare=()) -> dict:
    """The report as data (what report.json holds)."""
    from ..measure.bench import machine

    build = read_build(build_dir)
    bench = build["bench"]
    points = [p for b in [build, *_related_builds(build, compare)] if (p := _ratio_point(b))]
    points.sort(key=lambda p: (p["achieved_ratio"], p["method"] or ""))
    prune = build["stages"].get("prune", {}).get("result", {})
    skipped = {p: e["reason"] for p, e in (bench or {}).get("providers", {}).items() if e.get("status") == "skipped"}
    expert = _model_side(build, "expert", "expert")
    expert.update({k: prune.get(k) for k in ("method", "target_ratio", "achieved_ratio") if k in prune})
    return {
        "format": "cusprun-edge-report",
        "format_version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_dir": str(build["root"]),
        "config": build["config"],
        "machine": (bench or {}).get("machine") or machine(),
        "bench_date": (bench or {}).get("date"),
        "bench_settings": (bench or {}).get("settings"),
        "dense": _model_side(build, "dense", "dense"),
        "expert": expert,
        "retention": _retention(build["validate"]),
        "speedup": _speedup(bench),
        "skipped_providers": skipped,
        "parity": {side: _parity(m) for side, m in build["manifests"].items()},
        "validation": {k: (build["validate"] or {}).get(k) for k in ("expert_spec", "dense", "expert", "settings")},
        "three_way": (build["validate"] or {}).get("three_way"),
        "ratio_search": prune.get("ratio_search"),
        "vocab": prune.get("vocab"),
        "weights_read": _weights_read(build["root"]),
        "quality_vs_ratio": points,
        "stages": {name: {k: rec.get(k) for k in ("seconds", "peak_rss_mb", "peak_rss_scope")}
                   for name, rec in build["stages"].items()},
        "generations": build["generations"],
        "baseline": _baseline_side(build),
        "gguf": build["gguf"],
    }


def generation_rows(data: dict) -> list[dict]:
    gens = data.get("generations") or {}
    return [p for p in gens.get("prompts", []) if "dense" in p and "expert" in p]


def _weights_read(root: Path) -> dict:
    """Bytes of weights each artifact reads per generated token (weights_read.py), by side."""
    from ..model.weights_read import weight_bytes_per_token

    out = {}
    for side in ("dense", "expert"):
        path = Path(root) / "export" / side / "model.onnx"
        if path.exists():
            out[side] = weight_bytes_per_token(path)["per_token_bytes"]
    return out


def decode_rate(side: dict, provider: str) -> float | None:
    return ((side or {}).get("latency") or {}).get(provider, {}).get("decode_tok_s")


def artifact_ppl(data: dict, side: str) -> float | None:
    """Held-out perplexity of an artifact as it ships: the expert's, our dense export's (validate's three-way
    comparison) or the baseline's."""
    if side == "expert":
        return ((data["expert"].get("eval") or {}).get("overall") or {}).get("ppl")
    if side == "dense":
        return ((data.get("three_way") or {}).get("dense_quantized") or {}).get("ppl")
    return (data.get("baseline") or {}).get("ppl")
