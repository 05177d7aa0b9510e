"""The layer loop: calibration documents carried through the decoder one layer at a time.

`capture_stream` runs the embedding once and records layer 0's input and the keyword arguments (masks, rotary
tables) the model passes every layer. A consumer then walks the layers in order: for each, the layer is
materialized (model/lazy.py: read from disk for a lazy model, already there for an eager one), the consumer
observes or edits it while the stream runs through it, and the stream moves on to the next layer's input.
Scoring, the damage probes and the refit all walk this loop, so a model never needs more than one decoder
layer's weights in memory, and activations pass each layer once per sweep instead of a whole-model forward
per consumer (llm-compressor's sequential pipeline does the same for GPTQ).

Running a layer alone on the recorded inputs is the same computation as the whole-model forward: the scores
of a sweep equal those of hooks on a full forward bit for bit (tests/test_sequential.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import arch


def padded_batches(tokenizer, texts: list[str], batch_size: int, max_length: int):
    """(input_ids, attention_mask) of `texts` in batches, padded on the right whatever the tokenizer's own
    side: a left-padded row (Gemma-3's tokenizer pads left) starts at a later position and its causal
    forward differs (2% higher perplexity on Gemma-3-270M in batches of two), while padding after the
    real tokens cannot change what comes before it."""
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, padding_side="right")
        yield enc["input_ids"], enc["attention_mask"]


class Stop(Exception):
    """Raised by a capture hook: the rest of the forward is not needed."""


@dataclass
class Stream:
    """Documents in batches at the input of some decoder layer: hidden states (CPU), token masks, ids, and
    for every layer the keyword arguments the model passed it (masks, rotary tables; shared, not copied)."""

    hidden: list[torch.Tensor]
    masks: list[torch.Tensor]
    ids: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]

    @property
    def n_tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


@torch.no_grad()
def capture_stream(model, tokenizer, texts: list[str], *, batch_size: int = 8, max_length: int = 512) -> Stream:
    """Layer 0's input and every layer's keyword arguments for `texts`. The layers' forwards are swapped for
    a recorder that returns its input, so this costs the embedding and the masks, not the layers (and works on
    a lazy model, whose layers hold no weights)."""
    layers = arch.decoder_layers(model)
    spec = arch.spec_for(model)
    embed = arch.get(model, spec.embed).weight
    device = embed.device
    stream = Stream([], [], [], [[] for _ in layers])

    def recorder(i):
        def forward(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            stream.layer_kwargs[i].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == 0:
                stream.hidden.append(h.detach().cpu())
            return h
        return forward

    def stop(module, args):
        raise Stop

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # instance attribute, deleted below: the class forward returns
    handle = arch.get(model, spec.final_norm).register_forward_pre_hook(stop)
    try:
        for ids, mask in padded_batches(tokenizer, texts, batch_size, max_length):
            stream.masks.append(mask.bool())
            stream.ids.append(ids)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward
    return stream


def to_device(obj, device):
    """Tensors inside nested tuples, lists and dicts moved to `device` (other values as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer, x: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    """One decoder layer on one batch of its input, on `device`; the output comes back to the CPU."""
    out = layer(x.to(device), **to_device(kwargs, device))
    return (out[0] if isinstance(out, tuple) else out).cpu()


def input_of(layer, module, x, kwargs, device) -> torch.Tensor:
    """The input `module` (a projection inside `layer`) receives when `layer` runs on x ([B, T, F])."""
    seen = []

    def hook(mod, args):
        seen.append(args[0])
        raise Stop

    h = module.register_forward_pre_hook(hook)
    try:
        layer(x.to(device), **to_device(kwargs, device))
    except Stop:
        pass
    finally:
        h.remove()
    return seen[0]


@contextmanager
def visiting(module, device):
    """`module` on `device` for the block and back where it lives after: with the model on the CPU and
    --device cuda, one part of it at a time occupies the accelerator (a no-op when it is already there)."""
    param = next(module.parameters(), None)
    home = param.device if param is not None else None
    move = home is not None and home != torch.device(device)
    if move:
        module.to(device)
    try:
        yield module
    finally:
        if move:
            module.to(home)
