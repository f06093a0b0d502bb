"""Stratum labels for queries: what kind of query each one is, so evaluation sets can cover every kind.

Kinds (combinable; a query's stratum is the combination of its labels, e.g.
``difficulty=2-10|n_positives=1``):

* ``difficulty``: rank of the first positive under the base model: ``1``, ``2-10``, ``11-100``, ``>100``;
* ``n_positives``: number of relevant documents: ``1``, ``2``, ``3-5``, ``6-10``, ``>10``;
* ``topic``: k-means cluster of the query embeddings (faiss), ``topic=0`` ... ``topic=k-1``;
* ``field:NAME``: a query metadata field of ``queries.jsonl`` (``NAME`` may be a dotted path, e.g.
  ``field:metadata.domain``);
* ``mapping``: a user-supplied file of ``query-id<TAB>stratum`` lines (CSV with a header also works).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from miner.errors import ConfigError, DataError

__all__ = [
    "KINDS",
    "DIFFICULTY_BANDS",
    "N_POSITIVE_BANDS",
    "parse_strata",
    "band",
    "first_positive_ranks",
    "topic_clusters",
    "read_mapping",
    "read_field",
    "combine",
    "sort_key",
]

KINDS: tuple[str, ...] = ("difficulty", "n_positives", "topic", "mapping", "field:NAME")
# (lowest value, highest value, label); the last band is open-ended. A difficulty of 0 means "not in the top 100".
DIFFICULTY_BANDS: tuple[tuple[int, int, str], ...] = ((1, 1, "1"), (2, 10, "2-10"), (11, 100, "11-100"), (101, 1 << 62, ">100"))
N_POSITIVE_BANDS: tuple[tuple[int, int, str], ...] = ((1, 1, "1"), (2, 2, "2"), (3, 5, "3-5"), (6, 10, "6-10"), (11, 1 << 62, ">10"))
DIFFICULTY_DEPTH = 100  # ranks beyond this are all ">100"

I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


def parse_strata(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Validate a comma-separated list (or sequence) of stratum kinds; an unknown name is a ConfigError."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"no strata given; choose from {', '.join(KINDS)}")
    for name in names:
        if name.startswith("field:"):
            if not name[len("field:"):].strip():
                raise ConfigError("field: needs a field name, e.g. field:metadata.domain")
        elif name not in KINDS:
            raise ConfigError(f"unknown stratum {name!r}; choose from {', '.join(KINDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"stratum given twice in {','.join(names)}")
    return tuple(names)


def band(value: int, bands: tuple[tuple[int, int, str], ...]) -> tuple[int, str]:
    """(band index, label) of ``value``."""
    for i, (lo, hi, label) in enumerate(bands):
        if lo <= value <= hi:
            return i, label
    raise ValueError(f"{value} is in no band of {[b[2] for b in bands]}")


def first_positive_ranks(
    search: object, q_emb: F32, pos_indptr: I64, pos_ids: I64, depth: int = DIFFICULTY_DEPTH
) -> I64:
    """1-based rank of each query's best-ranked positive among all documents; ``depth + 1`` when deeper.

    Args:
        search: an index with ``search(queries, k)`` (e.g. :func:`miner.search.build_index`'s result).
        q_emb: float32[q, d] query embeddings.
        pos_indptr, pos_ids: CSR of each query's positive corpus rows.
    """
    k = min(depth, search.n_docs)  # type: ignore[attr-defined]
    ids = search.search(q_emb, k).ids  # type: ignore[attr-defined]
    ranks = np.full(len(q_emb), depth + 1, dtype=np.int64)
    for r in range(len(q_emb)):
        hit = np.flatnonzero(np.isin(ids[r], pos_ids[pos_indptr[r] : pos_indptr[r + 1]]))
        if len(hit):
            ranks[r] = int(hit[0]) + 1
    return ranks


def topic_clusters(q_emb: F32, n_clusters: int, seed: int) -> I64:
    """k-means (faiss) cluster of each query embedding, clusters numbered by their smallest member row."""
    import faiss

    x = np.ascontiguousarray(q_emb, dtype=np.float32)
    if n_clusters < 2:
        raise ConfigError(f"topic strata need at least 2 clusters, got {n_clusters}")
    if n_clusters > len(x):
        raise ConfigError(f"cannot cluster {len(x)} queries into {n_clusters} topics; lower --topics")
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=25, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 20)
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    raw = assign[:, 0].astype(np.int64)
    # renumber by first appearance, so labels do not depend on faiss's centroid order
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[c] for c in raw.tolist()], dtype=np.int64)


def read_mapping(path: str | Path, query_ids: Sequence[str]) -> list[str]:
    """The stratum of each query from a ``query-id<TAB>stratum`` file (or a CSV with those two columns).

    Raises:
        DataError: the file is missing or malformed, a population query has no stratum, a stratum name is
            empty, or a stratum of the file holds no query of the population (an empty stratum).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (the mapping file of query-id -> stratum)")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for lineno, row in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[0].strip().lower() in {"query-id", "query_id", "qid", "id"}:
                continue
            if len(row) != 2:
                raise DataError(f"{path}:{lineno}: expected 2 columns (query-id, stratum), got {len(row)}")
            qid, stratum = row[0].strip(), row[1].strip()
            if not stratum:
                raise DataError(f"{path}:{lineno}: empty stratum name for query {qid!r}")
            mapping[qid] = stratum
    missing = [q for q in query_ids if q not in mapping]
    if missing:
        raise DataError(f"{path}: {len(missing)} queries have no stratum (first: {missing[0]!r})")
    labels = [mapping[q] for q in query_ids]
    empty = sorted(set(mapping.values()) - set(labels))
    if empty:
        raise DataError(
            f"{path}: stratum {empty[0]!r} is empty: none of its queries is in the population "
            f"({len(empty)} such strata); drop their lines or map only this split's queries"
        )
    return labels


def _lookup(record: dict[str, object], dotted: str) -> object:
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def read_field(queries_path: str | Path, field: str, query_ids: Sequence[str]) -> list[str]:
    """The value of metadata ``field`` (a dotted path) of each query in ``queries.jsonl``.

    Raises:
        DataError: a population query lacks the field, or its value is empty or not a scalar.
    """
    path = Path(queries_path)
    wanted = set(query_ids)
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            qid = str(record.get("_id"))
            if qid not in wanted:
                continue
            value = _lookup(record, field)
            if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
                shown = "missing" if value is None else f"{value!r:.40}"
                raise DataError(
                    f"{path}:{lineno}: query {qid!r} has no usable value for field {field!r} ({shown}); "
                    "every query needs a non-empty scalar, or use a mapping file"
                )
            values[qid] = str(value).strip()
    return [values[q] for q in query_ids]


def combine(columns: Sequence[tuple[str, Sequence[str], Sequence[int]]]) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Join per-kind labels into one stratum per query.

    Args:
        columns: ``(kind, labels, order keys)`` per kind; the order keys sort the combined strata (band
            order for bands, first appearance otherwise).

    Returns:
        ``(stratum of each query, sort key of each stratum)``; strata read ``kind=label|kind=label``.
    """
    n = len(columns[0][1])
    strata: list[str] = []
    keys: dict[str, tuple[int, ...]] = {}
    for i in range(n):
        name = "|".join(f"{kind}={labels[i]}" for kind, labels, _ in columns)
        strata.append(name)
        keys.setdefault(name, tuple(int(order[i]) for _, _, order in columns))
    return strata, keys


def sort_key(stratum: str) -> tuple[tuple[int, int, str], ...]:
    """Order strata by band (``difficulty=1`` before ``difficulty=11-100``), topic number, then name."""
    key = []
    for part in stratum.split("|"):
        kind, _, label = part.partition("=")
        bands = {"difficulty": DIFFICULTY_BANDS, "n_positives": N_POSITIVE_BANDS}.get(kind)
        labels = [b[2] for b in bands] if bands else []
        if label in labels:
            key.append((0, labels.index(label), ""))
        elif kind == "topic" and label.isdigit():
            key.append((0, int(label), ""))
        else:
            key.append((1, 0, part))
    return tuple(key)
