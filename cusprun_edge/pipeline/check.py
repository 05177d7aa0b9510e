"""Every check of a build config that needs no model, before anything loads or any directory appears:
one line naming the fix for each problem (UserError)."""

from __future__ import annotations

from ..config.corpora import ExpertSpec
from ..errors import UserError
from .config import BuildConfig


def check_config(cfg: BuildConfig) -> BuildConfig:
    """Every check that needs no model, with one line naming the fix; returns cfg."""
    from ..config.targets import FORMATS, resolve_target
    from ..export.quant_plan import PLANS
    from ..prune.registry import check_options, check_ratio, check_vocab_options
    from .search import check_target

    check_ratio(cfg.ratio)
    check_options(cfg.method, dict(cfg.method_options))
    spec = ExpertSpec.parse(cfg.expert)
    check_held_out(spec.corpora())
    profile = resolve_target(cfg.target)
    check_precision(profile, cfg.precision)
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"--threads must be 1 or more, got {cfg.threads}")
    if any(not p.strip() for p in cfg.prompts):
        raise UserError("--prompt is empty")
    if cfg.beat_baseline and not cfg.baseline:
        raise UserError("--beat-baseline needs the baseline: drop --no-baseline")
    if cfg.beat_baseline and cfg.max_ppl_ratio is not None:
        raise UserError("--beat-baseline and --max-ppl-ratio each choose the ratio: pass one of them")
    check_vocab_options(cfg.prune_vocab, cfg.vocab_size, cfg.vocab_floor)
    if cfg.quant_plan not in PLANS:
        raise UserError(f"--quant-plan '{cfg.quant_plan}' is unknown; choose {' or '.join(PLANS)}")
    if cfg.max_ppl_ratio is not None:
        check_target(cfg.max_ppl_ratio)
    unknown = set(cfg.formats) - set(FORMATS)
    if unknown or "onnx" not in cfg.formats:
        raise UserError(f"--format must be onnx or gguf, got '{', '.join(sorted(unknown) or cfg.formats)}'")
    if cfg.max_memory is not None:
        from .memory_plan import memory_limit

        memory_limit(cfg.max_memory)
    if "gguf" in build_formats(cfg, profile):
        from ..export.gguf import check_source_supported

        check_source_supported(cfg.model)
    return cfg


def build_formats(cfg: BuildConfig, profile=None) -> tuple[str, ...]:
    """What the build ships: the config's formats and its target profile's (resolved here when not given)."""
    from ..config.targets import resolve_target

    extra = [f for f in (profile or resolve_target(cfg.target)).formats if f not in cfg.formats]
    return (*cfg.formats, *extra)


def check_precision(profile, precision: str | None) -> None:
    """A precision the target cannot take is refused before anything loads."""
    if precision is not None and precision not in profile.precisions:
        raise UserError(f"precision '{precision}' is not available for target '{profile.name}'; "
                        f"choose one of {', '.join(profile.precisions)}")


def config_inputs(cfg: BuildConfig) -> list:
    """The user's files this build reads: its output may not be written inside any of them."""
    from ..config.targets import resolve_target

    return [cfg.model, resolve_target(cfg.target).path or None, *ExpertSpec.parse(cfg.expert).user_paths()]


def check_held_out(corpora: dict) -> None:
    """A build validates on held-out documents: refuse up front corpora that have none (not after the export)."""
    from ..config.corpora import MIN_HELD_OUT_DOCS

    if any(c.eval for c in corpora.values()):
        return
    mine = [name.removeprefix("user:") for name in corpora if name.startswith("user:")]
    hint = (f"a corpus of your own ({', '.join(mine)}) needs at least {MIN_HELD_OUT_DOCS} documents, a quarter of "
            "them held out" if mine else "add a built-in category")
    raise UserError(f"the expert's corpora have no held-out documents to validate on; {hint}")


