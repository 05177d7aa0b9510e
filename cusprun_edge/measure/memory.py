"""Resident memory of this process: now, its peak, and its peak over a span of work (a build stage).

On Linux the kernel keeps the high-water mark of the resident set (VmHWM in /proc/self/status) and lets a
process reset it (writing 5 to /proc/self/clear_refs), so each stage's own peak is exact, not sampled.
Elsewhere the peak is the process's lifetime maximum (getrusage), which can only over-state a stage's peak:
the record says which one it is. Standard library only: the benchmark's worker (runtime.py, run as a script
that imports nothing of the package) imports this file beside it.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_CLEAR = Path("/proc/self/clear_refs")

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. Linux: VmHWM, which starts afresh at exec and after a reset
    (getrusage's ru_maxrss is carried over from the parent across fork + exec, so it would count the parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Span:
    """Wall time and peak resident memory of the work inside a `with measured() as span:` block."""

    seconds: float = 0.0
    peak_bytes: int = 0
    scope: str = "stage"  # "stage": this block's own peak; "process": the process's peak so far

    def record(self) -> dict:
        return {"seconds": round(self.seconds, 2), "peak_rss_mb": round(self.peak_bytes / 2**20, 1),
                "peak_rss_scope": self.scope}


_OPEN: list["measured"] = []  # spans inside one another: a reset inside one must not lose the outer's peak


class measured:
    """Context manager: `with measured() as span: ...`; span.seconds and span.peak_bytes are set on exit.
    Spans may nest (a stage that measures a step of its own): each sees its own peak."""

    def __enter__(self) -> Span:
        before = peak_rss_bytes()
        for outer in _OPEN:  # the peak so far is theirs before the kernel's mark is reset for this one
            outer._floor = max(outer._floor, before)
        self.span = Span(scope="stage" if _reset_peak() else "process")
        self._floor = 0
        _OPEN.append(self)
        self._t0 = time.perf_counter()
        return self.span

    def __exit__(self, *exc) -> None:
        self.span.seconds = time.perf_counter() - self._t0
        _OPEN.remove(self)
        self.span.peak_bytes = max(self._floor, peak_rss_bytes())


def parse_size(text: str) -> int:
    """'8GB', '8 GiB', '512M', '1.5G' -> bytes (binary units: a GB here is 2**30, as `free -g` counts).
    Raises ValueError with what is accepted."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a memory size; write a number and a unit, e.g. 8GB or 512MB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"
