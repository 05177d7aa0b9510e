"""Weight-only quantization of an ONNX decoder by a per-tensor plan: every MatMul with a constant
weight becomes com.microsoft.MatMulNBits (4 or 8 bits, block 32) as its plan entry says, and a tied
embedding reads the lm_head's quantized weight (GatherBlockQuantized)."""

from __future__ import annotations

import numpy as np

from . import nbits


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
    records = {}
    for names in groups.values():
        entry = plan[names[0]]
        parts = []
        for name in names:
            weight = numpy_helper.to_array(matmuls[name][1])
            if entry.method == "gptq":
                q = nbits.quantize_gptq(weight, entry.bits, grams[name], block=entry.block)
            else:
                q = nbits.quantize(weight, entry.bits, entry.kind, block=entry.block, method=entry.method,
                                   importance=(importance or {}).get(name))
            records[name] = {"exact_blocks": q.exact_blocks, "blocks": q.blocks,
                             "max_abs_error": q.max_abs_error, "rel_rms_error": q.rel_rms_error}
            if grams and name in grams:
                records[name]["output_error"] = nbits.output_error(weight, q, grams[name])
            parts.append((weight.shape[1], nbits.pack(q)))
        packed = {key: np.concatenate([p[key] for _, p in parts], axis=1 if key == "offsets" else 0)
                  for key in parts[0][1]}
        _replace(proto, [matmuls[n][0] for n in names], [n for n, _ in parts], packed, entry, accuracy_level)
        for name in names:
            weight_init = matmuls[name][1]
            if not any(weight_init.name in n.input for n in proto.graph.node):
                proto.graph.initializer.remove(inits[weight_init.name])
    return records


def _block_sum_columns(packed: dict, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of `nb` extra output columns that compute the input's per-block sums: column j
    weighs block j's inputs by exactly 1 (code mid + 1, scale 1) and every other input by 0 (code mid)."""
    n_blocks = packed["offsets"].shape[0]
    mid = 1 << (bits - 1)
    codes = np.full((n_blocks, n_blocks, block), mid, np.uint8)
    codes[np.arange(n_blocks), np.arange(n_blocks)] = mid + 1
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return codes, np.ones((n_blocks, n_blocks), np.float32)


def _replace(proto, nodes, widths, packed, entry, accuracy_level) -> None:
    """Put MatMulNBits (+ offset correction, + Split when several MatMuls share it) where `nodes` were.

    The offset form's correction is blocksum(x) @ C; the block sums come out of the same MatMulNBits as
    extra output columns (exact: weights 0 and 1), so the correction costs a Split, a tiny MatMul and an
    Add instead of also a Reshape and a ReduceSum: 120 fewer nodes per decode step on SmolLM2. (With
    accuracy_level 4 the sums are of the int8 activations the kernel itself multiplies, so the correction
    matches its main product.)"""
    from onnx import helper, numpy_helper

    graph = proto.graph
    first = nodes[0]
    name, x = first.name, first.input[0]
    k = next(i for i in graph.initializer if i.name == first.input[1]).dims[0]
    prefix = f"{first.input[1]}_Q{entry.bits}"

    def constant(array, suffix):
        graph.initializer.append(numpy_helper.from_array(array, f"{prefix}{suffix}"))
        return f"{prefix}{suffix}"

    offsets = "offsets" in packed and "zero_points" not in packed
    columns = sum(widths)
    b, scales = packed["B"], packed["scales"]
    if offsets:
        extra_b, extra_scales = _block_sum_columns(packed, entry.bits, entry.block)
        b, scales = np.concatenate([b, extra_b]), np.concatenate([scales, extra_scales])
    inputs = [x, constant(b, ""), constant(scales, "_scales")]
    if "zero_points" in packed:
        inputs.append(constant(packed["zero_points"], "_zero_points"))
    out = first.output[0] if len(nodes) == 1 else f"{name}_packed"
    main_out = f"{name}_nbits" if offsets else out
    new = [helper.make_node("MatMulNBits", inputs, [main_out], name=name, domain="com.microsoft", K=k,
                            N=len(scales), bits=entry.bits, block_size=entry.block, accuracy_level=accuracy_level)]
    if offsets:
        parts = constant(np.array([columns, len(scales) - columns], np.int64), "_sums_split")
        new += [helper.make_node("Split", [main_out, parts], [f"{name}_main", f"{name}_block_sums"],
                                 name=f"{name}_sums_split", axis=-1),
                helper.make_node("MatMul", [f"{name}_block_sums", constant(packed["offsets"], "_offsets")],
                                 [f"{name}_offset"], name=f"{name}_offset"),
                helper.make_node("Add", [f"{name}_main", f"{name}_offset"], [out], name=f"{name}_plus_offset")]
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
    paths = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        parts = [s.strip(" '") for s in scopes.strip("[]").split(",") if s.strip(" '")]
        path = parts[-2] if len(parts) >= 2 else node.name
        path = path.removeprefix("model.")
        if node.name.endswith(".qkv"):
            path = path.rsplit(".", 1)[0] + ".qkv_proj" if "." in path else f"{node.name}_proj"
        paths[node.name] = path
    return paths
