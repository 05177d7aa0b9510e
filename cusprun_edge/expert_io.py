"""Save and load pruned experts as Hugging Face directories (safetensors + config with per-layer shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import arch
from .errors import UserError
from .fsutil import atomic_directory, check_replaceable
from .structure import Structure, record_structure, shape_like
from .vocab import shape_vocab_like

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
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        (tmp / EXPERT_MARKER).write_text(json.dumps(record, indent=2, default=str))
    return out


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


def load_expert(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an expert saved by `save_expert`; returns (model, tokenizer) like `load_model`."""
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
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if raw:
        shape_like(model, Structure.from_dict(raw))
    vocab = getattr(config, "cusprun_vocab", None)
    if vocab:
        shape_vocab_like(model, vocab)
    state = _read_state_dict(path)
    result = model.load_state_dict(state, strict=False, assign=True)
    if vocab:
        if vocab["tied"]:
            spec = arch.spec_for(model)
            arch.get(model, spec.lm_head).inner.weight = arch.get(model, spec.embed).inner.weight
    else:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or still_meta:
        raise UserError(
            f"{path}: weights do not match the recorded structure "
            f"(unexpected {result.unexpected_keys[:3]}, missing {still_meta[:3]})"
        )
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def expert_record(path) -> dict:
    f = Path(path) / EXPERT_MARKER
    return json.loads(f.read_text()) if f.exists() else {}
