"""Every architecture the README claims, end to end on a tiny model: score on text, prune with Cus-Prun
(FFN channels and query heads), save and reload the expert, export fp32 and pass the parity gate."""

from __future__ import annotations

import pytest
from tiny import MORE_FAMILIES, TEXT, tiny_model_more

from cusprun_edge.model import arch


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_score_prune_export_parity(family, tmp_path):
    from cusprun_edge.config.corpora import Corpus
    from cusprun_edge.export import export_model
    from cusprun_edge.model.expert_io import load_expert
    from cusprun_edge.model.structure import count_params
    from cusprun_edge.prune.pruner import prune_and_save
    from cusprun_edge.prune.score import score_model

    model, tok = tiny_model_more(family)
    assert arch.spec_for(model).family == family
    corpus = Corpus("domain/tiny", calib=TEXT[:12])
    scores = score_model(model, tok, {"domain/tiny": corpus}, batch_size=4, max_length=64, show_progress=False)
    before = count_params(model)["total"]
    # a ratio high enough that query heads go too (cusprun takes FFN channels first)
    record = prune_and_save(model, tok, scores, ["domain/tiny"], "cusprun", 0.6, tmp_path / "expert",
                            options={"head_policy": "fraction", "reconstruct": "none"})
    assert 0.5 < record["achieved_ratio"] <= 0.65
    expert, etok = load_expert(tmp_path / "expert")
    assert count_params(expert)["total"] < before
    manifest = export_model(expert, etok, "x86-cpu", tmp_path / "onnx", precision="fp32")
    fp32 = manifest["parity"]["fp32"]
    assert fp32["passed"], fp32
    for mode in ("no_cache", "with_cache"):
        assert fp32[mode]["top1_agreement"] == 1.0 and fp32[mode]["positions"] > 0
    assert (tmp_path / "onnx" / "genai_config.json").exists()
    shape = manifest["structure"]  # narrower FFNs and fewer query heads, per layer, in the exported graph
    assert max(shape["intermediate_sizes"]) < 128 and min(shape["num_attention_heads"]) < 6
