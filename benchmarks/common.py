"""Shared helpers: the machine description written into every results file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# CUSPRUN_BENCH_RESULTS: another folder for the results (runs side by side, each in its own folder, are merged
# into results/ afterwards)
RESULTS = Path(os.environ.get("CUSPRUN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    """The machine description shared with `cusprun-edge bench`, plus the date and flat versions."""
    import onnx

    from cusprun_edge.measure.bench import machine as bench_machine

    m = bench_machine()
    pkgs = m.get("packages", {})
    return {
        **m, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "onnx": onnx.__version__,
        "torch": pkgs.get("torch"), "transformers": pkgs.get("transformers"),
        "onnxruntime": pkgs.get("onnxruntime"), "onnxruntime_genai": pkgs.get("onnxruntime-genai"),
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2))
    return path
