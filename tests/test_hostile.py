"""Hostile input, one row per case: every misuse of a subcommand exits with 2 (130 for Ctrl-C), says so in one
line on stderr with no traceback, and leaves the file system exactly as it was (the workspace is hashed before
and after). The cases of the audit of issue 23 and our own; tiny models, so the whole file stays fast.

Most rows run `cusprun_edge.cli.main` in this process; Ctrl-C, SIGKILL, a second concurrent build and a file
size limit need a real process."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import chdir, redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
from conftest import CLI

DOCS = ["The quick brown fox jumps over the lazy dog near the river bank.",
        "The court held that the contract was void for lack of consideration.",
        "Interest rates rose as inflation stayed above the central bank's target.",
        "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
        "Le patient présente une fièvre et une toux depuis trois jours."]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a tiny HF model M, its pruned expert E and E's fp32 export ART (the tiny artifacts other test
    files build once per session), a corpus C (12 documents), and broken variants of each."""
    from test_validate import build_tiny_artifacts

    from cusprun_edge.model.expert_io import save_expert

    art = build_tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(art["dense_hf"], root / "M")
    save_expert(copy.deepcopy(art["expert_model"]), art["tok"], root / "E", {"method": "magnitude"})
    shutil.copytree(art["expert_art"], root / "ART")
    corpus = root / "C"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(DOCS[i % 5] + " " + DOCS[(i + 2) % 5])
    small = root / "C3"
    small.mkdir()
    for i in range(3):
        (small / f"doc{i}.txt").write_text(DOCS[i])

    def model_variant(name, edit_config=None, weights=None):
        shutil.copytree(root / "M", root / name)
        if edit_config is not None:
            cfg = json.loads((root / name / "config.json").read_text())
            (root / name / "config.json").write_text(json.dumps(edit_config(cfg)))
        if weights is not None:
            f = root / name / "model.safetensors"
            f.write_bytes(weights(f.read_bytes()))

    model_variant("M-truncated", weights=lambda b: b[: len(b) // 2])
    model_variant("M-garbage", weights=lambda b: os.urandom(len(b)))
    model_variant("M-config-list", edit_config=lambda c: [])
    model_variant("M-hidden-abc", edit_config=lambda c: {**c, "hidden_size": "abc"})
    model_variant("M-inconsistent", edit_config=lambda c: {**c, "intermediate_size": c["intermediate_size"] * 2})
    shutil.copytree(root / "E", root / "E-type7")
    cfg = json.loads((root / "E-type7" / "config.json").read_text())
    (root / "E-type7" / "config.json").write_text(json.dumps({**cfg, "model_type": 7}))
    shutil.copytree(root / "E", root / "E-truncated")
    weights = root / "E-truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    shutil.copytree(root / "ART", root / "ART-garbage")  # same size: only running it can tell
    graph = root / "ART-garbage" / "model.onnx"
    graph.write_bytes(os.urandom(graph.stat().st_size))
    shutil.copytree(root / "ART", root / "ART-plus")  # our export, with a file of the user's put inside
    (root / "ART-plus" / "notes.txt").write_text("mine")
    shutil.copytree(root / "ART", root / "ART-no-data")
    (root / "ART-no-data" / "model.onnx.data").unlink()

    (root / "mine.txt").write_text("mine\n")
    (root / "user" / "report").mkdir(parents=True)
    (root / "user" / "report" / "q3.docx").write_text("a quarter of work")
    (root / "user-dir").mkdir()
    (root / "user-dir" / "notes.txt").write_text("notes")
    (root / "nul.txt").write_bytes(b"\x00" * 64)
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "notext.csv").write_text("a,b\n1,2\n3,4\n")
    (root / "x.toml").mkdir()
    (root / "a-file").write_text("not a directory")
    (root / "paper.pdf").write_bytes(b"%PDF-1.4 not a corpus")
    (root / "link").symlink_to(root / "user-dir")
    return root


def _tree(root: Path) -> dict:
    """Every entry under `root`: type, and a file's sha256 (a symlink's target)."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            state[rel] = ("dir",)
        else:
            state[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return state


def run_main(*args, cwd) -> tuple[int, str, str]:
    """`cusprun-edge ARGS` in this process: (exit code, stdout, stderr)."""
    from cusprun_edge import cli

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["cusprun-edge", *map(str, args)]), chdir(cwd), \
            redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


M, E, C = "{ws}/M", "{ws}/E", "domain={ws}/C"
SCORE = ["score", "--model", M, "--expert", C]
BUILD = ["build", "--model", M, "--expert", C, "--method", "magnitude", "--precision", "fp32"]
VALIDATE = ["validate", "--dense", M, "--expert", C]

# id: (arguments, a fragment of the one line)
CASES = {
    # 1: build --out never touches a user's directory; never the model's
    "build into a user's directory": ([*BUILD, "--out", "{ws}/user"], "not a build directory"),
    "build into a user's directory, --force": ([*BUILD, "--out", "{ws}/user", "--force"], "not a build directory"),
    "build --out is the model directory": ([*BUILD, "--out", M], "is the input"),
    "build --out inside the corpus": ([*BUILD, "--out", "{ws}/C/build"], "inside the input"),
    "build --out is a file": ([*BUILD, "--out", "{ws}/mine.txt"], "is a file"),
    # 3: existing files are not overwritten
    "score over a user's file": ([*SCORE, "--out", "{ws}/mine.txt"], "already exists"),
    "score over a user's file, --force": ([*SCORE, "--out", "{ws}/mine.txt", "--force"], "not a cusprun-edge score"),
    "validate over a user's file": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--out", "{ws}/mine.txt"],
                                    "already exists"),
    "validate over a user's file, --force": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--out", "{ws}/mine.txt",
                                              "--force"], "not a validate record"),
    "bench over a user's file": (["bench", "--artifact", "{ws}/ART", "--out", "{ws}/mine.txt", "--force"],
                                 "not a bench record"),
    "export into a user's directory, --force": (["export", "--model", E, "--out", "{ws}/user-dir", "--force"],
                                                "not an export directory"),
    "prune into a user's directory, --force": (["prune", "--model", M, "--expert", C, "--method", "magnitude",
                                                "--out", "{ws}/user-dir", "--force"], "not an expert directory"),
    "export --out is the expert": (["export", "--model", E, "--out", E, "--force"], "is the input"),
    "validate --out inside the artifact": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--out", "{ws}/ART/v.json"],
                                           "inside the input"),
    # 4: broken model files
    "truncated safetensors": ([*SCORE, "--model", "{ws}/M-truncated", "--out", "{ws}/s.st"], "could not load"),
    "garbage safetensors": ([*SCORE, "--model", "{ws}/M-garbage", "--out", "{ws}/s.st"], "could not load"),
    "config.json is []": ([*SCORE, "--model", "{ws}/M-config-list", "--out", "{ws}/s.st"], "expected a JSON object"),
    "hidden_size is 'abc'": ([*SCORE, "--model", "{ws}/M-hidden-abc", "--out", "{ws}/s.st"], "could not load"),
    "inconsistent dimensions": ([*SCORE, "--model", "{ws}/M-inconsistent", "--out", "{ws}/s.st"],
                                "do not match config.json"),
    "expert with model_type 7": ([*SCORE, "--model", "{ws}/E-type7", "--out", "{ws}/s.st"], "model_type"),
    "expert with truncated weights": ([*SCORE, "--model", "{ws}/E-truncated", "--out", "{ws}/s.st"], "E-truncated"),
    # 5: output paths the OS would refuse
    "parent is a file": ([*SCORE, "--out", "{ws}/mine.txt/s.st"], "is a file, not a directory"),
    "name too long": ([*SCORE, "--out", "{ws}/" + "n" * 300], "too long"),
    "score --out is a directory": ([*SCORE, "--out", "{ws}/user-dir"], "is a directory"),
    "export --out is a file": (["export", "--model", E, "--out", "{ws}/mine.txt"], "is a file"),
    # 6: numbers checked at the edge
    "score --batch-size 0": ([*SCORE, "--batch-size", "0", "--out", "{ws}/s.st"], "--batch-size"),
    "score --max-length -1": ([*SCORE, "--max-length", "-1", "--out", "{ws}/s.st"], "--max-length"),
    "validate --max-length 0": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--max-length", "0",
                                 "--out", "{ws}/v.json"], "--max-length"),
    "validate --max-docs -1": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--max-docs", "-1",
                                "--out", "{ws}/v.json"], "--max-docs"),
    "validate --threads 0": ([*VALIDATE, "--expert-artifact", "{ws}/ART", "--threads", "0", "--out", "{ws}/v.json"],
                             "--threads"),
    "prune --vocab-size -5": (["prune", "--model", M, "--expert", C, "--method", "magnitude", "--prune-vocab",
                               "--vocab-size", "-5", "--out", "{ws}/e2"], "--vocab-size"),
    "--vocab-size without --prune-vocab": (["prune", "--model", M, "--expert", C, "--method", "magnitude",
                                            "--vocab-size", "5", "--out", "{ws}/e2"], "--prune-vocab"),
    "build --threads 0": ([*BUILD, "--threads", "0", "--out", "{ws}/b"], "--threads"),
    "build --max-memory 8 parsecs": ([*BUILD, "--max-memory", "8 parsecs", "--out", "{ws}/b"], "not a memory size"),
    "build --max-memory too small": ([*BUILD, "--max-memory", "64MB", "--out", "{ws}/b"], "needs about"),
    # 9: nothing measured is a failure
    "bench on a garbage graph": (["bench", "--artifact", "{ws}/ART-garbage", "--quick", "--out", "{ws}/b.json"],
                                 "benchmark failed"),
    "bench without model.onnx.data": (["bench", "--artifact", "{ws}/ART-no-data", "--out", "{ws}/b.json"],
                                      "model.onnx.data is missing"),
    "validate on a garbage graph": ([*VALIDATE, "--expert-artifact", "{ws}/ART-garbage", "--max-docs", "1",
                                     "--out", "{ws}/v.json"], "cannot open"),
    "validate without model.onnx.data": ([*VALIDATE, "--expert-artifact", "{ws}/ART-no-data", "--out", "{ws}/v.json"],
                                         "model.onnx.data is missing"),
    # 10: messages that say what is wrong
    "build on a corpus of 3 documents": ([*BUILD, "--expert", "domain={ws}/C3", "--out", "{ws}/b"],
                                         "no held-out documents"),
    "a NUL-only .txt corpus": ([*SCORE, "--expert", "domain={ws}/nul.txt", "--out", "{ws}/s.st"], "NUL"),
    "bad .jsonl names its line": ([*SCORE, "--expert", "domain={ws}/bad.jsonl", "--out", "{ws}/s.st"],
                                  "bad.jsonl:2 "),
    "a .csv without a text column": ([*SCORE, "--expert", "domain={ws}/notext.csv", "--out", "{ws}/s.st"],
                                     "no column 'text'"),
    "report on a file": (["report", "{ws}/a-file"], "is a file"),
    "a directory named x.toml as target": (["export", "--model", E, "--target", "{ws}/x.toml", "--out", "{ws}/x"],
                                           "is a directory"),
    # our own
    "export --force over our export holding a user's file": (["export", "--model", E, "--out", "{ws}/ART-plus",
                                                               "--force"], "did not write (notes.txt)"),
    "export --format gguf into a user's directory, --force": (["export", "--model", E, "--format", "gguf", "--out",
                                                                "{ws}/user-dir", "--force"], "not an export directory"),
    "--out is a symbolic link": ([*SCORE, "--out", "{ws}/link", "--force"], "symbolic link"),
    "prune --scores is a directory": (["prune", "--model", M, "--expert", C, "--scores", "{ws}/C", "--out", "{ws}/e2"],
                                      "is a directory"),
    "bench --artifact is a file": (["bench", "--artifact", "{ws}/mine.txt", "--out", "{ws}/b.json"], "is a file"),
    "score --model is a text file": ([*SCORE, "--model", "{ws}/mine.txt", "--out", "{ws}/s.st"], "is not a model"),
    "a .pdf corpus": ([*SCORE, "--expert", "domain={ws}/paper.pdf", "--out", "{ws}/s.st"], "unsupported file type"),
    "build --out is the corpus, --force": ([*BUILD, "--out", "{ws}/C", "--force"], "is the input"),
    "bench --threads 0": (["bench", "--artifact", "{ws}/ART", "--threads", "0", "--out", "{ws}/b.json"], "--threads"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input(ws, case):
    args, fragment = CASES[case]
    args = [a.format(ws=ws) for a in args]
    before = _tree(ws)
    code, _, err = run_main(*args, cwd=ws)
    line = one_line(err)
    assert code == 2, (code, err)
    assert line.startswith("error: ") and fragment in line, line
    assert _tree(ws) == before


def test_replace_only_our_own(ws):
    """--force replaces our own output (a score file), and an empty directory is a fine --out; the user's
    own files beside stay."""
    from cusprun_edge.prune.score import ScoreSet

    out = ws / "scored" / "s.safetensors"
    try:
        code, _, err = run_main(*[a.format(ws=ws) for a in SCORE], "--out", out, "--max-length", "32", cwd=ws)
        assert code == 0, err
        first = out.stat().st_ino
        code, _, err = run_main(*[a.format(ws=ws) for a in SCORE], "--out", out, "--max-length", "32", cwd=ws)
        assert code == 2 and "already exists" in one_line(err)
        code, _, err = run_main(*[a.format(ws=ws) for a in SCORE], "--out", out, "--max-length", "32", "--force",
                                cwd=ws)
        assert code == 0, err
        assert out.stat().st_ino != first  # written again (renamed into place), and whole:
        assert ScoreSet.load(out).n_layers == 4
        assert sorted(p.name for p in out.parent.iterdir()) == ["s.safetensors"]  # nothing left beside
    finally:
        shutil.rmtree(ws / "scored", ignore_errors=True)


def _cli_process(*args, tmpdir: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "COLUMNS": "200"}
    # a terminal's Ctrl-C reaches a process whose SIGINT is at its default; a test run started in the background
    # of a non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen([CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_ctrl_c_and_sigkill_during_export(ws, tmp_path):
    """Ctrl-C: exit 130, one line, nothing left (beside the output or in the temporary directory). SIGKILL
    leaves the output's staging directories only; the next run writing the same output removes them."""
    out, system_tmp = ws / "x", tmp_path / "tmp"
    system_tmp.mkdir()
    before = _tree(ws)
    proc = _cli_process("export", "--model", ws / "E", "--precision", "fp32", "--out", out, tmpdir=system_tmp)
    _wait_for(lambda: list(ws.glob("x.tmp-*")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert one_line(err).startswith("interrupted: nothing was written")
    assert _tree(ws) == before and list(system_tmp.iterdir()) == []

    proc = _cli_process("export", "--model", ws / "E", "--precision", "fp32", "--out", out, tmpdir=system_tmp)
    _wait_for(lambda: len(list(ws.glob("x.tmp-*"))) == 2, proc)  # the log's staging and the export's
    proc.kill()
    proc.communicate()
    assert list(system_tmp.iterdir()) == []  # every temporary file was in the output's staging directory
    assert len(list(ws.glob("x.tmp-*"))) == 2 and not out.exists()
    try:  # the next run writing there (a quick one: a score file) removes them
        code, _, err = run_main(*[a.format(ws=ws) for a in SCORE], "--max-length", "32", "--out", out, cwd=ws)
        assert code == 0, err
        assert out.is_file() and list(ws.glob("x.tmp-*")) == []
    finally:
        out.unlink(missing_ok=True)
    assert _tree(ws) == before


def test_second_build_is_refused_and_ctrl_c_keeps_finished_stages(ws, tmp_path):
    """Two builds into one directory: the second is refused in one line while the first runs; Ctrl-C ends the
    first with exit 130 and one line saying what it kept."""
    out = ws / "b"
    before = _tree(ws)
    args = [a.format(ws=ws) for a in BUILD] + ["--quick-bench", "--threads", "1", "--no-baseline", "--out", out]
    proc = _cli_process(*args, tmpdir=tmp_path)
    try:
        _wait_for(lambda: (out / "build.json").is_file(), proc)
        code, _, err = run_main(*args, cwd=ws)
        assert code == 2 and "another build is writing here" in one_line(err), err
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        line = one_line(err)
        assert line.startswith("interrupted: ")
        if "finished stages kept" in line:
            assert "run the same command again to resume" in line and (out / "build.json").is_file()
        else:
            assert not out.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(out, ignore_errors=True)
    assert _tree(ws) == before


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_disk_full_while_writing(ws):
    """A write that fails (here: the file size limit, as on a full disk) is one line, exit 2, nothing left."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    before = _tree(ws)
    proc = subprocess.run([CLI, *[a.format(ws=ws) for a in SCORE], "--max-length", "32", "--out", ws / "s.st"],
                          capture_output=True, text=True, preexec_fn=limit, cwd=ws, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert one_line(proc.stderr).startswith("error: ")
    assert _tree(ws) == before


def test_staging_leftovers_of_dead_runs_only(tmp_path):
    """Beside an output, a run removes the staging directories of dead runs (marked, lock free), never a live
    run's (locked) and never a directory of the user's that merely looks like one (no marker)."""
    from cusprun_edge import outputs

    out = tmp_path / "x"
    dead = tmp_path / "x.tmp-dead0000"
    dead.mkdir()
    (dead / outputs.STAGING_MARKER).write_text("1\n")
    (dead / "model.onnx").write_bytes(b"half")
    users = tmp_path / "x.tmp-mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with outputs.staging(out, "dir") as live:
        assert not dead.exists() and users.exists()
        assert outputs.clear_stale(out) == [] and live.root.is_dir()  # alive: locked
        (live.path / "f").write_text("done")
        live.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x.tmp-mine"]
    assert (out / "f").read_text() == "done" and (users / "notes.txt").read_text() == "mine"
