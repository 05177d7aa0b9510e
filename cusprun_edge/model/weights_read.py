"""Bytes of weights one generated token reads: the memory-traffic limit of decode speed.

Decoding one token multiplies one activation row by every projection matrix, so it reads every weight
of every MatMul once; a Gather (the input embedding, rotary tables) reads only the rows it looks up.
On a memory-bound CPU the decode speed-up of an expert over dense is at most the ratio of these bytes;
the report puts the measured speed-up next to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

GATHER_OPS = {"Gather", "GatherBlockQuantized"}


def _nbytes(init: onnx.TensorProto) -> int:
    n = int(np.prod(init.dims)) if init.dims else 1
    if init.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4):
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def weight_bytes_per_token(model_path: Path | str) -> dict:
    """{"weights_bytes": all initializers, "per_token_bytes": bytes one decode step reads,
    "by_op": per consuming op type}. Reads the graph only, not the external weight data."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    # A Cast of an initializer (scales stored in fp16) is folded when ONNX Runtime loads the model: what the
    # kernels read is its output, in the Cast's type.
    for node in graph.node:
        if node.op_type == "Cast" and node.input[0] in inits:
            folded = onnx.TensorProto(name=node.output[0], data_type=next(a.i for a in node.attribute if a.name == "to"))
            folded.dims.extend(inits.pop(node.input[0]).dims)
            inits[node.output[0]] = folded
    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            if name in inits:
                consumers.setdefault(name, []).append((node.op_type, pos))
    total = per_token = 0
    by_op: dict[str, int] = {}
    for name, init in inits.items():
        size = _nbytes(init)
        total += size
        uses = consumers.get(name, [])
        if not uses:
            continue
        # a table read only through Gather's data input costs one row per token
        if all(op in GATHER_OPS and pos == 0 for op, pos in uses) and init.dims:
            read, op = size // max(1, init.dims[0]), "Gather"
        else:
            read, op = size, next(op for op, pos in uses if not (op in GATHER_OPS and pos == 0))
        per_token += read
        by_op[op] = by_op.get(op, 0) + read
    return {"weights_bytes": total, "per_token_bytes": per_token, "by_op": by_op}
