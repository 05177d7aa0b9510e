import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cusprun-edge")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (converted once into the user cache)."""
    from cusprun_edge import load_model

    return load_model("smollm2-135m")


def run_cli(*args, env=None, timeout=900):
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_one_line_error(proc, *fragments):
    """Bad input: exit code 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("error: ")
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
