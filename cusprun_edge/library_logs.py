"""Where the libraries' own output goes while a build runs: a log file, not the terminal (unless `--verbose`).

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
