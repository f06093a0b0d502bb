"""Evaluation per stratum and population-weighted: measures through ir-measures, bootstrap, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir
from test_evalset import synthetic_beir

from miner.cli import main
from miner.config import EncodeConfig
from miner.errors import ConfigError, DataError
from miner.evalset import EvalsetConfig, build_evalset
from miner.evaluate import EvaluateConfig, evaluate, per_query_measures, stratified_bootstrap


def test_measures_by_hand() -> None:
    qrels = {"q1": {"d1": 1, "d9": 0}, "q2": {"d2": 1, "d3": 1}, "q3": {"d5": 1}}
    run = {"q1": {"d4": 3.0, "d1": 2.0, "d9": 1.0}, "q2": {"d3": 2.0, "d7": 1.0}}  # q3 retrieved nothing
    m = per_query_measures(qrels, run, ["nDCG@10", "MRR@10", "Recall@1", "Recall@10"])
    assert m["MRR@10"] == {"q1": 0.5, "q2": 1.0, "q3": 0.0}
    assert m["nDCG@10"]["q1"] == pytest.approx(1 / math.log2(3))
    ideal = 1 + 1 / math.log2(3)
    assert m["nDCG@10"]["q2"] == pytest.approx(1 / ideal)
    assert m["Recall@1"] == {"q1": 0.0, "q2": 0.5, "q3": 0.0}
    assert m["Recall@10"] == {"q1": 1.0, "q2": 0.5, "q3": 0.0}


def test_stratified_bootstrap_point_estimates_and_intervals() -> None:
    values = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.5])
    strata = ["a", "a", "b", "b", "b", "b"]
    population = {"a": 10.0, "b": 30.0}
    est, per = stratified_bootstrap(values, strata, population, resamples=0, confidence=0.95, seed=0)
    assert est.value == pytest.approx(0.25 * 1.0 + 0.75 * 0.125)
    assert per["a"].value == 1.0 and per["b"].value == pytest.approx(0.125) and est.low is None
    # the weighted estimate is sum(w m) / sum(w) with w = N_h / n_h
    w = np.array([5, 5, 7.5, 7.5, 7.5, 7.5])
    assert est.value == pytest.approx(np.sum(w * values) / w.sum())
    est, per = stratified_bootstrap(values, strata, population, resamples=500, confidence=0.9, seed=1)
    assert est.low <= est.value <= est.high and per["a"].low == per["a"].high == 1.0
    again, _ = stratified_bootstrap(values, strata, population, resamples=500, confidence=0.9, seed=1)
    assert again == est


def test_bootstrap_interval_covers_the_population_mean() -> None:
    rng = np.random.default_rng(0)
    pop_a, pop_b = rng.beta(2, 5, 2000), rng.beta(5, 2, 200)  # a common easy stratum, a rare hard one
    truth = (pop_a.sum() + pop_b.sum()) / 2200
    hits = 0
    for rep in range(200):
        a = rng.choice(pop_a, 40, replace=False)
        b = rng.choice(pop_b, 40, replace=False)
        est, _ = stratified_bootstrap(np.concatenate([a, b]), ["a"] * 40 + ["b"] * 40, {"a": 2000.0, "b": 200.0},
                                      resamples=400, confidence=0.9, seed=rep)
        hits += est.low <= truth <= est.high
    assert 0.82 <= hits / 200 <= 0.97


@pytest.fixture(scope="module")
def evalset(tmp_path_factory: pytest.TempPathFactory, model) -> tuple[Path, str]:
    data = synthetic_beir(tmp_path_factory.mktemp("eval_data"))
    cache = str(tmp_path_factory.mktemp("eval_cache"))
    out = tmp_path_factory.mktemp("eval_set")
    from miner.config import MineConfig

    build_evalset(data, out, EvalsetConfig(budget=24, strata=("n_positives",), min_per_stratum=5, distractors=5,
                                           background=20), MineConfig(encode=EncodeConfig(cache_dir=cache)), model=model)
    return out, cache


def test_evaluate_per_stratum_and_weighted(evalset: tuple[Path, str], model) -> None:
    folder, cache = evalset
    report = evaluate(folder, EncodeConfig(cache_dir=cache), EvaluateConfig(recall_at=(5, 20), bootstrap=200), model=model)
    assert report.measures == ["nDCG@10", "MRR@10", "Recall@5", "Recall@20"]
    assert report.weights.sum() == pytest.approx(40)
    assert list(report.by_stratum) == ["n_positives=1", "n_positives=2", "n_positives=3-5"]
    for m in report.measures:
        values = report.per_query[m]
        assert np.all((values >= 0) & (values <= 1))
        assert report.population[m].value == pytest.approx(np.sum(report.weights * values) / report.weights.sum())
        assert report.unweighted[m].value == pytest.approx(values.mean())
        assert report.population[m].low <= report.population[m].value <= report.population[m].high
    doc = report.to_dict()
    assert doc["population_size"] == pytest.approx(40) and len(doc["per_query"]) == 24
    assert json.loads(json.dumps(doc)) == doc
    table = report.table()
    assert "population (weighted)" in table and "n_positives=3-5" in table

    # without strata: one stratum, weighted == unweighted
    plain = evaluate(folder, EncodeConfig(cache_dir=cache), EvaluateConfig(bootstrap=0), model=model,
                     strata_file=None)
    assert plain.by_stratum.keys() == report.by_stratum.keys()  # strata.tsv found in the folder by default


def test_evaluate_folder_without_strata_and_identical_ids(tmp_path: Path, model) -> None:
    docs = {"q1": "what do cats eat", "d1": "Cats eat mice and fish.", "d2": "Dogs bark at night."}
    folder = write_beir(tmp_path / "f", docs, {"q1": "what do cats eat"}, [("q1", "d1", 1)], split="test")
    report = evaluate(folder, EncodeConfig(cache_dir=None), EvaluateConfig(bootstrap=0), model=model)
    assert list(report.by_stratum) == ["all"]
    # the document with the query's own id (same text) is not retrieved, so d1 is first
    assert report.per_query["MRR@10"][0] == 1.0
    keep = evaluate(folder, EncodeConfig(cache_dir=None), EvaluateConfig(bootstrap=0, ignore_identical_ids=False),
                    model=model)
    assert keep.per_query["MRR@10"][0] == 0.5


def test_cli_evaluate(evalset: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, cache = evalset
    out = tmp_path / "report.json"
    assert main(["evaluate", "--data", str(folder), "--cache-dir", cache, "--bootstrap", "100", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "population (weighted)" in printed and "nDCG@10" in printed
    report = json.loads(out.read_text())
    assert set(report["population"]) == {"nDCG@10", "MRR@10", "Recall@10", "Recall@100"}
    assert main(["evaluate", "--data", str(folder), "--cache-dir", cache, "--bootstrap", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["queries"] == 24

    bad = tmp_path / "strata.tsv"
    bad.write_text("query-id\tstratum\tinclusion_probability\tweight\nzzz\tA\t1.0\t1.0\n")
    for argv, message in [
        (["--strata", str(bad)], "evaluated queries have no stratum"),
        (["--recall-at", "ten"], "--recall-at must be comma-separated integers"),
        (["--confidence", "1.5"], "confidence must be in (0, 1)"),
    ]:
        assert main(["evaluate", "--data", str(folder), "--cache-dir", cache, "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_config_errors() -> None:
    with pytest.raises(ConfigError):
        EvaluateConfig(k=0)
    with pytest.raises(ConfigError):
        EvaluateConfig(bootstrap=-1)
    assert EvaluateConfig(k=5, recall_at=(50,)).depth == 50
    with pytest.raises(DataError):
        evaluate("/nonexistent/folder")
