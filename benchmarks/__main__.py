"""`python -m benchmarks [quality|frontier|speed|defaults|all] [--quick] [--model M --settings a,b]` writes
results/*.json and RESULTS.md (each part resumes where it stopped: finished rows and points are kept); `python -m benchmarks builder [--also LABEL=DIR]` compares our int4 export with GenAI's builder; `python -m benchmarks merge DIR...` merges runs made side by side in their own folders; `python -m benchmarks mc` measures multiple-choice retention item by item; `python -m benchmarks prune-cost` the prune stage's time and memory; `python -m benchmarks vocab` vocabulary trimming; `python -m benchmarks int4-parts` where the int4 fast plan loses quality; `python -m benchmarks gguf` the expert as GGUF in llama.cpp; `python -m benchmarks scale` memory and time on 1B-8B stand-ins; `python -m benchmarks default-vs-builder BUILD` a build's expert vs the builder."""

import argparse
import os
import sys
import time

import torch

from . import quality
from .common import write_json


def main() -> None:
    if sys.argv[1:2] == ["builder"]:  # its own options (see benchmarks/builder.py)
        from . import builder

        builder.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["default-vs-builder"]:  # a build's expert vs the builder, alternating (default_vs_builder.py)
        from . import default_vs_builder

        default_vs_builder.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["prune-cost"]:  # the prune stage's time and memory (benchmarks/prune_cost.py)
        from . import prune_cost

        p = argparse.ArgumentParser(prog="python -m benchmarks prune-cost")
        p.add_argument("--model", default=quality.DEFAULT_MODEL)
        p.add_argument("--device", default="cpu")
        p.add_argument("--note", default="")
        a = p.parse_args(sys.argv[2:])
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        prune_cost.run(a.model, a.device, a.note)
        return
    if sys.argv[1:2] == ["mc"]:  # multiple-choice retention item by item, with its standard error (benchmarks/mc.py)
        from . import mc

        p = argparse.ArgumentParser(prog="python -m benchmarks mc")
        p.add_argument("--model", default=quality.DEFAULT_MODEL)
        p.add_argument("--device", default="cpu")
        p.add_argument("--settings", default="", help="comma-separated subset of " + ", ".join(quality.SETTINGS))
        p.add_argument("--ratios", default="0.25", help="comma-separated target ratios")
        p.add_argument("--rows", default="cusprun", help="quality rows (methods and ablations), separated by ';'")
        a = p.parse_args(sys.argv[2:])
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
        mc.run(a.model, [s for s in a.settings.split(",") if s], [float(r) for r in a.ratios.split(",")],
               [r for r in a.rows.split(";") if r], a.device)
        return
    if sys.argv[1:2] == ["vocab"]:  # vocabulary trimming: size, coverage, quality per dense token, speed (vocab.py)
        from . import vocab

        vocab.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["int4-parts"]:  # where the int4 fast plan loses quality, part by part (int4_parts.py)
        from . import int4_parts

        int4_parts.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["scale"]:  # peak memory and time on stand-ins of 1B-8B models (benchmarks/scale.py)
        from . import scale

        scale.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["gguf"]:  # the expert as GGUF in llama.cpp vs the dense source GGUF (benchmarks/gguf.py)
        from . import gguf

        gguf.main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["merge"]:  # folders of runs side by side (benchmarks/gpu_run.sh) into results/
        from . import merge

        merge.main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("which", nargs="?", default="all", choices=["quality", "frontier", "speed", "defaults", "all"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one setting, one ratio, cusprun with and "
                        "without reconstruction and wanda-sp; one frontier point; no speed table")
    parser.add_argument("--model", default=quality.DEFAULT_MODEL, help="quality and frontier: the model to prune")
    parser.add_argument("--device", default="cpu", help="quality and defaults: where the model runs (cpu, cuda)")
    parser.add_argument("--settings", default="", help="quality, frontier and defaults: comma-separated subset of "
                        + ", ".join(quality.SETTINGS))
    parser.add_argument("--ratios", default="", help="quality, frontier and defaults: comma-separated "
                        "ratios (default: each part's own)")
    parser.add_argument("--rows", default="", help="quality: only these rows, separated by ';' "
                        "(e.g. 'cusprun[allocation=damage]')")
    parser.add_argument("--respeed", action="store_true",
                        help="frontier: only measure the speed pairs again, for the artifacts still in benchmarks/work")
    parser.add_argument("--vocab", default="both", choices=["both", "full", "pruned"],
                        help="frontier: points with the full vocabulary, the pruned one, or both")
    args = parser.parse_args()
    # BENCH_THREADS=1 lets two benchmark parts share the 2 cores without oversubscribing them
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    started = time.time()
    if args.which in ("quality", "all"):
        quality.run(quick=args.quick, model_name=args.model,
                    only=[x for x in args.settings.split(",") if x] or None,
                    rows_only=[x for x in args.rows.split(";") if x] or None,
                    ratios=[float(x) for x in args.ratios.split(",") if x] or None, device=args.device)
    if args.which == "defaults":  # how cusprun's defaults were chosen (held-apart documents; not in `all`)
        from . import defaults

        defaults.run(ratios=[float(x) for x in args.ratios.split(",") if x] or None, model_name=args.model,
                     only=[x for x in args.settings.split(",") if x] or None, device=args.device)
    if args.which == "frontier" and args.respeed:
        from . import frontier

        frontier.respeed(quick=args.quick, only=[x for x in args.settings.split(",") if x] or None,
                         ratios=[float(x) for x in args.ratios.split(",") if x] or None)
    elif args.which in ("frontier", "all"):
        from . import frontier

        frontier.run(quick=args.quick, model_name=args.model,
                     only=[x for x in args.settings.split(",") if x] or None,
                     ratios=[float(x) for x in args.ratios.split(",") if x] or None,
                     vocab_modes=(False,) if args.quick and args.vocab == "both" else
                     {"both": (False, True), "full": (False,), "pruned": (True,)}[args.vocab])
    if args.which == "speed" or (args.which == "all" and not args.quick):  # quick: the frontier point measures speed
        from . import speed

        speed.run(quick=args.quick)
    if args.which == "all":  # how long the whole `make bench` / `make bench-quick` took
        write_json("run-quick.json" if args.quick else "run.json", {
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]), "seconds": round(time.time() - started, 1),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    from .results_md import write_results_md

    write_results_md()


if __name__ == "__main__":
    main()
