"""The export of a model too large to hold whole, one decoder layer at a time (issue: 1B-8B models on one host).

The whole-model export (build.py) traces the model with its weights in memory, saves a float32 graph, loads it
back whole to quantize it and gates both: about three copies of the float32 weights at its peak. Here:

1. The decoder layers of a lazy model (model/lazy.py: layers on disk) get placeholders for the trace: tensors
   of the right shapes whose memory is never touched, so they cost address space, not memory. The graph
   comes from the same tracer, the same graph passes and the same per-layer widths, KV cache and fused
   attention as the whole-model export.
2. Their initializers are pointed at the weights on disk (onnx_ir lazy tensors); constant folding is kept off
   them, and the transposes the folding would have stored are made lazily too.
3. Layer after layer, each MatMul weight is read, quantized by its plan entry (quant_plan.py: the same entries
   and rounding as the whole-model export, GPTQ-style on input statistics gathered for that layer alone by
   the layer loop of model/sequential.py) and appended to the external data file; then the next layer. The
   float32 model never exists whole, in memory or on disk.
4. The gate is the same: PyTorch's logits (the lazy model run with one layer in memory at a time) against
   ONNX Runtime's on the parity prompts and the held-out text, falling back along the plan's levels.

What it does not do that the whole-model export does: fp16 (the converter needs the whole graph in memory),
storing fp16-exact block scales in half precision, and reading a tied embedding from the lm_head's quantized
weight (the embedding stays float32 in the data file); the manifest says so.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from ..errors import UserError
from ..model import arch
from ..model.shards import layers_streamed, materialized, reader_of
from . import parity as gate
from . import quant_plan
from .calibration import gram_for
from .common import DATA_FILE, MODEL_FILE, one_line
from .package import context_length
from .quant_plan import gate_key, levels_of, worst_off_grid
from .trace import export_onnx
from .weight_only import HALF_MIN_SIZE, module_path, quantize_group

FOLD_LIMIT = 8192  # values of a weight read from disk that constant folding may still read into memory
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PRECISIONS = ("fp32", "int8", "int4")


@contextmanager
def placeholders(model):
    """The lazy model's decoder layers hold uninitialised float32 tensors of their shapes (untouched memory is
    not resident) for a trace, and nothing after it."""
    layers = arch.decoder_layers(model)
    try:
        for layer in layers:
            for module in layer.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    if param.is_meta:
                        setattr(module, name, torch.nn.Parameter(torch.empty(param.shape), requires_grad=False))
        yield model
    finally:
        for layer in layers:
            layer.to("meta")


def _disk_tensor(reader, name: str, shape) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.tensor(reader.tensor(name).numpy()), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))


def _transposed(tensor, perm) -> ir.LazyTensor:
    shape = [tensor.shape[p] for p in perm]
    return ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy().transpose(perm))),
                         dtype=tensor.dtype, shape=ir.Shape(shape))


def binder(model):
    """export_onnx's `bind_weights` for a lazy model: layer initializers read from disk when written, the
    optimizer's constant folding kept off them, their transposes (nn.Linear's weight is [N, K]) made lazily."""
    from onnxscript.optimizer import optimize_ir

    reader = reader_of(model)
    prefix = arch.spec_for(model).layers + "."

    def lazy(value) -> bool:
        return value is not None and isinstance(value.const_value, ir.LazyTensor)

    def bind(onnx_model) -> None:
        graph = onnx_model.graph
        for value in graph.initializers.values():
            name = value.name.removeprefix("model.")  # the traced wrapper holds the model as `model`
            if name.startswith(prefix) and name in reader.files:
                value.const_value = _disk_tensor(reader, name, value.shape)
        # a norm's few values may fold (Gemma's 1 + weight) as on a whole model; a weight matrix may not
        optimize_ir(onnx_model, should_fold=lambda node: False if any(
            lazy(v) and v.const_value.size > FOLD_LIMIT for v in node.inputs) else None)
        _fold_transposes(graph, lambda value: lazy(value) and len(value.uses()) == 1)
    return bind


class DataWriter:
    """Appends tensors to one external data file and hands back onnx_ir tensors that point into it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.file = open(self.directory / DATA_FILE, "wb")
        self.offset = 0

    def tensor(self, array: np.ndarray, name: str) -> ir.ExternalTensor:
        array = np.ascontiguousarray(array)
        self.file.write(memoryview(array).cast("B"))
        tensor = ir.ExternalTensor(DATA_FILE, self.offset, array.nbytes, ir.DataType.from_numpy(array.dtype),
                                   shape=ir.Shape(array.shape), name=name, base_dir=str(self.directory))
        self.offset += array.nbytes
        return tensor

    def close(self) -> None:
        self.file.close()


def _initializer(graph, name: str, tensor) -> ir.Value:
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _stored(graph, writer: DataWriter, name: str, array: np.ndarray) -> ir.Value:
    """An initializer: in the data file when it is large, in the graph when it is a few values."""
    tensor = writer.tensor(array, name) if array.size >= HALF_MIN_SIZE else ir.tensor(array, name=name)
    return _initializer(graph, name, tensor)


def _fold_transposes(graph, which=lambda value: True) -> None:
    """Transpose(initializer) -> a lazily transposed initializer, for the initializers `which` accepts: a weight read
    from disk (nn.Linear's is [N, K]); for the quantizer, any constant, since a tied lm_head is
    MatMul(x, Transpose(embedding)) (weight_only.fold_weight_transposes on a whole graph)."""
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" else None
        if source is None or source.const_value is None or source.name not in graph.initializers or not which(source):
            continue
        perm = list(node.attributes.get_ints("perm", []))
        folded = _initializer(graph, f"{source.name}.transposed", _transposed(source.const_value, perm))
        ir.convenience.replace_all_uses_with(node.outputs[0], folded)
        graph.remove(node, safe=True)
        if not source.uses():
            graph.initializers.pop(source.name)


def constant_matmuls(graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
            and n.inputs[1] is not None and n.inputs[1].const_value is not None and len(n.inputs[1].shape) == 2]


def _layer_of(path: str) -> int | None:
    found = _LAYER.search(path)
    return int(found.group(1)) if found else None


def _replace(graph, writer, nodes, widths, packed, entry, accuracy_level, block_sums) -> None:
    """MatMulNBits (+ the offset correction, + a Split when several MatMuls share it) in place of `nodes`; as
    weight_only._replace does on a whole graph."""
    first = nodes[0]
    x, k = first.inputs[0], first.inputs[1].shape[0]
    prefix = f"{first.inputs[1].name}_Q{entry.bits}"
    inputs = [x, _stored(graph, writer, prefix, packed["B"]),
              _stored(graph, writer, f"{prefix}_scales", packed["scales"])]
    if "zero_points" in packed:
        inputs.append(_stored(graph, writer, f"{prefix}_zero_points", packed["zero_points"]))
    new = [ir.node("MatMulNBits", inputs, {"K": k, "N": sum(widths), "bits": entry.bits, "block_size": entry.block,
                                           "accuracy_level": accuracy_level}, domain="com.microsoft", name=first.name)]
    out = new[0].outputs[0]
    out.type = ir.TensorType(ir.DataType.FLOAT)
    if "offsets" in packed:
        nb = packed["offsets"].shape[0]
        if (id(x), nb) not in block_sums:
            shape = _stored(graph, writer, f"{prefix}_block_shape", np.array([0, 0, nb, entry.block], np.int64))
            axes = _stored(graph, writer, f"{prefix}_block_axes", np.array([-1], np.int64))
            blocks = ir.node("Reshape", [x, shape], name=f"{first.name}_blocks")
            sums = ir.node("ReduceSum", [blocks.outputs[0], axes], {"keepdims": 0}, name=f"{first.name}_block_sums")
            new[:0] = [blocks, sums]
            block_sums[(id(x), nb)] = sums.outputs[0]
        offsets = _stored(graph, writer, f"{prefix}_offsets", packed["offsets"])
        correction = ir.node("MatMul", [block_sums[(id(x), nb)], offsets], name=f"{first.name}_offset")
        total = ir.node("Add", [out, correction.outputs[0]], name=f"{first.name}_plus_offset")
        new += [correction, total]
        out = total.outputs[0]
        out.type = ir.TensorType(ir.DataType.FLOAT)
    if len(nodes) > 1:
        split = _stored(graph, writer, f"{prefix}_split", np.array(widths, np.int64))
        splitter = ir.node("Split", [out, split], {"axis": -1}, num_outputs=len(nodes), name=f"{first.name}_split")
        new.append(splitter)
        outs = list(splitter.outputs)
        for value in outs:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    else:
        outs = [out]
    ir.convenience.replace_nodes_and_values(graph, nodes[0], nodes, new, [n.outputs[0] for n in nodes], outs)


def _share_embedding(graph) -> bool:
    """A tied embedding gathers its rows from the lm_head's quantized weight (weight_only.share_embedding_with_lm_head
    on a whole graph, which says why this is exact)."""
    shared = False
    for gather in list(graph):
        table = gather.inputs[0] if gather.op_type == "Gather" else None
        if table is None or table.const_value is None or len(table.shape) != 2:
            continue
        quantized = next((n for n in graph if n.op_type == "MatMulNBits" and len(n.inputs) == 3
                          and n.inputs[1].name.startswith(f"{table.name}.transposed_Q")), None)
        if quantized is None:
            continue
        block, bits = quantized.attributes.get_int("block_size"), quantized.attributes.get_int("bits")
        vocab, hidden = table.shape
        if hidden % block:
            continue
        rows = []
        for part, shape, source in (("data", [vocab, hidden * bits // 8], quantized.inputs[1]),
                                    ("scales", [vocab, hidden // block], quantized.inputs[2])):
            shape_value = _initializer(graph, f"{table.name}.{part}_shape", ir.tensor(np.array(shape, np.int64)))
            rows.append(ir.node("Reshape", [source, shape_value], name=f"{table.name}.{part}_rows"))
        gathered = ir.node("GatherBlockQuantized", [rows[0].outputs[0], gather.inputs[1], rows[1].outputs[0]],
                           {"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
                           domain="com.microsoft", name=gather.name)
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], [*rows, gathered],
                                                [gather.outputs[0]], [gathered.outputs[0]])
        if not table.uses():
            graph.initializers.pop(table.name)
        shared = True
    return shared


def _layer_grams(model, tokenizer, texts: list[str]):
    """Yields, for each decoder layer in order and then for the output head, {module name: sum of x x^T of its
    input} over `texts` (padding excluded): export/calibration.input_grams, one layer in memory at a time."""
    from ..model.sequential import capture_stream, run_layer
    from .calibration import MAX_DOCUMENTS, MAX_TOKENS, every_linear

    if len(texts) > MAX_DOCUMENTS:  # the documents input_grams takes
        texts = [texts[i * len(texts) // MAX_DOCUMENTS] for i in range(MAX_DOCUMENTS)]
    names = every_linear(model)
    modules = dict(model.named_modules())
    stream = capture_stream(model, tokenizer, texts, max_length=MAX_TOKENS)
    spec = arch.spec_for(model)
    hidden = stream.hidden
    for i in range(len(arch.decoder_layers(model))):
        prefix = f"{spec.layers}.{i}."
        with materialized(model, i) as layer, torch.no_grad():
            mine = [n for n in names if n.startswith(prefix)]
            grams = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in mine}
            mask = {}

            def hook(name):
                def record(module, args):
                    x = args[0].reshape(-1, args[0].shape[-1])[mask["flat"]].float()
                    grams[name] += (x.T @ x).double()
                return record

            handles = [modules[n].register_forward_pre_hook(hook(n)) for n in mine]
            try:
                nxt = []
                for b, x in enumerate(hidden):
                    mask["flat"] = stream.masks[b].reshape(-1)
                    nxt.append(run_layer(layer, x, stream.layer_kwargs[i][b], "cpu"))
            finally:
                for h in handles:
                    h.remove()
        hidden = nxt
        yield {n: g.numpy() for n, g in grams.items()}
    head = [n for n in names if not n.startswith(spec.layers + ".")]
    norm = arch.get(model, spec.final_norm)
    grams = {}
    with torch.no_grad():
        for n in head:
            g = torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64)
            for b, x in enumerate(hidden):
                y = norm(x).reshape(-1, x.shape[-1])[stream.masks[b].reshape(-1)].float()
                g += (y.T @ y).double()
            grams[n] = g.numpy()
    yield grams


def write_weights(onnx_model, model, tokenizer, directory: Path, precision: str, *, level: int = 0,
                  plan_name: str = quant_plan.DEFAULT_PLAN, calibration: list[str] | None = None,
                  worst=frozenset(), accuracy_level: int = 4, on_layer=None) -> dict | None:
    """Quantize (int4/int8) the traced graph's MatMul weights layer by layer, as they are read from disk, and
    write every initializer to `directory`'s data file; save the graph. Returns the quantization record (None
    for fp32)."""
    graph = onnx_model.graph
    writer = DataWriter(directory)
    try:
        record = None
        if precision in ("int4", "int8"):
            onnx_model.opset_imports.setdefault("com.microsoft", 1)
            _fold_transposes(graph)
            record = _quantize_by_layer(graph, writer, model, tokenizer, precision, level, plan_name,
                                        calibration or [], worst, accuracy_level, on_layer)
            if _share_embedding(graph):
                record["embedding"] = "the lm_head's quantized weight (GatherBlockQuantized)"
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) or tensor is None:
                continue
            array = tensor.numpy()
            value.const_value = writer.tensor(array, value.name) if array.size >= HALF_MIN_SIZE \
                else ir.tensor(array, name=value.name)
    finally:
        writer.close()
    ir.save(onnx_model, directory / MODEL_FILE)
    return record


def _quantize_by_layer(graph, writer, model, tokenizer, precision, level, plan_name, calibration, worst,
                       accuracy_level, on_layer) -> dict:
    matmuls = constant_matmuls(graph)
    paths = {n.name: module_path(n.name, n.metadata_props.get("pkg.torch.onnx.name_scopes", "")) for n in matmuls}
    by_layer: dict[int | None, list[ir.Node]] = {}
    for node in matmuls:
        by_layer.setdefault(_layer_of(paths[node.name]), []).append(node)
    n_layers = len(arch.decoder_layers(model))
    calibrated = precision == "int4" and plan_name != "rtn" and bool(calibration)
    grams_iter = _layer_grams(model, tokenizer, calibration) if calibrated else None
    plan_all, records, block_sums = {}, {}, {}
    for i in [*range(n_layers), None]:
        if on_layer and i is not None:
            on_layer(i, n_layers)
        grams = next(grams_iter) if grams_iter is not None else {}
        nodes = by_layer.get(i, [])
        weights = {}
        for node in nodes:
            weight = node.inputs[1].const_value.numpy()
            # outside the layers, a transposed weight is the tied embedding read as the lm_head
            head = (i is None and node.inputs[1].name.endswith(".transposed")) or "lm_head" in paths[node.name]
            weights[node.name] = (paths[node.name], weight, head)
        by_matmul = {name: g for name, (path, weight, head) in weights.items()
                     if (g := gram_for(grams, path)) is not None
                     and (plan_name == "fast" or not head and quant_plan.off_grid(weight))}  # as calibrated_linears
        plan = quant_plan.make_plan(weights, precision, level, calibrated=set(by_matmul), worst=worst,
                                    plan_name=plan_name)
        groups: dict[tuple, list[ir.Node]] = {}
        for node in nodes:
            entry = plan[node.name]
            groups.setdefault((id(node.inputs[0]), entry.bits, entry.kind, entry.block, node.inputs[1].shape[0]),
                              []).append(node)
        for group in groups.values():
            entry = plan[group[0].name]
            widths, packed = quantize_group([(node.name, weights[node.name][1]) for node in group], entry,
                                            by_matmul, records)
            weight_values = [node.inputs[1] for node in group]
            _replace(graph, writer, group, widths, packed, entry, accuracy_level, block_sums)
            for value in weight_values:
                if not value.uses() and value.name in graph.initializers:
                    graph.initializers.pop(value.name)
        plan_all.update(plan)
        del weights, grams
    summary = quant_plan.summarize(plan_all, paths, records)
    record = {"method": "MatMulNBits weight-only by a per-tensor plan (cusprun_edge.export.quant_plan), "
                        "one decoder layer at a time (cusprun_edge.export.streamed)",
              "bits": 4 if precision == "int4" else 8, "block_size": quant_plan.BLOCK,
              "accuracy_level": accuracy_level, "level": level,
              "plan_name": plan_name if precision == "int4" else "int8",
              "level_description": levels_of(plan_name)[level] if precision == "int4" else "int8",
              "embedding": "float (untied from the lm_head)",
              "plan": summary}
    if calibrated:
        record["calibration"] = "GPTQ-style on input statistics gathered one decoder layer at a time"
    return record


def export_streamed(model, tokenizer, profile, precision, attention, limits, tmp: Path, step, held_out, calibration,
                    plan) -> tuple[dict, dict, dict | None, str, str, bool, list[str]]:
    """Export the lazy `model` into `tmp` layer by layer and gate it (see the module's docstring). Returns
    (timings, parity, quantization record, attention kind, exporter, rotary fused, notes) for build's manifest."""
    if precision not in PRECISIONS:
        raise UserError(f"a model this large is exported one layer at a time, which writes {', '.join(PRECISIONS)}, "
                        f"not {precision}; choose one of those")
    timings, notes = {}, []
    t = time.perf_counter()
    step("reference (PyTorch, one layer at a time)")
    with layers_streamed(model):
        reference = gate.reference_logits(model, tokenizer)
        held_reference = gate.held_out_reference(model, tokenizer, gate.held_out_texts(held_out)) \
            if precision != "fp32" else []
    timings["reference"] = round(time.perf_counter() - t, 2)
    names = levels_of(plan)
    levels = range(len(names)) if precision == "int4" else [0]
    kinds = ["gqa", "standard"] if attention == "gqa" else ["standard"]
    failures, worst, quantization = [], frozenset(), None
    for level in levels:
        if level == 1:
            worst = worst_off_grid(quantization)
            if not worst:
                continue
        for kind in kinds:
            for old in (tmp / MODEL_FILE, tmp / DATA_FILE):
                old.unlink(missing_ok=True)
            step("trace (placeholders)" if kind == "gqa" else "trace (placeholders, plain attention)")
            t = time.perf_counter()
            try:
                with placeholders(model):
                    onnx_model, exporter = export_onnx(model, kind, profile.opset, context_length(model, profile),
                                                       on_passes=lambda: step("graph passes"),
                                                       bind_weights=binder(model))
            except UserError:
                raise
            except Exception as exc:
                if kind == kinds[-1]:
                    raise
                notes.append(f"GroupQueryAttention export failed ({one_line(exc)}); exported plain attention")
                continue
            rotary_fused = any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("do_rotary", 0)
                               for n in onnx_model.graph)
            timings["export" + (f"_level{level}" if level else "")] = round(time.perf_counter() - t, 2)
            step(f"write {precision} one layer at a time" + (f" (fallback {level})" if level else ""))
            t = time.perf_counter()
            quantization = write_weights(
                onnx_model, model, tokenizer, tmp, precision, level=level, plan_name=plan,
                calibration=calibration, worst=worst, accuracy_level=profile.accuracy_level,
                on_layer=lambda i, n: step(f"write {precision}: layer {i + 1}/{n}"))
            del onnx_model
            timings[f"write_{precision}" + (f"_level{level}" if level else "")] = round(time.perf_counter() - t, 2)
            step(f"parity {precision}")
            t = time.perf_counter()
            gate_limits = limits[gate_key(precision, plan)]
            try:
                result = gate.check_parity(tmp / MODEL_FILE, reference, gate_limits)
            except Exception as exc:
                if kind == kinds[-1]:
                    raise
                notes.append(f"onnxruntime cannot run the GroupQueryAttention export ({one_line(exc)}); "
                             "exported plain attention")
                continue
            if precision != "fp32":
                result["held_out"] = gate.check_held_out(tmp / MODEL_FILE, held_reference, gate_limits)
                if result["passed"] and not result["held_out"]["passed"]:
                    result["passed"], result["failure"] = False, result["held_out"]["failure"]
            timings[f"parity_{precision}" + (f"_level{level}" if level else "")] = round(time.perf_counter() - t, 2)
            if result["passed"]:
                if failures and quantization is not None:
                    quantization["fallback"] = f"{'; '.join(failures)}; {names[level]} passed"
                    notes.append(quantization["fallback"])
                    result["failed_levels"] = failures
                notes.append("exported one decoder layer at a time (export/streamed.py)")
                return timings, {precision: result}, quantization, kind, exporter, rotary_fused, notes
            failures.append(f"{names[level] if precision == 'int4' else precision} failed parity ({result['failure']})")
            break  # the next level, with the attention that ran
    hint = {"int4": "; this model loses too much at int4: try --precision int8",
            "int8": "; try --precision fp32"}.get(precision, "")
    raise UserError(f"export failed parity ({precision}): {'; '.join(failures)}{hint}")
