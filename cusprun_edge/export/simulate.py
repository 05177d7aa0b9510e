"""The model as an int4 plan would ship it, in PyTorch: every Linear weight replaced by what its plan entry
stores (the same quantizer, the same calibration statistics), so its logits are the artifact's up to
MatMulNBits' arithmetic (accuracy_level 4 rounds activations to int8; level 0 computes in fp32 and agrees to
float rounding). The joint search probes ratio and plan this way without exporting, and a test holds the
export to it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from . import quant_plan
from .calibration import gram_for


def linear_weights(model) -> dict[str, tuple[str, np.ndarray, bool]]:
    """make_plan's input keyed by module name: name -> (name, W [K, N] as the export sees it, is the lm_head)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (name, module.weight.detach().cpu().numpy().T.astype(np.float32), name.endswith("lm_head"))
    return out


def quantized_copy(model, plan_name: str = "fast", grams: dict[str, np.ndarray] | None = None, level: int = 0,
                   worst: set[str] | frozenset = frozenset()):
    """A copy of `model` whose Linear weights are what the int4 plan `plan_name` stores (dequantized), with the
    tied embedding reading the lm_head's as the export's GatherBlockQuantized does."""
    grams = grams or {}
    weights = linear_weights(model)
    calibrated = {name for name in weights if gram_for(grams, name) is not None}
    plan = quant_plan.make_plan(weights, "int4", level, calibrated=calibrated, worst=worst, plan_name=plan_name)
    twin = copy.deepcopy(model)
    modules = dict(twin.named_modules())
    for name, entry in plan.items():
        q = quant_plan.quantize_entry(weights[name][1], entry, gram_for(grams, name))
        with torch.no_grad():
            modules[name].weight.copy_(torch.from_numpy(q.dequantize().T.copy()))
    return twin
