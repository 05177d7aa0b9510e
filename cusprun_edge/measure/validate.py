"""Validate stage: the dense model and the shipped expert side by side on held-out text.

For each of the expert's corpora we use only the held-out `eval` documents and multiple-choice items
(never the `calib` documents that chose which units to keep), plus any text files the user passes.
Measured per category: perplexity, multiple-choice accuracy (where the category has items), top-1
next-token agreement and mean KL(dense || expert); retention is dense_ppl / expert_ppl for perplexity
(higher is better, 1.0 = no loss) and expert_acc / dense_acc for accuracy.

The expert runs through its exported ONNX artifact (what ships); the dense model through PyTorch,
or through its own export when `dense_artifact` is given (like for like: same precision, same runtime).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from ..errors import UserError
from ..fsutil import write_json

VALIDATE_FILE = "validate.json"


# --------------------------------------------------------------------------- inputs


def read_eval_text(source) -> list[str]:
    """Documents of a user's evaluation file: blank-line separated plain text, or .jsonl / a folder."""
    from ..config.corpora import read_texts

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"no such file or directory: {source}")
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty; pass a text file with the documents to evaluate on")
        head = path.read_bytes()[:8192]
        if b"\x00" in head:
            raise UserError(f"{path} is not a text file (it contains binary data)")
        if path.suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            try:
                raw = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 text") from None
            texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
            if not texts:
                raise UserError(f"{path} holds no text (only whitespace)")
            return texts
    return read_texts(str(path))


def _eval_sets(expert: str | None, texts, max_docs: int | None, max_mc: int | None) -> dict[str, dict]:
    """category name -> {"texts": held-out documents, "mc": held-out items}."""
    from ..config.corpora import ExpertSpec

    sets: dict[str, dict] = {}
    if expert:
        for name, corpus in ExpertSpec.parse(expert).corpora().items():
            docs = corpus.eval[:max_docs] if max_docs else list(corpus.eval)
            items = corpus.mc[:max_mc] if max_mc else list(corpus.mc)
            if docs or items:
                sets[name] = {"texts": docs, "mc": items}
    for source in texts or ():
        docs = read_eval_text(source)
        sets[f"user:{Path(source).name}"] = {"texts": docs[:max_docs] if max_docs else docs, "mc": [],
                                             "path": str(source)}
    if not sets:
        raise UserError("nothing to evaluate on: the expert's corpora have no held-out documents and no --text was given")
    return sets


def expert_spec_of(manifest: dict) -> str | None:
    """The expert spec recorded in an export manifest (when it was exported from an expert directory)."""
    record = ((manifest.get("source") or {}).get("expert")) or {}
    return record.get("expert") if isinstance(record, dict) else None


def _same_tokenizer(a, b) -> bool:
    if len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab()


def _trimmed_from(dense, expert) -> bool:
    """The expert's tokenizer is a trimmed vocabulary of the dense one (vocab.py): its tokens, fewer, new ids."""
    return len(expert) < len(dense) and set(expert.get_vocab()) <= set(dense.get_vocab())


def compare_trimmed(ref_fn, test_fn, tokenizer, test_tokenizer, texts: list[str], *, batch_size: int = 4,
                    max_length: int = 512, test_max_length: int = 2048) -> dict:
    """`compare_texts`' sums for an expert with a trimmed vocabulary: each model reads the same text (cut where
    the dense tokenizer's first `max_length` tokens end) with its own tokenizer; `tokens` counts the dense
    tokens, so both perplexities are per dense token. Agreement and KL need the same positions: none here."""
    from .evaluate import clip_to_tokens, text_quality

    clipped = clip_to_tokens(tokenizer, texts, max_length)
    ref = text_quality(ref_fn, tokenizer, clipped, tokenizer, batch_size=batch_size, max_length=max_length)
    test = text_quality(test_fn, test_tokenizer, clipped, tokenizer, batch_size=batch_size, max_length=test_max_length)
    return {"ref_nll": ref["nll"], "test_nll": test["nll"], "tokens": ref["dense_tokens"],
            "test_tokens": test["tokens"], "bytes": ref["bytes"], "agree": 0, "kl": 0.0, "positions": 0}


# --------------------------------------------------------------------------- measures


def compare_texts(ref_fn, test_fn, tokenizer, texts: list[str], *, batch_size: int = 4,
                  max_length: int = 512) -> dict:
    """One pass over `texts` with both models: summed next-token NLL of each, top-1 agreement, KL.

    The sums behind `evaluate.perplexity` and `evaluate.agreement`, from one forward of each model."""
    return compare_many(ref_fn, {"test": test_fn}, tokenizer, texts, batch_size=batch_size, max_length=max_length)["test"]


def compare_many(ref_fn, test_fns: dict, tokenizer, texts: list[str], *, batch_size: int = 4,
                 max_length: int = 512) -> dict[str, dict]:
    """`compare_texts`' sums for each of `test_fns` ({name: logits fn}) against one reference, which runs once
    per batch for all of them (validate compares the expert, our dense export and the builder's with the same
    PyTorch model: one forward instead of three)."""
    from ..model.sequential import padded_batches
    from .evaluate import agreement_sums, nll_sum

    outs = {name: {"ref_nll": 0.0, "test_nll": 0.0, "tokens": 0, "agree": 0, "kl": 0.0, "positions": 0}
            for name in test_fns}
    for ids, mask in padded_batches(tokenizer, texts, batch_size, max_length):
        ref = ref_fn(ids, mask)
        ref_nll = nll_sum(ref, ids, mask)[0]
        for name, test_fn in test_fns.items():
            test, out = test_fn(ids, mask), outs[name]
            if ref.shape != test.shape:
                raise UserError(f"dense and expert logits differ in shape ({tuple(ref.shape)} vs "
                                f"{tuple(test.shape)}); is the expert derived from this dense model?")
            out["ref_nll"] += ref_nll
            test_nll, tokens = nll_sum(test, ids, mask)
            out["test_nll"] += test_nll
            out["tokens"] += tokens
            agree, kl, positions = agreement_sums(ref, test, mask)
            out["agree"] += agree
            out["kl"] += kl
            out["positions"] += positions
    return outs


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(nll / max(1, tokens))


def _ratio(num, den):
    if num is None or den is None or den == 0:
        return None
    return num / den


def _mc_count(logits_fn, tokenizer, items) -> int:
    from .evaluate import mc_accuracy

    return round(mc_accuracy(logits_fn, tokenizer, items) * len(items)) if items else 0


def _summary(sums: dict, mc: tuple[int, int, int]) -> dict:
    """Per-model figures, retention, agreement and KL from summed counts (pooled the same way)."""
    from .evaluate import per_dense_token

    correct_dense, correct_expert, n_mc = mc
    dense, expert, retention = {}, {}, {}
    if sums["tokens"] and "test_tokens" in sums:  # a trimmed vocabulary: `ppl` is per dense token, the fair one
        for side, key, tokens in ((dense, "ref_nll", sums["tokens"]), (expert, "test_nll", sums["test_tokens"])):
            fair = per_dense_token(sums[key], sums["tokens"], sums["bytes"])
            side.update(ppl=fair["ppl_per_dense_token"], ppl_own_tokens=_ppl(sums[key], tokens), tokens=tokens, **fair)
        retention["ppl"] = dense["ppl"] / expert["ppl"]
    elif sums["tokens"]:
        dense["ppl"] = _ppl(sums["ref_nll"], sums["tokens"])
        expert["ppl"] = _ppl(sums["test_nll"], sums["tokens"])
        retention["ppl"] = dense["ppl"] / expert["ppl"]
    if n_mc:
        dense["acc"], expert["acc"] = correct_dense / n_mc, correct_expert / n_mc
        retention["acc"] = _ratio(expert["acc"], dense["acc"])
    out = {"dense": dense, "expert": expert, "retention": retention,
           "tokens": sums["tokens"], "mc_items": n_mc}
    if sums["positions"]:
        out["top1_agreement"] = sums["agree"] / sums["positions"]
        out["kl"] = max(0.0, sums["kl"] / sums["positions"])
    return out


# --------------------------------------------------------------------------- validate


def validate(
    dense,
    expert_artifact,
    *,
    texts=(),
    expert: str | None = None,
    dense_artifact=None,
    out=None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    max_docs: int | None = None,
    max_mc: int | None = None,
    batch_size: int = 4,
    max_length: int = 512,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    on_category=None,
    quantized_dense=None,
    baseline=None,
    reuse: dict | None = None,
) -> dict:
    """Measure dense vs expert on held-out text; writes `out` (a .json path) when given.

    `dense` is a model source for `load_model` or a loaded (model, tokenizer) pair. `expert` is the
    expert spec whose corpora to use (default: the one recorded in the artifact's manifest); `texts`
    are extra evaluation files. `quantized_dense`: the dense model's own export at the expert's
    precision; with it (and the dense model in PyTorch) the record gets `three_way`: dense fp32 /
    dense at the target precision / expert at the target precision, so quantization's cost and
    pruning's show apart. `baseline`: what a user would ship instead (ONNX Runtime GenAI's builder, int4, on the
    dense model; baseline.py), measured on the same texts against the same reference (record["baseline"]).
    `reuse`: record["dense_side"] of an earlier validate of the same dense model, `quantized_dense`, `baseline`,
    texts and settings (what does not depend on the expert: those two artifacts' sums against the reference, the
    dense model's multiple-choice count, per category); those are taken instead of measured again.
    Returns the record also written to `out`."""
    from .evaluate import torch_logits_fn
    from .runtime import OnnxCausalLM, read_manifest

    t0 = time.time()
    expert_dir, manifest = read_manifest(expert_artifact)
    expert = expert or expert_spec_of(manifest)
    if not expert and not texts:
        raise UserError(f"cannot tell which corpora the expert in {expert_dir} was built for; "
                        "pass --expert (e.g. language=en,domain=general) or --text FILE")
    if dense_artifact is not None:
        read_manifest(dense_artifact)
    if quantized_dense is not None:
        read_manifest(quantized_dense)
    if baseline is not None:
        read_manifest(baseline)
    sets = _eval_sets(expert, texts, max_docs, max_mc)  # bad input fails before any model loads

    if isinstance(dense, (tuple, list)):
        dense_model, tokenizer = dense
        dense_source = getattr(dense_model.config, "_name_or_path", None) or "in-memory model"
    else:
        from ..model.load import load_model

        dense_model, tokenizer = load_model(str(dense), trust_remote_code=trust_remote_code,
                                            allow_pickle=allow_pickle)
        dense_source = str(dense)
    from transformers import AutoTokenizer

    expert_tok = AutoTokenizer.from_pretrained(str(expert_dir))
    trimmed = not _same_tokenizer(tokenizer, expert_tok) and _trimmed_from(tokenizer, expert_tok)
    if not trimmed and not _same_tokenizer(tokenizer, expert_tok):
        raise UserError(f"the expert in {expert_dir} uses a different tokenizer than the dense model "
                        f"({len(expert_tok)} vs {len(tokenizer)} tokens); is it derived from this model?")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if expert_tok.pad_token_id is None:
        expert_tok.pad_token = expert_tok.eos_token

    expert_rt = OnnxCausalLM(expert_dir, provider=provider, threads=threads)
    expert_fn = expert_rt.logits_fn
    # the artifact's rotary tables and cache end at its context length: evaluate within it
    max_length = min(max_length, expert_rt.context_length or max_length)
    if dense_artifact is not None:
        dense_rt = OnnxCausalLM(dense_artifact, provider=provider, threads=threads)
        dense_fn = dense_rt.logits_fn
        max_length = min(max_length, dense_rt.context_length or max_length)
        dense_runtime = {"runtime": "onnxruntime", "artifact": str(dense_artifact),
                         "precision": dense_rt.manifest.get("precision"), "provider": dense_rt.active_providers[0]}
    else:
        dense_fn = torch_logits_fn(dense_model)
        dense_runtime = {"runtime": "pytorch", "dtype": str(next(dense_model.parameters()).dtype).replace("torch.", "")}

    quantized_fn = None
    if quantized_dense is not None and dense_artifact is None:
        quantized_rt = OnnxCausalLM(quantized_dense, provider=provider, threads=threads)
        quantized_fn = quantized_rt.logits_fn
        max_length = min(max_length, quantized_rt.context_length or max_length)
    baseline_fn = None
    if baseline is not None:
        baseline_rt = OnnxCausalLM(baseline, provider=provider, threads=threads)
        baseline_fn = baseline_rt.logits_fn
        max_length = min(max_length, baseline_rt.context_length or max_length)
    categories = {}
    shared = {"ref_nll": 0.0, "test_nll": 0.0, "tokens": 0, "agree": 0, "kl": 0.0, "positions": 0}
    totals = {**shared, **({"test_tokens": 0, "bytes": 0} if trimmed else {})}
    quantized_totals = dict.fromkeys(shared, 0)
    baseline_totals = dict.fromkeys(shared, 0)
    mc_totals = [0, 0, 0]
    reuse = reuse if dense_artifact is None else None  # reused sums are against the PyTorch reference
    reused = {side: (reuse or {}).get(side) or {} for side in ("quantized", "baseline", "dense_mc")}
    dense_side: dict[str, dict] = {side: {} for side in reused}
    for name, data in sets.items():
        # the PyTorch reference runs once per batch for every artifact compared with it
        tests = {**({"expert": expert_fn} if not trimmed else {}),
                 **({"quantized": quantized_fn} if quantized_fn is not None and name not in reused["quantized"] else {}),
                 **({"baseline": baseline_fn} if baseline_fn is not None and name not in reused["baseline"] else {})}
        compared = compare_many(dense_fn, tests, tokenizer, data["texts"], batch_size=batch_size,
                                max_length=max_length) if data["texts"] and tests else {}
        for side, fn in (("quantized", quantized_fn), ("baseline", baseline_fn)):
            if fn is not None and name in reused[side]:
                compared[side] = reused[side][name]
            if side in compared:
                dense_side[side][name] = compared[side]
        if not data["texts"]:
            sums = dict.fromkeys(totals, 0)
        elif trimmed:
            sums = compare_trimmed(dense_fn, expert_fn, tokenizer, expert_tok, data["texts"], batch_size=batch_size,
                                   max_length=max_length, test_max_length=expert_rt.context_length or 4 * max_length)
        else:
            sums = compared["expert"]
        dense_mc = reused["dense_mc"].get(name)
        dense_side["dense_mc"][name] = dense_mc = _mc_count(dense_fn, tokenizer, data["mc"]) if dense_mc is None \
            else dense_mc
        mc = (dense_mc, _mc_count(expert_fn, expert_tok, data["mc"]), len(data["mc"]))
        for k in totals:
            totals[k] += sums[k]
        for i in range(3):
            mc_totals[i] += mc[i]
        categories[name] = {"documents": len(data["texts"]), "split": "eval" if not name.startswith("user:") else "user",
                            **_summary(sums, mc)}
        if "quantized" in compared:
            quantized = compared["quantized"]
            for k in quantized_totals:
                quantized_totals[k] += quantized[k]
            categories[name]["three_way"] = three_way(sums, quantized)
        if "baseline" in compared:
            theirs = compared["baseline"]
            for k in baseline_totals:
                baseline_totals[k] += theirs[k]
            categories[name]["baseline"] = _against_reference(theirs)
        if "path" in data:
            categories[name]["path"] = data["path"]
        if on_category:
            on_category(name, categories[name])

    record = {
        "expert_spec": expert,
        "dense": {"source": dense_source, **dense_runtime},
        "expert": {"artifact": str(expert_dir), "runtime": "onnxruntime", "provider": expert_rt.active_providers[0],
                   "precision": manifest.get("precision"), "pruned": manifest.get("pruned")},
        "categories": categories,
        "overall": {**_summary(totals, tuple(mc_totals)),
                    **({"vocabulary": {"dense": len(tokenizer), "expert": len(expert_tok)}} if trimmed else {})},
        "settings": {"max_length": max_length, "batch_size": batch_size, "max_docs": max_docs, "max_mc": max_mc,
                     "held_out_only": True},
        "seconds": round(time.time() - t0, 2),
        **({"dense_side": dense_side, "dense_side_reused": bool(reuse)} if dense_artifact is None else {}),
    }
    if quantized_fn is not None and quantized_totals["tokens"]:
        record["three_way"] = {**three_way(totals, quantized_totals), "precision": manifest.get("precision"),
                               "dense_artifact": str(quantized_dense)}
    if baseline_fn is not None and baseline_totals["tokens"]:
        record["baseline"] = {"artifact": str(baseline), "precision": baseline_rt.manifest.get("precision"),
                              "format": baseline_rt.manifest.get("format"), **_against_reference(baseline_totals)}
    if out is not None:
        write_json(out, record)
    return record


def _against_reference(sums: dict) -> dict:
    """Perplexity, top-1 agreement and KL of a tested artifact against the reference, from compare_texts sums."""
    if not sums["positions"]:  # a trimmed vocabulary shares no positions with dense; its ppl is per dense token
        return {"ppl": _ppl(sums["test_nll"], sums["tokens"]), "top1_agreement": None, "kl": None,
                "tokens": sums["tokens"]}
    return {"ppl": _ppl(sums["test_nll"], sums["tokens"]), "top1_agreement": sums["agree"] / max(1, sums["positions"]),
            "kl": max(0.0, sums["kl"] / max(1, sums["positions"])), "tokens": sums["tokens"]}


def three_way(expert_sums: dict, quantized_sums: dict) -> dict:
    """Perplexity, top-1 agreement and KL against the dense model in PyTorch fp32 of: the dense model
    itself, its export at the target precision, the expert's export at the target precision."""
    def row(sums):
        return {k: v for k, v in _against_reference(sums).items() if k != "tokens"}

    return {"dense_fp32": {"ppl": _ppl(expert_sums["ref_nll"], expert_sums["tokens"]), "top1_agreement": 1.0, "kl": 0.0},
            "dense_quantized": row(quantized_sums), "expert_quantized": row(expert_sums),
            "tokens": expert_sums["tokens"]}


