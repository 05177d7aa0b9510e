"""The expert loads where users run models. `AutoModelForCausalLM.from_pretrained(expert_dir,
trust_remote_code=True)` builds its per-layer shapes through the modeling file every expert carries, and
the zero-padded copy (`write_hf_compat`, `prune --hf-compat`) loads in stock transformers with no remote
code; both give our own loader's logits, on tiny pruned models whose layers all differ."""

import json

import pytest
import torch
from conftest import run_cli
from tiny import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from cusprun_edge import outputs
from cusprun_edge.errors import UserError
from cusprun_edge.model import arch
from cusprun_edge.model.expert_io import (
    HF_COMPAT_MARKER,
    REMOTE_CODE_FILE,
    load_expert,
    save_expert,
    write_hf_compat,
)
from cusprun_edge.model.structure import (
    add_output_bias,
    count_params,
    keep_ffn_channels,
    keep_heads,
    keep_layers,
)

TEXT = "The quick brown fox jumps over the lazy dog. Le patient présente une fièvre."


def _uneven_expert(family: str, out, bias: bool = False):
    """Every layer its own FFN width, heads removed unevenly (one layer keeps a single KV group), one whole
    layer gone; with `bias`, FLAP-style output biases on one layer."""
    model, tok = tiny_model(family)
    spec, hd = arch.spec_for(model), arch.head_dim(model)
    for i, parts in enumerate(arch.all_layer_parts(model)):
        keep_ffn_channels(parts, torch.arange(0, 128 - 24 * i, 1 + i % 2), spec)  # 6 q heads over 2 KV heads
        if i == 1:
            keep_heads(parts, [0, 2, 3, 5], [0, 1], hd, spec)
        elif i == 2:
            keep_heads(parts, [4], [1], hd, spec)
        if bias and i == 0:
            add_output_bias(parts, "mlp", torch.randn(model.config.hidden_size) * 0.1, spec)
            add_output_bias(parts, "attn", torch.randn(model.config.hidden_size) * 0.1, spec)
    keep_layers(model, [0, 1, 2])
    save_expert(model, tok, out, {"method": "test"})
    return tok


def _logits(model, tok):
    with torch.no_grad():
        return model(tok(TEXT, return_tensors="pt").input_ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_with_remote_code_matches_our_loader(family, tmp_path):
    tok = _uneven_expert(family, tmp_path / "expert")
    config = json.loads((tmp_path / "expert" / "config.json").read_text())
    shapes = config["cusprun_structure"]
    assert len(set(shapes["intermediate_sizes"])) == 3 and len(set(shapes["num_attention_heads"])) == 3
    assert (tmp_path / "expert" / REMOTE_CODE_FILE).is_file() and "AutoModelForCausalLM" in config["auto_map"]

    ours, _ = load_expert(tmp_path / "expert")
    with pytest.raises(Exception):  # stock transformers: one width for every layer (why the file exists)
        AutoModelForCausalLM.from_pretrained(tmp_path / "expert")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", trust_remote_code=True,
                                                  dtype=torch.float32).eval()
    assert type(theirs).__name__.endswith("ExpertForCausalLM")
    assert count_params(theirs) == count_params(ours)  # the small model, not a padded one
    torch.testing.assert_close(_logits(theirs, tok), _logits(ours, tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_compat_copy_loads_in_stock_transformers(family, tmp_path):
    tok = _uneven_expert(family, tmp_path / "expert")
    out = write_hf_compat(tmp_path / "expert", tmp_path / "compat")
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and "cusprun_structure" not in config
    assert not (out / REMOTE_CODE_FILE).exists() and (out / HF_COMPAT_MARKER).is_file()

    ours, _ = load_expert(tmp_path / "expert")
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(stock).__module__.startswith("transformers.models.")
    dense, _ = tiny_model(family)
    keep_layers(dense, [0, 1, 2])
    # what it costs: every tensor has the dense model's shape (only the removed layer is saved)
    assert {k: v.shape for k, v in stock.state_dict().items()} == {k: v.shape for k, v in dense.state_dict().items()}
    assert count_params(stock)["total"] > count_params(ours)["total"]
    torch.testing.assert_close(_logits(stock, tok), _logits(ours, tok), rtol=0, atol=1e-5)

    with pytest.raises(Exception, match="already exists"):  # never over an existing directory
        write_hf_compat(tmp_path / "expert", tmp_path / "expert")


def test_hf_compat_keeps_flap_biases(tmp_path):
    """FLAP's output biases: Llama's stock flags give every projection a bias, zero where it had none."""
    tok = _uneven_expert("llama", tmp_path / "expert", bias=True)
    ours, _ = load_expert(tmp_path / "expert")
    out = write_hf_compat(tmp_path / "expert", tmp_path / "compat")
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] and config["attention_bias"]
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(stock, tok), _logits(ours, tok), rtol=0, atol=1e-5)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "expert", trust_remote_code=True,
                                                  dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(remote, tok), _logits(ours, tok), rtol=0, atol=1e-5)


def test_cli_prune_hf_compat(tmp_path):
    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    out = tmp_path / "expert"
    proc = run_cli("prune", "--model", tmp_path / "dense", "--method", "magnitude", "--ratio", "0.3",
                   "--out", out, "--hf-compat")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stock = AutoModelForCausalLM.from_pretrained(out / "hf-compat", dtype=torch.float32).eval()
    ours, _ = load_expert(out)
    torch.testing.assert_close(_logits(stock, tok), _logits(ours, tok), rtol=0, atol=1e-5)
    # --force may replace the expert with its copy inside: every file in it is ours, and nothing else
    outputs.check_replaceable(out, outputs.EXPERT)
    (out / "hf-compat" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        outputs.check_replaceable(out, outputs.EXPERT)
