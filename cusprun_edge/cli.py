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

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune a general causal LLM into a small expert (Cus-Prun) and compile it to ONNX for an edge target.",
)

MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Embedded name, local HF dir, .gguf file, expert dir or hub id.")
EXPERT = typer.Option("language=en,domain=general", "--expert", "-e",
                      help="Expert dimensions, e.g. language=fr,domain=medical,task=qa (a value may be a path to your data).")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow model code from the model's repository to run.")
PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading pickle checkpoints (.bin/.pt): only for sources you trust.")
FORCE = typer.Option(False, "--force", help="Replace the output if it exists.")


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


def _check_options(method: str, options: dict) -> None:
    from .methods import check_options

    check_options(method, options)


def _check_precision(profile, precision) -> None:
    """A precision the target cannot take is refused before anything loads."""
    if precision is not None and precision not in profile.precisions:
        raise UserError(f"precision '{precision}' is not available for target '{profile.name}'; "
                        f"choose one of {', '.join(profile.precisions)}")


def _console():
    from rich.console import Console

    return Console()


def _load(model: str, trust_remote_code: bool, allow_pickle: bool):
    from .models import load_model

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
    from .models import DEFAULT_MODEL, EMBEDDED, cache_state

    rows = [[name, "yes" if name == DEFAULT_MODEL else "no", entry.description, entry.package,
             "yes" if entry.installed() else "no", cache_state(name)] for name, entry in EMBEDDED.items()]
    _listing("Embedded models", ["name", "default", "model", "package", "installed", "cache"], rows, as_json)


@app.command()
def targets(as_json: bool = JSON_OUT):
    """List the target profiles (built-in; pass a .toml path to --target for your own)."""
    from .targets import list_targets

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
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, or auto (accelerate device map)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_length: int = typer.Option(512, "--max-length"),
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
):
    """Score every prunable unit on the expert's calibration corpora (one pass serves every method)."""
    from .corpora import ExpertSpec, all_builtin_corpora
    from .score import score_model

    corpora = all_builtin_corpora() if all_corpora else ExpertSpec.parse(expert).corpora()
    from .models import load_model

    m, tok = load_model(model, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device)
    scores = score_model(m, tok, corpora, batch_size=batch_size, max_length=max_length)
    scores.save(out)
    typer.echo(f"scored {len(corpora)} corpora in {scores.meta['seconds']:.1f} s -> {out}")


@app.command()
def prune(
    model: str = MODEL,
    expert: str = EXPERT,
    method: str = typer.Option("cusprun", "--method", help="cusprun, wanda-sp, flap, seap, magnitude, random, shortgpt."),
    ratio: float = typer.Option(0.25, "--ratio", help="Fraction of non-embedding parameters to remove, in (0, 0.9]."),
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
    from .corpora import ExpertSpec
    from .methods import get_method
    from .prune import prune_and_save
    from .score import ScoreSet, score_model
    from .vocab import vocab_held_out

    if not 0 < ratio <= 0.9:
        raise UserError(f"--ratio must be in (0, 0.9], got {ratio}")
    if (vocab_size is not None or vocab_floor is not None) and not prune_vocab:
        raise UserError("--vocab-size and --vocab-floor apply to vocabulary trimming; add --prune-vocab")
    spec = get_method(method)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force")
    if scores is not None and not scores.exists():
        raise UserError(f"no score file at {scores}; run `cusprun-edge score` first")
    if force:
        from .expert_io import EXPERT_MARKER
        from .fsutil import check_replaceable

        check_replaceable(out, EXPERT_MARKER, "an expert directory")
    method_options = _options(option)
    _check_options(method, method_options)
    corpora = ExpertSpec.parse(expert).corpora()
    m, tok = _load(model, trust_remote_code, allow_pickle)
    score_set = None
    if spec.needs_data:
        score_set = ScoreSet.load(scores) if scores else score_model(m, tok, corpora)
    vocab_texts = [t for c in corpora.values() for t in c.calib] if prune_vocab else None
    rec = prune_and_save(m, tok, score_set, list(corpora), method, ratio, out, options=method_options,
                         extra={"expert": expert, "base_model": model}, force=force, vocab_texts=vocab_texts,
                         vocab_size=vocab_size, vocab_floor=vocab_floor, vocab_held_out=vocab_held_out(corpora) if prune_vocab else None,
                         corpora=corpora, device=device)
    if hf_compat:
        from .expert_io import HF_COMPAT_DIR, write_hf_compat

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
    out: Path = typer.Option(..., "--out", "-o"),
    force: bool = FORCE,
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show the libraries' own log output."),
):
    """Compile a model or expert to ONNX artifacts for a target, with a parity gate and manifest."""
    import os
    import shutil
    import tempfile

    from .console import captured, show_library_logs
    from .export import export_model
    from .targets import resolve_target

    profile = resolve_target(target)
    _check_precision(profile, precision)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another --out or pass --force")
    if verbose:
        show_library_logs()
        m, tok = _load(model, trust_remote_code, allow_pickle)
        manifest = export_model(m, tok, profile, out, precision=precision, force=force)
    else:  # library output goes to OUT/export.log (in a temporary file while the export is written)
        fd, name = tempfile.mkstemp(prefix="cusprun-export-", suffix=".log")
        os.close(fd)
        log = Path(name)
        try:
            with captured(log):
                m, tok = _load(model, trust_remote_code, allow_pickle)
                manifest = export_model(m, tok, profile, out, precision=precision, force=force)
        except BaseException:
            log.unlink(missing_ok=True)
            raise
        shutil.move(str(log), out / "export.log")
    typer.echo(f"exported {manifest.get('precision')} for {profile.name} -> {out}")


@app.command()
def build(
    target: str = typer.Option("x86-cpu", "--target", "-t"),
    model: str = MODEL,
    expert: str = EXPERT,
    ratio: float = typer.Option(0.25, "--ratio"),
    method: str = typer.Option("cusprun", "--method"),
    precision: Optional[str] = typer.Option(None, "--precision"),
    option: list[str] = typer.Option([], "--option"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    quick_bench: bool = typer.Option(False, "--quick-bench", help="Shorter benchmark (fewer tokens and repetitions)."),
    prompt: list[str] = typer.Option([], "--prompt", help="Your own prompt for dense and expert to answer in the "
                                                           "report (repeatable)."),
    prune_vocab: bool = typer.Option(False, "--prune-vocab", help="Also trim the vocabulary to the expert's languages "
                                     "(its own tokenizer; the size is chosen on held-apart documents)."),
    max_ppl_ratio: Optional[float] = typer.Option(
        None, "--max-ppl-ratio", help="Search the largest ratio whose perplexity on calibration documents held apart "
        "from scoring stays within this factor of dense (e.g. 1.2); --ratio is then ignored."),
    out: Path = typer.Option(Path("build/expert"), "--out", "-o"),
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
    verbose: bool = typer.Option(False, "--verbose", "-v",
                                 help="Show the libraries' own log output (else it goes to OUT/build.log)."),
):
    """Run load, score, prune, export, validate, bench, generate and report; finished stages are skipped."""
    from .console import RichProgress, show_library_logs
    from .corpora import ExpertSpec
    from .pipeline import LOG_FILE, BuildConfig
    from .pipeline import build as run_build
    from .targets import resolve_target

    # every check that needs no model runs before anything loads or any directory appears
    if not 0 < ratio <= 0.9:
        raise UserError(f"--ratio must be in (0, 0.9], got {ratio}")
    method_options = _options(option)
    _check_options(method, method_options)
    ExpertSpec.parse(expert).corpora()
    _check_precision(resolve_target(target), precision)
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be 1 or more, got {threads}")
    if any(not p.strip() for p in prompt):
        raise UserError("--prompt is empty")
    if max_ppl_ratio is not None:
        from .search import check_target

        check_target(max_ppl_ratio)
    cfg = BuildConfig(target=target, model=model, expert=expert, ratio=ratio, method=method, precision=precision,
                      method_options=method_options, threads=threads, trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle, quick_bench=quick_bench, prompts=list(prompt),
                      prune_vocab=prune_vocab, max_ppl_ratio=max_ppl_ratio)
    if verbose:
        show_library_logs()
    progress = RichProgress()

    def on_stage(name, state):
        if state != "running":  # one line per stage, once it is done or skipped
            progress.line(f"[bold]{name:<9}[/bold] {state}", markup=True)

    started = time.time()
    run_build(cfg, out, on_stage=on_stage, progress=progress, capture_output=not verbose)
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
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="At most this many documents per category."),
    max_length: int = typer.Option(512, "--max-length"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    out: Path = typer.Option(Path("validate.json"), "--out", "-o"),
    trust_remote_code: bool = TRUST,
    allow_pickle: bool = PICKLE,
):
    """Dense vs expert on held-out text: perplexity, accuracy, agreement, KL and retention per category."""
    from rich.table import Table

    from .validate import validate as run_validate

    record = run_validate(dense, expert_artifact, texts=text, expert=expert, dense_artifact=dense_artifact,
                          out=out, threads=threads, max_docs=max_docs, max_length=max_length,
                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the target's)."),
    quick: bool = typer.Option(False, "--quick", help="Shorter prompts, fewer tokens and repetitions."),
    out: Path = typer.Option(Path("bench.json"), "--out", "-o"),
):
    """Latency, tokens/s, peak memory and size of exported artifacts, side by side, per execution provider."""
    from rich.table import Table

    from .bench import bench as run_bench
    from .bench import summary_rows

    names = [p for p in (providers or "").split(",") if p.strip()] or None
    record = run_bench(artifact, providers=names, target=target, threads=threads, quick=quick, out=out)
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
):
    """Write report.json, report.md and a self-contained report.html for a build."""
    from .report import report as run_report

    data = run_report(build_dir, out=out, compare=compare)
    where = out or build_dir / "report"
    typer.echo(f"wrote {where / 'report.json'}, {where / 'report.md'}, {where / 'report.html'} "
               f"({len(data['plots'])} plots)")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        # usage errors of the (vendored) click arrive here in non-standalone mode: print them as one line
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            print(f"error: {exc.format_message()}", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
