"""Quality-target build: the largest pruning ratio whose perplexity stays within a factor of dense.

Users think in "no worse than 1.2x dense", not in "remove 25% of parameters". The search prunes candidate
ratios from one scoring pass and measures each on the calibration documents held apart from scoring
(`Corpus.tune`), never on the eval split, which stays for the confirmation afterwards. A larger ratio is a
faster expert (fewer weights read per token), so the fastest expert within the target is the largest
ratio that passes. Perplexity rises with the ratio on every expert measured here, so a bisection between
a passing and a failing ratio finds it in a few prunes; every measured point is kept for the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import UserError

RATIO_FLOOR = 0.02  # below this the search refuses: the target is out of reach for this expert
RATIO_CEILING = 0.60
TOLERANCE = 0.02  # stop when the passing and failing ratios are this close


@dataclass
class SearchPoint:
    ratio: float
    ppl: float
    ppl_ratio: float
    passed: bool
    seconds: float


def check_target(max_ppl_ratio: float, *, at_least_one: bool = False) -> None:
    """A user's factor must be above 1.0; matching a baseline's perplexity itself is a factor of exactly 1.0."""
    if max_ppl_ratio == 1.0 and at_least_one:
        return
    if not max_ppl_ratio > 1.0:
        raise UserError(f"--max-ppl-ratio {max_ppl_ratio} must be above 1.0 (e.g. 1.2: perplexity at most 1.2x dense)")


def search_ratio(measure: Callable[[float], float], dense_ppl: float, max_ppl_ratio: float, *,
                 lo: float = 0.05, hi: float = 0.45, floor: float = RATIO_FLOOR, tolerance: float = TOLERANCE,
                 max_steps: int = 8, on_point: Callable[[SearchPoint], None] | None = None,
                 what_to_do: str = "raise --max-ppl-ratio or use --ratio") -> dict:
    """Largest ratio in [floor, hi] with measure(ratio) <= max_ppl_ratio * dense_ppl.

    `measure(ratio)` prunes a fresh copy at `ratio` and returns its held-apart perplexity. Starts at `lo`;
    when `lo` fails, halves towards `floor` and refuses the target (UserError) if even `floor` fails.
    Returns {"ratio", "points", "seconds", ...}; every ratio tried lies within [floor, hi].
    """
    check_target(max_ppl_ratio, at_least_one=True)
    if not 0 < floor <= lo <= hi < 1:
        raise ValueError(f"search bounds must satisfy 0 < floor <= lo <= hi < 1 (got {floor}, {lo}, {hi})")
    limit = max_ppl_ratio * dense_ppl
    points: list[SearchPoint] = []
    t_start = time.time()

    def probe(ratio: float) -> bool:
        t0 = time.time()
        ppl = float(measure(ratio))
        point = SearchPoint(round(ratio, 4), ppl, ppl / dense_ppl, ppl <= limit, round(time.time() - t0, 1))
        points.append(point)
        if on_point:
            on_point(point)
        return point.passed

    good, bad = None, None
    ratio = lo
    while True:  # find a passing ratio at or below lo
        if probe(ratio):
            good = ratio
            break
        bad = ratio
        if ratio <= floor or len(points) >= max_steps:
            best = min(points, key=lambda p: p.ppl)
            raise UserError(
                f"no pruning ratio down to {ratio:.2f} keeps held-apart perplexity within {max_ppl_ratio}x dense "
                f"(best: {best.ppl_ratio:.2f}x at {best.ratio:.2f}); {what_to_do}")
        ratio = max(floor, ratio / 2)
    if bad is None:  # lo passed: is the ceiling already within the target?
        if probe(hi):
            good = hi
        else:
            bad = hi
    while bad is not None and bad - good > tolerance and len(points) < max_steps:
        mid = round((good + bad) / 2, 3)
        if probe(mid):
            good = mid
        else:
            bad = mid
    return {
        "ratio": good,
        "max_ppl_ratio": max_ppl_ratio,
        "dense_ppl": dense_ppl,
        "measured_on": "calibration documents held apart from scoring",
        "points": [asdict(p) for p in sorted(points, key=lambda p: p.ratio)],
        "seconds": round(time.time() - t_start, 1),
    }
