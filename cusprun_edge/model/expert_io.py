"""Save and load pruned experts as Hugging Face directories (safetensors + config with per-layer shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..fsutil import atomic_directory, check_replaceable
from . import arch
from .shards import READER_ATTR, ShardReader, is_lazy, reader_of
from .structure import Structure, record_structure, shape_like
from .vocab_layers import shape_vocab_like

EXPERT_MARKER = "cusprun.json"


def save_expert(model, tokenizer, out: Path, record: dict, force: bool = False) -> Path:
    """Write model + tokenizer + `cusprun.json` (what produced it) atomically into `out`."""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force")
    check_replaceable(out, EXPERT_MARKER, "an expert directory")  # --force never deletes foreign data
    record_structure(model)
    with atomic_directory(out) as tmp:
        state = None
        vocab = getattr(model.config, "cusprun_vocab", None)
        if vocab and vocab["tied"]:  # transformers only knows the dense tie; save the shared matrix once
            head_key = arch.spec_for(model).lm_head + ".inner.weight"
            state = {k: v for k, v in model.state_dict().items() if k != head_key}
        if is_lazy(model):
            _save_layer_by_layer(model, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        add_remote_code(tmp, model.config)
        (tmp / EXPERT_MARKER).write_text(json.dumps(record, indent=2, default=str))
    return out


def _save_layer_by_layer(model, directory: Path) -> None:
    """Save a lazy model whose every layer was staged on disk by the prune (lazy.ShardReader.stage_layer): the
    layers' files are linked (or copied) into `directory` beside one file of the rest, with an index, so the
    whole model is never in memory."""
    import os
    import shutil

    from safetensors.torch import save_file

    reader = reader_of(model)
    prefix = arch.spec_for(model).layers + "."
    layer_names = [n for n in reader.names() if n.startswith(prefix)]
    head = arch.spec_for(model).lm_head + ".weight"
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(prefix) and not (k == head and model.config.tie_word_embeddings)}
    save_file(rest, str(directory / "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map = dict.fromkeys(rest, "model-rest.safetensors")
    for name in layer_names:
        source = reader.files[name]
        target = directory / source.name
        if not target.exists():
            try:
                os.link(source, target)
            except OSError:  # another file system
                shutil.copyfile(source, target)
        weight_map[name] = source.name
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                        indent=2))
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


REMOTE_CODE_FILE = "modeling_cusprun.py"


def add_remote_code(directory: Path, config) -> None:
    """Put the modeling file (`hf_modeling.py`) beside the weights and name it in config.json's `auto_map`:
    `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` then builds the per-layer shapes.
    Remote code stays the user's explicit opt-in; without it transformers loads the stock class and fails
    on the widths (`write_hf_compat` writes a copy stock transformers loads)."""
    from . import hf_modeling

    name = hf_modeling.CLASSES.get(config.model_type)
    if name is None or getattr(config, "cusprun_vocab", None):  # the previous vocabulary rule: ours only
        return
    (directory / REMOTE_CODE_FILE).write_text(Path(hf_modeling.__file__).read_text(encoding="utf-8"))
    config_file = directory / "config.json"
    data = json.loads(config_file.read_text())
    data["auto_map"] = {"AutoModelForCausalLM": f"{REMOTE_CODE_FILE.removesuffix('.py')}.{name}"}
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-tensor bars and notices are noise.
    (Here, below both loaders: `models.load_model` hands expert directories to `load_expert`.)"""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights; is it a complete expert directory?")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_expert(path, dtype: torch.dtype = torch.float32, device: str = "cpu", *, lazy: bool = False):
    """Load an expert saved by `save_expert`; returns (model, tokenizer) like `load_model`. `lazy`: its decoder
    layers stay on disk until a sweep or `shards.layers_streamed` reads one (model/lazy.py), float32 on the CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").exists():
        raise UserError(f"{path} is not an expert directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    arch.spec_for_model_type(config.model_type)
    raw = getattr(config, "cusprun_structure", None)
    with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
        # the auto_map in config.json is for transformers' users; we build the shapes ourselves, no remote code
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if raw:
        shape_like(model, Structure.from_dict(raw))
    vocab = getattr(config, "cusprun_vocab", None)
    if vocab:
        shape_vocab_like(model, vocab)
    layers = arch.spec_for(model).layers + "."  # a lazy expert's decoder layers stay on disk
    if lazy:
        reader = ShardReader(path)
        state = {name: reader.tensor(name) for name in reader.names() if not name.startswith(layers)}
        setattr(model, READER_ATTR, reader)
    else:
        state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False, assign=True)
    if vocab:
        if vocab["tied"]:
            spec = arch.spec_for(model)
            arch.get(model, spec.lm_head).inner.weight = arch.get(model, spec.embed).inner.weight
    else:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not (lazy and n.startswith(layers))]
    if result.unexpected_keys or still_meta:
        raise UserError(
            f"{path}: weights do not match the recorded structure "
            f"(unexpected {result.unexpected_keys[:3]}, missing {still_meta[:3]})"
        )
    model = (model if lazy else model.to(device=device, dtype=dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def expert_record(path) -> dict:
    f = Path(path) / EXPERT_MARKER
    return json.loads(f.read_text()) if f.exists() else {}



# --------------------------------------------------------------------------- a copy stock transformers loads

HF_COMPAT_DIR = "hf-compat"  # where `prune --hf-compat` puts the copy, inside the expert directory
HF_COMPAT_MARKER = "cusprun-hf-compat.json"


def _dense_slots(model, parts, heads_per_kv: int) -> dict[str, tuple]:
    """Projection -> (rows, columns) of the dense-shaped weight that hold this layer's units (None: all).
    An FFN channel keeps its position among the kept ones; query head j of KV group k (j // g) takes the
    dense slot of the same place in group k, so transformers' GQA repeat pairs it with the same KV head."""
    hd = arch.head_dim(model)
    n_q, n_kv, ffn = parts.o.in_features // hd, parts.k.out_features // hd, parts.down.in_features
    g = n_q // n_kv
    heads = torch.tensor([(j // g) * heads_per_kv + j % g for j in range(n_q)], dtype=torch.long)
    q = (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)
    kv, channels = torch.arange(n_kv * hd), torch.arange(ffn)
    spec = arch.spec_for(model)
    a, m = spec.attn, spec.mlp
    return {f"{a}.{spec.q_proj}": (q, None), f"{a}.{spec.k_proj}": (kv, None), f"{a}.{spec.v_proj}": (kv, None),
            f"{a}.{spec.o_proj}": (None, q), f"{m}.{spec.gate_proj}": (channels, None),
            f"{m}.{spec.up_proj}": (channels, None), f"{m}.{spec.down_proj}": (None, channels)}


def write_hf_compat(expert, out, force: bool = False) -> Path:
    """Write a copy of the expert at `expert` that stock transformers loads with no remote code
    (`AutoModelForCausalLM.from_pretrained(out)`): every layer zero-padded back to the dense widths and head
    counts. Exact (a padded FFN channel or query head adds exactly zero to its layer's output), but it saves
    nothing: the copy is as large and as slow as the dense model. The expert itself, loaded with
    `trust_remote_code=True`, is the small one."""
    from transformers import AutoModelForCausalLM

    expert, out = Path(expert), Path(out)
    if out.exists() and not (force and (out / HF_COMPAT_MARKER).is_file()):
        raise UserError(f"{out} already exists and is not a copy we wrote with --force; choose another output")
    model, tokenizer = load_expert(expert)
    if getattr(model.config, "cusprun_vocab", None):
        raise UserError(f"{expert} keeps its vocabulary by the previous rule (ids remapped in place), which stock "
                        "transformers cannot express; load it with cusprun_edge.load_expert")
    spec = arch.spec_for(model)
    shapes = getattr(model.config, "cusprun_structure", None) or {}
    data = {k: v for k, v in model.config.to_dict().items() if k not in ("cusprun_structure", "auto_map")}
    # a bias FLAP's compensation added: the stock flag that gives every such projection one (zero elsewhere)
    if any(shapes.get("down_proj_bias") or ()) and "mlp_bias" in data:
        data["mlp_bias"] = True
    if any(shapes.get("o_proj_bias") or ()) and "attention_bias" in data:
        data["attention_bias"] = True
    config = type(model.config).from_dict(data)
    stock = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target, source = stock.state_dict(), model.state_dict()
    missing = [k for k in source if k not in target]
    if missing:  # e.g. a FLAP bias on an o_proj that the stock class builds without one (Qwen2)
        raise UserError(f"{expert}: stock {type(stock).__name__} has no place for {missing[0]}; load the expert "
                        "itself with trust_remote_code=True instead")
    group = config.num_attention_heads // config.num_key_value_heads
    slots = {}  # "model.layers.3.mlp.down_proj" -> (rows, columns)
    for i, parts in enumerate(arch.all_layer_parts(model)):
        for name, where in _dense_slots(model, parts, group).items():
            slots[f"{spec.layers}.{i}.{name}"] = where
    padded = {}
    for key, dense in target.items():
        value = source.get(key)
        module, _, kind = key.rpartition(".")
        if value is None:
            if kind != "bias":
                raise UserError(f"{expert}: its weights have no {key}; it cannot be written for stock transformers")
            padded[key] = torch.zeros_like(dense)  # a bias only the stock flag asks for
        elif module not in slots:
            padded[key] = value
        else:
            rows, cols = slots[module]
            slot = torch.zeros_like(dense)
            if kind == "bias" and rows is None:  # an output bias (o_proj, down_proj): the dense width already
                slot.copy_(value)
            elif rows is not None:
                slot[rows] = value
            else:
                slot[:, cols] = value
            padded[key] = slot
    stock.load_state_dict(padded, strict=True)
    with atomic_directory(out) as tmp:
        stock.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / HF_COMPAT_MARKER).write_text(json.dumps({
            "from": str(expert), "note": "zero-padded to the dense widths: exact, but as large and as slow as the "
            "dense model; the expert directory itself (trust_remote_code=True) is the small one"}, indent=2))
    return out
