"""export_model: trace, graph passes and the fp32 gate, then the target precision by its plan and its
gate (falling back along the plan), then GenAI config and manifest, all in a temporary directory
renamed into place at the end (a refused export leaves nothing behind)."""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from ..config.targets import resolve_target
from ..errors import UserError
from ..fsutil import atomic_directory
from ..model import arch
from ..model.shards import is_lazy
from ..model.structure import count_params, structure_of
from . import parity as gate
from . import trace_cache
from .common import MANIFEST_FILE, MODEL_FILE, exports_layer_by_layer, one_line
from .package import (
    context_length,
    estimate_memory,
    io_record,
    library_versions,
    opset_of,
    source_record,
    tool_version,
    write_genai_config,
    write_manifest,
)
from .passes import save_onnx
from .precision import convert_precision
from .quant_plan import DEFAULT_PLAN, PLANS, gate_key, levels_of, worst_off_grid
from .trace import export_onnx

StepCallback = Callable[[str], None]


def export_source(source, target, out, **kwargs) -> dict:
    """Load `source` (embedded name, .gguf, HF or expert directory) and export it; returns the manifest."""
    model, tokenizer = load_for_export(str(source))
    return export_model(model, tokenizer, target, out, source=str(source), **kwargs)


def load_for_export(source: str, *, trust_remote_code: bool = False, allow_pickle: bool = False,
                    layer_by_layer: bool | None = None):
    """(model, tokenizer) of `source` as export_model takes it: whole, or with its decoder layers left on disk
    (model/lazy.py) so the export runs one layer at a time (export/streamed.py). `layer_by_layer`: None decides by
    size (common.exports_layer_by_layer)."""
    from ..model.lazy import lazy_model, model_shape
    from ..model.load import load_model

    if layer_by_layer is None:
        layer_by_layer = exports_layer_by_layer(model_shape(source, trust_remote_code=trust_remote_code)["params"])
    load = lazy_model if layer_by_layer else load_model
    return load(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def export_model(
    model,
    tokenizer,
    target,
    out,
    *,
    precision: str | None = None,
    force: bool = False,
    attention: str | None = None,
    thresholds: dict[str, dict[str, float]] | None = None,
    source: str | None = None,
    held_out: str | None = None,
    calibration: list[str] | None = None,
    on_step: StepCallback | None = None,
    quant_plan: str = DEFAULT_PLAN,
) -> dict:
    """Export `model` for `target` (a TargetProfile or its name/path) into the directory `out`.

    `precision` defaults to the target's; `attention` ("gqa" or "standard") to the target's;
    `thresholds` overrides entries of parity.THRESHOLDS; `held_out` names the expert (e.g.
    "language=fr,domain=medical") whose evaluation split joins the general one in the quantized gate
    (default: the one recorded in an expert directory `source`); `on_step(name)` hears each step as it
    starts ("trace", "graph passes", "parity fp32", "quantize int4", "parity int4", "package").
    `calibration`: documents (never the held-out ones) whose activations guide the quantization of weights on
    no 4-bit grid (GPTQ-style; default: the calibration documents of the expert recorded in `source`).
    `quant_plan`: the int4 plan, "exact", "fast" or "rtn" (export/quant_plan.py).
    Returns the manifest (also written to `out/manifest.json`). Raises UserError on bad input or failed
    parity, leaving nothing behind; an error in the exporter or a library surfaces as itself."""
    started = time.perf_counter()
    profile = resolve_target(target)
    precision = precision or profile.precision
    if precision not in profile.precisions:
        raise UserError(
            f"precision '{precision}' is not available for target '{profile.name}'; "
            f"choose one of {', '.join(profile.precisions)}"
        )
    if quant_plan not in PLANS:
        raise UserError(f"quantization plan '{quant_plan}' is unknown; choose one of {', '.join(PLANS)}")
    attention = attention or profile.attention
    if attention not in ("gqa", "standard"):
        raise UserError(f"attention '{attention}' is unknown; use 'gqa' or 'standard'")
    limits = {p: {**gate.THRESHOLDS[p], **(thresholds or {}).get(p, {})} for p in gate.THRESHOLDS}
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; choose another output directory or pass --force")
        if not _replaceable(out):
            raise UserError(f"{out} exists and is not an export directory (no {MANIFEST_FILE}); "
                            "--force replaces only a previous export: choose another output directory")
    _check_model(model)
    memory = estimate_memory(model, precision, profile)
    if memory["total_mb"] > profile.memory_budget_mb:
        raise UserError(
            f"the exported model needs about {memory['total_mb']:.0f} MB on '{profile.name}' "
            f"(weights {memory['weights_mb']:.0f} MB + KV cache {memory['kv_cache_mb']:.0f} MB at "
            f"{profile.max_sequence_length} tokens), over its {profile.memory_budget_mb} MB budget; "
            "choose a lower precision or prune further"
        )

    with atomic_directory(out) as tmp:
        spec = _held_out_spec(source, held_out)
        manifest = _build(model, tokenizer, profile, precision, attention, limits, tmp, memory, source,
                          on_step or (lambda name: None), spec,
                          calibration if calibration is not None else _calibration_texts(spec, quant_plan), quant_plan)
        write_manifest(tmp, manifest, started)
    return manifest


def _replaceable(out: Path) -> bool:
    """--force replaces a previous export or an empty directory, never anything else."""
    if out.is_symlink() or not out.is_dir():
        return False
    return (out / MANIFEST_FILE).is_file() or not any(out.iterdir())


def _check_model(model) -> None:
    arch.spec_for(model)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        raise UserError(
            f"export needs a float32 model on the CPU, got {param.dtype} on {param.device}; "
            "load it with load_model(..., dtype=torch.float32)"
        )



def _held_out_spec(source: str | None, held_out: str | None) -> str | None:
    """The expert spec whose evaluation split joins the general one in the held-out gate."""
    if held_out or not source:
        return held_out
    from ..model.expert_io import expert_record

    path = Path(source)
    record = expert_record(path) if path.is_dir() else {}
    spec = (record.get("extra") or {}).get("expert") if isinstance(record.get("extra"), dict) else None
    return spec or record.get("expert")


def _calibration_texts(spec: str | None, plan: str = DEFAULT_PLAN) -> list[str]:
    """The expert's scoring documents (the gate reads the held-apart ones; nothing reads its eval split). The fast plan
    rounds every weight on them, so a model with no recorded expert is calibrated on the general domain's."""
    from ..config.corpora import ExpertSpec, calibration_documents

    spec = spec or ("domain=general" if plan == "fast" else None)
    if not spec or plan == "rtn":
        return []

    try:
        return calibration_documents(ExpertSpec.parse(spec).corpora())
    except UserError:  # an expert built from data that is no longer there: plain re-quantization
        return []


def _grams(model, tokenizer, texts, timings, notes, plan: str = DEFAULT_PLAN) -> dict:
    """Input statistics for GPTQ-style quantization: of the weights on no 4-bit grid (exact plan; none: nothing to
    do), or of every weight (fast plan)."""
    from .calibration import MAX_DOCUMENTS, calibrated_linears, input_grams

    t = time.perf_counter()
    names = calibrated_linears(model, plan)
    if not names or not texts:
        return {}
    grams = input_grams(model, tokenizer, texts, names)
    timings["calibration"] = round(time.perf_counter() - t, 2)
    what = "every weight (fast plan)" if plan == "fast" else f"{len(names)} weights on no 4-bit grid"
    notes.append(f"{what} quantized GPTQ-style on {min(len(texts), MAX_DOCUMENTS)} calibration documents")
    return grams


def _build(model, tokenizer, profile, precision, attention, limits, tmp, memory, source, step, held_out,
           calibration, plan) -> dict:
    if is_lazy(model):  # too large to hold whole: one decoder layer at a time
        from .streamed import export_streamed

        timings, parity, quantization, attention, exporter, rotary_fused, notes = export_streamed(
            model, tokenizer, profile, precision, attention, limits, tmp, step, held_out, calibration, plan)
    else:
        timings, parity, quantization, attention, exporter, rotary_fused, notes = _export_whole(
            model, tokenizer, profile, precision, attention, limits, tmp, step, held_out, calibration, plan)
    step("package")
    t = time.perf_counter()
    tokenizer.save_pretrained(tmp)
    genai = write_genai_config(model, tokenizer, profile, attention, tmp)
    if genai.get("skipped"):
        notes.append(genai["skipped"])
    timings["package"] = round(time.perf_counter() - t, 2)
    return {
        "format": "cusprun-edge-onnx",
        "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "cusprun-edge", "version": tool_version()},
        "libraries": library_versions(),
        "source": source_record(model, source),
        "target": profile.to_dict(),
        "precision": precision,
        "quantization": quantization,
        "opset": opset_of(tmp / MODEL_FILE),
        "exporter": exporter,
        "attention": "GroupQueryAttention" if attention == "gqa" else "standard",
        "io": io_record(model, attention, rotary_fused),
        "parameters": count_params(model),
        "structure": structure_of(model).to_dict(),
        "pruned": getattr(model.config, "cusprun_structure", None) is not None,
        "memory_estimate_mb": memory,
        "parity": {"prompts": list(gate.PARITY_PROMPTS), "decode_steps": gate.DECODE_STEPS,
                   "held_out": {"spec": held_out or "domain=general", "split": gate.HELD_OUT_SPLIT,
                                "documents_per_corpus": gate.HELD_OUT_DOCS, "tokens_per_document": gate.HELD_OUT_TOKENS},
                   "runtime": "onnxruntime CPUExecutionProvider", "reference": "PyTorch fp32",
                   "thresholds": {p: limits[gate_key(p, plan)] for p in parity},
                   **parity},
        "genai": genai,
        "timings_s": timings,
        "notes": notes,
    }


def _export_whole(model, tokenizer, profile, precision, attention, limits, tmp, step, held_out, calibration, plan):
    """The whole model in memory: trace, gate the fp32 graph, quantize it and gate that. Returns (timings, parity,
    quantization record, attention kind, exporter, rotary fused, notes)."""
    timings: dict[str, float] = {}
    notes: list[str] = []
    t = time.perf_counter()
    reference = gate.reference_logits(model, tokenizer)
    timings["reference"] = round(time.perf_counter() - t, 2)
    fp32_dir = tmp / "fp32"
    attention, exporter, fp32_parity, rotary_fused = _export_fp32(
        model, attention, profile, reference, limits, fp32_dir, timings, notes, step)

    parity = {"fp32": fp32_parity}
    quantization = None
    if precision == "fp32":
        convert_precision(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, precision)
    else:
        t = time.perf_counter()
        texts = gate.held_out_texts(held_out)
        held_reference = gate.held_out_reference(model, tokenizer, texts)
        timings["held_out_reference"] = round(time.perf_counter() - t, 2)
        grams = _grams(model, tokenizer, calibration, timings, notes, plan) if precision == "int4" else {}
        gate_limits = limits[gate_key(precision, plan)]
        quantization, parity[precision] = _quantize_and_gate(
            fp32_dir, tmp, precision, profile, reference, held_reference, gate_limits, timings, notes, step,
            grams, plan)
        del grams
    shutil.rmtree(fp32_dir)
    return timings, parity, quantization, attention, exporter, rotary_fused, notes


def _quantize_and_gate(fp32_dir, tmp, precision, profile, reference, held_reference, limits, timings, notes, step,
                       grams=None, plan=DEFAULT_PLAN):
    """Convert to `precision` and gate it on the prompts and the held-out text; an int4 export that fails
    falls back along its plan's levels (quant_plan.levels_of: more weights at 8 bits) and says why; one that
    still fails is refused (UserError: the model itself does not survive this precision)."""
    names = levels_of(plan)
    levels = range(len(names)) if precision == "int4" else [0]
    failures, worst, quantization = [], frozenset(), None
    for level in levels:
        if level == 1:
            worst = worst_off_grid(quantization)  # ranked by what level 0 measured
            if not worst:
                continue  # nothing re-quantized at 4 bits: level 1 would be level 0 again
        step(f"quantize {precision}" + (f" (fallback {level})" if level else ""))
        t = time.perf_counter()
        quantization = convert_precision(fp32_dir / MODEL_FILE, tmp / MODEL_FILE, precision, level=level,
                                         accuracy_level=profile.accuracy_level, grams=grams, worst=worst, plan=plan)
        timings[f"convert_{precision}" + (f"_level{level}" if level else "")] = round(time.perf_counter() - t, 2)
        step(f"parity {precision}")
        t = time.perf_counter()
        result = gate.check_parity(tmp / MODEL_FILE, reference, limits)
        result["held_out"] = gate.check_held_out(tmp / MODEL_FILE, held_reference, limits)
        if result["passed"] and not result["held_out"]["passed"]:
            result["passed"], result["failure"] = False, result["held_out"]["failure"]
        timings[f"parity_{precision}" + (f"_level{level}" if level else "")] = round(time.perf_counter() - t, 2)
        if result["passed"]:
            if failures:
                quantization["fallback"] = (f"{'; '.join(failures)}; {names[level]} passed")
                notes.append(quantization["fallback"])
                result["failed_levels"] = failures
            return quantization, result
        failures.append(f"{names[level] if precision == 'int4' else precision} failed parity ({result['failure']})")
    hint = {"int4": "; this model loses too much at int4: try --precision int8",
            "int8": "; try --precision fp16 or fp32"}.get(precision, "")
    raise UserError(f"export failed parity ({precision}): {'; '.join(failures)}{hint}")


def _export_fp32(model, attention, profile, reference, limits, directory, timings, notes, step):
    """Export the fp32 graph into `directory` and gate it.

    Returns (attention, exporter, parity, whether GroupQueryAttention applies the rotary embedding).

    A GroupQueryAttention export that fails to trace, to load in ONNX Runtime, or its parity is retried with
    plain attention. A plain export that fails to trace or load is our bug or a library's: it raises as is;
    one that fails parity is refused (UserError)."""
    tries = ["gqa", "standard"] if attention == "gqa" else ["standard"]
    for kind in tries:
        last = kind == tries[-1]
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        step("trace" if kind == "gqa" else "trace (plain attention)")
        t = time.perf_counter()
        key = trace_cache.trace_key(model, kind, profile.opset, context_length(model, profile)) \
            if trace_cache.enabled() else None
        cached = trace_cache.lookup(key, directory) if key else None
        if cached:
            exporter, rotary_fused = cached["exporter"], cached["rotary_fused"]
            notes.append(f"traced graph reused from the cache ({key})")
        else:
            try:
                onnx_model, exporter = export_onnx(model, kind, profile.opset, context_length(model, profile),
                                                   on_passes=lambda: step("graph passes"))
            except UserError:
                raise
            except Exception as exc:  # a fused-attention failure is retried with plain attention; a plain one raises
                if last:
                    raise
                notes.append(f"GroupQueryAttention export failed ({one_line(exc)}); exported plain attention")
                continue
            rotary_fused = any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0)
                               for n in onnx_model.graph)
            save_onnx(onnx_model, directory / MODEL_FILE)
            del onnx_model
        timings["export"] = round(time.perf_counter() - t, 2)
        step("parity fp32")
        t = time.perf_counter()
        try:
            parity = gate.check_parity(directory / MODEL_FILE, reference, limits["fp32"])
        except Exception as exc:
            if last:
                raise
            notes.append(f"onnxruntime cannot run the GroupQueryAttention export ({one_line(exc)}); "
                         "exported plain attention")
            continue
        timings["parity_fp32"] = round(time.perf_counter() - t, 2)
        if parity["passed"]:
            if key and not cached:
                trace_cache.store(key, directory, {"exporter": exporter, "rotary_fused": rotary_fused})
            return kind, exporter, parity, rotary_fused
        if last:
            raise UserError(f"export failed parity (fp32): {parity['failure']}")
        notes.append(f"GroupQueryAttention export failed parity ({parity['failure']}); "
                     "exported plain attention")
    raise AssertionError("unreachable")
