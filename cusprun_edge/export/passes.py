"""Graph passes on the traced decoder: GenAI's dimension names, ONNX Runtime's fused ops (RMSNorm and
residual + RMSNorm, GroupQueryAttention fed without reshapes, one packed q/k/v projection), lowering to
opset 17, saving with external data, and the fp16 conversion's clean-ups."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..errors import UserError
from .common import DATA_FILE, kv_layout


def finish_graph(onnx_model, model, ort_fusions: bool) -> None:
    """Name the dynamic axes as GenAI and readers expect and, for a graph that is ONNX Runtime's
    already (GroupQueryAttention), use its fused ops."""
    kv_heads, head_dim = kv_layout(model)
    graph = onnx_model.graph
    seq = ["batch_size", "sequence_length"]
    shapes = {"input_ids": seq, "position_ids": seq, "logits": [*seq, model.config.vocab_size],
              "attention_mask": ["batch_size", "total_sequence_length"]}
    for i, kv in enumerate(kv_heads):
        for part in ("key", "value"):
            shapes[f"past_key_values.{i}.{part}"] = ["batch_size", kv, "past_sequence_length", head_dim]
            shapes[f"present.{i}.{part}"] = ["batch_size", kv, "total_sequence_length", head_dim]
    for value in [*graph.inputs, *graph.outputs]:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    if ort_fusions:
        # One SimplifiedLayerNormalization per RMSNorm: it accumulates in fp32 whatever the input type,
        # so an fp16 export cannot overflow on the sum of squares.
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

        fuse_rms_normalization(onnx_model)
        # the residual Add joins the next RMSNorm (SkipSimplifiedLayerNormalization, which also returns the
        # sum): 60 fewer nodes per decode step on SmolLM2, as the GenAI builder's graph has
        fuse_skip_rms_normalization(onnx_model)
        # Gemma's tanh GELU is traced as 8 elementwise ops per layer; ONNX Runtime's FastGelu is the same
        # formula in one (within 8e-7 of it; the builder's graph has one Gelu per layer too)
        from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu

        fuse_gelu(onnx_model)
        _norms_without_transposes(graph)
        _attention_without_reshapes(graph)
        _pack_qkv_projections(graph)
        ir.passes.common.RemoveUnusedNodesPass()(onnx_model)


def _producer(value, op_type: str, perm: list[int] | None = None):
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    if perm is not None and list(node.attributes.get_ints("perm", [])) != perm:
        return None
    return node


def _attention_without_reshapes(graph) -> None:
    """Feed GroupQueryAttention its projections as they come, [batch, seq, heads * head_dim].

    transformers views them as [batch, heads, seq, head_dim] and the op's translation turns them
    back: Reshapes (and Transpose pairs) that ONNX Runtime would run at every step. The same goes
    for the output. (Not when something sits in between, e.g. Gemma's per-head q/k norms.)"""
    for node in list(graph):
        if node.op_type != "GroupQueryAttention":
            continue
        for index in (0, 1, 2):
            source = _before_views(node.inputs[index])
            if source is not node.inputs[index]:
                node.replace_input_with(index, source)
        output, query = node.outputs[0], node.inputs[0]
        if output.shape is None and query.shape is not None and len(query.shape) == 3:
            output.shape = query.shape.copy()  # [batch, seq, heads * head_dim], like the query
        merged = _after_views(output)
        if merged is not output:
            ir.convenience.replace_all_uses_with(merged, output)


_SWAP = [0, 2, 1, 3]


def _norms_without_transposes(graph) -> None:
    """Transpose(0, 2, 1, 3) -> SimplifiedLayerNormalization over the last axis -> Transpose(0, 2, 1, 3) is the
    norm alone: swapping the heads and positions axes does not change a norm over each head's own vector.
    Gemma-3's per-head q/k norms are traced that way, 4 Transposes per layer that ONNX Runtime would run at
    every decode step."""
    for node in list(graph):
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        before = _producer(x, "Transpose", _SWAP)
        uses = list(node.outputs[0].uses())
        if (before is None or len(list(x.uses())) != 1 or len(uses) != 1 or uses[0].idx != 0
                or node.attributes.get_int("axis", -1) not in (-1, 3)):
            continue
        after = uses[0].node
        if _producer(after.outputs[0], "Transpose", _SWAP) is None or after.outputs[0].is_graph_output():
            continue
        node.replace_input_with(0, before.inputs[0])
        node.outputs[0].shape = before.inputs[0].shape.copy() if before.inputs[0].shape is not None else None
        ir.convenience.replace_all_uses_with(after.outputs[0], node.outputs[0])


def _before_views(value):
    """The value `value` is a pure re-view of (Reshapes and cancelling Transpose pairs), else `value`."""
    current = value
    while current is not None:
        reshape = _producer(current, "Reshape")
        if reshape is not None:
            current = reshape.inputs[0]
            continue
        second = _producer(current, "Transpose", _SWAP)
        first = _producer(second.inputs[0], "Transpose", _SWAP) if second else None
        if first is None:
            break
        current = first.inputs[0]
    same = current is not None and current.shape is not None and value.shape is not None
    return current if same and list(current.shape) == list(value.shape) and current is not value else value


def _after_views(value):
    """The last value of a chain of single-use Reshapes after `value` with `value`'s shape, else `value`."""
    current, found = value, value
    while True:
        uses = list(current.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
            break
        current = uses[0].node.outputs[0]
        if current.is_graph_output():
            break
        if current.shape is not None and value.shape is not None and list(current.shape) == list(value.shape):
            found = current
    return found


def _pack_qkv_projections(graph) -> None:
    """One MatMul (and bias Add) for query, key and value: GroupQueryAttention splits packed input
    itself, and one wide (quantized) MatMul runs faster than three narrow ones."""
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or any(v is None for v in node.inputs[:3]):
            continue
        parts = [_projection(v) for v in node.inputs[:3]]
        if None in parts or len({id(p[0].inputs[0]) for p in parts}) != 1:
            continue
        if len({p[2] is None for p in parts}) != 1:
            continue  # bias on some projections only
        x = parts[0][0].inputs[0]
        name = parts[0][0].name
        packed_weight = joined([p[1] for p in parts], axis=1)
        weight = ir.Value(name=f"{name}.qkv_weight", const_value=packed_weight,
                          shape=packed_weight.shape, type=ir.TensorType(ir.DataType.FLOAT))
        graph.register_initializer(weight)
        matmul = ir.node("MatMul", [x, weight], name=f"{name}.qkv")
        matmul.metadata_props.update(parts[0][0].metadata_props)  # the query's module scopes name it
        matmul.outputs[0].name = f"{name}.qkv_output"
        new_nodes, packed = [matmul], matmul.outputs[0]
        if parts[0][2] is not None:
            packed_bias = joined([p[2] for p in parts], axis=0)
            bias = ir.Value(name=f"{name}.qkv_bias", const_value=packed_bias,
                            shape=packed_bias.shape, type=ir.TensorType(ir.DataType.FLOAT))
            graph.register_initializer(bias)
            add = ir.node("Add", [packed, bias], name=f"{name}.qkv_add")
            add.outputs[0].name = f"{name}.qkv_sum"
            new_nodes.append(add)
            packed = add.outputs[0]
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, packed)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)


def joined(tensors, axis: int):
    """The constant tensors concatenated along `axis`: at once, or when read where one of them is read from disk
    only when written (export/streamed.py), so a packed q/k/v weight of a large model never sits in memory."""
    if not any(isinstance(t, ir.LazyTensor) for t in tensors):
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis))
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    return ir.LazyTensor(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),
                         dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))


def _projection(value):
    """(MatMul node, weight tensor, bias tensor or None) when `value` is x @ W (+ b) with constant W, b."""
    add = _producer(value, "Add")
    bias = None
    if add is not None:
        matmul = _producer(add.inputs[0], "MatMul")
        constant = add.inputs[1].const_value if add.inputs[1] is not None else None
        if matmul is None or constant is None or len(constant.shape) != 1:
            return None
        bias = constant
    else:
        matmul = _producer(value, "MatMul")
    if matmul is None or matmul.inputs[1].const_value is None or len(matmul.inputs[1].shape) != 2:
        return None
    return matmul, matmul.inputs[1].const_value, bias


# Opset 18 moved Reduce* axes from an attribute to an input; these ops changed in other ways or are new,
# and the graphs exported here never use them, so lowering refuses rather than guesses.
_REDUCE_AXES_INPUT_AT_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_UNLOWERABLE_AT_18 = {"Pad", "Resize", "ScatterND", "ScatterElements", "Col2Im", "CenterCropPad",
                      "GroupNormalization", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "LpPool",
                      "Mish", "OptionalGetElement", "OptionalHasElement"}


def lower_to_opset_17(onnx_model) -> None:
    """Rewrite an opset-18 graph as opset 17 (what TensorRT 8.5 parses): Reduce* axes back to an
    attribute, Split's num_outputs dropped (an even split is the opset-13 default)."""
    for node in onnx_model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _REDUCE_AXES_INPUT_AT_18:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                raise UserError(f"cannot lower {node.name} to opset 17: it uses noop_with_empty_axes")
            node.attributes.pop("noop_with_empty_axes", None)
            if len(node.inputs) > 1 and node.inputs[1] is not None:
                axes = node.inputs[1].const_value
                if axes is None:
                    raise UserError(f"cannot lower {node.name} to opset 17: its axes are computed")
                node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.numpy().reshape(-1)])
                node.resize_inputs(1)
        elif node.op_type == "Split" and "num_outputs" in node.attributes:
            x, axis = node.inputs[0], node.attributes.get_int("axis", 0)
            size = x.shape[axis] if x.shape is not None else None
            if not isinstance(size, int) or size % len(node.outputs):
                raise UserError(f"cannot lower {node.name} to opset 17: uneven or dynamic split")
            node.attributes.pop("num_outputs")
        elif node.op_type in _UNLOWERABLE_AT_18:
            raise UserError(f"cannot lower the graph to opset 17: it uses {node.op_type} ({node.name})")
    onnx_model.opset_imports[""] = 17


def save_onnx(onnx_model, path: Path) -> None:
    """Save with every weight in one external file beside the graph, so models over 2 GB work.
    onnx_ir warns once per intermediate value that has a shape but no dtype (left by the exporter's
    shape inference) and drops that shape; the graph is valid either way, so those warnings are muted."""
    serde_log = logging.getLogger("onnx_ir.serde")
    level = serde_log.level
    serde_log.setLevel(logging.ERROR)
    try:
        ir.save(onnx_model, str(path), external_data=DATA_FILE)
    finally:
        serde_log.setLevel(level)

def rotary_angle_nodes(proto) -> list[str]:
    """Nodes computing the inputs of Cos/Sin (position * inverse frequency): they stay fp32."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    keep, stack = set(), [n for n in proto.graph.node if n.op_type in ("Cos", "Sin")]
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep.add(node.name)
        stack.extend(producer[i] for i in node.input if i in producer)
    return sorted(keep)


def drop_fp16_round_trips(proto) -> None:
    """Cast(fp32->fp16) feeding only Cast(fp16->fp32): the converter puts one between two fp32 nodes,
    which overflows (x**2 of an RMSNorm) and rounds for nothing. Connect the fp32 value directly."""
    from onnx import TensorProto

    nodes = proto.graph.node
    producer = {out: node for node in nodes for out in node.output}
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in proto.graph.output}

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    rename, dead = {}, set()
    for back in nodes:
        if cast_to(back) != TensorProto.FLOAT or back.input[0] not in producer:
            continue
        down = producer[back.input[0]]
        if cast_to(down) != TensorProto.FLOAT16 or back.output[0] in graph_outputs:
            continue
        rename[back.output[0]] = down.input[0]
        dead.add(id(back))
        if all(id(c) in dead for c in consumers[down.output[0]]) and down.output[0] not in graph_outputs:
            dead.add(id(down))
    kept = [n for n in nodes if id(n) not in dead]
    for node in kept:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    del proto.graph.node[:]
    proto.graph.node.extend(kept)

