"""Physical pruning keeps the model consistent: zero-impact units go without changing logits, and experts
with per-layer widths, fewer layers and compensation biases reload with identical logits."""

import pytest
import torch
from tiny import FAMILIES, tiny_model

from cusprun_edge import load_expert, load_model
from cusprun_edge.model import arch
from cusprun_edge.model.expert_io import save_expert
from cusprun_edge.model.structure import (
    add_output_bias,
    check_gqa,
    count_params,
    keep_ffn_channels,
    keep_heads,
    keep_layers,
    structure_of,
)

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_removing_zero_impact_units_keeps_logits(family):
    model, _ = tiny_model(family)
    spec, hd = arch.spec_for(model), arch.head_dim(model)
    parts = arch.all_layer_parts(model)
    with torch.no_grad():
        parts[0].down.weight[:, :10] = 0  # FFN channels 0..9 of layer 0 write nothing
        parts[1].o.weight[:, 0 * hd:1 * hd] = 0  # query heads 0 and 3 (one per KV group) write nothing
        parts[1].o.weight[:, 3 * hd:4 * hd] = 0
    ref = model(IDS).logits
    keep_ffn_channels(parts[0], torch.arange(10, parts[0].down.in_features), spec)
    keep_heads(arch.all_layer_parts(model)[1], [1, 2, 4, 5], [0, 1], hd, spec)
    out = model(IDS).logits
    assert torch.allclose(out, ref, atol=1e-5)
    s = structure_of(model)
    assert s.intermediate_sizes[0] == 118 and s.num_attention_heads[1] == 4 and s.num_key_value_heads[1] == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_round_trip_with_per_layer_shapes(family, tmp_path):
    model, tok = tiny_model(family)
    spec, hd = arch.spec_for(model), arch.head_dim(model)
    keep_ffn_channels(arch.all_layer_parts(model)[0], torch.arange(0, 70), spec)
    keep_heads(arch.all_layer_parts(model)[2], [0, 3], [0, 1], hd, spec)
    add_output_bias(arch.all_layer_parts(model)[3], "mlp", torch.full((96,), 0.01), spec)
    keep_layers(model, [0, 2, 3])
    ref = model(IDS).logits
    greedy = model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False)
    save_expert(model, tok, tmp_path / "expert", {"method": "test"})
    for loaded, _ in (load_expert(tmp_path / "expert"), load_model(str(tmp_path / "expert"))):
        assert torch.equal(loaded(IDS).logits, ref)
        assert torch.equal(loaded.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False), greedy)
        s = structure_of(loaded)
        assert s.source_layers == [0, 2, 3]
        assert s.intermediate_sizes == [70, 128, 128]
        assert s.num_attention_heads == [6, 2, 6]
        assert s.down_proj_bias == [False, False, True]
    assert count_params(loaded)["total"] == count_params(model)["total"]


def test_gqa_validation():
    assert check_gqa([0, 1, 3, 4], [0, 1], 6, 2) == 2
    with pytest.raises(ValueError, match="same number"):
        check_gqa([0, 1, 3], [0, 1], 6, 2)
    with pytest.raises(ValueError, match="KV head"):
        check_gqa([0, 3], [0], 6, 2)


def test_save_refuses_existing_dir(tmp_path):
    from cusprun_edge import UserError

    model, tok = tiny_model("llama")
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="already exists"):
        save_expert(model, tok, tmp_path / "e", {})
