"""The CLI: listings work, and bad input is one line on stderr with exit code 2 and nothing written."""

from conftest import assert_one_line_error, run_cli


def test_targets_lists_every_profile():
    proc = run_cli("targets", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for name in ("jetson-orin-nano", "jetson-agx-orin", "x86-cpu", "arm64-cpu", "cuda-gpu"):
        assert name in proc.stdout


def test_bad_prune_and_build_inputs(tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("prune", "--ratio", "0.95", "--out", out), "--ratio must be in (0, 0.9]")
    assert_one_line_error(run_cli("prune", "--method", "obs", "--out", out), "unknown method 'obs'")
    assert_one_line_error(run_cli("prune", "--expert", "domain=astrology", "--out", out), "no corpus for domain=astrology")
    assert_one_line_error(run_cli("prune", "--scores", tmp_path / "none.safetensors", "--out", out), "no score file")
    assert_one_line_error(run_cli("build", "--target", "toaster", "--out", out), "toaster")
    assert_one_line_error(run_cli("build", "--expert", "colour=red", "--out", out), "unknown expert dimension")
    assert_one_line_error(run_cli("prune", "--option", "tau", "--out", out), "KEY=VALUE")
    assert not out.exists()


def test_existing_output_refused(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    assert_one_line_error(run_cli("prune", "--out", out), "already exists")
