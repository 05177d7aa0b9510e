"""Run an exported artifact (what ships) with ONNX Runtime: full-sequence logits and greedy decoding.

`OnnxCausalLM` opens the artifact's `model.onnx` with one execution provider and feeds it the way
ONNX Runtime GenAI does (an empty past for the prompt, then one token a step with the returned
present as the next past). It imports no torch at module level, so the benchmark's worker process
measures the memory of ONNX Runtime and the model only; `logits_fn` returns torch tensors for
`evaluate`'s measures, importing torch when called.

`GenaiCausalLM` runs the same directory through onnxruntime_genai's Generator (its genai_config.json),
when the export wrote one and the installed onnxruntime-genai has the provider.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    from ..errors import UserError
    from .memory import peak_rss_bytes, rss_bytes
except ImportError:  # run as a script (the benchmark's worker): nothing of the package, no torch
    from memory import peak_rss_bytes, rss_bytes  # the standard-library-only module beside this file

    class UserError(Exception):
        pass

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"

# Short names accepted on the command line, and the ONNX Runtime GenAI name of each provider it has.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "nvtensorrtrtx": "NvTensorRTRTXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
GENAI_PROVIDER_NAMES = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml",
                        "WebGpuExecutionProvider": "webgpu", "QNNExecutionProvider": "qnn",
                        "OpenVINOExecutionProvider": "OpenVINO",
                        "NvTensorRTRTXExecutionProvider": "NvTensorRtRtx"}
ORT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
              "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def provider_name(name: str) -> str:
    """'cpu' -> 'CPUExecutionProvider'; full names pass through; anything else is a UserError."""
    import onnxruntime as ort

    text = name.strip()
    if text.lower() in PROVIDER_ALIASES:
        return PROVIDER_ALIASES[text.lower()]
    for full in ort.get_all_providers():
        if text.lower() == full.lower():
            return full
    raise UserError(
        f"unknown execution provider '{name}'; use one of {', '.join(sorted(set(PROVIDER_ALIASES)))} "
        "or a full ONNX Runtime name such as CUDAExecutionProvider"
    )


def read_manifest(artifact_dir) -> tuple[Path, dict]:
    """(directory, manifest) of an exported artifact; UserError when it is not one."""
    path = Path(artifact_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; pass an export directory (`cusprun-edge export --out`)")
    if not path.is_dir():
        raise UserError(f"artifact directory {path} does not exist")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise UserError(f"{path} is not an exported artifact (no {MANIFEST_FILE}); run `cusprun-edge export` first")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{manifest_path} is not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path} is not a manifest (expected a JSON object)")
    if not (path / MODEL_FILE).is_file():
        raise UserError(f"{path} has a manifest but no {MODEL_FILE}; the export is incomplete")
    files = manifest.get("files")
    for name, record in (files.items() if isinstance(files, dict) else ()):
        if not name.startswith(MODEL_FILE):  # the graph and its weights: what a session would fail on
            continue
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None:
            raise UserError(f"{path} is incomplete: {name} is missing (its manifest lists it); export it again")
        if isinstance(record, dict) and record.get("bytes") not in (None, size):
            raise UserError(f"{path / name} has changed since the export ({size} bytes, the manifest says "
                            f"{record['bytes']}); export it again")
    return path, manifest


def model_file_bytes(artifact_dir) -> int:
    """Bytes of the ONNX graph and its external weights (what a device loads)."""
    path = Path(artifact_dir)
    return sum(p.stat().st_size for p in path.iterdir()
               if p.is_file() and (p.suffix == ".onnx" or p.name.endswith((".onnx.data", ".onnx_data"))))


def _ort_option_value(value):
    return "1" if value is True else "0" if value is False else str(value)


class OnnxCausalLM:
    """An exported decoder run with ONNX Runtime on one execution provider (CPU as fallback)."""

    def __init__(self, artifact_dir, provider: str = "CPUExecutionProvider", threads: int | None = None,
                 provider_options: dict | None = None):
        import onnxruntime as ort

        self.path, self.manifest = read_manifest(artifact_dir)
        self.provider = provider_name(provider)
        target = self.manifest.get("target") or {}
        if provider_options is None:  # the target profile's options for this provider, if it names it
            provider_options = next((p.get("options", {}) for p in target.get("providers", [])
                                     if p.get("name") == self.provider), {})
        options = ort.SessionOptions()
        options.log_severity_level = 3
        level = ORT_LEVELS.get(target.get("graph_optimization_level", "all"), "ORT_ENABLE_ALL")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        intra = threads if threads is not None else target.get("intra_op_threads") or 0
        if intra:
            options.intra_op_num_threads = int(intra)
        if target.get("inter_op_threads"):
            options.inter_op_num_threads = int(target["inter_op_threads"])
        providers = [(self.provider, {k: _ort_option_value(v) for k, v in provider_options.items()})]
        if self.provider != "CPUExecutionProvider":
            providers.append(("CPUExecutionProvider", {}))
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path / MODEL_FILE), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a broken graph or provider is reported in one line
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot open {self.path / MODEL_FILE} on {self.provider}: {first}") from None
        self.session_seconds = time.perf_counter() - t0
        self.active_providers = self.session.get_providers()
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.input_names = {i.name for i in self.session.get_inputs()}
        kv_type = self.past_inputs[0].type if self.past_inputs else "tensor(float)"
        self.kv_dtype = np.float16 if kv_type == "tensor(float16)" else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]
        io = self.manifest.get("io", {})
        heads = io.get("kv_heads_per_layer") or []
        self.kv_shapes = []  # (kv_heads, head_dim) per past input, from the graph or else the manifest
        for n, inp in enumerate(self.past_inputs):
            h, d = inp.shape[1], inp.shape[3]
            if not isinstance(h, int):
                h = heads[n // 2]
            if not isinstance(d, int):
                d = io["head_dim"]
            self.kv_shapes.append((h, d))
        self.past_capacity = 0  # see empty_past
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4
        genai = self.manifest.get("genai") or {}
        self.context_length = genai.get("context_length") or target.get("max_sequence_length")

    @property
    def provider_active(self) -> bool:
        """False when ONNX Runtime fell back to CPU because the requested provider did not initialise."""
        return bool(self.active_providers) and self.active_providers[0] == self.provider

    def empty_past(self, batch: int = 1, new: int = 0) -> list[np.ndarray]:
        """No cached token: zero-length buffers, or zeros of the capacity a shared-buffer sliding window wants
        (`past_capacity`, set on first need), which the attention mask leaves unread."""
        length = max(self.past_capacity, new) if self.past_capacity else 0
        return [np.zeros((batch, h, length, d), self.kv_dtype) for h, d in self.kv_shapes]

    def forward(self, ids: np.ndarray, past: list[np.ndarray] | None = None, past_len: int = 0):
        """ids [B, T] after `past_len` cached tokens -> (logits [B, T, V] float32, present list)."""
        ids = np.asarray(ids, dtype=np.int64)
        batch, new = ids.shape
        feed = {"input_ids": ids,
                "attention_mask": np.ones((batch, past_len + new), np.int64),
                "position_ids": np.arange(past_len, past_len + new, dtype=np.int64)[None].repeat(batch, 0)}
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        feed.update({i.name: p for i, p in zip(self.past_inputs, past if past is not None else self.empty_past(batch, new))})
        try:  # errors raise with their message; ONNX Runtime's own log of them is kept off the console
            logits, *present = self.session.run(self.output_names, feed, self.run_options)
        except Exception as exc:  # noqa: BLE001 - only the one case below is handled; the rest re-raised
            # The GenAI builder's Gemma 3 graph shares past and present buffers in its sliding-window layers, and
            # ONNX Runtime then wants a past buffer at least as long as the window even when nothing is cached.
            if past is not None or self.past_capacity:
                raise
            self.past_capacity = window_wanted(exc, self.path / MODEL_FILE)
            if not self.past_capacity:
                raise
            return self.forward(ids, None, past_len)
        return logits.astype(np.float32, copy=False), present

    @property
    def logits_fn(self):
        """`evaluate`'s logits_fn: (ids [B, T], mask [B, T]) -> logits [B, T, V] (torch).

        Each row runs alone on its real tokens (left or right padding alike, an empty past), and its
        logits go back to those positions; padded positions get zeros, which the measures ignore."""

        def fn(ids, mask):
            import torch

            ids_np, mask_np = ids.cpu().numpy(), mask.cpu().numpy().astype(bool)
            rows = []
            for row, keep in zip(ids_np, mask_np):
                rows.append(self.forward(row[keep][None])[0][0] if keep.any() else None)
            vocab = next((r.shape[-1] for r in rows if r is not None), 1)
            out = np.zeros((*ids_np.shape, vocab), np.float32)
            for b, (r, keep) in enumerate(zip(rows, mask_np)):
                if r is not None:
                    out[b, keep] = r
            return torch.from_numpy(out)

        return fn

    def generate(self, prompt_ids, max_new_tokens: int, *, eos_token_id=None, step_seconds: list | None = None):
        """Greedy decoding with the KV cache; returns the new token ids.

        Stops at `eos_token_id` (an int or a list) when given; `step_seconds`, when a list, receives the
        wall time of each step (the first is the prompt's prefill, the rest one decode step each)."""
        eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
        ids = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        past, past_len, new = None, 0, []
        for _ in range(max_new_tokens):
            t0 = time.perf_counter()
            logits, past = self.forward(ids, past, past_len)
            token = int(logits[0, -1].argmax())
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - t0)
            past_len += ids.shape[1]
            new.append(token)
            if token in eos:
                break
            ids = np.array([[token]], np.int64)
        return new


def window_wanted(exc: Exception, model_file: Path) -> int:
    """The length KV buffers must have when `exc` is ONNX Runtime refusing shorter ones (a graph whose
    sliding-window layers share past and present buffers): the largest sliding window of the graph's
    GroupQueryAttention nodes; 0 when `exc` is something else or the graph has no window."""
    if "capacity" not in str(exc):
        return 0
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    return max((a.i for n in graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
                if a.name == "local_window_size"), default=0)


# --------------------------------------------------------------------------- ONNX Runtime GenAI


def genai_support(artifact_dir, provider: str = "CPUExecutionProvider") -> str | None:
    """None when onnxruntime_genai can run this artifact on `provider`, else the reason it cannot."""
    path = Path(artifact_dir)
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai not installed"
    if not (path / GENAI_CONFIG).is_file():
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            note = (manifest.get("genai") or {}).get("skipped")
        except (OSError, json.JSONDecodeError):
            note = None
        return note or f"{path} has no {GENAI_CONFIG}"
    if provider == "CPUExecutionProvider":
        return None
    checks = {"CUDAExecutionProvider": "is_cuda_available", "DmlExecutionProvider": "is_dml_available",
              "OpenVINOExecutionProvider": "is_openvino_available", "QNNExecutionProvider": "is_qnn_available",
              "WebGpuExecutionProvider": "is_webgpu_available"}
    check = checks.get(provider)
    if check is None:
        return f"onnxruntime-genai has no {provider}"
    if not getattr(og, check, lambda: False)():
        package = "onnxruntime-genai-cuda" if provider == "CUDAExecutionProvider" else "an onnxruntime-genai build"
        return f"the installed onnxruntime-genai has no {provider} (install {package})"
    return None


class GenaiCausalLM:
    """The artifact run by onnxruntime_genai (the runtime a device app would use)."""

    def __init__(self, artifact_dir, provider: str = "CPUExecutionProvider", threads: int | None = None):
        import onnxruntime_genai as og

        self.og = og
        self.path = Path(artifact_dir)
        self.provider = provider_name(provider)
        reason = genai_support(self.path, self.provider)
        if reason:
            raise UserError(reason)
        config = og.Config(str(self.path))
        config.clear_providers()
        if self.provider != "CPUExecutionProvider":
            config.append_provider(GENAI_PROVIDER_NAMES[self.provider])
        # errors raise with their message; ONNX Runtime's own log of them is kept off the console
        session_options = {"log_severity_level": 4, **({"intra_op_num_threads": threads} if threads else {})}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        genai = json.loads((self.path / GENAI_CONFIG).read_text())
        self.context_length = genai["model"]["context_length"]
        t0 = time.perf_counter()
        self.model = og.Model(config)
        self.session_seconds = time.perf_counter() - t0
        self.buffer_length = 0  # see retry_with_window

    def generator(self, total_length: int, *, stop_at_end: bool = False):
        """A greedy generator up to `total_length` tokens (the prompt's included), which runs to that length
        unless `stop_at_end` lets it stop at the end of sequence; its KV buffers are at least `buffer_length`
        long (retry_with_window), so with them it is stopped by the caller, not by max_length."""
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": max(total_length, self.buffer_length), "do_sample": False}
        if not stop_at_end:
            options["min_length"] = total_length
        params.set_search_options(**options)
        return self.og.Generator(self.model, params)

    def retry_with_window(self, run):
        """`run()`, once more with KV buffers as long as the sliding window where the graph asked for that: the
        GenAI builder's Gemma 3 shares past and present buffers in its sliding-window layers, and ONNX Runtime
        refuses buffers shorter than the window (GenAI sizes them by max_length)."""
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 - only that case is retried; the rest re-raised
            if self.buffer_length:
                raise
            self.buffer_length = window_wanted(exc, self.path / MODEL_FILE)
            if not self.buffer_length:
                raise
            return run()

    def prefill(self, prompt_ids) -> float:
        """Seconds to run the prompt and pick the first token (time to first token)."""
        ids = np.asarray(prompt_ids, dtype=np.int32)

        def run():
            generator = self.generator(len(ids) + 1)
            t0 = time.perf_counter()
            generator.append_tokens(ids)
            generator.generate_next_token()
            return time.perf_counter() - t0

        return self.retry_with_window(run)

    def generate(self, prompt_ids, max_new_tokens: int, *, step_seconds: list | None = None) -> list[int]:
        """Greedy decoding of exactly `max_new_tokens` tokens (no early stop)."""
        ids = np.asarray(prompt_ids, dtype=np.int32)

        def run():
            steps = []
            generator = self.generator(len(ids) + max_new_tokens)
            t0 = time.perf_counter()
            generator.append_tokens(ids)
            for _ in range(max_new_tokens):
                generator.generate_next_token()
                t1 = time.perf_counter()
                steps.append(t1 - t0)
                t0 = t1
            return steps, [int(t) for t in generator.get_sequence(0)[len(ids):]]

        steps, new = self.retry_with_window(run)
        if step_seconds is not None:
            step_seconds.extend(steps)
        return new


# --------------------------------------------------------------------------- benchmark worker
# `bench` runs this file as a script in a fresh process per (artifact, provider), so the peak
# resident memory it reports is that of ONNX Runtime with this model alone (no torch, no other model).


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def _open(artifact, engine: str, provider: str, threads: int | None):
    """(runner, whether the provider is active, vocabulary size) for one artifact on `engine`."""
    if engine == "onnxruntime-genai":
        model = GenaiCausalLM(artifact, provider, threads=threads)
        return model, True, json.loads((Path(artifact) / GENAI_CONFIG).read_text())["model"]["vocab_size"]
    model = OnnxCausalLM(artifact, provider, threads=threads)
    vocab = model.session.get_outputs()[0].shape[-1]
    return model, model.provider_active, vocab if isinstance(vocab, int) else 32000


def measure_side_by_side(job: dict) -> dict:
    """Decode tokens/s of several artifacts in one process, alternating round by round (each round decodes with
    every artifact once, in turn), so a machine that speeds up or slows down during the run moves them alike: the
    ratios a verdict compares. Measured one process after another, the same artifacts' rates scattered by about
    10% here between runs. Returns the median per artifact and every round's rate."""
    models = {label: _open(path, job["engine"], job["provider"], job.get("threads"))
              for label, path in job["artifacts"].items()}
    vocab = min(v for _, _, v in models.values())
    rng = np.random.default_rng(job.get("seed", 0))
    ids = rng.integers(min(100, vocab // 4), vocab, size=job["decode_prompt_tokens"]).tolist()
    n_new = max(2, min([job["new_tokens"]] + [(m.context_length or 1 << 30) - len(ids) for m, _, _ in models.values()]))
    rates: dict[str, list[float]] = {label: [] for label in models}
    for round_ in range(job["warmup"] + job["rounds"]):
        for label, (model, _, _) in models.items():
            steps: list[float] = []
            model.generate(ids, n_new, step_seconds=steps)
            if round_ >= job["warmup"]:
                rates[label].append(len(steps[1:]) / sum(steps[1:]))
    return {"rounds": job["rounds"], "prompt_tokens": len(ids), "new_tokens": n_new,
            "decode_tok_s": {label: float(np.median(r)) for label, r in rates.items()},
            "tok_s_runs": {label: [float(x) for x in r] for label, r in rates.items()}}


def measure(job: dict) -> dict:
    """Time one artifact on one provider: session creation, prefill (time to first token) per prompt
    length, per-token decode latency and tokens/s; then the process's peak resident memory."""
    mb = 1024 * 1024
    rss_start = rss_bytes()
    engine, provider = job["engine"], job["provider"]
    model, active, vocab = _open(job["artifact"], engine, provider, job.get("threads"))
    result = {"engine": engine, "provider": provider, "provider_active": active,
              "session_s": model.session_seconds, "rss_start_mb": rss_start / mb, "rss_loaded_mb": rss_bytes() / mb}
    if not active:
        result["active_providers"] = model.active_providers
        return result
    rng = np.random.default_rng(job.get("seed", 0))
    low = min(100, vocab // 4)  # avoid the special tokens at the start of most vocabularies

    def prompt(n):
        return rng.integers(low, vocab, size=n).tolist()

    limit = model.context_length or 1 << 30
    prefill, skipped = {}, {}
    for length in job["prompt_lengths"]:
        if length + 1 > limit:
            skipped[str(length)] = f"beyond the context length {limit}"
            continue
        ids = prompt(length)
        times = []
        for rep in range(job["warmup"] + job["reps"]):
            if engine == "onnxruntime-genai":
                seconds = model.prefill(ids)
            else:
                steps: list[float] = []
                model.generate(ids, 1, step_seconds=steps)
                seconds = steps[0]
            if rep >= job["warmup"]:
                times.append(seconds)
        prefill[str(length)] = _percentiles(times)
    result["prefill"] = prefill
    if skipped:
        result["prefill_skipped"] = skipped

    n_prompt, n_new = job["decode_prompt_tokens"], job["new_tokens"]
    n_new = max(2, min(n_new, limit - n_prompt))
    ids = prompt(n_prompt)
    per_token, rates = [], []
    for rep in range(job["warmup"] + job["decode_reps"]):
        steps = []
        model.generate(ids, n_new, step_seconds=steps)
        decode = steps[1:]  # steps[0] is the prompt's prefill and the first token
        if rep >= job["warmup"]:
            per_token.extend(decode)
            rates.append(len(decode) / sum(decode))
    result["decode"] = {"prompt_tokens": n_prompt, "new_tokens": n_new, "per_token": _percentiles(per_token),
                        "tok_s": float(np.median(rates)), "tok_s_runs": [float(r) for r in rates]}
    result["peak_rss_mb"] = peak_rss_bytes() / mb
    return result


def _worker_main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = measure_side_by_side(job) if "artifacts" in job else measure(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as one line
        text = str(exc).strip().splitlines()
        result = {"error": f"{type(exc).__name__}: {text[0][:300] if text else ''}"}
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
