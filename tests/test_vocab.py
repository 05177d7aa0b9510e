"""--prune-vocab: kept tokens keep their logits, dropped tokens are never produced, experts reload."""

import pytest
import torch
from tiny import FAMILIES, TEXT, tiny_model

from cusprun_edge import load_expert
from cusprun_edge.expert_io import save_expert
from cusprun_edge.structure import count_params
from cusprun_edge.vocab import DROPPED_LOGIT, coverage, prune_vocab_for_corpora, tokens_to_keep


@pytest.mark.parametrize("family", FAMILIES)
def test_vocab_pruning_round_trip(family, tmp_path):
    model, tok = tiny_model(family)
    ids = tok(TEXT[0], return_tensors="pt").input_ids
    ref = model(ids).logits
    before = count_params(model)
    info = prune_vocab_for_corpora(model, tok, TEXT[:3], keep_top=40)
    assert info["vocab_after"] < info["vocab_before"] == 300
    kept = model.lm_head.kept_ids
    out = model(ids).logits
    assert out.shape == ref.shape  # the tokenizer's ids and the vocabulary size are unchanged
    assert torch.allclose(out[..., kept], ref[..., kept], atol=1e-5)
    dropped = torch.ones(300, dtype=torch.bool)
    dropped[kept] = False
    assert torch.all(out[..., dropped] == DROPPED_LOGIT)
    assert count_params(model)["embedding"] < before["embedding"]
    generated = model.generate(ids[:, :4], max_new_tokens=8, do_sample=False)[0, 4:]
    assert set(generated.tolist()) <= set(kept.tolist())
    save_expert(model, tok, tmp_path / "e", {})
    loaded, _ = load_expert(tmp_path / "e")
    assert torch.equal(loaded(ids).logits, out)
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.inner.weight is loaded.model.embed_tokens.inner.weight


def test_script_rule_keeps_unseen_text_of_the_same_script():
    _, tok = tiny_model("llama")
    kept = tokens_to_keep(tok, TEXT[:1], 300)  # one English sentence
    # every token of the other (Latin-script) sentences is kept, though calibration never saw them
    assert coverage(tok, kept, TEXT[1:5]) == 1.0
    narrow = tokens_to_keep(tok, TEXT[:1], 300, keep_top=10)
    assert len(narrow) < len(kept) and coverage(tok, narrow, TEXT[1:5]) < 1.0


@pytest.mark.integration
def test_smollm2_english_expert_vocabulary_covers_held_out_text(smollm2):
    from cusprun_edge.corpora import builtin_corpus

    _, tok = smollm2
    corpus = builtin_corpus("language", "en")
    kept = tokens_to_keep(tok, corpus.calib, len(tok))
    assert coverage(tok, kept, corpus.eval) >= 0.999
    cyrillic = tok(" Привет мир")["input_ids"]
    assert not set(cyrillic) <= set(kept.tolist()), "tokens of scripts the expert never saw are dropped"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_vocab_pruned_model_exports_and_matches_on_kept_tokens(precision, tmp_path):
    from test_export import TINY_QUANTIZED

    from cusprun_edge.export import export_model
    from cusprun_edge.runtime import OnnxCausalLM

    model, tok = tiny_model("llama")
    prune_vocab_for_corpora(model, tok, TEXT[:3], keep_top=40)
    kept = model.lm_head.kept_ids
    manifest = export_model(model, tok, "x86-cpu", tmp_path / "e", precision=precision, thresholds=TINY_QUANTIZED)
    assert manifest["parity"]["fp32"]["passed"]
    ids = tok(TEXT[1], return_tensors="pt").input_ids
    want = model(ids).logits[0].detach()
    got = torch.from_numpy(OnnxCausalLM(tmp_path / "e").forward(ids.numpy())[0][0])
    assert got.shape == want.shape  # full vocabulary, so the unchanged tokenizer and GenAI work
    diff = got[:, kept] - want[:, kept]
    if precision == "fp32":
        assert float(diff.abs().max()) < 1e-3
    else:  # the same scale-free limit the export's own int4 gate applied to this tiny model
        assert float(diff.norm() / want[:, kept].norm()) <= TINY_QUANTIZED["int4"]["max_rel_rms"]
    dropped = torch.ones(want.shape[-1], dtype=torch.bool)
    dropped[kept] = False
    assert float(got[:, dropped].max()) < -1e3  # dropped tokens are never generated
