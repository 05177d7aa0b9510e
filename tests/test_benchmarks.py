"""The benchmark verdict (where Cus-Prun wins and where it does not) is computed from the result rows:
ablations never count as 'another method', and each measure keeps its own direction."""

from benchmarks.results_md import _verdict


def _row(method, ppl, acc, general, ablation=False, ratio=0.25):
    return {"setting": "code", "target_ratio": ratio, "method": method, "expert_ppl": ppl, "mc_acc": acc,
            "general_ppl": general, "ablation": ablation}


def test_verdict_counts_wins_per_measure_and_ignores_ablations():
    rows = [
        _row("cusprun", 10.0, 0.30, 50.0), _row("flap", 12.0, 0.40, 40.0), _row("wanda-sp", 11.0, 0.20, 60.0),
        _row("wanda-sp[head_policy=ffn_first]", 9.0, 0.9, 10.0, ablation=True),
        _row("cusprun", 30.0, 0.30, 50.0, ratio=0.45), _row("flap", 20.0, 0.30, 70.0, ratio=0.45),
        _row("wanda-sp[head_policy=ffn_first]", 40.0, 0.1, 90.0, ablation=True, ratio=0.45),
    ]
    text = "\n".join(_verdict({"rows": rows}))
    assert "each of 2 setting/ratio cells: lowest expert perplexity in 1, highest multiple-choice accuracy " \
           "in 1, lowest general (out-of-expert) perplexity in 1" in text
    assert "code at 0.45 (flap 20.00 vs 30.00)" in text
    assert "wanda-sp's in 1 of 2 cells" in text
    # the ablation's better figures at 0.25 are not 'best other'
    assert "| code | 0.25 | 2 | **10.00** | wanda-sp 11.00 | 0.300 | flap 0.400 | 50.00 | flap 40.00 |" in text
    assert "the other 2 published methods" in text


def test_verdict_without_other_methods_says_nothing():
    assert _verdict({"rows": [_row("cusprun", 10.0, 0.3, 50.0)]}) == []


def test_defaults_summary_compares_each_recipe_with_the_default_on_shared_settings():
    from benchmarks.defaults import summary

    rows = [{"ratio": 0.35, "setting": s, "candidate": c, "tune_ppl": p} for s, c, p in (
        ("code", "default", 10.0), ("code", "allocation=uniform", 9.0), ("fr+medical", "default", 80.0),
        ("fr+medical", "allocation=uniform", 40.0), ("code", "tau=1.0", 11.0))]
    out = {r["candidate"]: r for r in summary({"rows": rows})}
    assert out["allocation=uniform"]["vs_default"] == round((0.9 * 0.5) ** 0.5, 4)
    assert out["tau=1.0"]["vs_default"] == 1.1 and out["tau=1.0"]["settings"] == ["code"]
    assert out["default"]["vs_default"] == 1.0
    assert [r["candidate"] for r in summary({"rows": rows})][0] == "allocation=uniform"


def test_merge_adds_the_workers_new_rows_once_and_keeps_one_entry_per_machine(tmp_path, monkeypatch):
    import json

    from benchmarks import merge

    cpu = {"cpu": "EPYC", "date": "2026-11-30 10:00 UTC"}
    gpu = {"cpu": "Xeon", "gpu": "H200", "date": "2026-11-30 11:00 UTC"}

    def row(method, ppl, device):
        return {"setting": "code", "method": method, "target_ratio": 0.25, "expert_ppl": ppl, "device": device}

    main = {"model": "m", "machine": cpu, "dense": {}, "rows": [row("flap", 20.0, "cpu")]}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "quality.json").write_text(json.dumps(main))
    workers = []
    for i, ppl in enumerate((10.0, 11.0)):  # two workers of one machine measured the same new row
        w = tmp_path / f"w{i}"
        w.mkdir()
        part = {"model": "m", "machine": gpu | {"date": f"2026-11-30 11:0{i} UTC"},
                "rows": main["rows"] + [row("cusprun", ppl, "cuda (H200)")]}
        (w / "quality.json").write_text(json.dumps(part))
        (w / "defaults.json").write_text(json.dumps({"machine": gpu, "rows": [
            {"setting": "code", "ratio": 0.35, "candidate": "default", "tune_ppl": 8.0 + i}]}))
        workers.append(w)
    monkeypatch.setattr(merge, "RESULTS", tmp_path / "results")
    assert merge.merge_quality(workers) == 1
    out = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert [(r["method"], r["expert_ppl"]) for r in out["rows"]] == [("flap", 20.0), ("cusprun", 10.0)]
    assert [m["cpu"] for m in out["machines"]] == ["EPYC", "Xeon"] and out["partial"]
    assert merge.merge_defaults(workers) == 1
    d = json.loads((tmp_path / "results" / "defaults.json").read_text())
    assert d["rows"][0]["tune_ppl"] == 8.0 and d["machine"]["cpu"] == "Xeon"


def test_mc_retention_pairs_items_and_its_error_shrinks_with_more_items():
    import numpy as np

    from benchmarks.mc import retention_se

    rng = np.random.default_rng(0)

    def outcomes(n):
        dense = (rng.random(n) < 0.5).astype(float)
        return dense, dense * (rng.random(n) < 0.8)  # the expert loses about a fifth of dense's right answers

    # the same outcomes: retention exactly 1 with no spread, since every resample pairs the same items
    same = [(rng.random(60) < 0.5).astype(float) for _ in range(3)]
    point, mean, per_se, mean_se = retention_se(same, same, rounds=500)
    assert point == [1.0, 1.0, 1.0] and mean == 1.0 and mean_se == 0.0 and per_se == [0.0, 0.0, 0.0]
    small = [outcomes(40) for _ in range(3)]
    large = [outcomes(4000) for _ in range(3)]
    _, mean_small, _, se_small = retention_se([d for d, _ in small], [e for _, e in small], rounds=2000)
    _, mean_large, _, se_large = retention_se([d for d, _ in large], [e for _, e in large], rounds=2000)
    assert abs(mean_large - 0.8) < 0.03 and se_large < se_small / 5
    assert mean_small == np.mean([e.mean() / d.mean() for d, e in small])


def test_head_fit_reads_a_steps_fixed_share_and_the_head_size_for_a_target_speedup():
    from benchmarks.vocab import head_fit

    def run(noise):  # a step costs 0.4 of the dense one's plus 0.03 per 10,000 head rows
        rows = {"expert (90,000 tokens)": 90000, "cut 30,000": 30000, "cut 256": 256}
        return {"date": "d", "head_rows": rows,
                "vs_faster_dense": {k: 1 / (0.4 + 3e-6 * n + noise) for k, n in rows.items()}}

    fit = head_fit([run(0.01), run(-0.01)])
    assert fit["runs"] == 2 and fit["points"] == 6
    assert abs(fit["fixed_share"] - 0.4) < 1e-3 and abs(fit["share_per_10k_rows"] - 0.03) < 1e-3
    assert abs(fit["rows_for_2x"] - 33333) < 50  # (0.5 - 0.4) / 3e-6
    assert abs(fit["fitted_vs_faster_dense"]["0"] - 2.5) < 0.01
    # a fixed share above half: no head size reaches 2x
    assert head_fit([{"date": "d", "head_rows": {"e": 1000, "c": 10},
                      "vs_faster_dense": {"e": 1 / 0.61, "c": 1 / 0.6}}])["rows_for_2x"] == 0
