"""What a user ships without us: ONNX Runtime GenAI's model builder (`python -m onnxruntime_genai.models.builder`,
int4, its defaults, for the CPU) run on the same dense model. Built once per model and builder version and cached
beside the converted models, with a small manifest so the bench, validate and generate stages take it like any
export of ours.

The builder (onnxruntime-genai 0.18) reads one flat `rope_parameters` dict; transformers 5.x writes Gemma 3's per
attention type (`full_attention`, `sliding_attention`), and the builder stops with KeyError 'rope_type'. The
builder runs here with a view of the config that has both (global theta and the local base frequency), which is
what the model's own code computes, so the artifact stays the model's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError

LABEL = "builder"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
MANIFEST_FILE = "manifest.json"

# Run as `python -c RUNNER <builder args>`: the builder with Gemma 3's rope settings also given flat.
RUNNER = """
import runpy, sys
try:
    from transformers import Gemma3TextConfig
    _init = Gemma3TextConfig.__init__
    def _with_flat_rope(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        per_type = dict(getattr(self, "rope_parameters", None) or {})
        full = per_type.get("full_attention", per_type)
        local = per_type.get("sliding_attention", {})
        self.rope_local_base_freq = local.get("rope_theta", 10000.0)
        self.rope_theta = full.get("rope_theta", 1e6)
        self.rope_parameters = {**per_type, "rope_type": full.get("rope_type", "default"), "rope_theta": self.rope_theta}
    Gemma3TextConfig.__init__ = _with_flat_rope
except ImportError:
    pass
sys.argv = ["builder"] + sys.argv[1:]
runpy.run_module("%s", run_name="__main__")
""" % BUILDER_MODULE


def builder_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def hf_directory(source: str) -> Path:
    """The dense model as a Hugging Face directory (what the builder reads): an embedded model's or a GGUF's
    converted cache, or the directory itself."""
    from ..model.load import EMBEDDED, convert_gguf, resolve_source

    kind, where = resolve_source(source)
    if kind == "embedded":
        return convert_gguf(EMBEDDED[where].locate())
    if kind == "gguf":
        return convert_gguf(Path(where))
    if kind == "hf-dir":
        return Path(where)
    raise UserError(f"the GenAI builder baseline needs the dense model ({kind} '{source}' is not one)")


def _key(hf_dir: Path, precision: str) -> str:
    """Changes with the model's files (names, sizes, config) and the builder's version."""
    digest = hashlib.sha256()
    for path in sorted(hf_dir.iterdir()):
        if path.is_file():
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    digest.update((hf_dir / "config.json").read_bytes() if (hf_dir / "config.json").is_file() else b"")
    digest.update(f"{builder_version()}:{precision}".encode())
    return digest.hexdigest()[:16]


def builder_dir(hf_dir: Path, precision: str = "int4") -> Path:
    """Where the builder's export of the Hugging Face directory `hf_dir` is cached."""
    from ..model.load import cache_root

    return cache_root() / "builder" / f"{hf_dir.name}-{precision}-{_key(hf_dir, precision)}"


def builder_artifact(source: str, precision: str = "int4", *, timeout: float = 1800) -> Path:
    """The builder's export of the dense model `source` for the CPU (cached); returns its directory.
    Raises UserError with the builder's last line when it fails."""
    hf_dir = hf_directory(source)  # converting (or hashing) a GGUF is not free: once per call
    out = builder_dir(hf_dir, precision)
    if (out / MANIFEST_FILE).is_file():
        return out
    failed = out.with_name(out.name + ".failed")  # the builder's answer is kept either way: it is slow to repeat
    if failed.is_file():
        raise UserError(failed.read_text().strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # built under a temporary name beside the cache entry, renamed when complete: an interrupted build is never used
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        work = tmp / "artifact"
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, "-i", str(hf_dir), "-o", str(work), "-p", precision, "-e", "cpu",
             "-c", str(tmp / "cache")],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if result.returncode or not (work / "model.onnx").is_file():
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            reason = f"ONNX Runtime GenAI's builder could not export {hf_dir.name}: {last[0][:200]}"
            failed.write_text(reason + "\n")
            raise UserError(reason)
        files = {p.name: {"bytes": p.stat().st_size} for p in work.iterdir() if p.is_file()}
        decoder = json.loads((work / "genai_config.json").read_text())["model"]
        manifest = {
            "format": "onnxruntime-genai-builder",
            "builder": {"module": BUILDER_MODULE, "version": builder_version(), "precision": precision,
                        "execution_provider": "cpu", "options": "defaults",
                        "seconds": round(time.perf_counter() - started, 1)},
            "source": {"hf_dir": str(hf_dir)},
            "precision": precision,
            "pruned": False,
            # what our runtime needs to feed an empty KV cache, read off the builder's GenAI config
            "io": {"kv_heads_per_layer": [decoder["decoder"]["num_key_value_heads"]] * decoder["decoder"]["num_hidden_layers"],
                   "head_dim": decoder["decoder"]["head_size"]},
            "genai": {"config": "genai_config.json", "context_length": decoder.get("context_length")},
            "files": files,
            "total_bytes": sum(f["bytes"] for f in files.values()),
        }
        (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if (out / MANIFEST_FILE).is_file():  # another build finished first: keep its copy
            return out
        shutil.rmtree(out, ignore_errors=True)
        os.replace(work, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def builder_or_reason(source: str) -> tuple[Path | None, str | None]:
    """(the builder's artifact, None), or (None, why there is none) for a model the builder cannot take: a build
    goes on without the comparison and its report says why."""
    try:
        return builder_artifact(source), None
    except UserError as exc:
        return None, str(exc)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"ONNX Runtime GenAI's builder did not run: {type(exc).__name__}: {str(exc)[:200]}"
