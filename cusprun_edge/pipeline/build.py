"""The `build` pipeline: load -> score -> prune -> export -> validate -> bench -> generate -> report.

Each stage is a small class (Olive-pass style: base in stage.py, the stages in stages.py) with a fingerprint of its config,
upstream stages and code, and one `run` that writes into a fresh directory. A finished stage leaves
`<out>/<stage>/stage.json` with its fingerprint; a re-run skips stages whose fingerprint is unchanged,
so an interrupted build resumes from the last finished stage. A stage is written into a temporary
directory (`.<stage>.tmp-*`) and renamed when complete; a resumed build clears those a killed run left.
A build that fails before any stage finished removes what it wrote (the directory too, when it made it).
One run at a time writes a build directory (an advisory lock), and only into its own (outputs.py).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..measure.memory import format_size, measured
from . import stages
from .config import RECIPE_FILE, BuildConfig
from .stage import BuildContext, Progress, Stage

__all__ = ["BuildConfig", "BuildContext", "Stage", "STAGES", "build", "register_stage"]

LOG_FILE = "build.log"
TMP_DIR = ".tmp"  # temporary files of the libraries while a build runs


def _default_stages() -> list[Stage]:
    return [stages.LoadStage(), stages.ScoreStage(), stages.PruneStage(), stages.ExportStage(),
            stages.ValidateStage(), stages.BenchStage(), stages.GenerateStage(), stages.ReportStage()]


STAGES: list[Stage] = _default_stages()


def register_stage(stage: Stage) -> None:
    """Add a stage at the end of every build's pipeline (once per name): a plug-in's own stage."""
    if all(s.name != stage.name for s in STAGES):
        STAGES.append(stage)


def stages_for(config: BuildConfig) -> list[Stage]:
    """The stages a build runs: the ONNX pipeline, with one stage per extra format (the config's or the target
    profile's) before the report, which then reads it too (its fingerprint follows the extra stage)."""
    from .check import build_formats

    if "gguf" not in build_formats(config) or any(s.name == "gguf" for s in STAGES):
        return list(STAGES)
    report = next(i for i, s in enumerate(STAGES) if s.name == "report")
    reads_gguf = stages.ReportStage()
    reads_gguf.depends = (*reads_gguf.depends, "gguf")
    return [*STAGES[:report], stages.GGUFStage(), reads_gguf, *STAGES[report + 1:]]


def _finished(ctx: BuildContext, stage: Stage, fp: str) -> bool:
    record = ctx.stage_dir(stage.name) / "stage.json"
    if not record.exists():
        return False
    try:
        return json.loads(record.read_text()).get("fingerprint") == fp
    except json.JSONDecodeError:
        return False


def _stage_names() -> list[str]:
    """Every stage a build can run: the pipeline's and those a format adds."""
    return [*(s.name for s in STAGES), *(n for n in (stages.GGUFStage.name,) if all(s.name != n for s in STAGES))]


def _finished_stages(out: Path) -> list[str]:
    return [name for name in _stage_names() if (out / name / "stage.json").is_file()]


def _clear_leftovers(out: Path) -> None:
    """Temporary stage directories a killed run left behind (a finished stage was renamed away)."""
    for name in _stage_names():
        for tmp in out.glob(f".{name}.tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def build(config: BuildConfig, out: Path, *, on_stage=None, progress: Progress | None = None,
          capture_output: bool = False, force: bool = False, inputs=()) -> dict:
    """Run every stage in order, skipping finished ones (every one with `force`); returns {stage: its record}.

    `out` is a new or empty directory, or a build directory to resume (it holds build.json); anything else is
    refused, as is a second run while one writes there (outputs.py). `inputs`: paths `out` may not be in.
    `on_stage(name, state)` hears "skipped (unchanged)", "running" and "done in S s"; `progress`
    hears what a running stage is doing. With `capture_output`, everything libraries print or log
    goes to `<out>/build.log` instead of the terminal."""
    from .. import outputs
    from ..library_logs import captured

    out = Path(out).expanduser().resolve()  # stages hand paths to worker processes with their own working directory
    if config.max_memory is not None:  # refused before any directory appears (memory_plan.py)
        from .memory_plan import check_memory

        check_memory(config, config.max_memory)
    with outputs.BuildLock(out, inputs) as lock:
        ours = [name for name in ("build.json", RECIPE_FILE, LOG_FILE, TMP_DIR) if not (out / name).exists()]
        _clear_leftovers(out)
        try:
            with outputs.temporary_files_in(out / TMP_DIR), \
                    captured(out / LOG_FILE) if capture_output else contextlib.nullcontext():
                (out / "build.json").write_text(json.dumps(config.as_dict(), indent=2))
                (out / RECIPE_FILE).write_text(config.recipe_text())  # `build --recipe` runs this build again
                return _run_stages(BuildContext(config, out, progress), on_stage, rerun=force)
        except BaseException as exc:
            done = _finished_stages(out)
            if not done:  # nothing worth resuming: leave no debris (what we wrote, the directories we made)
                for name in ours:
                    path = out / name
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                lock.remove_created()
            if isinstance(exc, UserError) and done:
                raise UserError(f"{exc}; finished stages kept in {out} ({', '.join(done)}): "
                                "run the same command again to resume") from None
            raise
        finally:
            shutil.rmtree(out / TMP_DIR, ignore_errors=True)


def interrupt_note(out) -> str:
    """What an interrupted build kept, for the CLI's one line."""
    out = Path(out).expanduser()
    done = _finished_stages(out) if out.is_dir() else []
    if not done:
        return "no stage had finished, nothing was kept"
    return f"finished stages kept in {out} ({', '.join(done)}): run the same command again to resume"


def _run_stages(ctx: BuildContext, on_stage, rerun: bool = False) -> dict:
    out, records = ctx.out, {}
    for stage in stages_for(ctx.config):
        fp = stage.fingerprint(ctx)
        final = ctx.stage_dir(stage.name)
        if (final.exists() or final.is_symlink()) and not (final / "stage.json").is_file():
            raise UserError(f"{final} is not a stage this build wrote (no stage.json); move it away, nothing in it "
                            "was touched")
        if not rerun and _finished(ctx, stage, fp):
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
        ctx.progress.begin(stage.name, stage.own_progress)
        try:
            with measured() as span:
                result = stage.run(ctx, work)
        except UserError as exc:
            shutil.rmtree(work, ignore_errors=True)
            raise UserError(f"stage '{stage.name}' failed: {exc}") from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            ctx.progress.end()
        record = {"stage": stage.name, "fingerprint": fp, **span.record(), "finished": time.time(), "result": result}
        ctx.fingerprints[stage.name] = f"{fp}@{record['finished']}"
        (work / "stage.json").write_text(json.dumps(record, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        records[stage.name] = record
        if on_stage:
            on_stage(stage.name, f"done in {record['seconds']:.1f} s, peak memory {format_size(span.peak_bytes)}")
    return records
