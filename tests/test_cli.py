"""The CLI: listings work (on a terminal, piped, as JSON), and bad input is one line on stderr with
exit code 2 and nothing written."""

import pytest
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
    (out / "mine.txt").write_text("mine")  # an empty directory is a fine --out; one with files is not
    assert_one_line_error(run_cli("prune", "--out", out), "already exists")


def test_listings_piped_are_plain_rows_and_json():
    """Piped, the listings are tab-separated rows (names whole, one row per entry); --json for jq."""
    import json

    proc = run_cli("targets", env={"COLUMNS": "40"})
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert sum("jetson-orin-nano" in "\t".join(r) for r in rows) == 1  # `targets | grep -c jetson-orin-nano`
    assert {r[0] for r in rows} >= {"jetson-orin-nano", "jetson-agx-orin", "x86-cpu", "arm64-cpu", "cuda-gpu"}
    assert len({len(r) for r in rows}) == 1
    proc = run_cli("models", env={"COLUMNS": "40"})
    row = next(line for line in proc.stdout.splitlines() if line.startswith("smollm2-135m\t"))
    assert any(state in row for state in ("cached at ", "not converted yet", "not installed"))  # same row
    entries = json.loads(run_cli("targets", "--json").stdout)
    assert {e["name"] for e in entries} >= {"x86-cpu"} and all("precisions" in e for e in entries)
    assert json.loads(run_cli("models", "--json").stdout)[0]["cache"]


@pytest.mark.parametrize("case", ["missing model", "corrupt gguf", "unknown target", "unknown expert",
                                  "ratio out of range", "empty calibration file", "precision the target lacks"])
def test_build_failing_first_stage_leaves_no_directory(case, tmp_path):
    """Bad input found before or in the first stage: exit 2, one line, and no output directory."""
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)  # the magic, then no valid header
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args, fragment = {
        "missing model": (["--model", tmp_path / "nonexistent" / "model"], "no such file or directory"),
        "corrupt gguf": (["--model", corrupt], "cannot read GGUF file"),
        "unknown target": (["--target", "toaster"], "unknown target 'toaster'"),
        "unknown expert": (["--expert", "domain=astrology"], "no corpus for domain=astrology"),
        "ratio out of range": (["--ratio", "0"], "--ratio must be in (0, 0.9]"),
        "empty calibration file": (["--expert", f"domain={empty}"], "holds no text"),
        "precision the target lacks": (["--precision", "fp16"], "precision 'fp16' is not available"),
    }[case]
    out = tmp_path / "build" / "x"
    assert_one_line_error(run_cli("build", *args, "--out", out), fragment)
    assert not out.exists()


def test_method_options_are_checked(tmp_path):
    """An --option the method does not read is refused; a bad value is one line, not a raw exception."""
    out = tmp_path / "out"
    assert_one_line_error(run_cli("prune", "--option", "tua=0.9", "--out", out), "--option tua is not an option")
    assert_one_line_error(run_cli("prune", "--option", "tau=abc", "--out", out), "--option tau=abc is not valid")
    assert_one_line_error(run_cli("prune", "--option", "aggregate=median", "--out", out), "choose one of mean, rms")
    assert_one_line_error(run_cli("build", "--option", "seed=1", "--out", out), "--option seed is not an option")
    assert_one_line_error(run_cli("build", "--method", "random", "--option", "seed=x", "--out", out),
                          "--option seed=x is not valid")
    assert_one_line_error(run_cli("prune", "--option", "head_policy=all", "--out", out), "head_policy=all")
    assert not out.exists()


def test_force_never_deletes_what_is_not_an_expert(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    assert_one_line_error(run_cli("prune", "--force", "--out", out), "not an expert directory")
    assert (out / "thesis.txt").read_text() == "years of work"
    from tiny import tiny_model

    from cusprun_edge.errors import UserError
    from cusprun_edge.model.expert_io import save_expert

    model, tok = tiny_model("llama")
    with pytest.raises(UserError, match="not an expert directory"):
        save_expert(model, tok, out, {}, force=True)  # the library refuses too, not only the CLI
    assert (out / "thesis.txt").exists()
    expert = tmp_path / "expert"
    save_expert(model, tok, expert, {"method": "none"})
    save_expert(model, tok, expert, {"method": "again"}, force=True)  # our own output: replaced
    assert "again" in (expert / "cusprun.json").read_text()
