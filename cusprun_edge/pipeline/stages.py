"""The stages of `build`, in order: load -> score -> prune -> export -> validate -> bench -> generate -> report
(-> gguf with `--format gguf`).

Each is a small class (base in stage.py): its config keys, the stages it depends on, and one `run` that
calls its family's package and writes into a fresh directory. A stage imports its code inside `run`, so its
fingerprint (stage.py: `stage_code`) covers what it runs and nothing the other stages run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .stage import Stage


class LoadStage(Stage):
    name = "load"

    def config_keys(self):
        return ("model", "trust_remote_code", "allow_pickle")

    def run(self, ctx, work):
        from ..model.structure import count_params
        from ..prune.score import model_fingerprint

        ctx.progress.start(f"loading {ctx.config.model}")
        model, _ = ctx.streamed()
        return {"model": ctx.config.model, "model_hash": model_fingerprint(model), "params": count_params(model)}


class ScoreStage(Stage):
    name = "score"
    depends = ("load",)
    own_progress = True  # score_model draws its own bar (layers)

    def config_keys(self):
        return ("expert",)

    def run(self, ctx, work):
        import rich

        from ..config.corpora import ExpertSpec
        from ..prune.score import score_model

        # the dense model's statistics are the same in every build of this model and corpora: kept in the user cache
        key = self.statistics_key(ctx)
        cached = cached_statistics(key, work)
        if cached is not None:
            return {**cached, "from_cache": key}
        model, tok = ctx.streamed()  # one decoder layer in memory at a time
        corpora = ExpertSpec.parse(ctx.config.expert).corpora()
        # its bar draws on rich's console: only on a terminal (piped, it would leave a blank line)
        scores = score_model(model, tok, corpora, show_progress=rich.get_console().is_terminal)
        scores.save(work / "scores.safetensors")
        result = {"corpora": {k: c.sha256() for k, c in corpora.items()}, "seconds": scores.meta["seconds"]}
        store_statistics(key, work, result, files=["scores.safetensors"])
        return result

    def statistics_key(self, ctx) -> str:
        from .stage import content_key

        return content_key(ctx, (LoadStage, ScoreStage), ("model", "trust_remote_code", "allow_pickle", "expert"),
                           what="scores")


class PruneStage(Stage):
    name = "prune"
    depends = ("score",)

    def config_keys(self):
        return ("expert", "ratio", "method", "method_options", "prune_vocab", "vocab_size", "vocab_floor",
                "max_ppl_ratio", "beat_baseline")

    def fingerprint(self, ctx):
        fp = super().fingerprint(ctx)
        if not _searching(ctx.config):
            return fp
        # a search judges each ratio on the artifact as it would ship: its plan and target choose the ratio too
        shipped = json.dumps([ctx.config.quant_plan, ctx.config.precision, ctx.config.target])
        return hashlib.sha256(f"{fp}:{shipped}".encode()).hexdigest()[:16]

    def run(self, ctx, work):
        import copy

        from ..config.corpora import ExpertSpec
        from ..model.shards import reporting_layers
        from ..prune.pruner import prune_and_save
        from ..prune.score import ScoreSet
        from ..prune.vocab import vocab_held_out

        cfg = ctx.config
        model, tok = ctx.streamed() if prunes_streamed(cfg) else ctx.dense()
        scores = ScoreSet.load(ctx.stage_dir("score") / "scores.safetensors")
        corpora = ExpertSpec.parse(cfg.expert).corpora()
        names = list(corpora)
        search, pruned = None, None
        ratio = cfg.ratio
        if _searching(cfg):
            search, pruned = _search_ratio(ctx, model, tok, scores, corpora)
            ratio = search["ratio"]
        what = f"pruning {ratio:.0%} with {cfg.method}"
        ctx.progress.start(what)
        # the search's probe at the chosen ratio is the expert: it is not pruned a second time
        expert, pruned_record = pruned if pruned is not None else (copy.deepcopy(model), None)
        calib = [t for c in corpora.values() for t in c.calib]
        # the damage probes measure the dense model under the uniform plan of these scores, ratio and method: the
        # same in every build of them, kept in the user cache (not for a search, whose probes prune whole models)
        damage_key = None if search is not None else self.damage_key(ctx)
        cached = (cached_statistics(damage_key, work) or {}).get("layer_damage") if damage_key else None
        damage = {**cached, "from_cache": damage_key} if cached else None
        with reporting_layers(lambda i, n: ctx.progress.update(description=f"{what}: layer {i + 1}/{n}")):
            record = prune_and_save(expert, tok, scores, names, cfg.method, ratio, work / "expert",
                                    options=dict(cfg.method_options),
                                    extra={"expert": cfg.expert, "base_model": cfg.model, "ratio_search": search},
                                    corpora=corpora, vocab_texts=calib if cfg.prune_vocab else None,
                                    vocab_held_out=vocab_held_out(corpora) if cfg.prune_vocab else None,
                                    vocab_size=cfg.vocab_size, vocab_floor=cfg.vocab_floor,
                                    pruned_record=pruned_record, layer_damage=damage)
        if damage_key and damage is None and record.get("layer_damage"):
            store_statistics(damage_key, work, {"layer_damage": record["layer_damage"]})
        keys = ("method", "target_ratio", "achieved_ratio", "params_before", "params_after", "reconstruction",
                "vocab", "ratio_search")
        return {**{k: record.get(k) for k in keys},
                **({"layer_damage_from_cache": damage_key} if damage is not None else {})}

    def damage_key(self, ctx) -> str:
        from .stage import content_key

        return content_key(ctx, (LoadStage, ScoreStage, PruneStage),
                           ("model", "trust_remote_code", "allow_pickle", *self.config_keys()), what="layer damage")


def prunes_streamed(cfg) -> bool:
    """Whether the build prunes the dense model one decoder layer in memory at a time: where the prune allows it
    (pruner.prunes_layer_by_layer) and no ratio search runs (it prunes whole probes)."""
    from ..prune.pruner import prunes_layer_by_layer

    return not _searching(cfg) and prunes_layer_by_layer(cfg.method, cfg.method_options, cfg.prune_vocab)


def exports_streamed(cfg) -> bool:
    """Whether the build exports one decoder layer in memory at a time (export/streamed.py): by the model's size."""
    from ..export.common import exports_layer_by_layer
    from ..model.lazy import model_shape

    return exports_layer_by_layer(model_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)["params"])


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

    from ..config.corpora import TUNE_EVERY
    from ..config.targets import resolve_target
    from ..measure.evaluate import perplexity, torch_logits_fn
    from ..prune.pruner import prune_model
    from .search import search_ratio

    cfg = ctx.config
    tune = [t for c in corpora.values() for t in c.tune]
    flag = "--beat-baseline" if cfg.beat_baseline else "--max-ppl-ratio"
    if not tune:
        raise UserError(f"{flag} needs calibration documents held apart from scoring; the expert's corpora "
                        f"have too few (at least {2 * TUNE_EVERY} documents each)")
    precision = cfg.precision or resolve_target(cfg.target).precision
    shipped = as_shipped(tok, corpora, precision, cfg.quant_plan)
    if cfg.beat_baseline:
        from ..measure.baseline import builder_artifact
        from ..measure.runtime import OnnxCausalLM

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


def as_shipped(tok, corpora, precision: str, plan: str):
    """model -> the same model as an int4 export of `plan` would store its weights (itself for other precisions)."""
    if precision != "int4":
        return lambda model: model
    from ..export.calibration import calibrated_linears, input_grams
    from ..export.simulate import quantized_copy

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

        from ..export import export_model
        from ..model.expert_io import load_expert

        # export_model reports its steps (trace, graph passes, quantize, parity) when it can
        takes_steps = "on_step" in inspect.signature(export_model).parameters

        def steps(side):
            return {"on_step": lambda step: ctx.progress.update(description=f"export {side}: {step}")} \
                if takes_steps else {}

        from ..config.corpora import ExpertSpec, calibration_documents

        # weights the plan re-rounds are fitted on the expert's scoring documents; the gate judges them on the
        # held-apart ones, the general domain's beside the expert's (export/parity.py)
        calibration = calibration_documents(ExpertSpec.parse(ctx.config.expert).corpora())
        ctx.progress.start("export dense", total=2)
        layer_by_layer = exports_streamed(ctx.config)  # too large to hold whole: one decoder layer at a time
        # the dense export is the same in every build of this model, target, plan and corpora: kept in the user cache
        from ..config.targets import resolve_target

        key = self.dense_key(ctx)
        dense_manifest = cached_dense_export(key, work / "dense", resolve_target(ctx.config.target).path)
        if dense_manifest is None:
            model, tok = ctx.streamed() if layer_by_layer else ctx.dense()
            dense_manifest = export_model(model, tok, ctx.config.target, work / "dense",
                                          precision=ctx.config.precision, held_out=ctx.config.expert,
                                          calibration=calibration, quant_plan=ctx.config.quant_plan, **steps("dense"))
            store_dense_export(key, work / "dense")
        ctx.progress.update(description="export expert", advance=1)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert", lazy=layer_by_layer)
        expert_manifest = export_model(expert, etok, ctx.config.target, work / "expert",
                                       precision=ctx.config.precision, held_out=ctx.config.expert,
                                       calibration=calibration, quant_plan=ctx.config.quant_plan, **steps("expert"))
        ctx.progress.update(advance=1)
        return {"dense": _manifest_summary(dense_manifest), "expert": _manifest_summary(expert_manifest)}

    def dense_key(self, ctx) -> str:
        """What decides the dense export's files: this stage's code, the model, corpora and target (their
        contents), the expert spec its manifest records, its precision and plan, and the libraries that trace,
        rewrite and quantize it."""
        from .stage import content_key

        return content_key(ctx, (LoadStage, ExportStage),
                           ("model", "trust_remote_code", "allow_pickle", "expert", "target", "precision", "quant_plan"))


DENSE_EXPORTS, DENSE_SWITCH = "dense-exports", "CUSPRUN_EDGE_EXPORT_CACHE"
DENSE_KEEP_BYTES = 2 * 1024**3  # SmolLM2-135M's int4 dense export is about 90 MB, Gemma-3-270M's about 0.35 GB


def cached_dense_export(key: str, dest: Path, target_path: str) -> dict | None:
    """The dense export of an earlier build with the same key, copied into `dest`: its manifest, or None."""
    from ..export import dir_cache
    from ..fsutil import write_json

    if dir_cache.lookup(DENSE_EXPORTS, key, dest, switch=DENSE_SWITCH) is None:
        return None
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if isinstance(manifest.get("target"), dict):
        manifest["target"]["path"] = target_path  # the same profile's content, read from this checkout's file
    manifest.setdefault("notes", []).append(
        "taken from the user cache: an earlier build exported the same model for the same target, precision, plan "
        "and corpora with the same code (CUSPRUN_EDGE_EXPORT_CACHE=0 exports anew)")
    write_json(manifest_path, manifest)
    return manifest


def store_dense_export(key: str, directory: Path) -> None:
    from ..export import dir_cache

    files = sorted(p.name for p in directory.iterdir() if p.is_file())
    dir_cache.store(DENSE_EXPORTS, key, directory, {}, files=files, keep_bytes=DENSE_KEEP_BYTES, switch=DENSE_SWITCH)


STATISTICS, STATISTICS_SWITCH = "statistics", "CUSPRUN_EDGE_STATS_CACHE"
STATISTICS_KEEP_BYTES = 512 * 1024**2  # SmolLM2-135M's scores are about 36 MB, its damage probes a few hundred bytes


def cached_statistics(key: str, dest: Path) -> dict | None:
    """The dense model's statistics an earlier build stored under `key`: its files copied into `dest`, its record
    (without the cache's own fields), or None. CUSPRUN_EDGE_STATS_CACHE=0 computes them anew."""
    from ..export import dir_cache

    record = dir_cache.lookup(STATISTICS, key, dest, switch=STATISTICS_SWITCH)
    return None if record is None else {k: v for k, v in record.items() if k not in ("files", "stored")}


def store_statistics(key: str, directory: Path, record: dict, files: tuple[str, ...] = ()) -> None:
    from ..export import dir_cache

    dir_cache.store(STATISTICS, key, directory, record, files=list(files), keep_bytes=STATISTICS_KEEP_BYTES,
                    switch=STATISTICS_SWITCH)


def _manifest_summary(manifest: dict) -> dict:
    keys = ("precision", "parity", "total_bytes", "parameters")
    return {k: manifest.get(k) for k in keys}


class ValidateStage(Stage):
    """Pipeline stage: validate the exported expert against the dense model (PyTorch)."""

    name = "validate"
    depends = ("export",)

    def config_keys(self):
        return ("expert", "baseline")

    def run(self, ctx, work: Path) -> dict:
        from ..config.corpora import ExpertSpec
        from ..measure.validate import VALIDATE_FILE, validate

        model, tok = ctx.dense()
        n = len(ExpertSpec.parse(ctx.config.expert).dims)
        ctx.progress.start(f"validate: held-out texts of {n} categories, dense and expert")

        def counted(_module, args, kwargs, _out):  # each held-out text (or choice) passes the dense model once
            ids = kwargs.get("input_ids", args[0] if args else None)
            ctx.progress.update(advance=ids.shape[0] if ids is not None else 1)

        hook = model.register_forward_hook(counted, with_kwargs=True)
        from ..measure.baseline import builder_or_reason

        builder, no_builder = builder_or_reason(ctx.config.model) if ctx.config.baseline else (None, None)
        dense_export = ctx.stage_dir("export") / "dense"
        quantized = dense_export if (dense_export / "manifest.json").is_file() else None
        # what does not depend on the expert (our dense export's and the builder's sums against the dense model, its
        # multiple-choice count) is the same in every build of this model, corpora and target: kept in the user cache
        key = self.dense_side_key(ctx, builder) if quantized is not None else None
        reuse = (cached_statistics(key, work) or {}).get("dense_side") if key else None
        try:
            record = validate((model, tok), ctx.stage_dir("export") / "expert", expert=ctx.config.expert,
                              out=work / VALIDATE_FILE, threads=ctx.config.threads, quantized_dense=quantized,
                              baseline=builder, reuse=reuse,
                              on_category=lambda name, _: ctx.progress.update(description=f"validate: {name} done"))
        finally:
            hook.remove()
        if key and reuse is None:
            store_statistics(key, work, {"dense_side": record["dense_side"]})
        overall = record["overall"]
        return {"file": VALIDATE_FILE, "categories": list(record["categories"]),
                **({"dense_side_from_cache": key} if reuse is not None else {}),
                "retention": overall["retention"], "top1_agreement": overall.get("top1_agreement"),
                "kl": overall.get("kl"), "dense_ppl": overall["dense"].get("ppl"),
                "expert_ppl": overall["expert"].get("ppl"),
                "baseline_ppl": (record.get("baseline") or {}).get("ppl"), "no_baseline": no_builder}

    def dense_side_key(self, ctx, builder) -> str:
        """What decides validate's dense side: the dense model, corpora, target and settings, our dense export (its
        own content key) and the builder's artifact (its cache entry, named by the model's files and the builder's
        version)."""
        from .stage import content_key

        return content_key(ctx, (LoadStage, ValidateStage),
                           ("model", "trust_remote_code", "allow_pickle", "expert", "target", "threads"),
                           dense_export=ExportStage().dense_key(ctx), builder=builder.name if builder else None,
                           what="validate dense side")


class BenchStage(Stage):
    """Pipeline stage: dense and expert exports benchmarked side by side on the target's providers."""

    name = "bench"
    depends = ("export",)

    def config_keys(self):
        return ("threads", "quick_bench", "baseline", "target")

    def run(self, ctx, work: Path) -> dict:
        from ..fsutil import write_json
        from ..measure.bench import BENCH_FILE, bench
        export = ctx.stage_dir("export")
        ctx.progress.start("bench")
        runs = []

        def on_run(provider, label):
            if runs:
                ctx.progress.update(advance=1)
            runs.append(label)
            ctx.progress.update(description=f"bench {label} on {provider.replace('ExecutionProvider', '')}")

        from ..measure.baseline import LABEL, builder_or_reason

        # what a user ships without us, measured in the same run: the GenAI builder's int4 of the dense model
        builder, no_builder = builder_or_reason(ctx.config.model) if ctx.config.baseline else (None, None)
        extra = [builder] if builder is not None else []
        # every artifact at the same thread count: ours ask for the target's in genai_config, the builder's for none
        # (GenAI then runs one thread), and a comparison at unequal threads says nothing
        from ..config.targets import resolve_target
        from ..export.package import artifact_threads

        threads = ctx.config.threads or artifact_threads(resolve_target(ctx.config.target))
        record = bench([export / "dense", export / "expert", *extra], labels=["dense", "expert"] + [LABEL] * len(extra),
                       target=ctx.config.target, threads=threads, quick=ctx.config.quick_bench,
                       out=work / BENCH_FILE, on_run=on_run)
        measured = {p: e for p, e in record["providers"].items() if e["status"] == "measured"}
        errors = [f"{p}/{n}: {r['error']}" for p, e in measured.items() for n, r in e["results"].items()
                  if "error" in r]
        if errors:
            raise UserError("benchmark failed: " + "; ".join(errors))
        if no_builder:
            record["no_baseline"] = no_builder
            write_json(work / BENCH_FILE, record)
        return {"file": BENCH_FILE, "measured": list(measured), "no_baseline": no_builder,
                "skipped": {p: e["reason"] for p, e in record["providers"].items() if e["status"] == "skipped"},
                "speedup": record["speedup"]}


class GenerateStage(Stage):
    """Pipeline stage: dense and expert answer the expert's prompts (report: "the expert talking")."""

    name = "generate"
    depends = ("export",)

    def config_keys(self):
        return ("expert", "prompts", "threads", "baseline")

    def run(self, ctx, work: Path) -> dict:
        from ..measure.generate import GENERATIONS_FILE, checked_prompts, generate, prompts_for
        prompts = prompts_for(ctx.config.expert, ctx.config.prompts)
        export = ctx.stage_dir("export")
        ctx.progress.start("generate: dense and expert answer the prompts",
                           total=3 * (len(prompts) + len(checked_prompts())))
        from ..measure.baseline import LABEL, builder_or_reason

        # the checked answers of what a user ships without us too
        builder, _ = builder_or_reason(ctx.config.model) if ctx.config.baseline else (None, None)
        record = generate({"dense": export / "dense", "expert": export / "expert",
                           **({LABEL: builder} if builder is not None else {})}, prompts,
                          threads=ctx.config.threads, out=work / GENERATIONS_FILE,
                          on_prompt=lambda: ctx.progress.update(advance=1))
        return {"file": GENERATIONS_FILE, "prompts": len(prompts), "skipped": record.get("skipped"),
                "tok_s": record.get("tok_s"), "looping": record.get("looping"),
                "checks_right": (record.get("checks") or {}).get("right")}


class ReportStage(Stage):
    """Pipeline stage: the build's report (JSON, Markdown, self-contained HTML)."""

    name = "report"
    depends = ("validate", "bench", "generate")

    def config_keys(self):
        return ()

    def run(self, ctx, work: Path) -> dict:
        from ..report.render import report
        ctx.progress.start("report: tables and plots")
        data = report(ctx.out, out=work)
        return {"files": ["report.json", "report.md", "report.html"], "plots": data["plots"],
                "speedup": {p: s.get("decode") for p, s in data["speedup"].items()},
                "retention": data["retention"].get("overall")}


class GGUFStage(Stage):
    name = "gguf"
    depends = ("prune",)

    def config_keys(self):
        return ("model", "expert", "prompts", "threads")

    def run(self, ctx, work: Path) -> dict:
        from ..config.corpora import ExpertSpec
        from ..export.gguf import GGUF_FILE, export_gguf, source_gguf_for, summary_line
        from ..measure.generate import prompts_for
        from ..measure.gguf_check import RECORD_FILE, check_in_llama_cpp
        from ..measure.llamacpp import missing
        from ..model.expert_io import load_expert

        ctx.progress.start("gguf: export", total=6)
        expert, etok = load_expert(ctx.stage_dir("prune") / "expert")
        source = source_gguf_for(ctx.config.model)
        manifest = export_gguf(expert, etok, work / "expert", source=ctx.config.model, source_gguf=source)
        ctx.progress.update(advance=1)
        if source is None:  # no source GGUF: the dense model through the same writer
            model, tok = ctx.dense()
            export_gguf(model, tok, work / "dense")
            dense_gguf = ctx.stage_dir(self.name) / "dense" / GGUF_FILE  # where it lies once the stage is renamed
            dense_now = work / "dense" / GGUF_FILE
        else:
            dense_gguf = dense_now = source
        record = {"expert_gguf": f"expert/{GGUF_FILE}", "dense_gguf": str(dense_gguf), "dense_bytes": dense_now.stat().st_size,
                  "export": {k: manifest[k] for k in ("architecture", "bytes", "counts", "fallbacks", "requant")},
                  "summary": summary_line(manifest)}
        reason = missing()
        if reason:
            record["checked"] = f"not checked in llama.cpp: {reason}"
        else:
            corpora = ExpertSpec.parse(ctx.config.expert).corpora()
            eval_texts = [t for c in corpora.values() for t in c.eval]
            prompts = [p["prompt"] for p in prompts_for(ctx.config.expert, ctx.config.prompts)]
            record["checked"] = "llama.cpp"
            record |= check_in_llama_cpp(expert, etok, work / "expert" / GGUF_FILE, dense_now, eval_texts, prompts,
                                         threads=ctx.config.threads or 2, dense=ctx.dense(),
                                         on_step=lambda s: ctx.progress.update(description=f"gguf: {s}", advance=1))
        (work / RECORD_FILE).write_text(json.dumps(record, indent=2))
        out = {"file": RECORD_FILE, "summary": record["summary"], "checked": record["checked"]}
        if "ppl" in record:
            out |= {"ppl_ratio": record["ppl"]["ratio"], "decode_speedup": record["speed"]["decode_speedup"],
                    "greedy_identical": f"{record['greedy']['identical']}/{record['greedy']['prompts']}",
                    "max_abs_logit_diff": record["parity"]["max_abs_diff"]}
        return out
