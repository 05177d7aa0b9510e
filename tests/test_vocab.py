"""--prune-vocab: kept tokens keep their logits, dropped tokens are never produced, experts reload."""

import pytest
import torch
from tiny import FAMILIES, TEXT, tiny_model

from cusprun_edge import load_expert
from cusprun_edge.expert_io import save_expert
from cusprun_edge.structure import count_params
from cusprun_edge.vocab import DROPPED_LOGIT, prune_vocab_for_corpora


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
