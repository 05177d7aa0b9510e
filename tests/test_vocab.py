"""--prune-vocab trims the vocabulary for real: its own tokenizer reads any text, the embedding and lm_head
hold only the kept rows, the expert reloads, the export's logits are as wide as the kept vocabulary and
GenAI generates with it; quality across vocabularies is per dense token, one definition."""

import json
import math

import pytest
import torch
from tiny import TEXT, tiny_model

from cusprun_edge import load_expert
from cusprun_edge.errors import UserError
from cusprun_edge.model.expert_io import save_expert
from cusprun_edge.model.structure import count_params
from cusprun_edge.model.tokenizer_trim import round_trip_failures, trim_tokenizer
from cusprun_edge.prune.vocab import HOSTILE, TRIMMED_KEY, original_ids, trim_model_vocab

# emoji (with joiners), CJK, Arabic, Cyrillic, control characters, digit and whitespace runs, astral letters
MORE_HOSTILE = HOSTILE + ["a" * 300, "\r\n\r\n\t \t", "٣٤٥ ١٢", "ﬁ ǅ ẞ ß İ", "<s></s><unk> ok", "\u0301\u0301e"]


def _tiny_trimmed(family: str):
    """A tiny model and tokenizer, and both trimmed to the tokens of two sentences plus every third merge."""
    model, tok = tiny_model(family)
    keep = {i for t in TEXT[:2] for i in tok(t)["input_ids"]} | set(range(0, len(tok), 3))
    new_tok, new_to_old = trim_tokenizer(tok, keep)
    return model, tok, new_tok, new_to_old


def test_tiny_tokenizer_trim_reads_any_text():
    _, tok, new_tok, new_to_old = _tiny_trimmed("llama")
    assert len(new_tok) == len(new_to_old) < len(tok)
    assert new_to_old == sorted(new_to_old) and len(set(new_to_old)) == len(new_to_old)
    assert round_trip_failures(tok, new_tok, MORE_HOSTILE + TEXT[:5]) == []
    for text in TEXT[:5]:  # every new id stands for the same string as its original id
        ids = new_tok(text)["input_ids"]
        assert tok.decode([new_to_old[i] for i in ids]) == text
    # words whose dense tokens are all kept tokenize exactly as before
    assert [new_to_old[i] for i in new_tok(TEXT[0])["input_ids"]] == tok(TEXT[0])["input_ids"]
    assert new_tok.convert_ids_to_tokens(new_tok.eos_token_id) == tok.eos_token


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_trimmed_model_keeps_its_logits_on_kept_tokens_and_reloads(family, tmp_path):
    model, tok, new_tok, new_to_old = _tiny_trimmed(family)
    ids = tok(TEXT[0], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    before = count_params(model)
    trim_model_vocab(model, new_to_old)
    index = torch.tensor(new_to_old)
    new_ids = new_tok(TEXT[0], return_tensors="pt").input_ids
    assert torch.equal(index[new_ids], ids)
    with torch.no_grad():
        out = model(new_ids).logits
    assert out.shape[-1] == len(new_to_old) == model.config.vocab_size
    assert torch.allclose(out, ref[..., index], atol=1e-5)
    assert count_params(model)["embedding"] < before["embedding"]
    assert model.config.eos_token_id == new_tok.eos_token_id and model.config.bos_token_id == new_tok.bos_token_id
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight
    save_expert(model, new_tok, tmp_path / "e", {})
    loaded, loaded_tok = load_expert(tmp_path / "e")
    assert len(loaded_tok) == len(new_to_old) and original_ids(loaded) == new_to_old
    with torch.no_grad():
        assert torch.equal(loaded(new_ids).logits, out)
    saved = json.loads((tmp_path / "e" / "tokenizer.json").read_text())
    assert max(saved["model"]["vocab"].values()) == len(new_to_old) - 1  # a plain tokenizer.json, new ids


@pytest.fixture(scope="module")
def trimmed_exports(tmp_path_factory):
    """precision -> (dense logits of TEXT[1], trimmed tokenizer, original ids, export directory), built once."""
    from test_export import TINY_QUANTIZED

    from cusprun_edge.export import export_model

    done = {}

    def get(precision):
        if precision not in done:
            model, tok, new_tok, new_to_old = _tiny_trimmed("llama")
            with torch.no_grad():
                dense = model(tok(TEXT[1], return_tensors="pt").input_ids).logits[0]
            trim_model_vocab(model, new_to_old)
            out = tmp_path_factory.mktemp("trimmed") / precision
            export_model(model, new_tok, "x86-cpu", out, precision=precision, thresholds=TINY_QUANTIZED)
            done[precision] = (dense, new_tok, new_to_old, out)
        return done[precision]

    return get


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_trimmed_export_logits_match_pytorch_and_genai_generates(precision, trimmed_exports):
    import numpy as np
    import onnxruntime_genai as og
    from test_export import TINY_QUANTIZED

    from cusprun_edge.measure.runtime import OnnxCausalLM

    dense, new_tok, new_to_old, out = trimmed_exports(precision)
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert genai["vocab_size"] == len(new_to_old) and genai["eos_token_id"] == new_tok.eos_token_id
    shipped = json.loads((out / "tokenizer.json").read_text())
    assert len(shipped["model"]["vocab"]) == len(new_to_old)
    new_ids = new_tok(TEXT[1], return_tensors="pt").input_ids
    got = torch.from_numpy(OnnxCausalLM(out).forward(new_ids.numpy())[0][0])
    want = dense[:, torch.tensor(new_to_old)]  # the dense model's logits over the kept ids
    assert got.shape == want.shape
    if precision == "fp32":
        assert float((got - want).abs().max()) < 1e-3
    else:  # the same scale-free limit the export's own int4 gate applied to this tiny model
        assert float((got - want).norm() / want.norm()) <= TINY_QUANTIZED["int4"]["max_rel_rms"]

    og_model = og.Model(str(out))
    og_tok = og.Tokenizer(og_model)
    prompt = og_tok.encode(TEXT[0][:20])
    assert list(prompt) == new_tok(TEXT[0][:20])["input_ids"]  # GenAI reads the shipped trimmed tokenizer
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False)
    generator = og.Generator(og_model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    new = np.asarray(generator.get_sequence(0))[len(prompt):]
    assert len(new) and int(new.max()) < len(new_to_old)
    assert isinstance(og_tok.decode(new), str)


def test_perplexity_per_dense_token_is_one_definition():
    from cusprun_edge.measure.evaluate import (
        clip_to_tokens,
        per_dense_token,
        predicted_tokens,
        text_quality,
        torch_logits_fn,
    )
    from cusprun_edge.prune.vocab import trimmed_logits_fn

    model, tok, new_tok, new_to_old = _tiny_trimmed("llama")
    texts = clip_to_tokens(tok, TEXT[1:5], 8)
    assert all(len(tok(t)["input_ids"]) <= 8 for t in texts) and texts[0] != TEXT[1]
    dense = text_quality(torch_logits_fn(model), tok, texts, tok)
    assert dense["dense_tokens"] == dense["tokens"] == predicted_tokens(tok, texts)
    assert dense["ppl_per_dense_token"] == pytest.approx(dense["ppl"])  # the dense model: the same thing
    trimmed = text_quality(trimmed_logits_fn(model, new_to_old), new_tok, texts, tok)
    assert trimmed["tokens"] > trimmed["dense_tokens"] == dense["dense_tokens"]  # dropped words split
    want = per_dense_token(trimmed["nll"], dense["dense_tokens"], sum(len(t.encode()) for t in texts))
    assert trimmed["ppl_per_dense_token"] == want["ppl_per_dense_token"] == math.exp(trimmed["nll"] / dense["tokens"])
    assert trimmed["bits_per_byte"] == pytest.approx(trimmed["nll"] / math.log(2) / trimmed["bytes"])


def test_trimmed_validate_reports_per_dense_token(trimmed_exports, tmp_path):
    """validate scores a trimmed expert with its own tokenizer, per dense token, on the same text as dense."""
    from cusprun_edge.measure.validate import validate

    _, new_tok, new_to_old, out = trimmed_exports("fp32")
    dense = tiny_model("llama")
    tok = dense[1]
    (tmp_path / "t.txt").write_text("\n\n".join(TEXT[1:4]))
    record = validate(dense, out, texts=[tmp_path / "t.txt"])
    overall = record["overall"]
    assert overall["vocabulary"] == {"dense": len(tok), "expert": len(new_to_old)}
    assert overall["expert"]["ppl_per_dense_token"] > 0 and overall["expert"]["bits_per_byte"] > 0
    # the same untrimmed weights: the trimmed expert only loses the probability of dropped tokens' splits
    assert overall["dense"]["ppl_per_dense_token"] == pytest.approx(overall["dense"]["ppl_own_tokens"])
    assert overall["expert"]["ppl"] == overall["expert"]["ppl_per_dense_token"]  # what the report reads
    assert overall["expert"]["tokens"] > overall["dense"]["tokens"]


def test_bad_vocabulary_sizes_are_refused():
    from cusprun_edge.prune.vocab import KeepRule

    _, tok = tiny_model("llama")
    rule = KeepRule(tok, TEXT[:1], ["en"], words=2000)
    for size in (10, len(rule.base) - 1, len(tok)):
        with pytest.raises(UserError, match="--vocab-size"):
            rule.check_size(size)
    rule.check_size(len(rule.base))


def test_a_corpus_the_tokenizer_cannot_read_is_refused():
    from cusprun_edge.prune.vocab import KeepRule

    _, tok = tiny_model("llama")  # trained on Latin-script text: CJK is bytes only
    with pytest.raises(UserError, match="byte pieces"):
        KeepRule(tok, ["这是一个测试文本，全部是中文字符。" * 5], ["zh"], words=2000)


@pytest.mark.integration
def test_smollm2_trimmed_tokenizer_round_trips_hostile_text(smollm2):
    from cusprun_edge.config.corpora import builtin_corpus
    from cusprun_edge.prune.vocab import KeepRule, coverage

    _, tok = smollm2
    corpus = builtin_corpus("language", "en")
    rule = KeepRule(tok, corpus.calib, ["en"])
    keep = rule.keep(16384)
    new_tok, new_to_old = trim_tokenizer(tok, keep)
    assert len(new_to_old) == 16384
    assert round_trip_failures(tok, new_tok, MORE_HOSTILE + corpus.eval) == []
    assert coverage(tok, keep, corpus.eval) > 0.9  # frequent English tokens are kept whole
    assert not set(tok(" Привет мир")["input_ids"]) <= set(keep)


@pytest.mark.integration
def test_gemma_trimmed_tokenizer_round_trips_hostile_text():
    """Gemma-3's byte-fallback BPE (262k tokens), when its converted tokenizer is in the cache (seconds)."""
    from transformers import AutoTokenizer

    from cusprun_edge.model.load import EMBEDDED, converted_dir

    entry = EMBEDDED["gemma3-270m"]
    if not entry.installed():
        pytest.skip("gemma3-270m is not installed")
    directory = converted_dir(entry.locate())
    if not (directory / "tokenizer.json").exists():
        pytest.skip("gemma3-270m is not converted yet")
    tok = AutoTokenizer.from_pretrained(directory)
    keep = set(range(0, 20000)) | {i for t in TEXT[:5] for i in tok(t)["input_ids"]}
    new_tok, new_to_old = trim_tokenizer(tok, keep)
    assert len(new_to_old) < 30000
    assert round_trip_failures(tok, new_tok, MORE_HOSTILE + TEXT[:5]) == []
    assert new_tok("hi")["input_ids"][0] == new_tok.bos_token_id == new_to_old.index(tok.bos_token_id)
    assert sum(t.startswith("<0x") for t in new_tok.convert_ids_to_tokens(list(range(len(new_tok))))) == 256
    # text whose dense tokens are all kept tokenizes as before, and every kept token BPE forms from its own
    # string still forms (Gemma-3 spells a token with many merges: keeping the first listed one is not enough)
    for text in TEXT[:5]:
        assert [new_to_old[i] for i in new_tok(text)["input_ids"]] == tok(text)["input_ids"]
    keep = set(range(0, len(tok), 7))
    new_tok, new_to_old = trim_tokenizer(tok, keep)
    dense_bpe, trimmed_bpe = tok.backend_tokenizer.model, new_tok.backend_tokenizer.model
    strings = [s for s in tok.convert_ids_to_tokens(sorted(keep)) if len(s) > 2]
    formed = [s for s in strings if [t.value for t in dense_bpe.tokenize(s)] == [s]]
    assert len(formed) > 10000
    assert [s for s in formed if [t.value for t in trimmed_bpe.tokenize(s)] != [s]] == []


def test_old_layout_experts_still_load(tmp_path):
    """Experts saved by the previous rule (ids kept, rows remapped) load as they were saved."""
    from cusprun_edge.model.vocab_layers import prune_vocab

    model, tok = tiny_model("llama")
    kept = torch.tensor(sorted(set(range(0, 300, 2)) | {0, 1, 2}))
    prune_vocab(model, kept)
    ids = tok(TEXT[0], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids).logits
    save_expert(model, tok, tmp_path / "old", {})
    loaded, _ = load_expert(tmp_path / "old")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert getattr(loaded.config, TRIMMED_KEY, None) is None
