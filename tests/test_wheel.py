"""The wheel ships what a build reads: every target profile and every built-in corpus, as package data
that importlib.resources finds (a pip-installed tool has no checkout beside it)."""

import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

from cusprun_edge.config.corpora import calib_root
from cusprun_edge.config.targets import builtin_dirs


@pytest.mark.integration
def test_wheel_contains_target_profiles_and_corpora(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "cusprun_edge", src / "cusprun_edge", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("cusprun_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    # every data file the checkout's readers find is in the wheel, at the same place in the package
    package = REPO / "cusprun_edge"
    data = [p for d in (calib_root(), *builtin_dirs()) for p in d.rglob("*") if p.is_file()]
    wanted = {p.relative_to(REPO).as_posix() for p in data}
    assert any(n.endswith("/x86-cpu.toml") for n in wanted) and any(n.endswith("/general.jsonl") for n in wanted)
    assert any(n.endswith("/prompts.json") for n in wanted) and any(n.endswith(".mc.jsonl") for n in wanted)
    assert all(p.is_relative_to(package) for p in data)  # package data, not files beside the package
    assert wanted <= names, sorted(wanted - names)[:5]
