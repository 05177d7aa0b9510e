"""The `build` pipeline: load -> score -> prune -> export -> validate -> bench -> generate -> report.

Each stage is a small class (Olive-pass style, base in `stages.py`) with a fingerprint of its config,
upstream stages and code, and one `run` that writes into a fresh directory. A finished stage leaves
`<out>/<stage>/stage.json` with its fingerprint; a re-run skips stages whose fingerprint is unchanged,
so an interrupted build resumes from the last finished stage. A stage is written into a temporary
directory (`.<stage>.tmp-*`) and renamed when complete; a resumed build clears those a killed run left.
A build that fails before any stage finished removes what it wrote (the directory too, when it made it).
One run at a time writes a build directory (an advisory lock), and only into its own (outputs.py).
"""

from __future__ import annotations

import contextlib
import hashlib
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
TMP_DIR = ".tmp"  # temporary files of the libraries while a build runs


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
        return ("expert", "ratio", "method", "method_options", "prune_vocab", "max_ppl_ratio", "beat_baseline")

    def fingerprint(self, ctx):
        fp = super().fingerprint(ctx)
        if not _searching(ctx.config):
            return fp
        # a search judges each ratio on the artifact as it would ship: its plan and target choose the ratio too
        shipped = json.dumps([ctx.config.quant_plan, ctx.config.precision, ctx.config.target])
        return hashlib.sha256(f"{fp}:{shipped}".encode()).hexdigest()[:16]

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
        if _searching(cfg):
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


def _searching(cfg) -> bool:
    return cfg.max_ppl_ratio is not None or cfg.beat_baseline


SEARCH_DOCUMENTS = 32  # calibration documents (scoring ones, never held apart) that round a probe's weights
SEARCH_TOKENS = 256


def _search_ratio(ctx, model, tok, scores, corpora) -> tuple[dict, tuple]:
    """The ratio search of a quality-target build, on the corpora's held-apart `tune` documents, each ratio judged
    as it would ship: at int4, its weights rounded by the build's plan in PyTorch (export/simulate.py: the
    artifact's logits up to the kernel's int8 activations), without exporting. The limit is --max-ppl-ratio times
    the dense model's perplexity there (PyTorch fp32), or with --beat-baseline the perplexity of what a user would
    otherwise ship (the GenAI builder's int4 of the dense model, run in ONNX Runtime on the same documents).
    Returns the search record and (expert, prune record) of the chosen ratio's probe."""
    import copy

    from .corpora import TUNE_EVERY
    from .evaluate import perplexity, torch_logits_fn
    from .prune import prune_model
    from .search import search_ratio
    from .targets import resolve_target

    cfg = ctx.config
    tune = [t for c in corpora.values() for t in c.tune]
    flag = "--beat-baseline" if cfg.beat_baseline else "--max-ppl-ratio"
    if not tune:
        raise UserError(f"{flag} needs calibration documents held apart from scoring; the expert's corpora "
                        f"have too few (at least {2 * TUNE_EVERY} documents each)")
    precision = cfg.precision or resolve_target(cfg.target).precision
    shipped = _as_shipped(tok, corpora, precision, cfg.quant_plan)
    if cfg.beat_baseline:
        from .baseline import builder_artifact
        from .runtime import OnnxCausalLM

        ctx.progress.start("measuring the GenAI builder's int4 on held-apart documents")
        reference_ppl, factor = perplexity(OnnxCausalLM(builder_artifact(cfg.model)).logits_fn, tok, tune), 1.0
        reference = "the GenAI builder's int4 of the dense model (ONNX Runtime)"
    else:
        reference_ppl, factor = perplexity(torch_logits_fn(model), tok, tune), cfg.max_ppl_ratio
        reference = "the dense model (PyTorch fp32)"

    probes = {}  # ratio -> (expert, record); only passing probes are kept, and only the largest

    def measure(ratio: float) -> float:
        expert = copy.deepcopy(model)
        rec = prune_model(expert, scores, list(corpora), cfg.method, ratio, dict(cfg.method_options),
                          tokenizer=tok, corpora=corpora)
        ppl = perplexity(torch_logits_fn(shipped(expert)), tok, tune)
        if ppl <= factor * reference_ppl and all(ratio > r for r in probes):
            probes.clear()
            probes[ratio] = (expert, rec)
        return ppl

    ctx.progress.start(f"searching the ratio for perplexity <= {factor}x {reference}")
    search = search_ratio(measure, reference_ppl, factor,
                          on_point=lambda p: ctx.progress.update(f"ratio {p.ratio:.2f}: {p.ppl_ratio:.2f}x"),
                          what_to_do="raise --max-ppl-ratio or use --ratio" if not cfg.beat_baseline else
                          "this expert cannot match the baseline: use --ratio, or ship the dense model")
    search.update({"judged_as": f"{precision}" + (f", {cfg.quant_plan} plan (simulated in PyTorch)"
                                                   if precision == "int4" else " (PyTorch)"),
                   "reference": reference})
    return search, probes[search["ratio"]]


def _as_shipped(tok, corpora, precision: str, plan: str):
    """model -> the same model as an int4 export of `plan` would store its weights (itself for other precisions)."""
    if precision != "int4":
        return lambda model: model
    from .export.calibration import calibrated_linears, input_grams
    from .export.simulate import quantized_copy

    texts = [t for c in corpora.values() for t in c.calib]
    texts = [texts[i * len(texts) // SEARCH_DOCUMENTS] for i in range(min(SEARCH_DOCUMENTS, len(texts)))]

    def shipped(model):
        names = calibrated_linears(model, plan)
        grams = input_grams(model, tok, texts, names, max_tokens=SEARCH_TOKENS) if names else {}
        return quantized_copy(model, plan, grams)

    return shipped


class ExportStage(Stage):
    name = "export"
    depends = ("prune",)

    def config_keys(self):
        return ("target", "precision", "quant_plan")

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
                                      held_out=ctx.config.expert, calibration=calibration,
                                      quant_plan=ctx.config.quant_plan, **steps("dense"))
        ctx.progress.update(description="export expert", advance=1)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
        expert_manifest = export_model(expert, etok, ctx.config.target, work / "expert",
                                       precision=ctx.config.precision, held_out=ctx.config.expert,
                                       calibration=calibration, quant_plan=ctx.config.quant_plan, **steps("expert"))
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
          capture_output: bool = False, force: bool = False, inputs=()) -> dict:
    """Run every stage in order, skipping finished ones (every one with `force`); returns {stage: its record}.

    `out` is a new or empty directory, or a build directory to resume (it holds build.json); anything else is
    refused, as is a second run while one writes there (outputs.py). `inputs`: paths `out` may not be in.
    `on_stage(name, state)` hears "skipped (unchanged)", "running" and "done in S s"; `progress`
    hears what a running stage is doing. With `capture_output`, everything libraries print or log
    goes to `<out>/build.log` instead of the terminal."""
    from . import outputs
    from .console import captured

    out = Path(out).expanduser().resolve()  # stages hand paths to worker processes with their own working directory
    with outputs.BuildLock(out, inputs) as lock:
        ours = [name for name in ("build.json", LOG_FILE, TMP_DIR) if not (out / name).exists()]
        _clear_leftovers(out)
        try:
            with outputs.temporary_files_in(out / TMP_DIR), \
                    captured(out / LOG_FILE) if capture_output else contextlib.nullcontext():
                (out / "build.json").write_text(json.dumps(asdict(config), indent=2))
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
    for stage in STAGES:
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
