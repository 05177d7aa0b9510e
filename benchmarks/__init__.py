"""Reproducible measurements behind RESULTS.md: `python -m benchmarks [quality|speed|all] [--quick]`."""
