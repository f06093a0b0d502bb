"""The issue's acceptance check on real data: SciFact train (809 queries, 5,183 documents), every format.

Needs ../shared/data/scifact (skips in a fresh clone without it). Encoding SciFact takes minutes on a CPU:
set MINER_TEST_CACHE_DIR to share the embedding cache between test runs (.ci/run does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from miner.cli import main
from miner.data import load_beir, normalize_text
from miner.write import manifest_path, read_rows

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("model")]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("MINER_TEST_CACHE_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("scifact_cache")


def _check_negatives(scifact: Path, rows: list[dict], *, doc_key: str, pos_label: str | None = None) -> int:
    ds = load_beir(scifact, "train")
    # A query's positives include those of every query with the same normalised text (SciFact train has such
    # a pair, ids 89 and 90, with different judgements).
    by_text: dict[str, set[str]] = {}
    for r in range(len(ds.queries)):
        by_text.setdefault(normalize_text(ds.queries.texts[r]), set()).update(
            ds.corpus.ids[p] for p in ds.qrels.positives(r)
        )
    positives = {qid: by_text[normalize_text(t)] for qid, t in zip(ds.queries.ids, ds.queries.texts)}
    assert sum(len(v) for v in positives.values()) > len(ds.qrels.doc_idx[ds.qrels.grades > 0])  # the pair is there
    text = dict(zip(ds.corpus.ids, ds.corpus.texts))
    checked = 0
    for row in rows:
        qid = row["query_id"]
        pos_texts = {normalize_text(text[p]) for p in positives[qid]}
        for neg in row[doc_key] if isinstance(row[doc_key], list) else [row[doc_key]]:
            assert neg not in positives[qid], (qid, neg)
            assert normalize_text(text[neg]) not in pos_texts, (qid, neg)
            assert neg != qid
            checked += 1
    return checked


def test_scifact_triplets_rules_manifest_rerun(scifact: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "triplets.parquet"
    argv = ["mine", "--data", str(scifact), "--split", "train", "--out", str(out), "--format", "triplet",
            "--cache-dir", str(cache_dir), "--quiet"]
    assert main(argv) == 0
    rows = read_rows(out)
    assert len({r["query_id"] for r in rows}) == 809
    assert _check_negatives(scifact, rows, doc_key="negative_id") == len(rows)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["counts"]["queries"] == 809 and manifest["output"]["rows"] == len(rows)
    assert set(manifest["timings"]) >= {"load_model", "encode_documents", "encode_queries", "search_select", "write"}

    again = tmp_path / "again.parquet"
    assert main([*argv[:6], str(again), *argv[7:]]) == 0
    assert read_rows(again) == rows
    second = json.loads(manifest_path(again).read_text())
    assert second["encoding"]["documents"]["encoded"] == 0 and second["encoding"]["queries"]["encoded"] == 0
    assert second["timings"]["encode_documents"] < 5.0


@pytest.mark.parametrize("fmt,key", [("n-tuple", "negative_1_id"), ("labeled-pair", "document_id"),
                                     ("labeled-list", "document_ids")])
def test_scifact_other_formats(scifact: Path, cache_dir: Path, tmp_path: Path, fmt: str, key: str) -> None:
    out = tmp_path / f"{fmt}.jsonl"
    assert main(["mine", "--data", str(scifact), "--out", str(out), "--format", fmt, "--cache-dir", str(cache_dir),
                 "--quiet"]) == 0
    rows = read_rows(out)
    if fmt == "labeled-pair":
        rows = [r for r in rows if r["label"] == 0]
    if fmt == "labeled-list":
        rows = [{**r, key: [d for d, label in zip(r[key], r["labels"]) if label == 0]} for r in rows]
    if fmt == "n-tuple":
        rows = [{**r, key: [r[f"negative_{i}_id"] for i in range(1, 6)]} for r in rows]
    assert _check_negatives(scifact, rows, doc_key=key) > 0
    assert manifest_path(out).is_file()
