"""What a build shows on the terminal: one line per stage, a progress bar while one runs, and nothing
of the libraries' own logging (which goes to a log file instead, unless `--verbose`).

Libraries print in three ways: Python `logging` and `warnings` (onnx_ir, onnxscript, transformers),
plain `print` (torch.onnx) and C++ code writing to file descriptor 2 (ONNX Runtime). Only swapping the
process's stdout and stderr descriptors catches all three; our own output keeps a duplicate of the
original terminal descriptor and draws there through rich's global console.
"""

from __future__ import annotations

import datetime
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from .stages import Progress


@contextmanager
def captured(log_path: Path):
    """Send everything written to stdout/stderr (Python and C level) to `log_path` (appended);
    rich's global console keeps drawing on the terminal meanwhile."""
    import logging
    import warnings

    import rich

    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", encoding="utf-8")
    log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
    log.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    console = rich.get_console()
    before = dict(console.__dict__)
    rich.reconfigure(file=terminal, force_terminal=terminal.isatty() or None)
    logging.captureWarnings(True)
    previous_showwarning = warnings.showwarning
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        logging.captureWarnings(False)
        warnings.showwarning = previous_showwarning
        console.__dict__.clear()
        console.__dict__.update(before)
        terminal.close()
        log.close()


def show_library_logs() -> None:
    """--verbose: library loggers print their INFO records to stderr."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


class RichProgress(Progress):
    """A transient rich bar per running stage (spinner, what it is doing, bar when the total is known,
    elapsed time) and one printed line per stage when it ends."""

    def __init__(self):
        self._bar = None
        self._task = None

    def begin(self, stage: str, own_progress: bool = False) -> None:
        import rich
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        # a stage with its own bar keeps it (one live display at a time); piped, a bar would only leave
        # blank lines behind
        if own_progress or not rich.get_console().is_terminal:
            return
        self._bar = Bar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=rich.get_console(), transient=True,
                        redirect_stdout=False, redirect_stderr=False)
        self._bar.start()
        self._task = self._bar.add_task(stage, total=None)

    def start(self, description: str, total: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description, total=total, completed=0)

    def update(self, description: str | None = None, advance: float = 0, total: float | None = None) -> None:
        if self._bar is None:
            return
        kwargs = {"advance": advance}
        if description is not None:
            kwargs["description"] = description
        if total is not None:
            kwargs["total"] = total
        self._bar.update(self._task, **kwargs)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._bar = self._task = None

    @staticmethod
    def line(text: str, markup: bool = False) -> None:
        import rich

        # soft_wrap: a path or the verdict stays one line; markup only where we wrote it (paths may hold [ ])
        rich.get_console().print(text, highlight=False, soft_wrap=True, markup=markup)
