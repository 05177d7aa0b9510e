"""`python -m benchmarks [quality|speed|all] [--quick]` writes results/*.json and RESULTS.md."""

import argparse

import torch

from . import quality


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("which", nargs="?", default="all", choices=["quality", "speed", "all"])
    parser.add_argument("--quick", action="store_true", help="one setting, one ratio, three methods")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.which in ("quality", "all"):
        quality.run(quick=args.quick)
    if args.which in ("speed", "all"):
        from . import speed

        speed.run(quick=args.quick)
    from .results_md import write_results_md

    write_results_md()


if __name__ == "__main__":
    main()
