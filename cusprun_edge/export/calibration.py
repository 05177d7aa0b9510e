"""Calibration statistics for quantizing weights that lie on no 4-bit grid (refitted or re-blocked
projections of a pruned expert): H = sum over calibration tokens of x x^T for each such Linear's input,
which nbits.quantize_gptq uses to keep x @ W rather than W itself.

Only weights the plan would re-quantize get a matrix (a GGUF grid is transcoded exactly and needs none), so
the dense model costs nothing here and a pruned SmolLM2 holds 30 down_proj matrices (about 0.3 GB float64).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..model import arch
from ..model.sequential import Stop, padded_batches
from . import quant_plan

# Up to this many documents, taken evenly across the expert's corpora: on the 25% en+general SmolLM2 expert,
# 64 documents gave held-out top-1 0.899 / KL 0.027 at level 0 (weight-only fit: 0.806 / 0.102).
MAX_DOCUMENTS = 256
MAX_TOKENS = 512


def off_grid_linears(model) -> list[str]:
    """Names of the Linear modules (not the lm_head) whose weight, in the export's [K, N] layout, is not on a
    4-bit block grid: the ones quant_plan re-quantizes."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if quant_plan.off_grid(module.weight.detach().cpu().numpy().T):
            names.append(name)
    return names


# Projections that read the same input as another (q/k/v; gate/up; the export's packed q/k/v MatMul): one matrix
# serves them all.
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "qkv_proj": "q_proj", "up_proj": "gate_proj"}


def every_linear(model) -> list[str]:
    """Names of the Linear modules the fast plan quantizes GPTQ-style, the lm_head included, one per distinct input."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in SHARED_INPUT]


def calibrated_linears(model, plan: str) -> list[str]:
    """The Linear modules an int4 plan quantizes GPTQ-style: every one (fast), none (rtn), or those on no 4-bit grid
    (exact)."""
    if plan == "rtn":
        return []
    return every_linear(model) if plan == "fast" else off_grid_linears(model)


@torch.no_grad()
def input_grams(model, tokenizer, texts: list[str], names: list[str], *, batch_size: int = 8,
                max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
    """Module name -> sum over the tokens of `texts` (padding excluded) of x x^T, x the module's input."""
    modules = dict(model.named_modules())
    grams = {n: torch.zeros(modules[n].in_features, modules[n].in_features, dtype=torch.float64) for n in names}
    mask = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask["flat"]].float()
            grams[name] += (x.T @ x).double()  # a batch's sum in fp32 (a few thousand tokens), the total in fp64
        return record

    def stop(module, args):
        raise Stop

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    # the logits are not needed: the forward stops at the lm_head's input, after its own statistics (if any)
    head = _lm_head(model)
    if head is not None:
        handles.append(head.register_forward_pre_hook(stop))
    device = next(model.parameters()).device
    try:
        if len(texts) > MAX_DOCUMENTS:  # evenly spaced, so every corpus of the expert is represented
            texts = [texts[i * len(texts) // MAX_DOCUMENTS] for i in range(MAX_DOCUMENTS)]
        for ids, attention in padded_batches(tokenizer, texts, batch_size, max_tokens):
            mask["flat"] = attention.reshape(-1).bool().to(device)
            try:
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
            except Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: g.numpy() for n, g in grams.items()}


def _lm_head(model) -> torch.nn.Module | None:
    try:
        return arch.get(model, arch.spec_for(model).lm_head)
    except (AttributeError, UserError):  # an architecture outside the table: the whole forward runs
        return None


def gram_for(grams: dict[str, np.ndarray], path: str) -> np.ndarray | None:
    """The matrix of the module an ONNX MatMul computes (`path` from weight_only.module_paths, which may
    have lost a leading 'model.')."""
    stem, _, leaf = path.rpartition(".")
    candidates = [path] + ([f"{stem}.{SHARED_INPUT[leaf]}" if stem else SHARED_INPUT[leaf]] if leaf in SHARED_INPUT else [])
    for candidate in candidates:
        if candidate in grams:
            return grams[candidate]
        found = next((g for n, g in grams.items() if n.endswith("." + candidate)), None)
        if found is not None:
            return found
    return None
