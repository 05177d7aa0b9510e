"""`python -m benchmarks [quality|frontier|speed|all] [--quick] [--model M --settings a,b]` writes
results/*.json and RESULTS.md (each part resumes where it stopped: finished rows and points are kept); `python -m benchmarks builder [--also LABEL=DIR]` compares our int4 export with GenAI's builder."""

import argparse
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("which", nargs="?", default="all", choices=["quality", "frontier", "speed", "all"])
    parser.add_argument("--quick", action="store_true", help="one setting, one ratio, three methods")
    parser.add_argument("--model", default=quality.DEFAULT_MODEL, help="quality and frontier: the model to prune")
    parser.add_argument("--settings", default="", help="quality and frontier: comma-separated subset of "
                        + ", ".join(quality.SETTINGS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    if args.which in ("quality", "all"):
        quality.run(quick=args.quick, model_name=args.model,
                    only=[x for x in args.settings.split(",") if x] or None)
    if args.which in ("frontier", "all"):
        from . import frontier

        frontier.run(quick=args.quick, model_name=args.model,
                     only=[x for x in args.settings.split(",") if x] or None)
    if args.which in ("speed", "all"):
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
