"""Bench stage: dense and expert artifacts measured side by side on every usable execution provider.

For each provider that the target profile names (or `--providers` asks for; CPU always) and the
installed onnxruntime offers, each artifact runs in its own fresh process (so its peak resident
memory is real and no model warms another's caches): session creation time, prefill latency (time to
first token) at several prompt lengths, per-token decode latency and tokens/s, p50/p90 over repetitions
after warm-up. Decoding uses onnxruntime_genai's Generator when it can run every artifact on that
provider (so dense and expert run the same engine), else ONNX Runtime with the KV cache. A provider
the installed packages lack is reported as skipped, with the reason.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..fsutil import write_json

BENCH_FILE = "bench.json"
CPU = "CPUExecutionProvider"

FULL = {"prompt_lengths": [16, 128, 512], "new_tokens": 128, "decode_prompt_tokens": 16,
        "reps": 5, "decode_reps": 3, "warmup": 1}
QUICK = {"prompt_lengths": [16, 128], "new_tokens": 32, "decode_prompt_tokens": 16,
         "reps": 3, "decode_reps": 2, "warmup": 1}
# the decode rates comparisons read: every artifact in one process, alternating round by round
SIDE_BY_SIDE = {"rounds": 5, "new_tokens": 64, "decode_prompt_tokens": 16, "warmup": 1}
SIDE_BY_SIDE_QUICK = {"rounds": 3, "new_tokens": 32, "decode_prompt_tokens": 16, "warmup": 1}

# Which pip package brings each provider (for the skip reason).
PROVIDER_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu",
    "TensorrtExecutionProvider": "onnxruntime-gpu",
    "NvTensorRTRTXExecutionProvider": "onnxruntime-gpu",
    "DmlExecutionProvider": "onnxruntime-directml",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
    "QNNExecutionProvider": "onnxruntime-qnn",
    "WebGpuExecutionProvider": "onnxruntime-webgpu",
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gb = None
    versions = {d: _version(d) for d in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai",
                                         "onnxruntime-genai-cuda", "torch", "transformers")}
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "platform": platform.platform(),
            "python": platform.python_version(), "packages": {k: v for k, v in versions.items() if v}}


def unavailable_reason(provider: str) -> str:
    """Why the installed onnxruntime does not offer `provider`."""
    import onnxruntime as ort

    package = PROVIDER_PACKAGES.get(provider)
    offered = ", ".join(ort.get_available_providers())
    if package and not _version(package):
        return f"{package} not installed (the installed onnxruntime {ort.__version__} offers {offered})"
    if package:
        return f"{package} is installed but {provider} is not available here (no usable device or driver libraries)"
    return f"the installed onnxruntime {ort.__version__} has no {provider} (it offers {offered})"


def _labels(manifests: list[dict], paths: list[Path], labels) -> list[str]:
    if labels:
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise UserError("give one distinct label per artifact")
        return list(labels)
    names = ["expert" if m.get("pruned") else "dense" for m in manifests]
    if len(set(names)) == len(names):
        return names
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{n}-{i + 1}" for i, n in enumerate(names)]


def _requested_providers(providers, target, manifests) -> list[str]:
    from .runtime import provider_name

    if providers:
        names = [provider_name(p) for p in providers]
    elif target is not None:
        from ..config.targets import resolve_target

        names = [p.name for p in resolve_target(target).providers]
    else:
        names = [p["name"] for m in manifests for p in (m.get("target") or {}).get("providers", [])]
    names.append(CPU)  # CPU always
    return list(dict.fromkeys(names))


def _run_worker(job: dict, timeout: float) -> dict:
    """Measure one (artifact, provider) in a fresh interpreter that imports onnxruntime but not torch."""
    from . import runtime

    with tempfile.TemporaryDirectory(prefix="cusprun-bench-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        cmd = [sys.executable, runtime.__file__, str(job_file), str(result_file)]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if not result_file.exists():
            tail = [line for line in (proc.stderr or "").splitlines() if line.strip()]
            return {"error": f"worker exited with {proc.returncode}: {tail[-1][:300] if tail else 'no output'}"}
        return json.loads(result_file.read_text())


def _engine_for(provider: str, paths: list[Path]) -> tuple[str, str | None]:
    from .runtime import genai_support

    reasons = [genai_support(p, provider) for p in paths]
    missing = [f"{p.name}: {r}" for p, r in zip(paths, reasons) if r]
    if not missing:
        return "onnxruntime-genai", None
    return "onnxruntime", "decode loop on an ONNX Runtime session with the KV cache (GenAI cannot run " \
                          + "; ".join(missing) + ")"


def _speedups(results: dict[str, dict], baseline: str, side_by_side: dict | None = None) -> dict:
    """Each artifact against the baseline: prefill latency ratio (baseline/it) and decode tok/s ratio, from the
    side-by-side run where it measured both (else from their own processes)."""
    base = results.get(baseline, {})
    alternating = (side_by_side or {}).get("decode_tok_s") or {}
    out = {}
    for label, r in results.items():
        if label == baseline or "error" in r or "error" in base or "prefill" not in r:
            continue
        prefill = {n: base["prefill"][n]["p50_ms"] / r["prefill"][n]["p50_ms"]
                   for n in r["prefill"] if n in base.get("prefill", {}) and r["prefill"][n]["p50_ms"] > 0}
        entry = {"prefill": prefill}
        if r.get("decode") and base.get("decode") and base["decode"]["tok_s"] > 0:
            entry["decode"] = r["decode"]["tok_s"] / base["decode"]["tok_s"]
            if alternating.get(label) and alternating.get(baseline):
                entry["decode"] = alternating[label] / alternating[baseline]
                entry["decode_alone"] = r["decode"]["tok_s"] / base["decode"]["tok_s"]
            entry["decode_p50"] = base["decode"]["per_token"]["p50_ms"] / r["decode"]["per_token"]["p50_ms"]
        if r.get("peak_rss_mb") and base.get("peak_rss_mb"):
            entry["memory"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        out[label] = entry
    return out


def bench(
    artifacts,
    *,
    providers=None,
    target=None,
    threads: int | None = None,
    quick: bool = False,
    labels=None,
    out=None,
    settings: dict | None = None,
    timeout: float = 900,
    on_result=None,
    on_run=None,
) -> dict:
    """Benchmark `artifacts` (export directories) side by side; writes `out` (a .json path) when given.

    `providers`: names or aliases (cpu, cuda, tensorrt, ...); default: the target's (`target`, else each
    artifact's manifest), CPU always. `threads`: intra-op threads (default: the target's). `quick`:
    shorter prompts, fewer tokens and repetitions. `settings` overrides single entries of FULL/QUICK.
    `on_run(provider, label)` hears each measurement as it starts (a progress bar)."""
    import onnxruntime as ort

    from .runtime import model_file_bytes, read_manifest

    started = time.time()
    if not artifacts:
        raise UserError("pass at least one --artifact directory")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be 1 or more, got {threads}")
    read = [read_manifest(a) for a in artifacts]
    paths, manifests = [Path(p).resolve() for p, _ in read], [m for _, m in read]
    names = _labels(manifests, paths, labels)
    requested = _requested_providers(providers, target, manifests)
    plan = {**(QUICK if quick else FULL), **(settings or {})}
    available = set(ort.get_available_providers())

    info = {}
    for label, path, manifest in zip(names, paths, manifests):
        params = manifest.get("parameters") or {}
        eight_bit = (manifest.get("quantization") or {}).get("eight_bit")
        info[label] = {"path": str(path), "pruned": bool(manifest.get("pruned")), "precision": manifest.get("precision"),
                       "eight_bit_modules": eight_bit["modules"] if eight_bit else None,
                       "params": params.get("total"), "file_bytes": model_file_bytes(path),
                       "total_bytes": manifest.get("total_bytes")}
    baseline = next((n for n in names if not info[n]["pruned"]), names[0])

    report_providers, speedup = {}, {}
    for provider in requested:
        if provider not in available:
            report_providers[provider] = {"status": "skipped", "reason": unavailable_reason(provider)}
            continue
        engine, note = _engine_for(provider, paths)
        results = _measure_all(names, paths, provider, engine, threads, plan, timeout, on_run)
        if engine == "onnxruntime-genai" and any("error" in r for r in results.values()):
            errors = "; ".join(f"{n}: {r['error']}" for n, r in results.items() if "error" in r)
            engine, note = "onnxruntime", f"GenAI failed ({errors}); measured with an ONNX Runtime session"
            results = _measure_all(names, paths, provider, engine, threads, plan, timeout, on_run)
        inactive = [n for n, r in results.items() if r.get("provider_active") is False]
        if inactive:
            report_providers[provider] = {
                "status": "skipped",
                "reason": f"{provider} did not initialise on this machine (ONNX Runtime fell back to "
                          f"{', '.join(results[inactive[0]].get('active_providers', ['CPU']))})"}
            continue
        entry = {"status": "measured", "engine": engine, "results": results}
        if note:
            entry["engine_note"] = note
        ok = {n: str(p) for n, p in zip(names, paths) if "error" not in results[n]}
        if len(ok) > 1:
            if on_run:
                on_run(provider, "side by side")
            entry["side_by_side"] = _run_worker({"artifacts": ok, "provider": provider, "engine": engine,
                                                 "threads": threads, "seed": 0,
                                                 **(SIDE_BY_SIDE_QUICK if quick else SIDE_BY_SIDE)}, timeout)
        report_providers[provider] = entry
        speedup[provider] = _speedups(results, baseline, entry.get("side_by_side"))
        if on_result:
            on_result(provider, entry)

    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {"quick": quick, "threads": threads, **plan},
        "artifacts": info,
        "baseline": baseline,
        "providers": report_providers,
        "speedup": speedup,
        "seconds": round(time.time() - started, 2),
    }
    if out is not None:
        write_json(out, record)
    return record


def _measure_all(names, paths, provider, engine, threads, plan, timeout, on_run=None) -> dict:
    results = {}
    for label, path in zip(names, paths):
        if on_run:
            on_run(provider, label)
        job = {"artifact": str(path), "provider": provider, "engine": engine, "threads": threads, "seed": 0,
               **{k: plan[k] for k in ("prompt_lengths", "new_tokens", "decode_prompt_tokens", "reps",
                                       "decode_reps", "warmup")}}
        results[label] = _run_worker(job, timeout)
    return results


def summary_rows(record: dict) -> list[dict]:
    """Flat rows (provider, artifact, figures) for tables."""
    rows = []
    for provider, entry in record["providers"].items():
        if entry["status"] != "measured":
            rows.append({"provider": provider, "artifact": "-", "status": f"skipped: {entry['reason']}"})
            continue
        for label, r in entry["results"].items():
            if "error" in r:
                rows.append({"provider": provider, "artifact": label, "status": f"error: {r['error']}"})
                continue
            rows.append({"provider": provider, "artifact": label, "status": "measured", "engine": entry["engine"],
                         "prefill_ms": {n: v["p50_ms"] for n, v in r.get("prefill", {}).items()},
                         "decode_ms": r["decode"]["per_token"]["p50_ms"],
                         "decode_p90_ms": r["decode"]["per_token"]["p90_ms"],
                         "decode_tok_s": r["decode"]["tok_s"], "peak_rss_mb": r.get("peak_rss_mb"),
                         "session_s": r["session_s"], "file_bytes": record["artifacts"][label]["file_bytes"]})
    return rows


