"""Inputs: BEIR folders, pairs files and Python sequences, and the errors a new user runs into."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import DEMO, write_beir
from miner.data import same_text_keys, from_pairs, load_beir, load_data, load_pairs, normalize_text
from miner.errors import DataError


def _tiny(tmp_path: Path) -> Path:
    return write_beir(
        tmp_path / "beir",
        {"d1": "alpha", "d2": "beta", "d3": "gamma", "d4": "delta"},
        {"q1": "first", "q2": "second", "q3": "third"},
        [("q1", "d1", 1), ("q1", "d2", 2), ("q1", "d3", 0), ("q2", "d4", 0), ("q3", "d3", 1)],
    )


def test_beir_graded_qrels(tmp_path: Path) -> None:
    ds = load_beir(_tiny(tmp_path), "train")
    # q2 has only a judged non-relevant document: nothing to mine for, so it is dropped and counted.
    assert ds.queries.ids == ["q1", "q3"]
    assert ds.report.queries_without_positives == 1
    assert sorted(ds.qrels.positives(0).tolist()) == [0, 1]
    assert ds.qrels.judged_negatives(0).tolist() == [2]
    assert ds.qrels.positives(1).tolist() == [2]
    assert len(ds.sources) == 3 and all(len(h) == 64 for h in ds.sources.values())


def test_demo_sample_loads() -> None:
    ds = load_beir(DEMO, "train")
    assert len(ds.corpus) == 1000 and len(ds.queries) == 200


def test_broken_json_line_names_file_and_line(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]
    (folder / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"corpus\.jsonl:3: invalid JSON"):
        load_beir(folder)


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    with open(folder / "queries.jsonl", "a") as out:
        out.write(json.dumps({"_id": "q1", "text": "again"}) + "\n")
    with pytest.raises(DataError, match=r"queries\.jsonl:4: duplicate id 'q1' \(first seen on line 1\)"):
        load_beir(folder)


def test_missing_qrels_lists_splits(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"test\.tsv not found \(available splits: train\)"):
        load_beir(_tiny(tmp_path), "test")


def test_bad_qrels_line(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    with open(folder / "qrels" / "train.tsv", "a") as out:
        out.write("q1\td2\n")
    with pytest.raises(DataError, match=r"train\.tsv:7: expected 3 tab-separated columns"):
        load_beir(folder)


def test_unknown_ids_are_counted_or_strict(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    with open(folder / "qrels" / "train.tsv", "a") as out:
        out.write("q1\tnope\t1\nq9\td1\t1\n")
    ds = load_beir(folder)
    assert ds.report.missing_doc_ids == 1 and ds.report.missing_query_ids == 1
    with pytest.raises(DataError, match="unknown"):
        load_beir(folder, strict=True)


def test_empty_corpus(tmp_path: Path) -> None:
    folder = _tiny(tmp_path)
    (folder / "corpus.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        load_beir(folder)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv", ".tsv"])
def test_pairs_files(tmp_path: Path, suffix: str) -> None:
    rows = [{"q": "what do cats eat", "pos": "Cats eat mice."}, {"q": "what do cats eat", "pos": "Cats eat fish."},
            {"q": "why is the sky blue", "pos": "Rayleigh scattering."}]
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(f"q{sep}pos\n" + "".join(f"{r['q']}{sep}{r['pos']}\n" for r in rows))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"_id": "x1", "text": "Dogs bark."}) + "\n" + json.dumps({"_id": "x2", "text": "Cats eat fish."}) + "\n")
    ds = load_pairs(path, corpus=corpus, query_column="q", positive_column="pos")
    assert ds.queries.texts == ["what do cats eat", "why is the sky blue"]
    # "Cats eat fish." is already in the corpus file: reused, not added twice.
    assert ds.corpus.texts == ["Dogs bark.", "Cats eat fish.", "Cats eat mice.", "Rayleigh scattering."]
    assert sorted(ds.qrels.positives(0).tolist()) == [1, 2]


def test_wrong_column_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match=r"no column 'query' \(set --query-column\); columns are: question, answer"):
        load_pairs(path)


def test_unknown_file_type_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "pairs.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_data(tmp_path / "pairs.xlsx")
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nothing.jsonl")


def test_from_pairs_merges_repeated_queries() -> None:
    ds = from_pairs(["a", "b", "a"], ["x", ["y", "z"], "y"], corpus=["w", "x"])
    assert ds.queries.texts == ["a", "b"]
    assert ds.corpus.texts == ["w", "x", "y", "z"]
    assert sorted(ds.qrels.positives(0).tolist()) == [1, 2]
    assert sorted(ds.qrels.positives(1).tolist()) == [2, 3]
    assert ds.qrels.grades.dtype == np.int32


def test_normalize_text() -> None:
    assert normalize_text("  The\tCat\n SAT ") == "the cat sat"


_ALPHABET = "aZ09 .,\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x00\x85\xa0\u2003ßİΣſ\ufb03é"


@given(st.lists(st.text(alphabet=_ALPHABET, max_size=40) | st.text(max_size=40), max_size=6))
@settings(max_examples=400, deadline=None)
def test_same_text_keys_equal_exactly_for_equal_normalised_texts(texts: list[str]) -> None:
    """Keys come from the kernel's batched whitespace folding (or its fallback): equal keys exactly where
    normalize_text agrees, whitespace kinds, case folding, NULs and lone surrogates included."""
    variants = texts + ["  " + t.upper() + "\t" for t in texts] + ["\ud800" + t for t in texts[:1]]
    keys = same_text_keys(variants).tolist()
    for a, b in itertools.combinations(range(len(variants)), 2):
        assert (keys[a] == keys[b]) == (normalize_text(variants[a]) == normalize_text(variants[b]))
    assert [int(same_text_keys([t])[0]) for t in texts] == keys[: len(texts)]  # a key does not depend on the batch
