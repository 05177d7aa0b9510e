"""The `build` pipeline: load -> score -> prune -> export -> validate -> bench -> report.

Each stage is a small class (Olive-pass style) with a config-derived fingerprint and one `run` that writes
into a fresh directory. A finished stage leaves `<out>/<stage>/stage.json` with the fingerprint of its
inputs; a re-run skips stages whose fingerprint is unchanged, so an interrupted build resumes from the
last finished stage. A stage is written into a temporary directory and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .errors import UserError


@dataclass
class BuildConfig:
    target: str = "x86-cpu"
    model: str = "smollm2-135m"
    expert: str = "language=en,domain=general"
    ratio: float = 0.25
    method: str = "cusprun"
    precision: str | None = None  # the target's default when None
    method_options: dict = field(default_factory=dict)
    threads: int | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    quick_bench: bool = False


class BuildContext:
    """What stages share while one build runs: the config, the output root, and loaded objects."""

    def __init__(self, config: BuildConfig, out: Path):
        self.config = config
        self.out = out
        self._model = None
        self.fingerprints: dict[str, str] = {}

    def stage_dir(self, name: str) -> Path:
        return self.out / name

    def dense(self):
        """The dense model and tokenizer (loaded once per build, on first use)."""
        if self._model is None:
            from .models import load_model

            self._model = load_model(
                self.config.model, trust_remote_code=self.config.trust_remote_code,
                allow_pickle=self.config.allow_pickle,
            )
        return self._model


class Stage:
    name: str = ""
    depends: tuple[str, ...] = ()

    def config_keys(self) -> tuple[str, ...]:
        return ()

    def fingerprint(self, ctx: BuildContext) -> str:
        cfg = asdict(ctx.config)
        parts = {k: cfg[k] for k in self.config_keys()}
        parts["upstream"] = [ctx.fingerprints[d] for d in self.depends]
        parts["version"] = __version__
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, ctx: BuildContext, work: Path) -> dict:
        raise NotImplementedError


class LoadStage(Stage):
    name = "load"

    def config_keys(self):
        return ("model", "trust_remote_code", "allow_pickle")

    def run(self, ctx, work):
        from .score import model_fingerprint
        from .structure import count_params

        model, _ = ctx.dense()
        return {"model": ctx.config.model, "model_hash": model_fingerprint(model), "params": count_params(model)}


class ScoreStage(Stage):
    name = "score"
    depends = ("load",)

    def config_keys(self):
        return ("expert",)

    def run(self, ctx, work):
        from .corpora import ExpertSpec
        from .score import score_model

        model, tok = ctx.dense()
        corpora = ExpertSpec.parse(ctx.config.expert).corpora()
        scores = score_model(model, tok, corpora)
        scores.save(work / "scores.safetensors")
        return {"corpora": {k: c.sha256() for k, c in corpora.items()}, "seconds": scores.meta["seconds"]}


class PruneStage(Stage):
    name = "prune"
    depends = ("score",)

    def config_keys(self):
        return ("expert", "ratio", "method", "method_options")

    def run(self, ctx, work):
        import copy

        from .corpora import ExpertSpec
        from .prune import prune_and_save
        from .score import ScoreSet

        model, tok = ctx.dense()
        scores = ScoreSet.load(ctx.stage_dir("score") / "scores.safetensors")
        names = list(ExpertSpec.parse(ctx.config.expert).corpora())
        expert = copy.deepcopy(model)
        record = prune_and_save(expert, tok, scores, names, ctx.config.method, ctx.config.ratio,
                                work / "expert", options=dict(ctx.config.method_options),
                                extra={"expert": ctx.config.expert, "base_model": ctx.config.model})
        return {k: record[k] for k in ("method", "target_ratio", "achieved_ratio", "params_before", "params_after")}


class ExportStage(Stage):
    name = "export"
    depends = ("prune",)

    def config_keys(self):
        return ("target", "precision")

    def run(self, ctx, work):
        from .expert_io import load_expert
        from .export import export_model

        model, tok = ctx.dense()
        dense_manifest = export_model(model, tok, ctx.config.target, work / "dense", precision=ctx.config.precision)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
        expert_manifest = export_model(expert, etok, ctx.config.target, work / "expert",
                                       precision=ctx.config.precision)
        return {"dense": _manifest_summary(dense_manifest), "expert": _manifest_summary(expert_manifest)}


def _manifest_summary(manifest: dict) -> dict:
    keys = ("precision", "parity", "total_bytes", "parameters")
    return {k: manifest.get(k) for k in keys}


STAGES: list[Stage] = [LoadStage(), ScoreStage(), PruneStage(), ExportStage()]


def register_stage(stage: Stage) -> None:
    """Later stages (validate, bench, report) add themselves here, in pipeline order."""
    if all(s.name != stage.name for s in STAGES):
        STAGES.append(stage)


def _register_later_stages() -> None:
    from .bench import BenchStage
    from .report import ReportStage
    from .validate import ValidateStage

    for stage in (ValidateStage(), BenchStage(), ReportStage()):
        register_stage(stage)


_register_later_stages()


def _finished(ctx: BuildContext, stage: Stage, fp: str) -> bool:
    record = ctx.stage_dir(stage.name) / "stage.json"
    if not record.exists():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def build(config: BuildConfig, out: Path, *, on_stage=None) -> dict:
    """Run every stage in order, skipping finished ones; returns {stage: its record}."""
    out = Path(out).resolve()  # stages hand paths to worker processes with their own working directory
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").write_text(json.dumps(asdict(config), indent=2))
    ctx = BuildContext(config, out)
    records = {}
    for stage in STAGES:
        fp = stage.fingerprint(ctx)
        ctx.fingerprints[stage.name] = fp
        final = ctx.stage_dir(stage.name)
        if _finished(ctx, stage, fp):
            records[stage.name] = json.loads((final / "stage.json").read_text())
            if on_stage:
                on_stage(stage.name, "skipped (unchanged)")
            continue
        if on_stage:
            on_stage(stage.name, "running")
        work = Path(tempfile.mkdtemp(prefix=f".{stage.name}.tmp-", dir=out))
        t0 = time.time()
        try:
            result = stage.run(ctx, work)
        except UserError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise UserError(f"stage '{stage.name}' failed: {exc}") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        record = {"stage": stage.name, "fingerprint": fp, "seconds": round(time.time() - t0, 2), "result": result}
        (work / "stage.json").write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        records[stage.name] = record
        if on_stage:
            on_stage(stage.name, f"done in {record['seconds']:.1f} s")
    return records
