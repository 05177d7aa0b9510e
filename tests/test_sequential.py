"""The layer loop and the lazy model: scoring one layer at a time, with the layers read from disk one at a time,
gives the scores that hooks on whole-model forwards give, bit for bit, and holds one layer at a time."""

import pytest
import torch
from tiny import FAMILIES, TEXT, tiny_model

from cusprun_edge.config.corpora import Corpus
from cusprun_edge.model import arch
from cusprun_edge.model.lazy import lazy_model
from cusprun_edge.model.shards import is_lazy, materialized, reader_of
from cusprun_edge.prune import score
from cusprun_edge.prune.score import _Collector, model_fingerprint, score_model

CORPUS = Corpus("domain/a", TEXT[:21])


def _whole_forward_scores(model, tok, docs, batch_size=8):
    """The reference: each layer's hooks on full forwards of the whole model (what scoring did before)."""
    col = _Collector(model, len(docs))
    for i, layer in enumerate(arch.decoder_layers(model)):
        col.attach(i, layer)
        for start in range(0, len(docs), batch_size):
            enc = tok(docs[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=512)
            col.mask, col.doc_offset = enc["attention_mask"].bool(), start
            with torch.no_grad():
                model(**enc, use_cache=False)
        col.detach()
    return {k: [t.float() for t in v] for k, v in col.stats.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_scores_equal_whole_forward_scores(family):
    model, tok = tiny_model(family)
    swept = score_model(model, tok, {"domain": CORPUS}, show_progress=False).corpora["domain"]
    reference = _whole_forward_scores(model, tok, CORPUS.calib)
    assert set(swept.tensors) == set(reference)
    for key, per_layer in reference.items():
        for i, t in enumerate(per_layer):
            assert torch.equal(swept.tensors[key][i], t), (key, i)
    assert swept.n_tokens == sum(len(tok(d)["input_ids"]) for d in CORPUS.calib)


@pytest.mark.parametrize("family,dtype", [("llama", torch.bfloat16), ("qwen2", torch.float32),
                                          ("gemma3", torch.float32)])
def test_lazy_model_scores_as_the_eager_one_and_holds_one_layer(family, dtype, tmp_path, monkeypatch):
    model, tok = tiny_model(family)
    model.to(dtype).save_pretrained(tmp_path, max_shard_size="200KB")  # several shards and an index
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    from cusprun_edge.model.load import load_model

    eager, _ = load_model(str(tmp_path))
    lazy, lazy_tok = lazy_model(str(tmp_path))
    assert is_lazy(lazy) and not is_lazy(eager)
    layers = arch.decoder_layers(lazy)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert arch.get(lazy, arch.spec_for(lazy).embed).weight.device.type == "cpu"

    held = []  # the layers holding weights whenever a layer is read
    real = materialized

    def watching(m, i):
        held.append([j for j, layer in enumerate(arch.decoder_layers(m))
                     if next(layer.parameters()).device.type != "meta"])
        return real(m, i)

    monkeypatch.setattr(score, "materialized", watching)
    a = score_model(lazy, lazy_tok, {"domain": CORPUS}, show_progress=False)
    assert held == [[]] * len(layers)  # every earlier layer was dropped before the next was read
    b = score_model(eager, tok, {"domain": CORPUS}, show_progress=False)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert a.model_hash == b.model_hash == model_fingerprint(eager)
    for key, per_layer in b.corpora["domain"].tensors.items():
        for i, t in enumerate(per_layer):
            assert torch.equal(a.corpora["domain"].tensors[key][i], t), (key, i)
    with materialized(lazy, 1) as layer:  # inside the block: the layer's weights, as the eager model has them
        for (name, p), q in zip(layer.named_parameters(), arch.decoder_layers(eager)[1].parameters()):
            assert p.dtype == torch.float32 and torch.equal(p, q), name


def _saved(family, tmp_path, dtype=torch.float32):
    model, tok = tiny_model(family)
    model.to(dtype).save_pretrained(tmp_path, max_shard_size="200KB")
    tok.save_pretrained(tmp_path)
    from cusprun_edge.model.load import load_model

    return load_model(str(tmp_path)), lazy_model(str(tmp_path))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_damage_probes_and_refit_of_a_lazy_model_equal_the_eager_ones(family, tmp_path):
    """The damage probes (one sweep) and the sequential refit read each layer from disk once and give the
    eager model's figures exactly."""
    from cusprun_edge.prune.damage import layer_damage
    from cusprun_edge.prune.methods import make_plan
    from cusprun_edge.prune.reconstruct import choose_and_refit

    (eager, tok), (lazy, _) = _saved(family, tmp_path)
    corpora = {"domain/a": Corpus("domain/a", TEXT[:40], tune=TEXT[40:55])}
    scores = score_model(eager, tok, corpora, show_progress=False)
    opts = {"allocation": "uniform"}
    plans = [make_plan(m, scores, ["domain/a"], "cusprun", 0.3, opts) for m in (eager, lazy)]
    assert all(torch.equal(a, b) for a, b in zip(plans[0].ffn_keep, plans[1].ffn_keep))
    assert plans[0].q_keep == plans[1].q_keep

    reads = []
    reader = reader_of(lazy)
    real_tensor = reader.tensor
    reader.tensor = lambda name: (reads.append(name), real_tensor(name))[1]
    damage = [layer_damage(m, plans[0], tok, TEXT[40:55]) for m in (eager, lazy)]
    layer_reads = [n for n in reads if n.startswith("model.layers.")]
    assert len(layer_reads) == len(set(layer_reads))  # one sweep: every layer tensor read once
    assert damage[0]["damage"] == damage[1]["damage"] and damage[0]["dense_nll"] == damage[1]["dense_nll"]
    assert any(d > 0 for d in damage[0]["damage"])

    # ridge given: the refit is kept whatever the held-apart documents say, so there are weights to compare
    refits = [choose_and_refit(m, plans[0], tok, TEXT[:40], TEXT[40:55], ridge=1e-2) for m in (eager, lazy)]
    assert [t["tune_ppl"] for t in refits[0].tried] == [t["tune_ppl"] for t in refits[1].tried]
    assert sorted(refits[0].weights.keys()) == sorted(refits[1].weights.keys()) and len(refits[0].weights)
    assert type(refits[1].weights).__name__ == "OffloadedLayers"  # a lazy model's wait on disk
    for i, mods in refits[0].weights.items():
        for name, w in mods.items():
            assert torch.equal(w, refits[1].weights[i][name]), (i, name)
    assert all(p.device.type == "meta" for p in arch.decoder_layers(lazy).parameters())


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_a_lazy_model_prunes_layer_by_layer_into_the_same_expert(family, tmp_path):
    """The whole prune (damage probes, plan, refit, edits) of a lazy model, its layers written one at a time,
    saves the expert the whole model saves, tensor for tensor."""
    from cusprun_edge.model.expert_io import load_expert
    from cusprun_edge.prune.pruner import prune_and_save

    (eager, tok), (lazy, _) = _saved(family, tmp_path / "dense")
    corpora = {"domain/a": Corpus("domain/a", TEXT[:40], tune=TEXT[40:55])}
    scores = score_model(eager, tok, corpora, show_progress=False)
    records = [prune_and_save(m, tok, scores, ["domain/a"], "cusprun", 0.3, tmp_path / name, corpora=corpora)
               for m, name in ((eager, "eager"), (lazy, "lazy"))]
    assert records[0]["achieved_ratio"] == records[1]["achieved_ratio"] > 0.2
    assert records[0]["layer_damage"]["damage"] == records[1]["layer_damage"]["damage"]
    a, _ = load_expert(tmp_path / "eager")
    b, _ = load_expert(tmp_path / "lazy")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.config.cusprun_structure == b.config.cusprun_structure
    assert len(list((tmp_path / "lazy").glob("layer-*.safetensors"))) == len(arch.decoder_layers(b))
    assert not list(tmp_path.glob(".lazy.layers-tmp-*"))  # the staging directory is gone


def test_sweeps_report_each_layer_they_reach():
    from cusprun_edge.model.shards import reporting_layers

    model, tok = tiny_model("llama")
    seen = []
    with reporting_layers(lambda i, n: seen.append((i, n))):
        score_model(model, tok, {"domain": CORPUS}, show_progress=False)
    score_model(model, tok, {"domain": CORPUS}, show_progress=False)  # outside the block: nobody hears
    assert seen == [(i, 4) for i in range(4)]


def test_a_lazy_models_fingerprint_reads_its_layers_once_until_one_is_rewritten(tmp_path):
    (eager, _), (lazy, _) = _saved("llama", tmp_path)
    reader = reader_of(lazy)
    reads = []
    real_tensor = reader.tensor
    reader.tensor = lambda name: (reads.append(name), real_tensor(name))[1]
    assert model_fingerprint(lazy) == model_fingerprint(lazy) == model_fingerprint(eager)
    n_layer_tensors = sum(1 for n in reader.names() if n.startswith("model.layers."))
    assert len(reads) == n_layer_tensors  # the second call read nothing
    with materialized(lazy, 0) as layer:  # a rewritten layer (here: the same values) makes it hash again
        reader.stage_layer("model.layers.0.", layer, tmp_path / "layer-0.safetensors")
    assert model_fingerprint(lazy) == model_fingerprint(eager) and len(reads) > n_layer_tensors + 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batches_pad_on_the_right_whatever_the_tokenizer_says(family):
    """Gemma-3's tokenizer pads on the left; a left-padded row starts at a later position and scores
    differently. Batched NLL equals the sum over documents scored one by one."""
    from cusprun_edge.measure.evaluate import nll_total, torch_logits_fn
    from cusprun_edge.model.sequential import padded_batches

    model, tok = tiny_model(family)
    tok.padding_side = "left"
    texts = [t for t in TEXT if len(tok(t)["input_ids"]) > 3][:4]
    ids, mask = next(padded_batches(tok, texts, 4, 512))
    assert len({int(m.sum()) for m in mask}) > 1  # the batch does pad
    assert all(bool(m[: int(m.sum())].all()) for m in mask)  # real tokens first, padding after
    fn = torch_logits_fn(model)
    one_by_one = sum(nll_total(fn, tok, [t], batch_size=1)[0] for t in texts)
    assert nll_total(fn, tok, texts, batch_size=4)[0] == pytest.approx(one_by_one, rel=1e-4)
