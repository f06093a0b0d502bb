"""Stratified evaluation sets: allocation, weights, strata, the reduced corpus, leakage, CLI errors, SciFact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_beir
from hypothesis import given, settings
from hypothesis import strategies as st

from miner.allocate import allocate, pilot_variances, stratified_sample
from miner.cli import main
from miner.config import EncodeConfig, MineConfig
from miner.errors import ConfigError, DataError
from miner.evalset import EvalsetConfig, build_evalset, read_strata
from miner.strata import band, combine, parse_strata, read_mapping, sort_key, DIFFICULTY_BANDS

DATA_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "strata.tsv")


# ----------------------------------------------------------------------------------------------------
# Allocation


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 200), min_size=1, max_size=12),
    minimum=st.integers(0, 20),
    method=st.sampled_from(["proportional", "equal", "neyman"]),
    budget_share=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_allocation_sums_to_the_budget_and_respects_minima(
    sizes: list[int], minimum: int, method: str, budget_share: float, data: st.DataObject
) -> None:
    named = {f"s{i}": n for i, n in enumerate(sizes)}
    lowest = sum(min(n, minimum) for n in sizes)
    budget = max(1, lowest + int(budget_share * (sum(sizes) - lowest)))
    variances = {s: data.draw(st.floats(0.0, 1.0)) for s in named} if method == "neyman" else None
    plan = allocate(named, budget, method=method, min_per_stratum=minimum, variances=variances)  # type: ignore[arg-type]
    assert sum(p.sample for p in plan) == budget
    for p in plan:
        assert min(p.population, minimum) <= p.sample <= p.population
        assert p.too_small == (p.population < minimum)
        if p.population >= minimum:
            assert p.sample >= minimum


def test_allocation_by_hand() -> None:
    sizes = {"a": 150, "b": 100, "c": 35, "d": 15, "e": 3}
    # proportional: e is taken whole (3 < 10), d is held at its minimum, the rest ∝ N_h
    assert [p.sample for p in allocate(sizes, 200, min_per_stratum=10)] == [98, 66, 23, 10, 3]
    # equal: the same where possible; small strata whole
    assert [p.sample for p in allocate(sizes, 200, method="equal", min_per_stratum=10)] == [74, 73, 35, 15, 3]
    # Neyman: ∝ N_h S_h; b (high variance) is filled before a (low variance)
    variances = {"a": 0.01, "b": 0.1, "c": 0.1, "d": 0.0, "e": 0.2}
    neyman = allocate(sizes, 200, method="neyman", min_per_stratum=10, variances=variances)
    assert [p.sample for p in neyman] == [52, 100, 35, 10, 3]
    assert [p.name for p in neyman if p.too_small] == ["e"]
    assert pilot_variances(["a", "a", "b"], [0.0, 1.0, 5.0]) == {"a": 0.5, "b": 0.0}


@pytest.mark.parametrize(
    ("sizes", "budget", "kwargs", "match"),
    [
        ({"a": 50, "b": 50}, 15, {"min_per_stratum": 10}, "below the sum of the minima"),
        ({"a": 50, "b": 0}, 10, {}, "stratum 'b' is empty"),
        ({"a": 5, "b": 5}, 11, {}, "larger than the population"),
        ({"a": 5, "b": 5}, 4, {"method": "neyman"}, "pilot variance"),
        ({"a": 5, "b": 5}, 4, {"method": "neyman", "variances": {"a": 1.0, "b": 1.0, "z": 1.0}}, "unknown stratum 'z'"),
        ({"a": 5, "b": 5}, 4, {"method": "random"}, "allocation must be one of"),
    ],
)
def test_allocation_errors(sizes: dict[str, int], budget: int, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        allocate(sizes, budget, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Weights


def _population(seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    strata = ["rare"] * 12 + ["mid"] * 60 + ["common"] * 328
    value = np.concatenate([rng.normal(5.0, 1.0, 12), rng.normal(1.0, 0.5, 60), rng.normal(0.2, 0.1, 328)])
    return strata, value


def test_weights_sum_to_the_population_and_reproduce_its_mean() -> None:
    strata, value = _population()
    sizes = {s: strata.count(s) for s in dict.fromkeys(strata)}
    plan = allocate(sizes, 60, method="equal", min_per_stratum=10)
    estimates = []
    for seed in range(400):
        rows, prob = stratified_sample(strata, plan, seed=seed)
        weights = 1.0 / prob
        assert len(rows) == 60 and weights.sum() == pytest.approx(len(strata))
        estimates.append(np.sum(weights * value[rows]) / weights.sum())
    # Horvitz-Thompson is unbiased: the mean of the estimates is the population mean (within its s.e.)
    se = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - value.mean()) < 4 * se
    # the unweighted sample mean is not (the rare stratum is oversampled by the equal allocation)
    rows, _ = stratified_sample(strata, plan, seed=0)
    assert value[rows].mean() > value.mean() + 0.3
    # a quantity constant within strata is reproduced exactly by any draw
    per_stratum = {"rare": 3.0, "mid": 2.0, "common": 1.0}
    f = np.array([per_stratum[s] for s in strata])
    rows, prob = stratified_sample(strata, plan, seed=7)
    assert np.sum(f[rows] / prob) / np.sum(1 / prob) == pytest.approx(f.mean())


def test_draw_is_seeded_per_stratum() -> None:
    strata, _ = _population()
    sizes = {s: strata.count(s) for s in dict.fromkeys(strata)}
    plan = allocate(sizes, 40, min_per_stratum=5)
    a, _ = stratified_sample(strata, plan, seed=1)
    b, _ = stratified_sample(strata, plan, seed=1)
    c, _ = stratified_sample(strata, plan, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ----------------------------------------------------------------------------------------------------
# Strata


def test_strata_names_bands_and_order() -> None:
    assert parse_strata("difficulty, n_positives") == ("difficulty", "n_positives")
    assert parse_strata(["field:metadata.domain"]) == ("field:metadata.domain",)
    with pytest.raises(ConfigError, match="unknown stratum 'difficult'; choose from difficulty"):
        parse_strata("difficult")
    with pytest.raises(ConfigError, match="twice"):
        parse_strata("topic,topic")
    assert [band(r, DIFFICULTY_BANDS)[1] for r in (1, 2, 10, 11, 100, 101)] == ["1", "2-10", "2-10", "11-100", "11-100", ">100"]
    names = ["difficulty=11-100|n_positives=1", "difficulty=1|n_positives=2", "difficulty=>100|n_positives=1",
             "difficulty=1|n_positives=1"]
    assert sorted(names, key=sort_key) == [names[3], names[1], names[0], names[2]]
    strata, keys = combine([("a", ["x", "y"], [0, 1]), ("b", ["1", "1"], [0, 0])])
    assert strata == ["a=x|b=1", "a=y|b=1"] and keys["a=y|b=1"] == (1, 0)


def test_mapping_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "map.tsv"
    path.write_text("query-id\tstratum\nq1\tA\nq2\tB\nq9\tC\n")
    with pytest.raises(DataError, match="stratum 'C' is empty"):
        read_mapping(path, ["q1", "q2"])
    with pytest.raises(DataError, match="1 queries have no stratum"):
        read_mapping(path, ["q1", "q2", "q3"])
    path.write_text("q1\t\n")
    with pytest.raises(DataError, match="empty stratum name"):
        read_mapping(path, ["q1"])


# ----------------------------------------------------------------------------------------------------
# Building a set


def synthetic_beir(folder: Path, n_queries: int = 40, n_docs: int = 160, split: str = "test") -> Path:
    """Queries with 1, 2 or 4 positives and a 'domain' metadata field; short texts, fast to encode."""
    topics = ["cardiology", "genetics", "oncology", "immunology"]
    docs = {f"d{i}": f"{topics[i % 4]} finding number {i}: effect {i % 7} on marker {i % 11}" for i in range(n_docs)}
    queries: dict[str, str] = {}
    qrels: list[tuple[str, str, int]] = []
    for q in range(n_queries):
        qid = f"q{q}"
        queries[qid] = f"does {topics[q % 4]} effect {q % 7} change marker {q % 11}?"
        n_pos = 4 if q % 10 == 0 else 2 if q % 5 == 0 else 1
        for j in range(n_pos):
            qrels.append((qid, f"d{(q * 3 + j * 17) % n_docs}", 1))
        if q % 3 == 0:
            qrels.append((qid, f"d{(q * 3 + 101) % n_docs}", 0))  # a judged non-relevant document
    write_beir(folder, docs, queries, qrels, split=split)
    lines = [json.dumps({"_id": qid, "text": text, "metadata": {"domain": topics[int(qid[1:]) % 4]}})
             for qid, text in queries.items()]
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_beir(tmp_path_factory.mktemp("evalset_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("evalset_cache"))


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in DATA_FILES}


def _check_folder(folder: Path, population: int) -> tuple[list[str], dict]:
    qids, strata, prob, weights = read_strata(folder / "strata.tsv")
    assert weights.sum() == pytest.approx(population)
    np.testing.assert_allclose(weights, 1 / prob)
    docs = {json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()}
    queries = [json.loads(line)["_id"] for line in (folder / "queries.jsonl").read_text().splitlines()]
    assert sorted(queries) == sorted(qids)
    qrels = [line.split("\t") for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    assert {q for q, _, _ in qrels} == set(qids)
    assert all(d in docs for _, d, _ in qrels), "every judged document of a selected query is in the corpus"
    return qids, json.loads((folder / "manifest.json").read_text())


def test_build_without_a_model(beir: Path, tmp_path: Path) -> None:
    config = EvalsetConfig(budget=20, strata=("n_positives", "field:metadata.domain"), min_per_stratum=3,
                           distractors=0, background=30, seed=5)
    result = build_evalset(beir, tmp_path / "a", config)
    qids, manifest = _check_folder(tmp_path / "a", 40)
    assert len(qids) == 20 and manifest["model"] is None
    by_name = {s["stratum"]: s for s in manifest["strata"]}
    # n_positives=2 x 4 domains: 4 queries with 2 positives, each domain holding one -> too small, taken whole
    small = [s for s in manifest["strata"] if s["too_small"]]
    assert small and all(s["selected"] == s["population"] for s in small)
    assert manifest["too_small"] == [s["stratum"] for s in small]
    assert sum(s["population"] for s in by_name.values()) == 40
    assert manifest["corpus"]["background"] == 30 and manifest["corpus"]["judged"] > 0
    assert manifest["corpus"]["documents"] == sum(v for k, v in manifest["corpus"].items()
                                                  if k in ("positives", "judged", "mined", "bm25", "background"))
    assert result.weights.sum() == pytest.approx(40)
    # original records are copied: the metadata survives
    first = json.loads((tmp_path / "a" / "queries.jsonl").read_text().splitlines()[0])
    assert "metadata" in first

    again = build_evalset(beir, tmp_path / "b", config)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert again.manifest["files"] == manifest["files"]
    other = build_evalset(beir, tmp_path / "c", EvalsetConfig(**{**config.to_dict(), "seed": 6, "strata": config.strata}))
    assert _files(tmp_path / "c")["strata.tsv"] != _files(tmp_path / "a")["strata.tsv"]
    assert other.manifest["population"]["queries"] == 40


def test_leakage_guard(beir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    synthetic_beir(data)
    # a training split sharing query q1 (by id), q2 (by text, another id), and q3's positive document
    lines = (data / "queries.jsonl").read_text()
    q2_text = json.loads(lines.splitlines()[2])["text"]
    extra = json.dumps({"_id": "t2", "text": q2_text.upper()})
    (data / "queries.jsonl").write_text(lines + extra + "\n")
    q3_pos = (data / "qrels" / "test.tsv").read_text().splitlines()[1:]
    q3_pos = [line.split("\t")[1] for line in q3_pos if line.startswith("q3\t")][0]
    (data / "qrels" / "train.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\td0\t1\nt2\td1\t1\nt2\t{q3_pos}\t1\n")

    config = EvalsetConfig(budget=10, strata=("n_positives",), distractors=0, background=0, train="train")
    result = build_evalset(data, tmp_path / "report", config)
    leak = result.manifest["leakage"]
    assert leak["queries_in_training"] == 2 and set(leak["queries_in_training_ids"]) == {"q1", "q2"}
    assert leak["positive_as_training_positive"]["q3"] == [q3_pos]
    assert result.manifest["population"]["queries"] == 38
    assert not {"q1", "q2"} & set(result.query_ids)

    excluded = build_evalset(data, tmp_path / "exclude", EvalsetConfig(**{**config.to_dict(), "budget": 37,
                                                                          "leaked_positives": "exclude"}))
    assert "q3" not in excluded.query_ids  # its only positive leaked: it leaves the population
    assert excluded.manifest["population"]["queries"] == 37
    corpus = (tmp_path / "exclude" / "corpus.jsonl").read_text()
    assert f'"{q3_pos}"' not in corpus and excluded.manifest["corpus"]["excluded_leaked_positives"] >= 1
    with pytest.raises(DataError, match="training set 'nope' not found"):
        build_evalset(data, tmp_path / "x", EvalsetConfig(**{**config.to_dict(), "train": "nope"}))


def test_bm25_distractors(beir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bm25s", reason="BM25 distractors need the optional bm25s package (miner[bm25])")
    config = EvalsetConfig(budget=10, strata=("n_positives",), distractors=0, bm25_distractors=3, background=0)
    result = build_evalset(beir, tmp_path / "bm25", config)
    composition = result.manifest["corpus"]
    assert 0 < composition["bm25"] <= 30 and composition["mined"] == 0
    assert composition["documents"] == composition["positives"] + composition["judged"] + composition["bm25"]


def test_missing_bm25s_says_how_to_install(beir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bm25s", None)  # import bm25s now raises ImportError
    config = EvalsetConfig(budget=10, strata=("n_positives",), distractors=0, bm25_distractors=3, background=0)
    with pytest.raises(ImportError, match="pip install bm25s"):
        build_evalset(beir, tmp_path / "x", config)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown stratum"):
        EvalsetConfig(budget=10, strata=("difficulty", "nope"))
    with pytest.raises(ConfigError, match="mapping file"):
        EvalsetConfig(budget=10, strata=("mapping",))
    with pytest.raises(ConfigError, match="pilot variance"):
        EvalsetConfig(budget=10, allocation="neyman")
    with pytest.raises(ConfigError, match="only used by neyman"):
        EvalsetConfig(budget=10, pilot_variance={"a": 1.0})
    with pytest.raises(ConfigError, match="budget"):
        EvalsetConfig(budget=0)


def test_with_model_difficulty_and_mined_distractors(beir: Path, model, cache: str, tmp_path: Path) -> None:
    config = EvalsetConfig(budget=24, strata=("difficulty", "n_positives"), min_per_stratum=4, distractors=5,
                           background=10)
    mine_config = MineConfig(encode=EncodeConfig(cache_dir=cache))
    result = build_evalset(beir, tmp_path / "a", config, mine_config, model=model)
    qids, manifest = _check_folder(tmp_path / "a", 40)
    assert manifest["model"]["fingerprint"] and sum(manifest["difficulty"].values()) == 40
    assert all(s["stratum"].startswith("difficulty=") for s in manifest["strata"])
    assert manifest["corpus"]["mined"] > 0
    assert manifest["distractors"]["mined_per_query"]["asked"] == 5
    # strata listed in band order
    names = [s["stratum"] for s in manifest["strata"]]
    from miner.strata import sort_key as key

    assert names == sorted(names, key=key)
    again = build_evalset(beir, tmp_path / "b", config, mine_config, model=model)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert result.query_ids == again.query_ids


def test_cli_evalset_and_errors(beir: Path, model, cache: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["evalset", "--data", str(beir), "--split", "test", "--cache-dir", cache]
    out = tmp_path / "cli"
    assert main([*base, "--budget", "20", "--strata", "difficulty,n_positives", "--min-per-stratum", "3",
                 "--distractors", "3", "--background", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "stratum" in printed and "weights sum to 40" in printed
    _check_folder(out, 40)

    cases = [
        (["--budget", "20", "--strata", "difficulty,bogus"], "unknown stratum 'bogus'"),
        (["--budget", "5", "--strata", "n_positives", "--min-per-stratum", "10"], "below the sum of the minima"),
        (["--budget", "500", "--strata", "n_positives"], "larger than the population"),
        (["--budget", "5", "--strata", "mapping", "--strata-file", str(tmp_path / "map.tsv")], "is empty"),
        (["--budget", "5", "--strata", "n_positives", "--allocation", "neyman"], "pilot variance"),
    ]
    (tmp_path / "map.tsv").write_text("".join(f"q{i}\tA\n" for i in range(40)) + "q99\tB\n")
    for extra, message in cases:
        code = main([*base, *extra, "--distractors", "0", "--out", str(tmp_path / "bad"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and err.startswith("miner: error: ") and message in err, err


# ----------------------------------------------------------------------------------------------------
# The check on SciFact


@pytest.fixture(scope="module")
def scifact_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.environ.get("MINER_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("scifact_cache"))


@pytest.mark.slow
def test_scifact_evalset_command(scifact: Path, model, scifact_cache: str, tmp_path: Path) -> None:
    argv = ["evalset", "--data", str(scifact), "--split", "test", "--budget", "200", "--strata",
            "difficulty,n_positives", "--min-per-stratum", "10", "--cache-dir", scifact_cache, "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    qids, manifest = _check_folder(tmp_path / "a", 300)
    assert len(qids) == 200
    for s in manifest["strata"]:
        if s["population"] >= 10:
            assert s["selected"] >= 10, s
    # every positive of every selected query is in the reduced corpus
    docs = {json.loads(line)["_id"] for line in (tmp_path / "a" / "corpus.jsonl").read_text().splitlines()}
    from miner.data import load_beir

    full = load_beir(scifact, "test")
    for r, qid in enumerate(full.queries.ids):
        if qid in set(qids):
            assert {full.corpus.ids[d] for d in full.qrels.positives(r)} <= docs
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    second = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {k: v for k, v in second.items() if k != "timings"} == {k: v for k, v in manifest.items() if k != "timings"}
