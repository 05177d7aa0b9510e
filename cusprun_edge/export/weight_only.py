"""Weight-only quantization of an ONNX decoder by a per-tensor plan: every MatMul with a constant
weight becomes com.microsoft.MatMulNBits (4 or 8 bits, block 32) as its plan entry says, and a tied
embedding reads the lm_head's quantized weight (GatherBlockQuantized)."""

from __future__ import annotations

import numpy as np

from . import nbits, quant_plan

# Float initializers of at least this many values whose every value is an fp16 number are stored in fp16
# with a Cast (SmolLM2's int4 export: 113.4 -> 98.5 MB; ONNX Runtime folds the Cast when it loads the model).
HALF_MIN_SIZE = 1024


def constant_matmuls(proto) -> dict[str, tuple]:
    """MatMul node name -> (node, weight initializer) for MatMuls whose weight is a 2-D initializer."""
    inits = {i.name: i for i in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            found[node.name] = (node, inits[node.input[1]])
    return found


def fold_weight_transposes(proto) -> None:
    """Transpose(initializer) -> a transposed initializer, so the quantizer sees a constant weight.

    A tied lm_head exports as MatMul(x, Transpose(embedding)). (fp32/fp16 exports keep the Transpose,
    which ONNX Runtime folds when it loads the model, instead of storing the embedding twice.)"""
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        array = numpy_helper.to_array(initializers[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        folded = numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), f"{node.input[0]}.transposed")
        graph.initializer.append(folded)
        for consumer in graph.node:
            for i, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[i] = folded.name
        graph.node.remove(node)


def apply_plan(proto, plan: dict, accuracy_level: int,
               importance: dict[str, np.ndarray] | None = None,
               grams: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Replace each planned MatMul by MatMulNBits (+ its offset correction); returns per-tensor records
    (exact blocks, errors). `importance`: MatMul name -> mean square of its input per channel; `grams`:
    MatMul name -> sum of x x^T of its input, for weights planned with method "gptq".

    MatMuls that read the same input with the same storage (gate and up projections) become one wider
    MatMulNBits and a Split: one kernel call, one offset correction, instead of one each."""
    from onnx import numpy_helper

    matmuls = constant_matmuls(proto)
    groups: dict[tuple, list[str]] = {}
    for name, entry in plan.items():
        node, init = matmuls[name]
        groups.setdefault((node.input[0], entry.bits, entry.kind, entry.block, init.dims[0]), []).append(name)
    inits = {i.name: i for i in proto.graph.initializer}
    block_sums: dict[tuple[str, int], str] = {}  # (input, blocks) -> its per-block sums, computed once
    records = {}
    for names in groups.values():
        entry = plan[names[0]]
        weights = [(name, numpy_helper.to_array(matmuls[name][1])) for name in names]
        widths, packed = quantize_group(weights, entry, grams or {}, records, importance or {})
        _replace(proto, [matmuls[n][0] for n in names], widths, packed, entry, accuracy_level, block_sums)
        for name in names:
            weight_init = matmuls[name][1]
            if not any(weight_init.name in n.input for n in proto.graph.node):
                proto.graph.initializer.remove(inits[weight_init.name])
    return records


def quantize_group(weights: list[tuple[str, np.ndarray]], entry, grams: dict, records: dict,
                   importance: dict | None = None) -> tuple[list[int], dict[str, np.ndarray]]:
    """MatMul weights [K, N] that share one MatMulNBits (one input, one plan entry), quantized and packed side by
    side; each one's record (exact blocks, errors, and its output error where it has input statistics) goes into
    `records`. Returns (their widths, the packed arrays). The whole-graph and layer-by-layer exports both use it."""
    parts = []
    for name, weight in weights:
        q = quant_plan.quantize_entry(weight, entry, grams.get(name), (importance or {}).get(name))
        records[name] = {"exact_blocks": q.exact_blocks, "blocks": q.blocks,
                         "max_abs_error": q.max_abs_error, "rel_rms_error": q.rel_rms_error}
        if name in grams:
            records[name]["output_error"] = nbits.output_error(weight, q, grams[name])
        parts.append((weight.shape[1], nbits.pack(q)))
    packed = {key: np.concatenate([p[key] for _, p in parts], axis=1 if key == "offsets" else 0)
              for key in parts[0][1]}
    return [width for width, _ in parts], packed


def _replace(proto, nodes, widths, packed, entry, accuracy_level, block_sums) -> None:
    """Put MatMulNBits (+ offset correction, + Split when several MatMuls share it) where `nodes` were."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    first = nodes[0]
    name, x = first.name, first.input[0]
    k = next(i for i in graph.initializer if i.name == first.input[1]).dims[0]
    prefix = f"{first.input[1]}_Q{entry.bits}"

    def constant(array, suffix):
        name = f"{prefix}{suffix}"
        if array.dtype == np.float32 and array.size >= HALF_MIN_SIZE and np.array_equal(
                array.astype(np.float16).astype(np.float32), array):
            # every value is an fp16 number (GGUF's block scales are): store half the bytes and let ONNX Runtime
            # fold the Cast when it loads the model, so the kernel still reads fp32 and nothing else changes
            graph.initializer.append(numpy_helper.from_array(array.astype(np.float16), f"{name}_fp16"))
            graph.node.insert(0, helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast",
                                                  to=TensorProto.FLOAT))
        else:
            graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    inputs = [x, constant(packed["B"], ""), constant(packed["scales"], "_scales")]
    if "zero_points" in packed:
        inputs.append(constant(packed["zero_points"], "_zero_points"))
    out = first.output[0] if len(nodes) == 1 else f"{name}_packed"
    main_out = f"{name}_nbits" if "offsets" in packed else out
    new = [helper.make_node("MatMulNBits", inputs, [main_out], name=name, domain="com.microsoft", K=k,
                            N=sum(widths), bits=entry.bits, block_size=entry.block, accuracy_level=accuracy_level)]
    if "offsets" in packed:
        nb = packed["offsets"].shape[0]
        if (x, nb) not in block_sums:
            shape = constant(np.array([0, 0, nb, entry.block], np.int64), "_block_shape")
            axes = constant(np.array([-1], np.int64), "_block_axes")
            new[:0] = [helper.make_node("Reshape", [x, shape], [f"{name}_blocks"], name=f"{name}_blocks"),
                       helper.make_node("ReduceSum", [f"{name}_blocks", axes], [f"{name}_block_sums"],
                                        name=f"{name}_block_sums", keepdims=0)]
            block_sums[(x, nb)] = f"{name}_block_sums"
        offsets = constant(packed["offsets"], "_offsets")
        new.append(helper.make_node("MatMul", [block_sums[(x, nb)], offsets], [f"{name}_offset"], name=f"{name}_offset"))
        new.append(helper.make_node("Add", [main_out, f"{name}_offset"], [out], name=f"{name}_plus_offset"))
    if len(nodes) > 1:
        split = constant(np.array(widths, np.int64), "_split")
        new.append(helper.make_node("Split", [out, split], [n.output[0] for n in nodes], name=f"{name}_split", axis=-1))
    position = min(list(graph.node).index(n) for n in nodes)
    for node in nodes:
        graph.node.remove(node)
    for i, node in enumerate(new):
        graph.node.insert(position + i, node)


def share_embedding_with_lm_head(proto) -> bool:
    """Tied embeddings: gather token rows from the lm_head's quantized weight instead of a float copy.

    MatMulNBits stores its weight as [N, blocks, block * bits / 8] bytes, so for an lm_head that is the
    transposed embedding, row v holds token v's embedding, quantized in blocks along the hidden size:
    exactly what com.microsoft.GatherBlockQuantized reads (same default zero point, 8 or 128), when the
    lm_head has no zero points or offsets."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    shared = False
    for gather in list(graph.node):
        table = initializers.get(gather.input[0]) if gather.op_type == "Gather" else None
        if table is None or len(table.dims) != 2:
            continue
        quantized = next((n for n in graph.node if n.op_type == "MatMulNBits" and len(n.input) == 3
                          and n.input[1].startswith(f"{table.name}.transposed_Q")), None)
        if quantized is None:
            continue
        attrs = {a.name: a.i for a in quantized.attribute}
        block, bits = attrs["block_size"], attrs["bits"]
        vocab, hidden = table.dims
        if hidden % block:
            continue
        shapes = {"data": [vocab, hidden * bits // 8], "scales": [vocab, hidden // block]}
        nodes = []
        for (part, shape), source in zip(shapes.items(), quantized.input[1:3]):
            shape_name = f"{table.name}.{part}_shape"
            graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
            nodes.append(helper.make_node("Reshape", [source, shape_name],
                                          [f"{table.name}.{part}_rows"], name=f"{table.name}.{part}_rows"))
        nodes.append(helper.make_node(
            "GatherBlockQuantized", [f"{table.name}.data_rows", gather.input[1], f"{table.name}.scales_rows"],
            list(gather.output), name=gather.name, domain="com.microsoft",
            gather_axis=0, quantize_axis=1, block_size=block, bits=bits,
        ))
        position = list(graph.node).index(gather)
        graph.node.remove(gather)
        for offset, node in enumerate(nodes):
            graph.node.insert(position + offset, node)
        if not any(table.name in n.input for n in graph.node):
            graph.initializer.remove(table)
        shared = True
    return shared


def module_paths(proto) -> dict[str, str]:
    """MatMul node name -> the PyTorch module it computes (e.g. model.layers.0.mlp.down_proj), from the
    dynamo exporter's name scopes; packed q/k/v MatMuls ('<q node>.qkv') map to '<attention>.qkv_proj'."""
    return {node.name: module_path(node.name, next((p.value for p in node.metadata_props
                                                     if p.key == "pkg.torch.onnx.name_scopes"), ""))
            for node in proto.graph.node if node.op_type == "MatMul"}


def module_path(node_name: str, scopes: str) -> str:
    """The module a MatMul named `node_name` computes, from its `pkg.torch.onnx.name_scopes` metadata."""
    parts = [s.strip(" '") for s in scopes.strip("[]").split(",") if s.strip(" '")]
    path = parts[-2] if len(parts) >= 2 else node_name
    path = path.removeprefix("model.")
    if node_name.endswith(".qkv"):
        path = path.rsplit(".", 1)[0] + ".qkv_proj" if "." in path else f"{node_name}_proj"
    return path
