"""The `cusprun-edge` command line: a thin layer over the stage functions.

Bad input raises UserError anywhere below; `main` prints it as one line on stderr and exits with 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import UserError
from .pipeline.config import BuildConfig

DEFAULTS = BuildConfig()  # each default lives once, in the config

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune a general causal LLM into a small expert (Cus-Prun) and compile it to ONNX for an edge target.",
)

MODEL = typer.Option(DEFAULTS.model, "--model", "-m", help="Embedded name, local HF dir, .gguf file, expert dir or hub id.")
EXPERT = typer.Option(DEFAULTS.expert, "--expert", "-e",
                      help="Expert dimensions, e.g. language=fr,domain=medical,task=qa (a value may be a path to your data).")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow model code from the model's repository to run.")
PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading pickle checkpoints (.bin/.pt): only for sources you trust.")
FORCE = typer.Option(False, "--force", help="Replace the output if it exists.")
PLAN_HELP = ("int4 plan: 'exact' (GGUF grids kept exactly, 8-bit lm_head: closest to fp32) or 'fast' (plain 4-bit "
             "forms ONNX Runtime runs fastest, every weight rounded GPTQ-style; it beats the GenAI builder's int4 on "
             "speed and held-out perplexity) or 'rtn' (fast's forms rounded to nearest, as the builder rounds: minutes "
             "for an 8B model where the others take hours on a small CPU).")
QUANT_PLAN = typer.Option(DEFAULTS.quant_plan, "--quant-plan", help=PLAN_HELP + " Default for a build: fast.")
EXPORT_PLAN = typer.Option("exact", "--quant-plan", help=PLAN_HELP + " Default for a single export: exact.")


def _options(items: list[str]) -> dict:
    """KEY=VALUE pairs for a method's recipe; values parse as JSON when they can (0.9, true, "x")."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--option '{item}' is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _console():
    from rich.console import Console

    return Console()


def _load(model: str, trust_remote_code: bool, allow_pickle: bool):
    from .model.load import load_model

    return load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


JSON_OUT = typer.Option(False, "--json", help="Print JSON (one object per row) instead of a table.")


def _listing(title: str, columns: list[str], rows: list[list[str]], as_json: bool) -> None:
    """A table on a terminal, names whole whatever its width; plain tab-separated rows when piped
    (for grep and cut), or JSON with --json (for jq)."""
    if as_json:
        typer.echo(json.dumps([dict(zip(columns, row)) for row in rows], indent=2))
        return
    if not sys.stdout.isatty():
        for row in rows:
            typer.echo("\t".join(cell.replace("\t", " ").replace("\n", " ") for cell in row))
        return
    from rich.table import Table

    table = Table(title=title)
    widest = max((len(r[0]) for r in rows), default=4)
    table.add_column(columns[0], no_wrap=True, min_width=widest)  # the name is what a user copies
    for col in columns[1:]:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    _console().print(table)


@app.command()
def models(as_json: bool = JSON_OUT):
    """List the embedded models, whether each is installed, and its conversion cache."""
    from .model.load import DEFAULT_MODEL, EMBEDDED, cache_state

    rows = [[name, "yes" if name == DEFAULT_MODEL else "no", entry.description, entry.package,
             "yes" if entry.installed() else "no", cache_state(name)] for name, entry in EMBEDDED.items()]
    _listing("Embedded models", ["name", "default", "model", "package", "installed", "cache"], rows, as_json)


@app.command()
def targets(as_json: bool = JSON_OUT):
    """List the target profiles (built-in; pass a .toml path to --target for your own)."""
    from .config.targets import list_targets

    rows = []
    for t in list_targets():
        providers = ", ".join(p.name.removesuffix("ExecutionProvider") for p in t.providers)
        rows.append([t.name, ", ".join(t.aliases), t.description, providers, t.precision, ", ".join(t.precisions),
                     str(t.opset), str(t.max_sequence_length), str(t.memory_budget_mb)])
    _listing("Target profiles", ["name", "aliases", "description", "providers", "precision", "precisions", "opset",
                                 "max seq", "memory MB"], rows, as_json)


@app.command()
def score(
    model: str = MODEL,
    expert: str = EXPERT,
    all_corpora: bool = typer.Option(False, "--all", help="Score every built-in corpus (serves any expert later)."),
    out: Path = typer.Option(Path("scores.safetensors"), "--out", "-o"),
    force: bool = FORCE,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, or auto (accelerate device map)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    max_length: int = typer.Option(512, "--max-length", min=2),
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
):
    """Score every prunable unit on the expert's calibration corpora (one pass serves every method)."""
    from . import outputs
    from .config.corpora import ExpertSpec, all_builtin_corpora
    from .prune.score import score_model

    spec = None if all_corpora else ExpertSpec.parse(expert)
    out = outputs.check_output(out, kind="file", force=force, owner=outputs.SCORES,
                               inputs=[model, *(spec.user_paths() if spec else ())])
    corpora = all_builtin_corpora() if all_corpora else spec.corpora()
    from .model.load import load_model

    outputs.on_interrupt(f"nothing was written to {out}")
    if device == "cpu":  # the decoder layers are read from disk one at a time (model/lazy.py)
        from .model.lazy import lazy_model

        m, tok = lazy_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    else:
        m, tok = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device)
    scores = score_model(m, tok, corpora, batch_size=batch_size, max_length=max_length)
    with outputs.write_file(out) as path:
        try:
            scores.save(path)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            raise UserError(f"cannot write {out}: {str(exc).strip().splitlines()[0][:200]}; nothing was written") \
                from None
    typer.echo(f"scored {len(corpora)} corpora in {scores.meta['seconds']:.1f} s -> {out}")


@app.command()
def prune(
    model: str = MODEL,
    expert: str = EXPERT,
    method: str = typer.Option("cusprun", "--method", help="cusprun, wanda-sp, flap, seap, magnitude, random, shortgpt."),
    ratio: float = typer.Option(DEFAULTS.ratio, "--ratio", help="Fraction of non-embedding parameters to remove, in (0, 0.9]."),
    scores: Optional[Path] = typer.Option(None, "--scores", help="Score file from `score` (scored now if absent)."),
    option: list[str] = typer.Option([], "--option", help="Method recipe override KEY=VALUE (e.g. tau=1.0)."),
    prune_vocab: bool = typer.Option(False, "--prune-vocab", help="Also trim the vocabulary to the expert's languages: its own tokenizer, embedding and lm_head rows removed."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", min=1, help="With --prune-vocab: keep this many tokens (default: the smallest size within --vocab-floor on held-apart documents)."),
    vocab_floor: Optional[float] = typer.Option(None, "--vocab-floor", min=1.0, help="With --prune-vocab: the chosen size keeps held-apart perplexity per dense token within this factor of the untrimmed expert's (default 1.02)."),
    out: Path = typer.Option(..., "--out", "-o", help="Expert directory to write."),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
    device: str = typer.Option("cpu", "--device", help="Where the reconstruction runs, one layer at a time: cpu, cuda, cuda:1."),
    hf_compat: bool = typer.Option(False, "--hf-compat", help="Also write <out>/hf-compat: a copy zero-padded to the dense widths that stock transformers loads without trust_remote_code. Exact, but it saves nothing: as large and as slow as the dense model."),
):
    """Remove units for real and save the expert as a Hugging Face directory (transformers loads it with
    trust_remote_code=True through the modeling file it carries; --hf-compat adds a copy that needs none)."""
    from . import outputs
    from .config.corpora import ExpertSpec
    from .prune.pruner import prune_and_save, prunes_layer_by_layer
    from .prune.registry import check_options, check_ratio, check_vocab_options, get_method
    from .prune.score import ScoreSet, score_model
    from .prune.vocab import vocab_held_out

    check_ratio(ratio)
    check_vocab_options(prune_vocab, vocab_size, vocab_floor)
    spec = get_method(method)
    expert_spec = ExpertSpec.parse(expert)
    out = outputs.check_output(out, kind="dir", force=force, owner=outputs.EXPERT,
                               inputs=[model, scores, *expert_spec.user_paths()])
    if scores is not None and not scores.is_file():
        raise UserError(f"no score file at {scores}; run `cusprun-edge score` first" if not scores.exists()
                        else f"--scores {scores} is a directory; pass the score file `cusprun-edge score` wrote")
    method_options = _options(option)
    check_options(method, method_options)
    corpora = expert_spec.corpora()
    outputs.on_interrupt(f"nothing was written to {out}")
    if device in (None, "cpu") and prunes_layer_by_layer(method, method_options, prune_vocab):
        from .model.lazy import lazy_model  # one decoder layer in memory at a time

        m, tok = lazy_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    else:
        m, tok = _load(model, trust_remote_code, allow_pickle)
    score_set = None
    if spec.needs_data:
        score_set = ScoreSet.load(scores) if scores else score_model(m, tok, corpora)
    vocab_texts = [t for c in corpora.values() for t in c.calib] if prune_vocab else None
    rec = prune_and_save(m, tok, score_set, list(corpora), method, ratio, out, options=method_options,
                         extra={"expert": expert, "base_model": model}, force=force or out.is_dir(), vocab_texts=vocab_texts,
                         vocab_size=vocab_size, vocab_floor=vocab_floor, vocab_held_out=vocab_held_out(corpora) if prune_vocab else None,
                         corpora=corpora, device=device)
    if hf_compat:
        from .model.expert_io import HF_COMPAT_DIR, write_hf_compat

        try:
            write_hf_compat(out, out / HF_COMPAT_DIR)
        except UserError as exc:
            raise UserError(f"{exc} (the expert itself was written to {out})") from None
    vocab = ""
    if prune_vocab:
        v = rec["vocab"]
        worst = min(v["coverage"].values()) if v["coverage"] else float("nan")
        vocab = f", vocabulary {v['vocab_before']:,} -> {v['vocab_after']:,}, held-out token coverage >= {worst:.2%}"
    typer.echo(f"pruned {rec['achieved_ratio']:.2%} of prunable parameters with {method} "
               f"({rec['params_before']['total']:,} -> {rec['params_after']['total']:,} params{vocab}) -> {out}")


@app.command()
def export(
    model: str = MODEL,
    target: str = typer.Option("x86-cpu", "--target", "-t", help="Profile name or path to a profile .toml."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16, int8, int4 (default: the target's)."),
    quant_plan: str = EXPORT_PLAN,
    out: Path = typer.Option(..., "--out", "-o"),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' own log output."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (ONNX Runtime, per target) or gguf (llama.cpp: one "
                            "model.gguf, per-layer widths, the source GGUF's intact blocks copied)."),
    gguf_type: str = typer.Option("q8_0", "--gguf-type", help="With --format gguf: the type of weights pruning "
                                  "changed (q8_0, q4_0, q4_1, f16, f32)."),
    layer_by_layer: Optional[bool] = typer.Option(
        None, "--layer-by-layer/--whole-model", help="Hold one decoder layer in memory at a time (fp32, int8, int4), "
        "or the whole model (default: one layer at a time above 2 GB of float32 weights)."),
):
    """Compile a model or expert to ONNX artifacts for a target (or to GGUF for llama.cpp), with a manifest."""
    if fmt not in ("onnx", "gguf"):
        raise UserError(f"--format must be onnx or gguf, got '{fmt}'")
    if fmt == "gguf":
        from . import outputs
        from .export.gguf import export_gguf_source, summary_line

        out = outputs.check_output(out, kind="dir", force=force, owner=outputs.GGUF_EXPORT, inputs=[model])
        outputs.on_interrupt(f"nothing was written to {out}")
        manifest = export_gguf_source(model, out, requant=gguf_type, force=force or out.is_dir(),
                                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        typer.echo(f"exported {summary_line(manifest)} -> {out}")
        return
    import shutil

    from . import outputs
    from .config.targets import resolve_target
    from .export import export_model
    from .export.build import load_for_export
    from .library_logs import captured, show_library_logs
    from .pipeline.check import check_precision

    profile = resolve_target(target)
    check_precision(profile, precision)
    out = outputs.check_output(out, kind="dir", force=force, owner=outputs.EXPORT,
                               inputs=[model, profile.path or None])
    outputs.on_interrupt(f"nothing was written to {out}")
    replace = force or out.is_dir()  # checked above: an empty directory, or our own export with --force
    if verbose:
        show_library_logs()
        m, tok = load_for_export(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                 layer_by_layer=layer_by_layer)
        manifest = export_model(m, tok, profile, out, precision=precision, force=replace, quant_plan=quant_plan)
    else:  # library output goes to OUT/export.log (written in OUT's staging directory meanwhile)
        with outputs.staging(out) as stage:
            with captured(stage.path):
                m, tok = load_for_export(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                         layer_by_layer=layer_by_layer)
                manifest = export_model(m, tok, profile, out, precision=precision, force=replace,
                                        quant_plan=quant_plan)
            shutil.move(str(stage.path), out / "export.log")
    typer.echo(f"exported {manifest.get('precision')} for {profile.name} -> {out}")


@app.command()
def build(
    ctx: typer.Context,
    target: str = typer.Option(DEFAULTS.target, "--target", "-t"),
    model: str = MODEL,
    expert: str = EXPERT,
    ratio: float = typer.Option(DEFAULTS.ratio, "--ratio"),
    method: str = typer.Option(DEFAULTS.method, "--method"),
    precision: Optional[str] = typer.Option(None, "--precision"),
    quant_plan: str = QUANT_PLAN,
    option: list[str] = typer.Option([], "--option"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    quick_bench: bool = typer.Option(False, "--quick-bench", help="Shorter benchmark (fewer tokens and repetitions)."),
    prompt: list[str] = typer.Option([], "--prompt", help="Your own prompt for dense and expert to answer in the "
                                                           "report (repeatable)."),
    prune_vocab: bool = typer.Option(False, "--prune-vocab", help="Also trim the vocabulary to the expert's languages "
                                     "(its own tokenizer; the size is chosen on held-apart documents)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="With --prune-vocab: keep this many tokens "
                                             "(default: the smallest size within --vocab-floor on held-apart documents)."),
    vocab_floor: Optional[float] = typer.Option(None, "--vocab-floor", help="With --prune-vocab: the chosen size keeps "
                                                "held-apart perplexity per dense token within this factor of the "
                                                "untrimmed expert's (default 1.02)."),
    max_ppl_ratio: Optional[float] = typer.Option(
        None, "--max-ppl-ratio", help="Search the largest ratio whose perplexity on calibration documents held apart "
        "from scoring stays within this factor of dense (e.g. 1.2); --ratio is then ignored."),
    beat_baseline: bool = typer.Option(
        DEFAULTS.beat_baseline, "--beat-baseline/--no-beat-baseline",
        help="Search the largest ratio whose int4 artifact (judged on calibration documents "
        "held apart from scoring, as the plan would ship it) is no worse than ONNX Runtime GenAI's builder int4 of "
        "the dense model; --ratio is then ignored."),
    baseline: bool = typer.Option(DEFAULTS.baseline, "--baseline/--no-baseline",
                                  help="Measure ONNX Runtime GenAI's builder int4 of the dense model beside ours (built "
                                       "once per model and cached); the verdict compares the expert with it."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe.toml (every build writes the one it ran "
                                          "into its directory); options given on the command line override it."),
    out: Path = typer.Option(Path("build/expert"), "--out", "-o"),
    force: bool = typer.Option(False, "--force", help="Run every stage again (this build's finished stages are "
                               "replaced; nothing else in --out is touched)."),
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the libraries' own log output (else it goes to OUT/build.log)."),
    fmt: list[str] = typer.Option(["onnx"], "--format", help="gguf: also write the expert as a GGUF for llama.cpp "
                                  "and check it there (stage gguf, after the ONNX stages the report reads)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="e.g. 8GB: refuse, before it starts, a build "
                                             "whose estimated peak memory in some stage is over it."),
):
    """Run load, score, prune, export, validate, bench, generate and report; finished stages are skipped."""
    from . import outputs
    from .console import RichProgress
    from .library_logs import show_library_logs
    from .pipeline.build import LOG_FILE, interrupt_note
    from .pipeline.build import build as run_build
    from .pipeline.check import check_config, config_inputs

    # every check that needs no model runs before anything loads or any directory appears
    given = {"target": target, "model": model, "expert": expert, "ratio": ratio, "method": method,
             "precision": precision, "quant_plan": quant_plan, "method_options": _options(option), "threads": threads,
             "quick_bench": quick_bench, "prompts": prompt, "prune_vocab": prune_vocab,
             "vocab_size": vocab_size, "vocab_floor": vocab_floor,
             "max_ppl_ratio": max_ppl_ratio, "beat_baseline": beat_baseline, "baseline": baseline,
             "trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle, "max_memory": max_memory,
             "formats": sorted({f.strip() for item in fmt for f in item.split(",") if f.strip()} | {"onnx"},
                               key=lambda f: f != "onnx")}
    params = {"method_options": "option", "prompts": "prompt", "formats": "fmt"}  # field -> CLI parameter
    if recipe is not None:  # the recipe, then what the command line says
        base = BuildConfig.from_recipe(recipe).as_dict()
        # (by the source's name: typer may carry its own click, whose enum is not click's)
        given = {k: v for k, v in given.items()
                 if getattr(ctx.get_parameter_source(params.get(k, k)), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
        given = base | given
    cfg = check_config(BuildConfig.from_dict({k: v for k, v in given.items() if v is not None}))
    inputs = [*config_inputs(cfg), recipe]
    out = outputs.check_build_directory(out, inputs)
    if verbose:
        show_library_logs()
    progress = RichProgress()

    def on_stage(name, state):
        if state != "running":  # one line per stage, once it is done or skipped
            progress.line(f"[bold]{name:<9}[/bold] {state}", markup=True)

    started = time.time()
    outputs.on_interrupt(lambda: interrupt_note(out))
    run_build(cfg, out, on_stage=on_stage, progress=progress, capture_output=not verbose, force=force, inputs=inputs)
    report = out / "report" / "report.html"
    progress.line(f"build complete in {time.time() - started:.0f} s: {out}" + ("" if verbose else f" (library output: {out / LOG_FILE})"))
    if report.exists():
        verdict = json.loads((out / "report" / "report.json").read_text()).get("verdict")
        if verdict:
            progress.line(verdict)
        progress.line(f"report: {report}")


@app.command()
def validate(
    dense: str = typer.Option(..., "--dense", help="The dense model (embedded name, .gguf, HF directory)."),
    expert_artifact: Path = typer.Option(..., "--expert-artifact", help="The expert's export directory (manifest.json)."),
    text: list[Path] = typer.Option([], "--text", help="Extra held-out text (blank-line separated documents); repeatable."),
    expert: Optional[str] = typer.Option(None, "--expert", "-e",
                                         help="Expert spec whose eval corpora to use (default: recorded in the export)."),
    dense_artifact: Optional[Path] = typer.Option(None, "--dense-artifact",
                                                  help="Run the dense model from its own export instead of PyTorch."),
    max_docs: Optional[int] = typer.Option(None, "--max-docs", min=1, help="At most this many documents per category."),
    max_length: int = typer.Option(512, "--max-length", min=2),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    out: Path = typer.Option(Path("validate.json"), "--out", "-o"),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
):
    """Dense vs expert on held-out text: perplexity, accuracy, agreement, KL and retention per category."""
    from rich.table import Table

    from . import outputs
    from .fsutil import write_json
    from .measure.validate import validate as run_validate

    out = outputs.check_output(out, kind="file", force=force, owner=outputs.json_record("a validate record",
                                                                                        "categories", "overall"),
                               inputs=[dense, expert_artifact, dense_artifact, *text])
    outputs.on_interrupt(f"nothing was written to {out}")
    record = run_validate(dense, expert_artifact, texts=text, expert=expert, dense_artifact=dense_artifact,
                          out=None, threads=threads, max_docs=max_docs, max_length=max_length,
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    overall = record["overall"]
    if all(overall[side].get(k) is None for side in ("dense", "expert") for k in ("ppl", "acc")):
        raise UserError("validation measured nothing (no held-out token or item was scored); nothing was written")
    with outputs.write_file(out) as path:
        write_json(path, record)
    table = Table(title="Held-out quality: dense vs expert")
    for col in ("category", "dense ppl", "expert ppl", "ppl retention", "dense acc", "expert acc",
                "acc retention", "top-1 agree", "KL"):
        table.add_column(col)

    def f(v):
        return "-" if v is None else f"{v:.4g}"

    for name, r in [*record["categories"].items(), ("overall", record["overall"])]:
        table.add_row(name, f(r["dense"].get("ppl")), f(r["expert"].get("ppl")), f(r["retention"].get("ppl")),
                      f(r["dense"].get("acc")), f(r["expert"].get("acc")), f(r["retention"].get("acc")),
                      f(r.get("top1_agreement")), f(r.get("kl")))
    _console().print(table)
    typer.echo(f"wrote {out}")


@app.command()
def bench(
    artifact: list[Path] = typer.Option(..., "--artifact", help="Export directory; repeat to compare (dense and expert)."),
    providers: Optional[str] = typer.Option(None, "--providers",
                                            help="Comma-separated: cpu,cuda,tensorrt,... (default: the target's; CPU always)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Take the providers from this target profile."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Intra-op threads (default: the target's)."),
    quick: bool = typer.Option(False, "--quick", help="Shorter prompts, fewer tokens and repetitions."),
    out: Path = typer.Option(Path("bench.json"), "--out", "-o"),
    force: bool = FORCE,
):
    """Latency, tokens/s, peak memory and size of exported artifacts, side by side, per execution provider."""
    from rich.table import Table

    from . import outputs
    from .fsutil import write_json
    from .measure.bench import bench as run_bench
    from .measure.bench import summary_rows

    out = outputs.check_output(out, kind="file", force=force, owner=outputs.json_record("a bench record",
                                                                                        "providers", "speedup"),
                               inputs=artifact)
    outputs.on_interrupt(f"nothing was written to {out}")
    names = [p for p in (providers or "").split(",") if p.strip()] or None
    with outputs.staging(out) as stage:  # the workers' temporary files live in OUT's staging directory
        record = run_bench(artifact, providers=names, target=target, threads=threads, quick=quick, out=None)
        failed = [f"{r['artifact']} on {r['provider'].replace('ExecutionProvider', '')}: "
                  + r["status"].removeprefix("error: ").removeprefix("UserError: ")
                  for r in summary_rows(record) if r["status"].startswith("error")]
        if failed or not any(r["status"] == "measured" for r in summary_rows(record)):
            raise UserError(f"benchmark failed, nothing was written: {'; '.join(failed) or 'no provider ran'}")
        write_json(stage.path, record)
        stage.commit()
    table = Table(title="Benchmark (p50 after warm-up)")
    for col in ("provider", "artifact", "prefill ms by prompt", "decode ms/tok p50/p90", "tok/s", "peak MB",
                "session s", "MB on disk"):
        table.add_column(col, overflow="fold")
    for row in summary_rows(record):
        if row["status"] != "measured":
            status, _, reason = row["status"].partition(": ")
            table.add_row(row["provider"].replace("ExecutionProvider", ""), status if row["artifact"] == "-"
                          else f"{row['artifact']} ({status})", reason)
            continue
        table.add_row(row["provider"].replace("ExecutionProvider", ""), row["artifact"],
                      ", ".join(f"{n}: {v:.1f}" for n, v in row["prefill_ms"].items()),
                      f"{row['decode_ms']:.2f} / {row['decode_p90_ms']:.2f}", f"{row['decode_tok_s']:.1f}",
                      f"{row['peak_rss_mb']:.0f}", f"{row['session_s']:.2f}", f"{row['file_bytes'] / 2**20:.1f}")
    _console().print(table)
    for provider, ratios in record["speedup"].items():
        for label, s in ratios.items():
            if "decode" in s:
                typer.echo(f"{label} vs {record['baseline']} on {provider}: decode {s['decode']:.2f}x")
    typer.echo(f"wrote {out}")


@app.command()
def report(
    build_dir: Path = typer.Argument(..., help="A build directory (`cusprun-edge build --out`)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write (default BUILD_DIR/report)."),
    compare: list[Path] = typer.Option([], "--compare", help="Other build directories for quality vs ratio."),
    force: bool = typer.Option(False, "--force", help="Replace a report directory written before (with --out)."),
):
    """Write report.json, report.md and a self-contained report.html for a build."""
    import os

    from . import outputs
    from .report.collect import read_build
    from .report.render import report as run_report

    read_build(build_dir)  # no build directory: one line, before anything is written
    where = out or build_dir / "report"
    if out is None:  # the build's own report, written again: only its report files are replaced
        if where.is_dir() and any(where.iterdir()):
            outputs.check_replaceable(where, outputs.REPORT)
    else:
        where = outputs.check_output(out, kind="dir", force=force, owner=outputs.REPORT, inputs=[build_dir, *compare])
    outputs.on_interrupt(f"nothing was written to {where}")
    with outputs.staging(where, "dir") as stage:
        data = run_report(build_dir, out=stage.path, compare=compare)
        if out is None and where.is_dir():
            for f in stage.path.iterdir():
                os.replace(f, where / f.name)
            stage.committed = True
        else:
            stage.commit()
    typer.echo(f"wrote {where / 'report.json'}, {where / 'report.md'}, {where / 'report.html'} "
               f"({len(data['plots'])} plots)")


def main() -> None:
    from . import outputs

    outputs.on_interrupt(None)  # each command says what an interrupt keeps once it knows its output
    try:
        # typer catches KeyboardInterrupt inside a command and returns 130 instead of raising it
        code = app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except SystemExit:
        raise
    except OSError as exc:  # a full disk, a read-only file system: the user's to fix, in one line
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; nothing was written", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:
        # usage errors of the (vendored) click arrive here in non-standalone mode: print them as one line
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise
    if code == 130:
        print(outputs.interrupt_message(), file=sys.stderr)
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
