"""Names and small helpers every part of the export package shares: file names, the KV layout,
one-line exception text, and a context that keeps the exporters' and quantizers' chatter quiet."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

from ..model import arch
from ..model.structure import structure_of

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
# Float32 weights above which an export holds one decoder layer at a time (export/streamed.py): the whole-model
# export peaks at about three copies of them (the model, the traced graph saved and loaded back, ONNX Runtime's).
LAYER_BY_LAYER_ABOVE_BYTES = 2 * 1024**3


def exports_layer_by_layer(params: int) -> bool:
    """Whether a model of `params` parameters is exported one decoder layer at a time."""
    return params * 4 > LAYER_BY_LAYER_ABOVE_BYTES


def kv_layout(model) -> tuple[list[int], int]:
    """(KV heads of each layer, head dim)."""
    return structure_of(model).num_key_value_heads, arch.head_dim(model)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


@contextlib.contextmanager
def quiet():
    """The exporters and quantizers print progress, log every node and warn about every traced branch;
    keep the CLI's output clean (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxruntime", "onnxscript", "onnx_ir", "root")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)

