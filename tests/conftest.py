import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# `make test` runs two pytest-xdist workers on this 2-core machine: each gets one thread for torch
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

REPO = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).parent / "cusprun-edge")


def pytest_configure(config):
    """Convert the embedded SmolLM2 once, before xdist starts its workers: two workers converting it at the same
    time would each replace the other's cache directory."""
    if os.environ.get("PYTEST_XDIST_WORKER") or getattr(config.option, "numprocesses", None) in (None, 0):
        return
    from cusprun_edge.model.load import EMBEDDED, convert_gguf

    entry = EMBEDDED["smollm2-135m"]
    try:
        path = entry.locate()
    except Exception:  # not installed: the integration tests say so themselves
        return
    convert_gguf(path)


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


# --------------------------------------------------------------------------- tiny builds, shared by every module
# (a fixture defined here is one per session; one imported into several test modules would run once per module)

EXPERT = "language=en,domain=general"
USER_PROMPT = "Write one sentence about the sea:"


def tiny_build_config(model_dir, ratio, prompts=(), baseline=False):
    from cusprun_edge.pipeline.config import BuildConfig

    return BuildConfig(target="x86-cpu", model=str(model_dir), expert=EXPERT, ratio=ratio, method="magnitude",
                       precision="fp32", quick_bench=True, threads=1, prompts=list(prompts), baseline=baseline)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    from test_validate import build_tiny_artifacts

    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))


@pytest.fixture(scope="session")
def tiny_builds(tiny_artifacts, tmp_path_factory):
    """Two full pipeline builds of the tiny model (ratios 0.3 and 0.5) side by side in one parent."""
    import shutil

    from cusprun_edge.pipeline.build import build

    parent = tmp_path_factory.mktemp("builds")
    stages = {}
    for name, ratio in (("r50", 0.5), ("r30", 0.3)):  # r30 last: its report sees the sibling r50
        if name == "r30":  # same model and corpora: the finished load and score stages carry over (skipped)
            for stage in ("load", "score"):
                shutil.copytree(parent / "r50" / stage, parent / name / stage)
            shutil.copy(parent / "r50" / "build.json", parent / name)  # a build resumes only its own directory
        stages[name] = seen = []
        # r30 measures the GenAI builder's int4 of the dense model beside ours (the baseline its verdict names)
        build(tiny_build_config(tiny_artifacts["dense_hf"], ratio, [USER_PROMPT] if name == "r30" else [],
                                name == "r30"),
              parent / name, on_stage=lambda s, state, seen=seen: seen.append((s, state)))
    return parent / "r30", parent / "r50", stages
