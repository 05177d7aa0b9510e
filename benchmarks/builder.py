"""Our int4 export beside what a user would otherwise ship: ONNX Runtime GenAI's own model builder
(`python -m onnxruntime_genai.models.builder`, int4, its defaults) run on the same dense model (the
loader's dequantized Hugging Face cache of the GGUF). Both are measured on the same held-out text
against the model in PyTorch fp32 (perplexity, top-1 agreement, KL) and in one speed run that
alternates between them (decode tokens/s, time to first token), with their file sizes.

`python -m benchmarks builder [--also LABEL=DIR ...]` writes results/builder.json; `--also` adds other
export directories (e.g. an older plain-int4 export) to the same measurements.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .common import machine, write_json

MODEL = "smollm2-135m"
SPEC = "language=en,domain=general"
SPEED = {"prompt_tokens": 32, "new_tokens": 128, "ttft_prompt_tokens": 512, "rounds": 5, "threads": 2}


class DecoderLogits:
    """Logits of an exported decoder directory (ours or the builder's) over whole sequences, one pass with
    an empty cache: input names are read from the graph, so any GenAI-style decoder works."""

    def __init__(self, directory: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        decoder = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]  # may be symbolic in the graph

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length = ids.shape
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(length, dtype=np.int64)[None].repeat(batch, 0)
        for name, value in self.inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in value.type else np.float32
                feed[name] = np.zeros((batch, self.kv_heads, 0, self.head_size), dtype)
        return torch.from_numpy(self.session.run(["logits"], feed)[0].astype(np.float32))


def quality(model, tokenizer, artifacts: dict[str, Path], threads: int) -> dict:
    """Held-out perplexity of each artifact, top-1 agreement and KL against PyTorch fp32 (one document at a
    time: no padding, so every decoder sees exactly the same tokens)."""
    from cusprun_edge.config.corpora import ExpertSpec
    from cusprun_edge.measure.evaluate import torch_logits_fn
    from cusprun_edge.measure.validate import compare_texts

    texts = [t for corpus in ExpertSpec.parse(SPEC).corpora().values() for t in corpus.eval]
    reference = torch_logits_fn(model)
    cache: dict[bytes, torch.Tensor] = {}

    def cached(ids, mask):
        key = ids.numpy().tobytes()
        if key not in cache:
            cache[key] = reference(ids, mask)
        return cache[key]

    out = {}
    for label, directory in artifacts.items():
        sums = compare_texts(cached, DecoderLogits(directory, threads), tokenizer, texts, batch_size=1, max_length=512)
        out[label] = {"ppl": math.exp(sums["test_nll"] / sums["tokens"]),
                      "top1_agreement": sums["agree"] / sums["positions"], "kl": sums["kl"] / sums["positions"],
                      "tokens": sums["tokens"]}
        out.setdefault("pytorch_fp32", {"ppl": math.exp(sums["ref_nll"] / sums["tokens"]), "tokens": sums["tokens"]})
    return out


def speed(artifacts: dict[str, Path], settings: dict) -> dict:
    """Decode tokens/s and time to first token through onnxruntime_genai, alternating between the
    artifacts round by round so that a busy machine slows them alike."""
    from cusprun_edge.measure.runtime import GenaiCausalLM

    rng = np.random.default_rng(0)
    # ids every artifact has: a trimmed vocabulary may end below 40,000
    high = min([40000] + [json.loads((Path(d) / "genai_config.json").read_text())["model"]["vocab_size"]
                          for d in artifacts.values()])
    prompt = rng.integers(100, high, settings["prompt_tokens"]).tolist()
    long_prompt = rng.integers(100, high, settings["ttft_prompt_tokens"]).tolist()
    models = {label: GenaiCausalLM(str(d), "CPUExecutionProvider", threads=settings["threads"])
              for label, d in artifacts.items()}
    for model in models.values():  # warm-up
        model.generate(prompt, 8, step_seconds=[])
        model.prefill(long_prompt)
    rates: dict[str, list[float]] = {label: [] for label in models}
    ttft: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(settings["rounds"]):
        for label, model in models.items():
            steps: list[float] = []
            model.generate(prompt, settings["new_tokens"], step_seconds=steps)
            rates[label].append(len(steps[1:]) / sum(steps[1:]) if len(steps) > 1 else 0.0)
            ttft[label].append(model.prefill(long_prompt) * 1000)
    return {label: {"decode_tok_s": float(np.median(rates[label])), "decode_tok_s_runs": rates[label],
                    "ttft_ms": float(np.median(ttft[label])), "ttft_ms_runs": ttft[label]} for label in models}


def file_bytes(directory: Path) -> int:
    """The graph and its weights, without the tokenizer and configs (the bench's and the report's count)."""
    from cusprun_edge.measure.runtime import model_file_bytes

    return model_file_bytes(directory)


def file_mb(directory: Path) -> float:
    return file_bytes(directory) / 1e6


def run(also: dict[str, Path] | None = None, rounds: int = SPEED["rounds"], keep: Path | None = None) -> dict:
    from cusprun_edge.export import export_model
    from cusprun_edge.measure.baseline import builder_artifact
    from cusprun_edge.model.load import load_model

    torch.set_num_threads(SPEED["threads"])
    model, tokenizer = load_model(MODEL)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with tempfile.TemporaryDirectory() as scratch:
        root = keep or Path(scratch)
        seconds = {}
        artifacts = {}
        for plan in ("exact", "fast"):  # both int4 plans of ours, calibrated (fast) on the general domain
            ours = root / f"cusprun-int4-{plan}"
            if not ours.exists():
                started = time.perf_counter()
                export_model(model, tokenizer, "x86-cpu", ours, precision="int4", quant_plan=plan)
                seconds[f"cusprun-edge {plan}"] = round(time.perf_counter() - started, 1)
            artifacts[f"cusprun-edge int4 {plan}"] = ours
        started = time.perf_counter()
        artifacts["genai-builder int4"] = builder_artifact(MODEL)  # cached after its first build
        seconds["genai-builder (cached after the first)"] = round(time.perf_counter() - started, 1)
        artifacts.update(also or {})
        record = {
            "what": "dense SmolLM2-135M int4: cusprun-edge's exact and fast plans vs ONNX Runtime GenAI's model "
                    "builder (int4, its defaults, from the same dequantized weights), plus any --also artifacts",
            "held_out": f"{SPEC} eval split, whole documents (<= 512 tokens), against PyTorch fp32",
            "quality": quality(model, tokenizer, artifacts, SPEED["threads"]),
            "speed": speed(artifacts, {**SPEED, "rounds": rounds}),
            "file_mb": {label: round(file_mb(d), 1) for label, d in artifacts.items()},
            "export_seconds": seconds,
            "settings": {**SPEED, "rounds": rounds},
            "machine": machine(),
        }
    write_json("builder.json", record)
    return record


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks builder")
    parser.add_argument("--also", action="append", default=[], metavar="LABEL=DIR",
                        help="another export directory to measure alongside")
    parser.add_argument("--rounds", type=int, default=SPEED["rounds"])
    parser.add_argument("--keep", type=Path, help="build (or reuse) the two exports here instead of a temporary directory")
    args = parser.parse_args(argv)
    also = {}
    for item in args.also:
        label, _, path = item.partition("=")
        if not path or not (Path(path) / "model.onnx").is_file():
            parser.error(f"--also {item}: expected LABEL=DIR with DIR/model.onnx")
        also[label] = Path(path)
    record = run(also, args.rounds, args.keep)
    for label, q in record["quality"].items():
        s = record["speed"].get(label, {})
        print(f"{label:28s} ppl {q['ppl']:.3f} top-1 {q.get('top1_agreement', 1):.3f} KL {q.get('kl', 0):.4f} "
              f"decode {s.get('decode_tok_s', 0):.1f} tok/s TTFT {s.get('ttft_ms', 0):.0f} ms "
              f"files {record['file_mb'].get(label, 0)} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
