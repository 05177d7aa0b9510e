"""The `build` pipeline: load -> score -> prune -> export -> validate -> bench -> generate -> report.

Each stage is a small class (Olive-pass style, base in `stages.py`) with a fingerprint of its config,
upstream stages and code, and one `run` that writes into a fresh directory. A finished stage leaves
`<out>/<stage>/stage.json` with its fingerprint; a re-run skips stages whose fingerprint is unchanged,
so an interrupted build resumes from the last finished stage. A stage is written into a temporary
directory (`.<stage>.tmp-*`) and renamed when complete; a resumed build clears those a killed run left.
A build that fails before any stage finished removes the directory it created.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from .errors import UserError
from .stages import BuildConfig, BuildContext, Progress, Stage

__all__ = ["BuildConfig", "BuildContext", "Stage", "STAGES", "build", "register_stage"]

LOG_FILE = "build.log"


class LoadStage(Stage):
    name = "load"

    def config_keys(self):
        return ("model", "trust_remote_code", "allow_pickle")

    def run(self, ctx, work):
        from .score import model_fingerprint
        from .structure import count_params

        ctx.progress.start(f"loading {ctx.config.model}")
        model, _ = ctx.dense()
        return {"model": ctx.config.model, "model_hash": model_fingerprint(model), "params": count_params(model)}


class ScoreStage(Stage):
    name = "score"
    depends = ("load",)
    own_progress = True  # score_model draws its own bar (documents)

    def config_keys(self):
        return ("expert",)

    def run(self, ctx, work):
        import rich

        from .corpora import ExpertSpec
        from .score import score_model

        model, tok = ctx.dense()
        corpora = ExpertSpec.parse(ctx.config.expert).corpora()
        # its bar draws on rich's console: only on a terminal (piped, it would leave a blank line)
        scores = score_model(model, tok, corpora, show_progress=rich.get_console().is_terminal)
        scores.save(work / "scores.safetensors")
        return {"corpora": {k: c.sha256() for k, c in corpora.items()}, "seconds": scores.meta["seconds"]}


class PruneStage(Stage):
    name = "prune"
    depends = ("score",)

    def config_keys(self):
        return ("expert", "ratio", "method", "method_options", "prune_vocab", "max_ppl_ratio")

    def run(self, ctx, work):
        import copy

        from .corpora import ExpertSpec
        from .prune import prune_and_save
        from .score import ScoreSet
        from .vocab import vocab_held_out

        cfg = ctx.config
        model, tok = ctx.dense()
        scores = ScoreSet.load(ctx.stage_dir("score") / "scores.safetensors")
        corpora = ExpertSpec.parse(cfg.expert).corpora()
        names = list(corpora)
        search, pruned = None, None
        ratio = cfg.ratio
        if cfg.max_ppl_ratio is not None:
            search, pruned = _search_ratio(ctx, model, tok, scores, corpora)
            ratio = search["ratio"]
        ctx.progress.start(f"pruning {ratio:.0%} with {cfg.method}")
        # the search's probe at the chosen ratio is the expert: it is not pruned a second time
        expert, pruned_record = pruned if pruned is not None else (copy.deepcopy(model), None)
        calib = [t for c in corpora.values() for t in c.calib]
        record = prune_and_save(expert, tok, scores, names, cfg.method, ratio, work / "expert",
                                options=dict(cfg.method_options),
                                extra={"expert": cfg.expert, "base_model": cfg.model, "ratio_search": search},
                                corpora=corpora, vocab_texts=calib if cfg.prune_vocab else None,
                                vocab_held_out=vocab_held_out(corpora) if cfg.prune_vocab else None,
                                pruned_record=pruned_record)
        keys = ("method", "target_ratio", "achieved_ratio", "params_before", "params_after", "reconstruction",
                "vocab", "ratio_search")
        return {k: record.get(k) for k in keys}


def _search_ratio(ctx, model, tok, scores, corpora) -> tuple[dict, tuple]:
    """The ratio search of a quality-target build, on the corpora's held-apart `tune` documents. Returns the
    search record and (expert, prune record) of the chosen ratio's probe."""
    import copy

    from .corpora import TUNE_EVERY
    from .evaluate import perplexity, torch_logits_fn
    from .prune import prune_model
    from .search import search_ratio

    cfg = ctx.config
    tune = [t for c in corpora.values() for t in c.tune]
    if not tune:
        raise UserError("--max-ppl-ratio needs calibration documents held apart from scoring; the expert's corpora "
                        f"have too few (at least {2 * TUNE_EVERY} documents each)")
    dense_ppl = perplexity(torch_logits_fn(model), tok, tune)

    probes = {}  # ratio -> (expert, record); only passing probes are kept, and only the largest

    def measure(ratio: float) -> float:
        expert = copy.deepcopy(model)
        rec = prune_model(expert, scores, list(corpora), cfg.method, ratio, dict(cfg.method_options),
                          tokenizer=tok, corpora=corpora)
        ppl = perplexity(torch_logits_fn(expert), tok, tune)
        if ppl <= cfg.max_ppl_ratio * dense_ppl and all(ratio > r for r in probes):
            probes.clear()
            probes[ratio] = (expert, rec)
        return ppl

    ctx.progress.start(f"searching the ratio for perplexity <= {cfg.max_ppl_ratio}x dense")
    search = search_ratio(measure, dense_ppl, cfg.max_ppl_ratio,
                          on_point=lambda p: ctx.progress.update(f"ratio {p.ratio:.2f}: {p.ppl_ratio:.2f}x dense"))
    return search, probes[search["ratio"]]


class ExportStage(Stage):
    name = "export"
    depends = ("prune",)

    def config_keys(self):
        return ("target", "precision")

    def run(self, ctx, work):
        import inspect

        from .expert_io import load_expert
        from .export import export_model

        # export_model reports its steps (trace, graph passes, quantize, parity) when it can
        takes_steps = "on_step" in inspect.signature(export_model).parameters

        def steps(side):
            return {"on_step": lambda step: ctx.progress.update(description=f"export {side}: {step}")} \
                if takes_steps else {}

        from .corpora import ExpertSpec, calibration_documents

        # the gate reads the expert's eval split beside the general one; weights on no 4-bit grid are quantized
        # on the expert's calibration documents (scoring and held-apart ones)
        calibration = calibration_documents(ExpertSpec.parse(ctx.config.expert).corpora())
        ctx.progress.start("export dense", total=2)
        model, tok = ctx.dense()
        dense_manifest = export_model(model, tok, ctx.config.target, work / "dense", precision=ctx.config.precision,
                                      held_out=ctx.config.expert, calibration=calibration, **steps("dense"))
        ctx.progress.update(description="export expert", advance=1)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
        expert_manifest = export_model(expert, etok, ctx.config.target, work / "expert",
                                       precision=ctx.config.precision, held_out=ctx.config.expert,
                                       calibration=calibration, **steps("expert"))
        ctx.progress.update(advance=1)
        return {"dense": _manifest_summary(dense_manifest), "expert": _manifest_summary(expert_manifest)}


def _manifest_summary(manifest: dict) -> dict:
    keys = ("precision", "parity", "total_bytes", "parameters")
    return {k: manifest.get(k) for k in keys}


def _default_stages() -> list[Stage]:
    # the later stages know nothing of the pipeline: they build on stages.py only
    from .bench import BenchStage
    from .generate import GenerateStage
    from .report import ReportStage
    from .validate import ValidateStage

    return [LoadStage(), ScoreStage(), PruneStage(), ExportStage(), ValidateStage(), BenchStage(),
            GenerateStage(), ReportStage()]


STAGES: list[Stage] = _default_stages()


def register_stage(stage: Stage) -> None:
    """Add a stage at the end of the pipeline (once per name)."""
    if all(s.name != stage.name for s in STAGES):
        STAGES.append(stage)


def _finished(ctx: BuildContext, stage: Stage, fp: str) -> bool:
    record = ctx.stage_dir(stage.name) / "stage.json"
    if not record.exists():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def _finished_stages(out: Path) -> list[str]:
    return [s.name for s in STAGES if (out / s.name / "stage.json").is_file()]


def _clear_leftovers(out: Path) -> None:
    """Temporary stage directories a killed run left behind (a finished stage was renamed away)."""
    for stage in STAGES:
        for tmp in out.glob(f".{stage.name}.tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def build(config: BuildConfig, out: Path, *, on_stage=None, progress: Progress | None = None,
          capture_output: bool = False) -> dict:
    """Run every stage in order, skipping finished ones; returns {stage: its record}.

    `on_stage(name, state)` hears "skipped (unchanged)", "running" and "done in S s"; `progress`
    hears what a running stage is doing. With `capture_output`, everything libraries print or log
    goes to `<out>/build.log` instead of the terminal."""
    from .console import captured

    out = Path(out).resolve()  # stages hand paths to worker processes with their own working directory
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(out)
    try:
        with captured(out / LOG_FILE) if capture_output else contextlib.nullcontext():
            (out / "build.json").write_text(json.dumps(asdict(config), indent=2))
            return _run_stages(BuildContext(config, out, progress), on_stage)
    except BaseException as exc:
        done = _finished_stages(out)
        if not done and created:  # nothing worth resuming: leave no debris
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, UserError) and done:
            raise UserError(f"{exc}; finished stages kept in {out} ({', '.join(done)}): "
                            "run the same command again to resume") from None
        raise


def _run_stages(ctx: BuildContext, on_stage) -> dict:
    out, records = ctx.out, {}
    for stage in STAGES:
        fp = stage.fingerprint(ctx)
        final = ctx.stage_dir(stage.name)
        if _finished(ctx, stage, fp):
            records[stage.name] = json.loads((final / "stage.json").read_text())
            # the stages after it see this run of it, not only its config: one that ran again (its directory
            # deleted, e.g. to re-measure speed on a quiet machine) runs the stages that read its results again
            ctx.fingerprints[stage.name] = f"{fp}@{records[stage.name].get('finished')}"
            if on_stage:
                on_stage(stage.name, "skipped (unchanged)")
            continue
        if on_stage:
            on_stage(stage.name, "running")
        work = Path(tempfile.mkdtemp(prefix=f".{stage.name}.tmp-", dir=out))
        t0 = time.time()
        ctx.progress.begin(stage.name, stage.own_progress)
        try:
            result = stage.run(ctx, work)
        except UserError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise UserError(f"stage '{stage.name}' failed: {exc}") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            ctx.progress.end()
        record = {"stage": stage.name, "fingerprint": fp, "seconds": round(time.time() - t0, 2),
                  "finished": time.time(), "result": result}
        ctx.fingerprints[stage.name] = f"{fp}@{record['finished']}"
        (work / "stage.json").write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        records[stage.name] = record
        if on_stage:
            on_stage(stage.name, f"done in {record['seconds']:.1f} s")
    return records
