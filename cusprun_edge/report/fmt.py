"""Number formatting shared by the report's sentences and tables."""

from __future__ import annotations


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def fmt_ratio(value) -> str:
    """A retention or agreement: three decimals, so 0.998 does not print as 1."""
    return "-" if value is None else f"{value:.3f}"


def megabytes(n) -> str:
    # decimal megabytes, as file managers, README and benchmarks/results state sizes
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def ratio(a, b):
    return None if a is None or not b else a / b
