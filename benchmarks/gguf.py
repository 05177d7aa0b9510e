"""`python -m benchmarks gguf [--expert DIR]`: the expert as a GGUF in llama.cpp against the dense source GGUF,
which is what a llama.cpp user runs today. Writes results/gguf.json:

  - the export: architecture, size, tensors copied from the source GGUF / re-quantized / fallen back, and a check
    that every row of every copied tensor is byte for byte a row of the source GGUF's tensor;
  - logit parity of the GGUF in llama.cpp against the same expert in PyTorch fp32 on held-out text (flash
    attention off, fp32 KV cache), and greedy answers to the expert's built-in prompts (llama.cpp's defaults);
  - held-out perplexity of the expert GGUF and the dense source GGUF in llama.cpp (each document tokenized by the
    file's own tokenizer, first 512 tokens);
  - prefill and decode tokens/s of both at 2 threads, in alternating rounds within one run.

The expert defaults to the demo build's (build/demo/prune/expert, `make demo`); pass --expert for another.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .common import machine, write_json

WORK = Path(__file__).resolve().parent / "work" / "gguf"
DEMO_EXPERT = Path(__file__).resolve().parent.parent / "build" / "demo" / "prune" / "expert"


def verify_copies(gguf_path: Path, source_path: Path, manifest: dict) -> dict:
    """Every row of every tensor the manifest says was copied is, byte for byte, a row of the source GGUF's
    tensor of the same kind and its source layer (rows: one output each, a whole number of blocks)."""
    import gguf

    written = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    source = {t.name: t for t in gguf.GGUFReader(str(source_path)).tensors}
    src_layers = manifest.get("source_layers") or list(range(len(manifest["layers"]["n_head"])))
    checked = rows = 0
    for name, info in manifest["tensors"].items():
        if not info["how"].startswith("copied"):
            continue
        src_name = name
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            src_name = f"blk.{src_layers[int(i)]}.{rest}"
        out_rows = np.asarray(written[name].data)
        src_rows = {bytes(r) for r in np.asarray(source[src_name].data)}
        zero = bytes(out_rows.shape[1])
        bad = [i for i, r in enumerate(out_rows) if bytes(r) not in src_rows and bytes(r) != zero]
        if bad and out_rows.shape[1] != np.asarray(source[src_name].data).shape[1]:
            # whole input blocks (o_proj with heads removed): compare block by block
            bad = _block_mismatch(out_rows, np.asarray(source[src_name].data), written[name].tensor_type)
        if bad:
            raise AssertionError(f"{name}: {len(bad)} rows are not source rows")
        checked += 1
        rows += len(out_rows)
    return {"tensors": checked, "rows": rows, "all_byte_identical": True}


def _block_mismatch(out_rows, src_rows, qtype) -> list[int]:
    import gguf

    per_block = gguf.GGML_QUANT_SIZES[qtype][1]
    src_blocks = {bytes(b) for b in src_rows.reshape(-1, per_block)}
    return [i for i, r in enumerate(out_rows) if any(bytes(b) not in src_blocks for b in r.reshape(-1, per_block))]


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks gguf")
    p.add_argument("--expert", type=Path, default=DEMO_EXPERT, help="expert directory (default: the demo build's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="alternating speed rounds")
    p.add_argument("--gguf-type", default="q8_0", help="type of the weights pruning changed")
    a = p.parse_args(argv)
    run(a.expert, a.threads, a.rounds, a.gguf_type)


def run(expert_dir: Path, threads: int, rounds: int, requant: str) -> dict:
    import torch

    from cusprun_edge.config.corpora import ExpertSpec
    from cusprun_edge.export.gguf import GGUF_FILE, export_gguf, source_gguf_for
    from cusprun_edge.measure.generate import prompts_for
    from cusprun_edge.measure.gguf_check import check_in_llama_cpp
    from cusprun_edge.model.expert_io import expert_record, load_expert

    torch.set_num_threads(threads)
    if not (expert_dir / "cusprun.json").is_file():
        raise SystemExit(f"no expert at {expert_dir}: run `make demo` or pass --expert DIR")
    record = expert_record(expert_dir)
    spec = record.get("expert", "language=en,domain=general")
    model, tok = load_expert(expert_dir)
    source = source_gguf_for(str(expert_dir))
    if source is None:
        raise SystemExit(f"{expert_dir} was not pruned from a GGUF; this benchmark compares against its source GGUF")
    say("export")
    t0 = time.perf_counter()
    manifest = export_gguf(model, tok, WORK / "expert", source=str(expert_dir), source_gguf=source, requant=requant,
                           force=True)
    export_s = time.perf_counter() - t0
    expert_gguf = WORK / "expert" / GGUF_FILE
    copies = verify_copies(expert_gguf, source, manifest)

    corpora = ExpertSpec.parse(spec).corpora()
    eval_texts = [t for c in corpora.values() for t in c.eval]
    prompts = [q["prompt"] for q in prompts_for(spec)]
    # the same check as the build's gguf stage: parity and greedy answers of both files against PyTorch,
    # held-out perplexity, alternating speed
    check = check_in_llama_cpp(model, tok, expert_gguf, source, eval_texts, prompts, threads=threads, rounds=rounds,
                               on_step=say)
    import llama_cpp

    result = {
        "what": "the expert as GGUF in llama.cpp vs the dense source GGUF (what a llama.cpp user runs today)",
        "machine": {**machine(), "llama_cpp_python": llama_cpp.__version__},
        "expert": {"dir": str(expert_dir), "spec": spec, "method": record.get("method"),
                   "achieved_ratio": record.get("achieved_ratio")},
        "export": {"seconds": round(export_s, 1), "architecture": manifest["architecture"],
                   "bytes": manifest["bytes"], "dense_bytes": source.stat().st_size,
                   "counts": manifest["counts"], "fallbacks": manifest["fallbacks"],
                   "padded_ffn_layers": len(manifest["padded_ffn"]), "requant": requant,
                   "types": _type_counts(manifest)},
        "copied_blocks": copies,
        **check,
    }
    path = write_json("gguf.json", result)
    print(json.dumps({"ppl": {k: round(check["ppl"][k]["ppl"], 3) for k in ("dense", "expert")},
                      "decode_speedup": round(check["speed"]["decode_speedup"], 3), "faithful": check["faithful"],
                      "copied": copies}, indent=1))
    from .common import RESULTS
    from .results_md import write_results_md

    if RESULTS == Path(__file__).resolve().parent / "results":  # RESULTS.md reads benchmarks/results/ only
        path = f"{path} and {write_results_md()}"
    print(f"wrote {path}")
    return result


def say(step: str) -> None:
    print(f"[gguf {time.strftime('%H:%M:%S')}] {step}", file=sys.stderr, flush=True)


def _type_counts(manifest: dict) -> dict:
    out: dict[str, int] = {}
    for t in manifest["tensors"].values():
        key = f"{t['type']} {'copied' if t['how'].startswith('copied') else 'written'}"
        out[key] = out.get(key, 0) + 1
    return out
