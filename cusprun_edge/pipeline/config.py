"""The build's configuration: one typed record, its defaults, its checks, and its recipe file.

Whatever sets it (CLI flags, the Python API, a `recipe.toml` given to `build --recipe`), it is checked once,
before anything loads (check.py: `check_config`), and stages receive it as it is. This module imports nothing
of the package, so that every stage's fingerprint can name the config without hashing the checks' code. Every build writes the
recipe it ran (`<out>/recipe.toml`), so `build --recipe <out>/recipe.toml` runs the same build again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomllib

from ..errors import UserError

RECIPE_FILE = "recipe.toml"


@dataclass(frozen=True)
class BuildConfig:
    target: str = "x86-cpu"
    model: str = "smollm2-135m"
    expert: str = "language=en,domain=general"
    # The default expert: 10% removed, the fast int4 plan. `build --beat-baseline --quant-plan fast` chose 0.10 for
    # SmolLM2-135M en+general on the held-apart tune documents (simulated int4 perplexity 38.12 vs the GenAI builder's
    # 38.68 there; 0.113 failed), 2026-12-06, benchmarks/results/beat-baseline-search.json. Other models and experts
    # should search their own: --beat-baseline.
    ratio: float = 0.10
    method: str = "cusprun"
    precision: str | None = None  # the target's default when None
    method_options: dict = field(default_factory=dict)
    threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    quick_bench: bool = False
    prompts: tuple[str, ...] = ()  # the user's own prompts for the generations
    prune_vocab: bool = False
    vocab_size: int | None = None  # with prune_vocab: this many tokens, instead of the size search
    vocab_floor: float | None = None  # with prune_vocab: the size search's floor (prune/vocab.py DEFAULT_FLOOR when None)
    max_ppl_ratio: float | None = None  # when set, the prune stage searches the ratio (search.py)
    quant_plan: str = "fast"  # the int4 plan (export/quant_plan.py PLANS)
    beat_baseline: bool = False  # search the largest ratio whose int4 is no worse than the GenAI builder's dense
    baseline: bool = True  # measure the GenAI builder's int4 of the dense model beside ours (measure/baseline.py)
    formats: tuple[str, ...] = ("onnx",)  # "gguf" adds the gguf stage; the target profile may add it too
    max_memory: str | None = None  # "8GB": refuse, before it starts, a build whose estimated peak is over it

    def __post_init__(self):  # lists from JSON or TOML become tuples: the config is a value
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "formats", tuple(self.formats))

    # ------------------------------------------------------------------ the recipe file

    def recipe_text(self) -> str:
        """The config as TOML: every field, in order; a None (the default that follows the target) is left out."""
        lines = ["# cusprun-edge build recipe: `cusprun-edge build --recipe THIS_FILE` runs this build again"]
        options = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "method_options":
                options = value
            elif value is not None:
                lines.append(f"{f.name} = {_toml_value(value)}")
        if options:
            lines += ["", "[method_options]", *(f"{k} = {_toml_value(v)}" for k, v in options.items())]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_recipe(cls, path) -> BuildConfig:
        path = Path(path).expanduser()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"--recipe {path}: no such file") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UserError(f"--recipe {path} is not a TOML file ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(data, where=f"--recipe {path}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "the build config") -> BuildConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for name, value in data.items():
            if not _same_kind(value, known[name].type):
                raise UserError(f"{where}: {name} = {value!r} has the wrong type ({known[name].type})")
        return cls(**data)

    def as_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _same_kind(value, annotation: str) -> bool:
    """A recipe's value fits the field's annotation (an int is a float too; a bool is neither)."""
    if value is None:
        return False  # TOML has no null; leaving the key out means the default
    if "tuple" in annotation or "list" in annotation:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if annotation == "dict":
        return isinstance(value, dict)
    if isinstance(value, bool) or "bool" in annotation:
        return isinstance(value, bool) and "bool" in annotation
    if "float" in annotation and isinstance(value, (int, float)):
        return True
    if "int" in annotation and isinstance(value, int):
        return True
    if "str" in annotation and isinstance(value, str):
        return True
    return False
