"""Weights read one tensor, or one decoder layer, at a time from a model's safetensors shards.

A lazy model (lazy.py builds one) keeps its decoder layers on the meta device and a `ShardReader` beside them;
`materialized(model, i)` gives layer i its float32 weights for the length of a block. The pruning stages walk
the layers through it (model/sequential.py), so they run unchanged on a whole model, where it does nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from . import arch

READER_ATTR = "_cusprun_lazy_reader"  # the attribute a lazy model carries its reader in


class ShardReader:
    """Reads single tensors, in float32, from a directory's safetensors shards (one file or an index)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.fingerprint: str | None = None  # score.model_fingerprint's hash, kept until a layer is rewritten
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise UserError(f"{directory} has no weights (*.safetensors); pass a complete model directory")
            from safetensors import safe_open

            self.files = {}
            for file in files:
                with safe_open(str(file), "pt") as f:
                    self.files.update({name: file for name in f.keys()})

    def names(self) -> list[str]:
        return sorted(self.files)

    def stage_layer(self, prefix: str, layer, file: Path) -> None:
        """Write an edited (pruned) layer's tensors, float32, named `prefix` + their names in the layer, into
        `file`, and read them from there from now on."""
        from safetensors.torch import save_file

        state = {prefix + k: v.detach().to(torch.float32).contiguous() for k, v in layer.state_dict().items()}
        self.fingerprint = None
        for name in [n for n in self.files if n.startswith(prefix)]:
            del self.files[name]  # a tensor the edit removed is gone
        save_file(state, str(file), metadata={"format": "pt"})
        self.files.update({name: Path(file) for name in state})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (nothing is read)."""
        from safetensors import safe_open

        out = {}
        for file in sorted(set(self.files.values())):
            with safe_open(str(file), "pt") as f:
                out.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys() if name in self.files})
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in float32 (the file is opened for the read only: nothing of it stays mapped)."""
        from safetensors import safe_open

        if name not in self.files:
            raise UserError(f"the weights have no tensor {name}; is the model directory complete?")
        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name).to(torch.float32)


def is_lazy(model) -> bool:
    return getattr(model, READER_ATTR, None) is not None


def reader_of(model) -> ShardReader | None:
    return getattr(model, READER_ATTR, None)


_ON_LAYER: ContextVar[Callable[[int, int], None] | None] = ContextVar("on_layer", default=None)


@contextmanager
def reporting_layers(callback: Callable[[int, int], None]):
    """Inside the block, every sweep tells `callback(i, n_layers)` when it reaches layer i (a progress display
    for the long stages, without threading a callback through every sweep)."""
    token = _ON_LAYER.set(callback)
    try:
        yield
    finally:
        _ON_LAYER.reset(token)


@contextmanager
def materialized(model, i: int):
    """Decoder layer i of a lazy model holds its float32 weights inside the block and none after it (a no-op
    on an eager model). Yields the layer."""
    layers = arch.decoder_layers(model)
    layer = layers[i]
    on_layer = _ON_LAYER.get()
    if on_layer is not None:
        on_layer(i, len(layers))
    reader = reader_of(model)
    if reader is None:
        yield layer
        return
    prefix = f"{arch.spec_for(model).layers}.{i}."
    state = {name[len(prefix):]: reader.tensor(name) for name in reader.names() if name.startswith(prefix)}
    layer.load_state_dict(state, strict=True, assign=True)
    del state
    try:
        yield layer
    finally:
        layer.to("meta")


@contextmanager
def layers_streamed(model):
    """Inside the block, a whole-model forward of a lazy model reads each decoder layer from disk for its turn
    and drops it after (forward hooks around `materialized`), so code written for a whole model (the export's
    reference logits, a perplexity) runs on one holding a single layer. A no-op on an eager model."""
    if reader_of(model) is None:
        yield model
        return
    open_layers: dict[int, object] = {}

    def enter(i):
        def hook(module, args, kwargs):
            block = materialized(model, i)
            block.__enter__()
            open_layers[i] = block
        return hook

    def leave(i):
        def hook(module, args, kwargs, output):
            open_layers.pop(i).__exit__(None, None, None)
        return hook

    handles = []
    for i, layer in enumerate(arch.decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave(i), with_kwargs=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for block in open_layers.values():  # a forward that raised inside a layer
            block.__exit__(None, None, None)


def tensor_of(model, name: str, value: torch.Tensor) -> torch.Tensor:
    """The float32 value of the state-dict entry `name` (`value` as the model holds it): read from disk when
    a lazy model holds it on the meta device."""
    if value.device.type != "meta":
        return value
    reader = reader_of(model)
    if reader is None:
        raise ValueError(f"{name} has no data (meta device) and the model reads nothing lazily")
    return reader.tensor(name)


class OffloadedLayers:
    """layer index -> {name: tensor}, kept on disk (one safetensors file per layer in a temporary directory,
    removed with this object): per-layer results of a sweep over a model too large to hold them all, e.g. the
    refitted projections of every layer of an 8B model (7 GB in float32) until the expert is written."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="cusprun-layers-"))
        self._keys: list[int] = []
        weakref.finalize(self, shutil.rmtree, str(self.directory), True)

    def __setitem__(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(self.directory / f"{i:05d}.safetensors"))
        if i not in self._keys:
            self._keys.append(i)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if i not in self._keys:
            raise KeyError(i)
        return load_file(str(self.directory / f"{i:05d}.safetensors"))

    def __contains__(self, i) -> bool:
        return i in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self):
        return iter(list(self._keys))

    def keys(self):
        return list(self._keys)

    def items(self):
        return ((i, self[i]) for i in list(self._keys))
