"""A model whose decoder layers stay on disk until a sweep needs one (issue: 1B-8B models on one host).

`lazy_model(source)` builds the architecture with its parameters on the meta device (no memory), then loads
what every token passes through whatever the layer (the embedding, the final norm, the output head) in
float32. Each decoder layer is read from the safetensors shards, in float32, only inside
`with shards.materialized(model, i):` and dropped after it, so a sweep over the layers (model/sequential.py) holds one
layer's weights at a time: a 16 GB bf16 8B model is scored in about the size of its embedding, its head, one
layer and the calibration activations.

An eager model (load.load_model) goes through the same sweeps unchanged: `materialized` is a no-op on it.
Sources: a Hugging Face directory with safetensors weights, an embedded model or a .gguf (through the
converted cache, which is safetensors), or an expert directory (its per-layer widths: expert_io.load_expert).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from . import arch
from .shards import READER_ATTR, ShardReader


def _source_dir(source: str) -> Path | None:
    """The safetensors directory behind `source`, or None when it loads only eagerly (an expert, a hub id)."""
    from .load import EMBEDDED, convert_gguf, resolve_source

    kind, where = resolve_source(str(source))
    if kind == "embedded":
        return convert_gguf(EMBEDDED[where].locate())
    if kind == "gguf":
        return convert_gguf(where)
    if kind == "hf-dir" and any(Path(where).glob("*.safetensors")):
        return Path(where)
    return None  # pickle weights (checked by load_model), an expert, a hub id


def lazy_model(source: str, *, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) with the decoder layers left on disk (see the module's docstring). A source that
    cannot be read lazily loads eagerly (load.load_model), which every sweep also accepts."""
    from .expert_io import quiet_transformers
    from .load import checked_expert, load_model, resolve_source

    kind, where = resolve_source(str(source))
    if kind == "expert":
        return checked_expert(where, lazy=True)
    directory = _source_dir(source)
    if directory is None or trust_remote_code:
        return load_model(source, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    from transformers import AutoTokenizer

    from .load import check_hf_dir, first_line

    quiet_transformers()
    check_hf_dir(directory, allow_pickle)
    try:
        model = _skeleton(directory)
        config = model.config
        tokenizer = AutoTokenizer.from_pretrained(directory)
        reader = ShardReader(directory)
        expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        if any(expected.get(name, shape) != shape for name, shape in reader.shapes().items()):
            raise UserError(f"could not load {directory}: the weights' shapes do not match config.json "
                            "(a changed hidden_size or intermediate_size?)")
        prefix = arch.spec_for(model).layers + "."
        resident = {name: reader.tensor(name) for name in reader.names() if not name.startswith(prefix)}
    except UserError:
        raise
    except Exception as exc:  # a truncated shard, a config transformers cannot build: one line
        raise UserError(f"could not load {directory}: {first_line(exc)}") from None
    setattr(model, READER_ATTR, reader)
    missing = [n for n in model.state_dict() if not n.startswith(prefix) and n not in resident]
    if missing == [arch.spec_for(model).lm_head + ".weight"] and config.tie_word_embeddings:
        missing = []  # tied: the head is the embedding, tied below
    if missing:
        raise UserError(f"the weights at {directory} lack {', '.join(missing[:3])}; is the model directory complete?")
    model.load_state_dict(resident, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _skeleton(directory: Path):
    """The architecture of the model at `directory` (config.json alone), its parameters on the meta device and
    its buffers (the rotary tables) real; UserError for an architecture we do not support."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    arch.spec_for_model_type(config.model_type)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def model_shape(source: str, *, trust_remote_code: bool = False) -> dict:
    """Parameter counts of `source` from its config alone (the architecture built on the meta device: no
    weights read): total, embedding, output head (0 when tied), the largest decoder layer, hidden size, the
    largest FFN width and the number of layers. For estimating memory before anything loads."""
    from .expert_io import quiet_transformers
    from .load import load_model, resolve_source

    kind, where = resolve_source(str(source))
    directory = Path(where) if kind == "hf-dir" else _source_dir(source)  # a config is enough
    quiet_transformers()
    if directory is None:  # an expert or a hub id: loaded as load_model loads it
        model, _ = load_model(source, trust_remote_code=trust_remote_code)
    else:
        model = _skeleton(directory)
    spec = arch.spec_for(model)
    layers = arch.decoder_layers(model)
    embed = arch.get(model, spec.embed).weight
    head = arch.get(model, spec.lm_head).weight
    parts = arch.all_layer_parts(model)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "embedding": embed.numel(),
        "head": 0 if head is embed else head.numel(),
        "layer": max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        "hidden": model.config.hidden_size,
        "ffn": max(p.down.in_features for p in parts),
        "layers": len(layers),
    }
