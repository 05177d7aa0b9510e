"""Model sources: embedded, GGUF, HF directory, hub id; and every bad input the loader must refuse."""

import json
import os

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from tiny import tiny_model

from cusprun_edge import UserError, load_model
from cusprun_edge.model.load import EMBEDDED, _smollm2_gguf, resolve_source


def test_resolve_source_kinds(tmp_path):
    assert resolve_source("smollm2-135m") == ("embedded", "smollm2-135m")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M")[0] == "hub"
    with pytest.raises(UserError, match="no such file"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="unknown model"):
        resolve_source("not-a-model")


def test_local_hf_directory_round_trip(tmp_path):
    model, tok = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, ltok = load_model(str(tmp_path / "m"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)
    assert ltok.pad_token_id is not None


def test_pickle_checkpoint_refused_without_opt_in(tmp_path):
    model, tok = tiny_model("llama")
    d = tmp_path / "pickled"
    model.config.save_pretrained(d)  # a directory that holds only a pickle checkpoint
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_model(str(d))
    with pytest.raises(UserError, match="pickle"):
        load_model(str(d / "pytorch_model.bin"))


def test_unsupported_architecture_refused(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        load_model(str(d))


def test_corrupt_and_truncated_gguf_leave_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CUSPRUN_EDGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(bad))
    truncated = tmp_path / "truncated.gguf"
    with open(_smollm2_gguf(), "rb") as src:
        truncated.write_bytes(src.read(2_000_000))
    with pytest.raises(UserError, match="cannot read GGUF"):
        load_model(str(truncated))
    converted = tmp_path / "cache" / "converted"
    assert not converted.exists() or not any(converted.iterdir())


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="offline"):
        load_model("someone/some-model-that-is-not-cached")


def test_cli_models_lists_both_embedded():
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in proc.stdout.splitlines()}  # piped: plain rows
    for name in EMBEDDED:
        assert rows[name][4] in ("yes", "no")  # installed?, on the model's own row


def test_cli_bad_model_is_one_line_exit_2(tmp_path):
    assert_one_line_error(run_cli("score", "--model", "no-such-model", "--out", tmp_path / "s"), "unknown model")
    assert_one_line_error(run_cli("score", "--model", tmp_path / "nope.gguf", "--out", tmp_path / "s"), "no such file")
    assert_one_line_error(run_cli("score", "--model", "x/y", "--out", tmp_path / "s", env={"HF_HUB_OFFLINE": "1"}),
                          "offline")
    assert not (tmp_path / "s").exists()


def test_trust_remote_code_is_off_by_default():
    import inspect

    from cusprun_edge.cli import score

    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    assert inspect.signature(score).parameters["trust_remote_code"].default.default is False


@pytest.mark.integration
def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.integration
def test_second_load_uses_cache(smollm2):
    from cusprun_edge.model.load import cache_state

    state = cache_state("smollm2-135m")
    assert state.startswith("cached at")
    cached = state.split("cached at ", 1)[1]
    assert (os.path.exists(os.path.join(cached, "model.safetensors")))
    model, _ = load_model("smollm2-135m")  # from the cache: the GGUF is not dequantized again
    ref, _ = smollm2
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
