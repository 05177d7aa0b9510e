"""Target profiles: what an edge device runs, as data (one TOML file per device in `data/targets/`).

A profile names the ONNX Runtime execution providers to try (in order, with their options), the
precisions the device handles well and its default, the ONNX opset its runtime accepts, the sequence
length and batch to plan memory for, the memory budget, and session settings (graph optimisation
level, threads). `resolve_target` accepts a built-in name, an alias, or the path of a user's file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ..errors import UserError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")
ATTENTION_KINDS = ("gqa", "standard")
FORMATS = ("onnx", "gguf")  # what a build ships: ONNX always; "gguf" adds a GGUF for llama.cpp (stage gguf)
PROVIDERS = (
    "TensorrtExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
    "WebGpuExecutionProvider",
    "CoreMLExecutionProvider",
    "QNNExecutionProvider",
    "OpenVINOExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class ExecutionProvider:
    """One ONNX Runtime execution provider and the options it is created with."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetProfile:
    name: str
    description: str
    providers: tuple[ExecutionProvider, ...]  # most preferred first
    precision: str  # default precision
    precisions: tuple[str, ...]  # precisions this device runs well
    opset: int
    max_sequence_length: int
    batch_size: int
    memory_budget_mb: int
    graph_optimization_level: str
    intra_op_threads: int  # 0: let ONNX Runtime choose
    inter_op_threads: int
    # Optional fields.
    attention: str = "gqa"  # "gqa": ONNX Runtime's fused GroupQueryAttention; "standard": plain ONNX ops
    # MatMulNBits accuracy_level of int4/int8 exports: 0 computes in fp32, 4 quantizes activations to
    # int8 per block inside the CPU kernel (MLAS's fast path); the CUDA kernel ignores it.
    accuracy_level: int = 4
    aliases: tuple[str, ...] = ()
    formats: tuple[str, ...] = ("onnx",)  # artifacts a build for this target ships (FORMATS)
    path: str = ""  # the file it was read from

    def to_dict(self) -> dict:
        d = asdict(self)
        d["providers"] = [asdict(p) for p in self.providers]
        d["precisions"] = list(self.precisions)
        d["aliases"] = list(self.aliases)
        d["formats"] = list(self.formats)
        return d


# --------------------------------------------------------------------------- parsing

# field -> (type, required). Types are checked strictly: TOML `17` is an int, `"17"` is not.
_FIELDS: dict[str, tuple[type, bool]] = {
    "name": (str, True),
    "description": (str, True),
    "providers": (list, True),
    "precision": (str, True),
    "precisions": (list, True),
    "opset": (int, True),
    "max_sequence_length": (int, True),
    "batch_size": (int, True),
    "memory_budget_mb": (int, True),
    "graph_optimization_level": (str, True),
    "intra_op_threads": (int, True),
    "inter_op_threads": (int, True),
    "attention": (str, False),
    "accuracy_level": (int, False),
    "aliases": (list, False),
    "formats": (list, False),
}
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "a table"}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _bad(path: Path, name: str, problem: str) -> UserError:
    return UserError(f"target profile {path}: field '{name}' {problem}")


def _check_type(path: Path, name: str, value: Any, kind: type) -> None:
    if not _is(value, kind):
        raise _bad(path, name, f"must be {_TYPE_NAMES[kind]}, got {type(value).__name__} ({value!r})")


def _check_choice(path: Path, name: str, value: str, choices) -> None:
    if value not in choices:
        raise _bad(path, name, f"is '{value}'; choose one of {', '.join(choices)}")


def _parse_providers(path: Path, raw: list) -> tuple[ExecutionProvider, ...]:
    if not raw:
        raise _bad(path, "providers", "must list at least one execution provider")
    providers = []
    for i, entry in enumerate(raw):
        where = f"providers[{i}]"
        _check_type(path, where, entry, dict)
        unknown = set(entry) - {"name", "options"}
        if unknown:
            raise _bad(path, f"{where}.{min(unknown)}", "is not a provider field (use name, options)")
        if "name" not in entry:
            raise _bad(path, f"{where}.name", "is missing")
        _check_type(path, f"{where}.name", entry["name"], str)
        _check_choice(path, f"{where}.name", entry["name"], PROVIDERS)
        options = entry.get("options", {})
        _check_type(path, f"{where}.options", options, dict)
        for key, value in options.items():
            if not isinstance(value, (str, int, float, bool)):
                raise _bad(path, f"{where}.options.{key}", "must be a string, number or boolean")
        providers.append(ExecutionProvider(entry["name"], dict(options)))
    return tuple(providers)


def parse_profile(raw: dict, path: Path) -> TargetProfile:
    """Validate the table read from `path` and build its profile; errors name the file and field."""
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise _bad(path, unknown[0], f"is not a profile field; known fields: {', '.join(_FIELDS)}")
    for name, (kind, required) in _FIELDS.items():
        if name not in raw:
            if required:
                raise _bad(path, name, "is missing")
            continue
        _check_type(path, name, raw[name], kind)
    for name in ("precisions", "aliases", "formats"):
        for i, item in enumerate(raw.get(name, [])):
            _check_type(path, f"{name}[{i}]", item, str)
    for item in raw.get("formats", []):
        _check_choice(path, "formats", item, FORMATS)
    if "formats" in raw and "onnx" not in raw["formats"]:
        raise _bad(path, "formats", "must include onnx (the report and the checks read the ONNX artifacts)")
    for item in raw["precisions"]:
        _check_choice(path, "precisions", item, PRECISIONS)
    if not raw["precisions"]:
        raise _bad(path, "precisions", "must list at least one precision")
    _check_choice(path, "precision", raw["precision"], raw["precisions"])
    level = raw["graph_optimization_level"]
    _check_choice(path, "graph_optimization_level", level, GRAPH_OPTIMIZATION_LEVELS)
    _check_choice(path, "attention", raw.get("attention", "gqa"), ATTENTION_KINDS)
    if raw.get("accuracy_level", 4) not in (0, 1, 2, 3, 4):
        raise _bad(path, "accuracy_level", f"is {raw['accuracy_level']}; use 0 (fp32), 1, 2, 3 or 4 (int8)")
    if not 17 <= raw["opset"] <= 25:
        raise _bad(path, "opset", f"is {raw['opset']}; use an ONNX opset between 17 and 25")
    for name in ("max_sequence_length", "batch_size", "memory_budget_mb"):
        if raw[name] < 1:
            raise _bad(path, name, f"must be positive, got {raw[name]}")
    for name in ("intra_op_threads", "inter_op_threads"):
        if raw[name] < 0:
            raise _bad(path, name, f"must be 0 (runtime default) or more, got {raw[name]}")
    return TargetProfile(
        name=raw["name"],
        description=raw["description"],
        providers=_parse_providers(path, raw["providers"]),
        precision=raw["precision"],
        precisions=tuple(raw["precisions"]),
        opset=raw["opset"],
        max_sequence_length=raw["max_sequence_length"],
        batch_size=raw["batch_size"],
        memory_budget_mb=raw["memory_budget_mb"],
        graph_optimization_level=raw["graph_optimization_level"],
        intra_op_threads=raw["intra_op_threads"],
        inter_op_threads=raw["inter_op_threads"],
        attention=raw.get("attention", "gqa"),
        accuracy_level=raw.get("accuracy_level", 4),
        aliases=tuple(raw.get("aliases", ())),
        formats=tuple(raw.get("formats", ("onnx",))),
        path=str(path),
    )


def load_profile(path) -> TargetProfile:
    path = Path(path).expanduser()
    if path.exists() and not path.is_file():
        raise UserError(f"target profile {path} is a directory, not a .toml file")
    if not path.is_file():
        raise UserError(f"target profile {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"target profile {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise UserError(f"target profile {path} is not a UTF-8 text file") from None
    return parse_profile(raw, path)


# --------------------------------------------------------------------------- built-in profiles


def builtin_dirs() -> list[Path]:
    """Where built-in profiles live: package data (`cusprun_edge/data/targets`), in a checkout and a wheel."""
    from importlib import resources

    return [Path(str(resources.files("cusprun_edge") / "data" / "targets"))]


def list_targets() -> list[TargetProfile]:
    """Every built-in profile, sorted by name (the first directory that has a name wins)."""
    found: dict[str, TargetProfile] = {}
    for directory in builtin_dirs():
        for file in sorted(directory.glob("*.toml")):
            profile = load_profile(file)
            found.setdefault(profile.name, profile)
    return [found[name] for name in sorted(found)]


def resolve_target(name_or_path) -> TargetProfile:
    """A profile from a built-in name, an alias (`jetson`), a path to a .toml file, or a profile."""
    if isinstance(name_or_path, TargetProfile):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text or Path(text).is_file():
        return load_profile(text)
    profiles = list_targets()
    for profile in profiles:
        if text == profile.name or text in profile.aliases:
            return profile
    names = ", ".join(p.name + (f" (alias {', '.join(p.aliases)})" if p.aliases else "") for p in profiles)
    raise UserError(f"unknown target '{text}'; built-in targets: {names}; or pass the path of a .toml file")
