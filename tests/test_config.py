"""The build config: one typed record, checked once, written as the recipe every build leaves behind."""

from __future__ import annotations

import pytest
from conftest import run_cli

from cusprun_edge.errors import UserError
from cusprun_edge.pipeline.check import check_config
from cusprun_edge.pipeline.config import BuildConfig


def test_recipe_round_trips_every_field(tmp_path):
    cfg = BuildConfig(target="jetson-orin", ratio=0.1, method="wanda-sp", precision="int4",
                      method_options={"tau": 1.5, "allocation": "uniform"}, threads=2, prompts=("Say \"hi\"",),
                      quant_plan="fast", beat_baseline=True, formats=("onnx", "gguf"), prune_vocab=True,
                      vocab_size=65536, vocab_floor=1.05)
    path = tmp_path / "recipe.toml"
    path.write_text(cfg.recipe_text())
    assert BuildConfig.from_recipe(path) == cfg
    assert BuildConfig.from_recipe(path).as_dict() == cfg.as_dict()


@pytest.mark.parametrize("text, words", [
    ("ratio = 0.1\nratoi = 0.2\n", "unknown key(s) ratoi"),
    ("ratio = \"a quarter\"\n", "ratio = 'a quarter' has the wrong type"),
    ("threads = true\n", "threads = True has the wrong type"),
    ("ratio = [0.1\n", "is not a TOML file"),
])
def test_a_bad_recipe_is_refused_with_its_key(tmp_path, text, words):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        BuildConfig.from_recipe(path)


@pytest.mark.parametrize("changes, words", [
    ({"ratio": 0.95}, "--ratio must be in (0, 0.9]"),
    ({"quant_plan": "fastest"}, "--quant-plan 'fastest' is unknown"),
    ({"threads": 0}, "--threads must be 1 or more"),
    ({"beat_baseline": True, "baseline": False}, "--beat-baseline needs the baseline"),
    ({"beat_baseline": True, "max_ppl_ratio": 1.2}, "each choose the ratio"),
    ({"max_ppl_ratio": 0.9}, "must be above 1.0"),
    ({"formats": ("onnx", "tflite")}, "--format must be onnx or gguf"),
    ({"precision": "int3"}, "precision 'int3' is not available"),
    ({"vocab_size": 65536}, "add --prune-vocab"),
    ({"prune_vocab": True, "vocab_size": 0}, "must be a positive number of tokens"),
    ({"prune_vocab": True, "vocab_floor": 0.9}, "is below 1.0"),
])
def test_each_check_lives_in_check_config(changes, words):
    with pytest.raises(UserError) as err:
        check_config(BuildConfig(**changes))
    assert words in str(err.value)


def test_cli_recipe_then_flags(tmp_path):
    """`build --recipe` reads the recipe; a flag on the command line overrides it, and a bad recipe is one line,
    exit 2, nothing written."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(BuildConfig(ratio=0.3, quant_plan="nope").recipe_text())
    out = tmp_path / "out"
    proc = run_cli("build", "--recipe", str(recipe), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--quant-plan 'nope' is unknown" in proc.stderr and not out.exists()
    # the flag wins over the recipe: with the plan fixed, the recipe's next fault (checked after it) speaks
    recipe.write_text(BuildConfig(quant_plan="x", max_ppl_ratio=0.9).recipe_text())
    proc = run_cli("build", "--recipe", str(recipe), "--out", str(out))
    assert proc.returncode == 2 and "--quant-plan 'x' is unknown" in proc.stderr
    proc = run_cli("build", "--recipe", str(recipe), "--quant-plan", "fast", "--out", str(out))
    assert proc.returncode == 2 and "--max-ppl-ratio 0.9 must be above 1.0" in proc.stderr and not out.exists()
    proc = run_cli("build", "--recipe", str(tmp_path / "missing.toml"), "--out", str(out))
    assert proc.returncode == 2 and "no such file" in proc.stderr and not out.exists()
