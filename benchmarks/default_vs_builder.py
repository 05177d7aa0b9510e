"""The default build's expert against ONNX Runtime GenAI's builder int4 of the dense model, in one alternating run.

`python -m benchmarks default_vs_builder BUILD_DIR`: held-out perplexity (en+general eval split) and decode speed
at 2 threads, alternating rounds, of the build's expert and dense exports and the builder's artifact (the same
measures as `benchmarks builder`). Writes results/default-vs-builder.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .builder import MODEL, SPEC, SPEED, file_mb, quality, speed
from .common import machine, write_json


def run(build: Path, rounds: int = SPEED["rounds"]) -> dict:
    from cusprun_edge.measure.baseline import builder_artifact
    from cusprun_edge.model.load import load_model

    torch.set_num_threads(SPEED["threads"])
    model, tokenizer = load_model(MODEL)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = json.loads((build / "build.json").read_text())
    artifacts = {"genai-builder int4": builder_artifact(MODEL), "cusprun-edge dense": build / "export" / "dense",
                 "cusprun-edge expert": build / "export" / "expert"}
    record = {
        "what": "the default build's expert and dense exports vs ONNX Runtime GenAI's builder int4 of the dense model",
        "build": {k: config.get(k) for k in ("model", "expert", "ratio", "quant_plan", "target", "beat_baseline")},
        "held_out": f"{SPEC} eval split, whole documents (<= 512 tokens), against PyTorch fp32",
        "quality": quality(model, tokenizer, artifacts, SPEED["threads"]),
        "speed": speed(artifacts, {**SPEED, "rounds": rounds}),
        "file_mb": {label: round(file_mb(d), 1) for label, d in artifacts.items()},
        "settings": {**SPEED, "rounds": rounds},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
    }
    write_json("default-vs-builder.json", record)
    return record


def main(argv: list[str]) -> None:
    record = run(Path(argv[0]), int(argv[1]) if len(argv) > 1 else SPEED["rounds"])
    base = record["speed"]["genai-builder int4"]["decode_tok_s"]
    for label, s in record["speed"].items():
        q = record["quality"][label]
        print(f"{label:22s} ppl {q['ppl']:.3f} decode {s['decode_tok_s']:.1f} tok/s ({s['decode_tok_s'] / base:.2f}x "
              f"builder) TTFT {s['ttft_ms']:.0f} ms files {record['file_mb'][label]} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
