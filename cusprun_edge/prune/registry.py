"""The registry of pruning methods, as data: each method's recipe (MethodSpec), the choices and ranges its
options may take, and their checks. It imports no torch, so the CLI refuses a bad ratio, method or option at
once; methods.py holds the scorers and the planner that read these recipes.

A new method is one MethodSpec here (and its scorer in methods.py's SCORERS when it scores units its own way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError

RATIO_MAX = 0.9  # of the prunable parameters: beyond it no layer keeps enough to refit
# the scorers of methods.py (SCORERS), by name
SCORER_NAMES = ("cusprun", "wanda_sp", "flap", "seap", "magnitude", "random", "block_influence")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    description: str
    scorer: str  # key into SCORERS
    allocation: str  # "global" | "uniform" | "logistic" | "damage" | "layers"
    needs_data: bool = True
    bias_compensation: bool = False
    head_tier_reduce: str = "mean"  # how a head tier's score is formed from its heads: "mean" | "max"
    head_policy: str = "fraction"  # scheduled allocations: "fraction" | "ffn_first" (see module docstring)
    # Reconstruction after removal (reconstruct.py): "none" | "sequential" | "one-shot"; the ridge term is
    # "auto" (searched on the held-apart calibration documents) or a number; refit_target "layer" | "dense".
    reconstruct: str = "none"
    ridge: float | str = "auto"
    refit_target: str = "layer"
    # allocation "damage" (damage.py): layer i's share of the budget ~ (mean damage / damage_i) ** power,
    # within [1/cap, cap] times the uniform share
    damage_power: float = 1.0
    damage_cap: float = 2.0
    # Which FFN channels go once a layer's count is set: "scores" (the method's lowest) or "obs": among the
    # OBS_POOL x count lowest-scored (the units the method marks least relevant to the expert), those whose removal
    # the refit compensates best (reconstruct.obs_select); needs reconstruction.
    select: str = "scores"


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        # How these defaults are judged: `python -m benchmarks defaults` prunes cusprun under this recipe and
        # under one changed field at a time (head policy, allocation, damage power, tau, aggregation), with
        # reconstruction, and compares the perplexity of the held-apart calibration documents (never the eval
        # split); benchmarks/RESULTS.md has the table and the figures. Budgets from measured damage beat uniform
        # budgets there (1.11x in the geometric mean over three settings at 35%; the eval-split quality table
        # agrees), with power 1 ahead of 0.5 by 0.6%, so they are the default; a corpus with no held-apart
        # documents falls back to uniform (prune.prune_model records it).
        # reconstruct=sequential: the refit is only kept where it lowers the held-apart perplexity
        # (reconstruct.py), so it cannot make the expert worse there.
        MethodSpec("cusprun", "Cus-Prun: remove units irrelevant (lowest impact) for every expert dimension",
                   "cusprun", "damage", head_tier_reduce="max", head_policy="ffn_first", reconstruct="sequential"),
        MethodSpec("wanda-sp", "structured Wanda: |W| x input norm per unit, same sparsity every layer",
                   "wanda_sp", "uniform"),
        MethodSpec("flap", "FLAP: fluctuation of inputs x weight norm, standardized, global, bias compensation",
                   "flap", "global", bias_compensation=True),
        MethodSpec("seap", "SEAP: expert activation x weight norm, logistic depth schedule, ends protected",
                   "seap", "logistic"),
        MethodSpec("magnitude", "L1 weight magnitude per unit, same sparsity every layer", "magnitude",
                   "uniform", needs_data=False),
        MethodSpec("random", "random units, same sparsity every layer (a floor for the others)", "random",
                   "uniform", needs_data=False),
        MethodSpec("shortgpt", "ShortGPT: drop whole layers with the lowest block influence", "block_influence",
                   "layers"),
    ]
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]


RECIPE_CHOICES = {
    "allocation": ("global", "uniform", "logistic", "damage", "layers"),
    "head_tier_reduce": ("mean", "max"),
    "head_policy": ("fraction", "ffn_first"),
    "reconstruct": ("none", "sequential", "one-shot"),
    "refit_target": ("layer", "dense"),
    "select": ("scores", "obs"),
}


# select "obs": the candidate pool is this many times the channels a layer loses (capped at its width)
OBS_POOL = 2


def method_with_overrides(name: str, options: dict) -> MethodSpec:
    """A method with some of its recipe fields (allocation, bias_compensation, ...) replaced by options."""
    spec = get_method(name)
    fields = {k: options.pop(k) for k in list(options) if k in MethodSpec.__dataclass_fields__ and k != "name"}
    if isinstance(fields.get("reconstruct"), bool):  # --option reconstruct=true / false
        fields["reconstruct"] = "sequential" if fields["reconstruct"] else "none"
    if "ridge" in fields and fields["ridge"] != "auto":
        try:
            fields["ridge"] = float(fields["ridge"])
        except (TypeError, ValueError):
            fields["ridge"] = -1.0
        if not 0 <= fields["ridge"] < 1e3:
            raise UserError("--option ridge must be auto or a number in [0, 1000)")
    for key, low, high in (("damage_power", 0.0, 4.0), ("damage_cap", 1.0, 10.0)):
        if key in fields:
            value = fields[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise UserError(f"--option {key} must be a number in [{low:g}, {high:g}]")
            fields[key] = float(value)
    for key, value in fields.items():
        if key in RECIPE_CHOICES and value not in RECIPE_CHOICES[key]:
            raise UserError(f"--option {key}={value} is not valid; choose one of {', '.join(RECIPE_CHOICES[key])}")
    if "allocation" in fields and (fields["allocation"] == "layers") != (spec.allocation == "layers"):
        raise UserError(f"--option allocation={fields['allocation']} does not fit method '{name}'s unit scores")
    spec = dataclasses.replace(spec, **fields) if fields else spec
    if spec.select == "obs" and (spec.reconstruct == "none" or spec.allocation == "layers"):
        raise UserError("--option select=obs chooses channels by what the refit can compensate: it needs "
                        "reconstruction (--option reconstruct=sequential) and a method that removes channels")
    return spec


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= RATIO_MAX:
        raise UserError(f"--ratio must be in (0, {RATIO_MAX}], got {ratio}")


def check_vocab_options(prune_vocab: bool, size: int | None, floor: float | None) -> None:
    """--vocab-size and --vocab-floor, for `build` (and its recipes), `prune` and the size search alike."""
    if (size is not None or floor is not None) and not prune_vocab:
        raise UserError("--vocab-size and --vocab-floor apply to vocabulary trimming; add --prune-vocab")
    if size is not None and size < 1:
        raise UserError(f"--vocab-size {size} must be a positive number of tokens")
    if floor is not None and floor < 1.0:
        raise UserError(f"--vocab-floor {floor} is below 1.0; a trimmed vocabulary cannot beat the untrimmed one")


# What each scorer reads from the options besides MethodSpec fields (see the score_* functions in methods.py).
SCORER_OPTIONS = {
    "cusprun": {"tau": "a number in (0, 1]", "aggregate": ("mean", "rms")},
    "random": {"seed": "an integer"},
}


def check_options(method: str, options: dict) -> None:
    """One-line UserError for an --option key the method does not read, or a value it cannot take;
    called before anything loads (an unknown key would otherwise be silently ignored)."""
    spec = get_method(method)
    fields = MethodSpec.__dataclass_fields__
    recipe = set(fields) - {"name", "description"}
    scorer = options.get("scorer", spec.scorer)
    if scorer not in SCORER_NAMES:
        raise UserError(f"--option scorer={scorer} is not valid; choose one of {', '.join(SCORER_NAMES)}")
    known = SCORER_OPTIONS.get(scorer, {})
    for key, value in options.items():
        if key not in recipe and key not in known:
            raise UserError(f"--option {key} is not an option of method '{method}'; "
                            f"known: {', '.join(sorted(recipe | set(known)))}")
        rule = known.get(key) if key not in recipe else None
        if isinstance(rule, tuple) and value not in rule:
            raise UserError(f"--option {key}={value} is not valid; choose one of {', '.join(rule)}")
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key == "tau" and not (number and 0 < value <= 1):
            raise UserError(f"--option tau={value} is not valid; give {rule}")
        if key == "seed" and not (isinstance(value, int) and not isinstance(value, bool)):
            raise UserError(f"--option seed={value} is not valid; give {rule}")
        if key in recipe and fields[key].type in ("bool", bool) and not isinstance(value, bool):
            raise UserError(f"--option {key}={value} is not valid; give true or false")
    method_with_overrides(method, dict(options))  # recipe values (choices, ridge) are checked there
