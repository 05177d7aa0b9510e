"""The built-in corpora meet their spec, user data loads from every supported form, expert specs parse."""

import json

import pytest

from cusprun_edge import UserError
from cusprun_edge.config.corpora import (
    DIMENSIONS,
    ExpertSpec,
    builtin_categories,
    builtin_corpus,
    read_texts,
)

REQUIRED = {
    "language": {"en", "fr", "de", "es"},
    "domain": {"medical", "legal", "finance", "code", "general"},
    "task": {"qa", "summarization", "code-completion", "multiple-choice"},
}


def test_every_required_category_is_shipped():
    cats = builtin_categories()
    for dim, needed in REQUIRED.items():
        assert needed <= set(cats[dim]), (dim, cats[dim])


@pytest.mark.parametrize("dim,cat", [(d, c) for d, cs in REQUIRED.items() for c in sorted(cs)])
def test_category_sizes_and_held_out_split(dim, cat):
    c = builtin_corpus(dim, cat)
    assert len(c.calib) + len(c.tune) >= 60 and len(c.eval) >= 20
    assert len(c.tune) >= 12, "hyper-parameters need documents held apart from scoring"
    assert not set(c.calib) & set(c.eval), "evaluation text must never be calibration text"
    assert not set(c.tune) & (set(c.calib) | set(c.eval)), "tuning text is neither scored nor evaluated"
    assert len(set(c.calib + c.eval + c.tune)) == len(c.calib) + len(c.eval) + len(c.tune)
    if dim != "language":
        assert len(c.mc) >= 40
        for item in c.mc:
            assert len(item["options"]) == 4 and 0 <= item["answer"] < 4
            assert len(set(item["options"])) == 4


@pytest.mark.integration
def test_documents_are_100_to_300_tokens(smollm2):
    _, tok = smollm2
    for dim, cats in REQUIRED.items():
        for cat in cats:
            c = builtin_corpus(dim, cat)
            lengths = [len(tok(t)["input_ids"]) for t in c.calib + c.eval]
            inside = sum(100 <= n <= 300 for n in lengths) / len(lengths)
            assert inside >= 0.95, (dim, cat, min(lengths), max(lengths))


def test_expert_spec_parsing():
    spec = ExpertSpec.parse("language=fr, domain=medical,task=summarisation")
    assert spec.dims == {"language": "fr", "domain": "medical", "task": "summarization"}
    assert list(spec.corpora()) == ["language/fr", "domain/medical", "task/summarization"]
    for bad, msg in [("colour=red", "unknown expert dimension"), ("language", "DIMENSION=CATEGORY"),
                     ("language=fr,language=de", "twice"), ("", "names no dimension"), ("domain=", "no category")]:
        with pytest.raises(UserError, match=msg):
            ExpertSpec.parse(bad)
    with pytest.raises(UserError, match="no corpus for domain=astrology"):
        ExpertSpec.parse("domain=astrology").corpora()
    assert set(DIMENSIONS) == set(REQUIRED)


def test_user_data_forms(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"note number {i} about turbines")
    assert len(read_texts(str(folder))) == 5
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(4)))
    assert read_texts(str(jl)) == [f"row {i}" for i in range(4)]
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nfirst doc,1\nsecond doc,0\n")
    assert read_texts(str(csv)) == ["first doc", "second doc"]
    spec = ExpertSpec.parse(f"domain={folder}")
    corpus = spec.corpora()[f"user:{folder}"]
    assert len(corpus.calib) == 4 and len(corpus.eval) == 1


def test_user_data_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        read_texts(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(UserError, match="holds no text"):
        read_texts(str(blank))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(UserError, match="not UTF-8"):
        read_texts(str(binary))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserError, match="not valid JSON"):
        read_texts(str(broken))
    with pytest.raises(UserError, match="no such file"):
        read_texts(str(tmp_path / "missing"))
