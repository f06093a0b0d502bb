"""Leakage between a training set and an evaluation set.

A training set is read from a qrels split of a BEIR folder (queries, positives, judged negatives) or from a
file written by ``miner mine`` (queries, positives and mined negatives, any format). Against it,
:func:`check_leakage` finds eval queries that are training queries (same id or same normalised text) and
eval positives that training used as a positive or as a negative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from miner.data import Dataset, load_beir, normalize_text
from miner.errors import DataError

__all__ = ["TrainingSet", "load_training", "LeakageReport", "check_leakage"]


@dataclass(frozen=True)
class TrainingSet:
    """What a training set holds, as ids and normalised texts."""

    source: str
    query_ids: frozenset[str]
    query_texts: frozenset[str]  # normalised
    positive_ids: frozenset[str]
    negative_ids: frozenset[str]


def _from_beir(folder: Path, split: str) -> TrainingSet:
    data = load_beir(folder, split)
    positives: set[str] = set()
    negatives: set[str] = set()
    for r in range(data.qrels.n_queries):
        positives.update(data.corpus.ids[d] for d in data.qrels.positives(r))
        negatives.update(data.corpus.ids[d] for d in data.qrels.judged_negatives(r))
    return TrainingSet(
        source=f"{folder}/qrels/{split}.tsv",
        query_ids=frozenset(data.queries.ids),
        query_texts=frozenset(normalize_text(t) for t in data.queries.texts),
        positive_ids=frozenset(positives),
        negative_ids=frozenset(negatives),
    )


def _from_mined(path: Path) -> TrainingSet:
    from miner.write import read_rows

    rows = read_rows(path)
    if not rows or "query_id" not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "(no rows)"
        raise DataError(f"{path}: not a file written by 'miner mine' (no query_id column); columns: {columns}")
    qids: set[str] = set()
    texts: set[str] = set()
    positives: set[str] = set()
    negatives: set[str] = set()
    for row in rows:
        qids.add(str(row["query_id"]))
        text = row.get("query", row.get("anchor"))
        if isinstance(text, str):
            texts.add(normalize_text(text))
        if row.get("positive_id") is not None:
            positives.add(str(row["positive_id"]))
        for key, value in row.items():
            if value is not None and key.startswith("negative") and key.endswith("_id"):
                negatives.add(str(value))
        if "document_id" in row:
            (positives if row.get("label") else negatives).add(str(row["document_id"]))
        if "document_ids" in row:
            for doc, label in zip(row["document_ids"], row.get("labels") or []):
                (positives if label else negatives).add(str(doc))
    return TrainingSet(str(path), frozenset(qids), frozenset(texts), frozenset(positives), frozenset(negatives))


def load_training(spec: str | Path, *, data_folder: str | Path | None = None, split: str = "train") -> TrainingSet:
    """Read a training set.

    Args:
        spec: a file written by ``miner mine`` (``.parquet``/``.jsonl``), a BEIR folder (its ``split``
            qrels), or the name of a qrels split of ``data_folder`` (e.g. ``"train"``).
        data_folder: the eval data's BEIR folder, for a split name.
        split: the qrels split to read from a BEIR folder given as ``spec``.
    """
    path = Path(spec)
    if path.is_file():
        return _from_mined(path)
    if path.is_dir():
        return _from_beir(path, split)
    if data_folder is not None and Path(data_folder).is_dir() and (Path(data_folder) / "qrels" / f"{spec}.tsv").is_file():
        return _from_beir(Path(data_folder), str(spec))
    raise DataError(
        f"training set {str(spec)!r} not found: pass a file from 'miner mine', a BEIR folder, or a qrels split "
        "name of the --data folder"
    )


@dataclass
class LeakageReport:
    """Eval queries found in training, and eval positives that training used."""

    source: str
    queries_in_training: list[str] = field(default_factory=list)  # eval query ids
    positive_as_training_positive: dict[str, list[str]] = field(default_factory=dict)  # query id -> doc ids
    positive_as_training_negative: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self, limit: int = 50) -> dict[str, object]:
        def head(d: dict[str, list[str]]) -> dict[str, list[str]]:
            return dict(list(d.items())[:limit])

        return {
            "training_set": self.source,
            "queries_in_training": len(self.queries_in_training),
            "queries_in_training_ids": self.queries_in_training[:limit],
            "queries_with_positive_as_training_positive": len(self.positive_as_training_positive),
            "queries_with_positive_as_training_negative": len(self.positive_as_training_negative),
            "positive_as_training_positive": head(self.positive_as_training_positive),
            "positive_as_training_negative": head(self.positive_as_training_negative),
        }


def check_leakage(dataset: Dataset, rows: np.ndarray, training: TrainingSet) -> LeakageReport:
    """Compare the eval queries ``rows`` of ``dataset`` with ``training``."""
    report = LeakageReport(training.source)
    for r in rows.tolist():
        qid = dataset.queries.ids[r]
        if qid in training.query_ids or normalize_text(dataset.queries.texts[r]) in training.query_texts:
            report.queries_in_training.append(qid)
        docs = [dataset.corpus.ids[d] for d in dataset.qrels.positives(r)]
        as_pos = [d for d in docs if d in training.positive_ids]
        as_neg = [d for d in docs if d in training.negative_ids]
        if as_pos:
            report.positive_as_training_positive[qid] = as_pos
        if as_neg:
            report.positive_as_training_negative[qid] = as_neg
    return report
