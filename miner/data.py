"""Inputs: a corpus, the training queries and their judged documents.

Three sources give the same :class:`Dataset`:

* a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``; grade > 0 relevant, grade 0
  judged non-relevant) -> :func:`load_beir`;
* a pairs file (Parquet, JSONL, CSV or TSV) with a query column and a positive column, optionally with a
  separate corpus file -> :func:`load_pairs`;
* Python sequences -> :func:`from_pairs`.

Malformed input raises :class:`~miner.errors.DataError` naming the file and line. Qrels ids that are
missing from the corpus or the queries are counted in :attr:`Dataset.report` (an error with ``strict``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from miner import topk
from miner.errors import DataError

__all__ = [
    "Corpus",
    "Queries",
    "Qrels",
    "LoadReport",
    "Dataset",
    "load_beir",
    "load_pairs",
    "load_data",
    "from_pairs",
    "normalize_text",
    "file_sha256",
]

log = logging.getLogger(__name__)

PAIR_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def normalize_text(text: str) -> str:
    """Case-folded text with runs of whitespace collapsed: the key for "same text" checks."""
    return " ".join(text.casefold().split())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """Documents: ``ids[i]`` and ``texts[i]`` (title and body joined, the text that is encoded)."""

    ids: list[str]
    texts: list[str]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise DataError(f"corpus has {len(self.ids)} ids but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def index(self) -> dict[str, int]:
        """Document id -> row."""
        return {doc_id: i for i, doc_id in enumerate(self.ids)}

    @cached_property
    def normalized_keys(self) -> npt.NDArray[np.int64]:
        """int64[N]: one 64-bit hash of each document's normalised text, for exact-duplicate checks."""
        return same_text_keys(self.texts)


@dataclass(frozen=True)
class Queries:
    """Queries to mine for: ``ids[i]`` and ``texts[i]``."""

    ids: list[str]
    texts: list[str]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise DataError(f"queries have {len(self.ids)} ids but {len(self.texts)} texts")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Qrels:
    """Judgements in CSR form, aligned with :class:`Queries`.

    Row ``i`` holds ``doc_idx[indptr[i]:indptr[i + 1]]`` (corpus rows) with ``grades`` at the same
    positions; grade > 0 is relevant, grade 0 judged non-relevant.
    """

    indptr: npt.NDArray[np.int64]  # int64[Q + 1]
    doc_idx: npt.NDArray[np.int64]  # int64[nnz]
    grades: npt.NDArray[np.int32]  # int32[nnz]

    def positives(self, row: int) -> npt.NDArray[np.int64]:
        lo, hi = self.indptr[row], self.indptr[row + 1]
        return self.doc_idx[lo:hi][self.grades[lo:hi] > 0]

    def judged_negatives(self, row: int) -> npt.NDArray[np.int64]:
        lo, hi = self.indptr[row], self.indptr[row + 1]
        return self.doc_idx[lo:hi][self.grades[lo:hi] <= 0]

    @property
    def n_queries(self) -> int:
        return len(self.indptr) - 1


@dataclass
class LoadReport:
    """What loading skipped; with ``strict`` any of it is an error instead."""

    missing_query_ids: int = 0
    missing_doc_ids: int = 0
    queries_without_positives: int = 0
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "missing_query_ids": self.missing_query_ids,
            "missing_doc_ids": self.missing_doc_ids,
            "queries_without_positives": self.queries_without_positives,
            "examples": self.examples[:10],
        }


@dataclass(frozen=True)
class Dataset:
    """A corpus, the queries to mine for (each with at least one positive) and their qrels."""

    corpus: Corpus
    queries: Queries
    qrels: Qrels
    report: LoadReport = field(default_factory=LoadReport)
    sources: dict[str, str] = field(default_factory=dict)  # path -> sha256

    def __post_init__(self) -> None:
        if len(self.corpus) == 0:
            raise DataError("the corpus is empty: there is nothing to mine negatives from")
        if len(self.queries) == 0:
            raise DataError("no query has a positive document: there is nothing to mine for")
        if self.qrels.n_queries != len(self.queries):
            raise DataError(
                f"qrels have {self.qrels.n_queries} rows but there are {len(self.queries)} queries"
            )


def same_text_keys(texts: Sequence[str]) -> npt.NDArray[np.int64]:
    """int64[n]: a 64-bit hash (xxh3) of each text's ``normalize_text`` form, for same-text checks.

    Python case-folds the non-ASCII texts (ASCII needs only A-Z lowered); the kernel collapses whitespace
    and lowers ASCII for all of them in one call (``topk.fold_whitespace``): 0.03 s for the SciFact corpus,
    where normalising and hashing text by text took 0.07 s.

    Example:
        >>> k = same_text_keys(["The  cat", "the cat ", "a dog"])
        >>> bool(k[0] == k[1]), bool(k[0] == k[2])
        (True, False)
    """
    folded = [t if t.isascii() else t.casefold() for t in texts]  # the kernel lowers ASCII itself
    keys = np.fromiter((xxhash.xxh3_64_intdigest(b) for b in topk.fold_whitespace(folded)), dtype=np.uint64,
                       count=len(folded))
    return keys.view(np.int64)


# ----------------------------------------------------------------------------------------------------
# BEIR folders


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _field(path: Path, lineno: int, record: dict[str, object], name: str, *, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(f"{path}:{lineno}: missing field {name!r} (fields: {', '.join(record)})")
        return ""
    if isinstance(value, (int, float)) and name == "_id":
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{path}:{lineno}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _read_beir_records(path: Path, *, with_title: bool) -> tuple[list[str], list[str]]:
    ids: list[str] = []
    texts: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, record in _read_jsonl(path):
        doc_id = _field(path, lineno, record, "_id", required=True)
        if doc_id in first_line:
            raise DataError(f"{path}:{lineno}: duplicate id {doc_id!r} (first seen on line {first_line[doc_id]})")
        first_line[doc_id] = lineno
        text = _field(path, lineno, record, "text", required=True)
        if with_title:
            title = _field(path, lineno, record, "title", required=False)
            text = f"{title} {text}".strip() if title else text
        ids.append(doc_id)
        texts.append(text)
    return ids, texts


def _read_qrels(path: Path) -> list[tuple[str, str, int]]:
    rows: list[tuple[str, str, int]] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if lineno == 1 and parts[0].strip().lower() in {"query-id", "query_id", "qid"}:
                continue
            if len(parts) == 4:  # TREC layout: qid, iteration, docid, grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DataError(
                    f"{path}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                    f"got {len(parts)}: {line[:80]!r}"
                )
            try:
                grade = int(float(parts[2]))
            except ValueError:
                raise DataError(f"{path}:{lineno}: score must be an integer grade, got {parts[2]!r}") from None
            rows.append((parts[0].strip(), parts[1].strip(), grade))
    return rows


def load_beir(folder: str | Path, split: str = "train", *, strict: bool = False) -> Dataset:
    """Load a BEIR folder: ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.

    Only queries with at least one relevant document (grade > 0) in the split are kept, in the order of
    ``queries.jsonl``. Grade-0 judgements are kept as judged non-relevant documents.

    Raises:
        DataError: a file is missing or malformed (message names file and line), or, with ``strict``,
            qrels name ids that are not in the corpus or queries.
    """
    folder = Path(folder)
    corpus_path, queries_path = folder / "corpus.jsonl", folder / "queries.jsonl"
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for path in (corpus_path, queries_path):
        if not path.is_file():
            raise DataError(f"{path} not found: a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/")
    if not qrels_path.is_file():
        available = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        hint = f"available splits: {', '.join(available)}" if available else "the qrels/ folder has no .tsv"
        raise DataError(f"{qrels_path} not found ({hint})")

    doc_ids, doc_texts = _read_beir_records(corpus_path, with_title=True)
    corpus = Corpus(doc_ids, doc_texts)
    if len(corpus) == 0:
        raise DataError(f"{corpus_path} holds no documents")
    query_ids, query_texts = _read_beir_records(queries_path, with_title=False)
    query_index = {qid: i for i, qid in enumerate(query_ids)}

    report = LoadReport()
    judged: dict[int, dict[int, int]] = {}
    for qid, did, grade in _read_qrels(qrels_path):
        q = query_index.get(qid)
        d = corpus.index.get(did)
        if q is None:
            report.missing_query_ids += 1
            report.examples.append(f"query id {qid!r} of {qrels_path.name} is not in queries.jsonl")
            continue
        if d is None:
            report.missing_doc_ids += 1
            report.examples.append(f"corpus id {did!r} of {qrels_path.name} is not in corpus.jsonl")
            continue
        row = judged.setdefault(q, {})
        row[d] = max(grade, row.get(d, grade))
    _check_report(report, strict=strict, where=str(qrels_path))

    keep = [q for q in range(len(query_ids)) if q in judged and any(g > 0 for g in judged[q].values())]
    report.queries_without_positives = len(judged) - len(keep)
    queries = Queries([query_ids[q] for q in keep], [query_texts[q] for q in keep])
    qrels = _qrels_from_rows([judged[q] for q in keep])
    sources = {str(p): file_sha256(p) for p in (corpus_path, queries_path, qrels_path)}
    if not keep:
        raise DataError(f"{qrels_path}: no query has a relevant document (grade > 0)")
    return Dataset(corpus, queries, qrels, report, sources)


def _check_report(report: LoadReport, *, strict: bool, where: str) -> None:
    missing = report.missing_query_ids + report.missing_doc_ids
    if missing and strict:
        raise DataError(
            f"{where}: {report.missing_query_ids} query ids and {report.missing_doc_ids} corpus ids are "
            f"unknown (first: {report.examples[0]}); drop --strict to skip them"
        )
    if missing:
        log.warning("%s: skipped %d judgements with unknown ids (e.g. %s)", where, missing, report.examples[0])


def _qrels_from_rows(rows: Sequence[dict[int, int]]) -> Qrels:
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    doc_idx = np.fromiter((d for r in rows for d in r), dtype=np.int64, count=int(indptr[-1]))
    grades = np.fromiter((g for r in rows for g in r.values()), dtype=np.int32, count=int(indptr[-1]))
    return Qrels(indptr, doc_idx, grades)


# ----------------------------------------------------------------------------------------------------
# Pairs files and Python sequences


def _read_table(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Column names and an iterator of (line or row number, record) for any supported table file."""
    kind = PAIR_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix!r}; use .parquet, .jsonl, .csv or .tsv "
            "(or a BEIR folder)"
        )
    if not path.is_file():
        raise DataError(f"{path} not found")
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        columns = table.column_names
        return columns, ((i + 1, rec) for i, rec in enumerate(table.to_pylist()))
    if kind == "jsonl":
        records = list(_read_jsonl(path))
        columns = list(dict.fromkeys(key for _, rec in records for key in rec))
        return columns, iter(records)
    handle = open(path, encoding="utf-8", newline="")
    reader = csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ",")
    columns = list(reader.fieldnames or [])

    def rows() -> Iterator[tuple[int, dict[str, object]]]:
        with handle:
            for record in reader:
                if None in record:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header's {len(columns)}")
                yield reader.line_num, dict(record)

    return columns, rows()


def _require_column(path: Path, columns: list[str], name: str, flag: str) -> None:
    if name not in columns:
        raise DataError(
            f"{path}: no column {name!r} (set {flag}); columns are: {', '.join(columns) or '(none)'}"
        )


def _as_texts(value: object, path: Path, lineno: int, column: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    raise DataError(f"{path}:{lineno}: column {column!r} must hold text or a list of texts, got {value!r:.60}")


def load_pairs(
    path: str | Path,
    *,
    corpus: str | Path | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
) -> Dataset:
    """Load (query, positive) pairs from Parquet, JSONL, CSV or TSV.

    Rows with the same query text are one query with several positives; a positive cell may also hold a
    list of texts. The corpus is every positive plus, when given, the ``text`` column of ``corpus`` (a
    table file with optional ``_id``/``id`` and ``title`` columns). Query ids are ``q<row>`` and
    document ids ``d<row>`` unless the corpus file has ids.

    Raises:
        DataError: unknown file type, missing column (the message lists the columns that exist), a cell
            that is not text, or an empty file.
    """
    path = Path(path)
    columns, records = _read_table(path)
    _require_column(path, columns, query_column, "--query-column")
    _require_column(path, columns, positive_column, "--positive-column")
    pairs: dict[str, list[str]] = {}
    for lineno, record in records:
        query = record.get(query_column)
        if not isinstance(query, str) or not query.strip():
            raise DataError(f"{path}:{lineno}: column {query_column!r} must hold a non-empty text, got {query!r:.60}")
        pairs.setdefault(query, []).extend(_as_texts(record.get(positive_column), path, lineno, positive_column))
    if not pairs:
        raise DataError(f"{path} holds no rows")

    doc_ids: list[str] = []
    doc_texts: list[str] = []
    sources = {str(path): file_sha256(path)}
    if corpus is not None:
        corpus_path = Path(corpus)
        doc_ids, doc_texts = _read_corpus_table(corpus_path)
        sources[str(corpus_path)] = file_sha256(corpus_path)
    return from_pairs(list(pairs), list(pairs.values()), corpus=(doc_ids, doc_texts), sources=sources)


def _read_corpus_table(path: Path) -> tuple[list[str], list[str]]:
    columns, records = _read_table(path)
    _require_column(path, columns, "text", "a 'text' column in the corpus file")
    id_column = next((c for c in ("_id", "id", "doc_id", "corpus-id") if c in columns), None)
    ids: list[str] = []
    texts: list[str] = []
    seen: dict[str, int] = {}
    for lineno, record in records:
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: column 'text' must hold text, got {text!r:.60}")
        title = record.get("title")
        if isinstance(title, str) and title:
            text = f"{title} {text}"
        doc_id = str(record[id_column]) if id_column else f"c{len(ids)}"
        if doc_id in seen:
            raise DataError(f"{path}:{lineno}: duplicate id {doc_id!r} (first seen on line {seen[doc_id]})")
        seen[doc_id] = lineno
        ids.append(doc_id)
        texts.append(text)
    if not ids:
        raise DataError(f"{path} holds no documents")
    return ids, texts


def from_pairs(
    queries: Sequence[str],
    positives: Sequence[str | Sequence[str]],
    *,
    corpus: Sequence[str] | tuple[Sequence[str], Sequence[str]] | None = None,
    query_ids: Sequence[str] | None = None,
    sources: dict[str, str] | None = None,
) -> Dataset:
    """Build a :class:`Dataset` from Python sequences.

    Args:
        queries: query texts, one per query (repeat a query to give it several positives, or pass a list).
        positives: for each query, one positive text or a list of them.
        corpus: extra documents: a sequence of texts, or ``(ids, texts)``. Positive texts that are not in
            it (by exact text) are added.
        query_ids: ids for the queries (default ``q0``, ``q1``...).

    Example:
        >>> ds = from_pairs(["what is a cat"], [["A cat is a small felid."]], corpus=["Dogs bark."])
        >>> len(ds.corpus), len(ds.queries)
        (2, 1)
    """
    if len(queries) != len(positives):
        raise DataError(f"got {len(queries)} queries but {len(positives)} positive entries")
    if corpus is None:
        doc_ids: list[str] = []
        doc_texts: list[str] = []
    elif isinstance(corpus, tuple) and len(corpus) == 2 and not isinstance(corpus[0], str):
        doc_ids, doc_texts = list(corpus[0]), list(corpus[1])
    else:
        doc_texts = list(corpus)  # type: ignore[arg-type]
        doc_ids = [f"c{i}" for i in range(len(doc_texts))]
    by_text = {text: i for i, text in reversed(list(enumerate(doc_texts)))}
    taken_ids = set(doc_ids)

    merged: dict[str, dict[int, int]] = {}
    ids_of: dict[str, str] = {}
    for i, (query, pos) in enumerate(zip(queries, positives)):
        texts = [pos] if isinstance(pos, str) else list(pos)
        row = merged.setdefault(query, {})
        ids_of.setdefault(query, query_ids[i] if query_ids is not None else f"q{len(ids_of)}")
        for text in texts:
            if text not in by_text:
                by_text[text] = len(doc_texts)
                new_id = f"d{len(doc_texts)}"
                while new_id in taken_ids:  # a corpus file may already use the name
                    new_id += "_"
                taken_ids.add(new_id)
                doc_ids.append(new_id)
                doc_texts.append(text)
            row[by_text[text]] = 1
    report = LoadReport(queries_without_positives=sum(1 for r in merged.values() if not r))
    kept = [q for q, r in merged.items() if r]
    return Dataset(
        Corpus(doc_ids, doc_texts),
        Queries([ids_of[q] for q in kept], kept),
        _qrels_from_rows([merged[q] for q in kept]),
        report,
        dict(sources or {}),
    )


def load_data(
    data: str | Path,
    *,
    split: str = "train",
    corpus: str | Path | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
    strict: bool = False,
) -> Dataset:
    """Load a BEIR folder or a pairs file, whichever ``data`` is."""
    path = Path(data)
    if path.is_dir():
        if corpus is not None:
            raise DataError(f"--corpus is for pairs files; {path} is a BEIR folder with its own corpus.jsonl")
        return load_beir(path, split, strict=strict)
    if not path.exists():
        raise DataError(f"{path} not found (expected a BEIR folder or a .parquet/.jsonl/.csv/.tsv pairs file)")
    return load_pairs(path, corpus=corpus, query_column=query_column, positive_column=positive_column)
