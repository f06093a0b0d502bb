"""Positive-aware selection of negatives: ceilings, exclusions, rank window, sampling.

Everything here is a function over arrays for one batch of queries, so the same code runs in a training
loop, the batch CLI, or a worker that holds one shard of queries.

For query q with positives P (grade > 0) and reference score ``s = min(sim(q, p) for p in P)``:

* ceiling ``= min(max_score, s - absolute_margin, s - relative_margin * |s|)`` (sign-aware);
* excluded: every positive (and the positives of other queries with the same normalised text), the query's
  own document (same id or same normalised text), documents whose normalised text equals a positive's,
  near-duplicates of a positive (``sim(doc, p) >= dup_threshold``);
* judged non-relevant documents (grade 0) stay valid, and ``prefer_judged`` takes them first;
* ranks count valid candidates (0 = hardest); negatives come from ranks ``[range_min, range_max)`` by
  ``top``, ``random`` (seeded per query id) or ``spread`` sampling.

Near-duplicates are found among the candidates, not in the whole corpus: the search over-fetches a few
candidates past ``range_max``, each candidate is compared with the query's positives (one dot product per
pair), and queries that lose too many are searched again deeper. That costs ``O(candidates x positives)``
instead of a second corpus-wide search per positive.

Every skipped candidate is counted by reason: an excluded document is counted when it scored at least as
high as the last valid candidate of the pool (it took a place a negative would have had); documents above
the ceiling are all counted (a near-duplicate above the ceiling counts as above the ceiling).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from miner import topk
from miner.config import SelectConfig
from miner.search import Index, SearchResult

__all__ = [
    "REASONS",
    "Negatives",
    "Summary",
    "SelectionStats",
    "DuplicateFinder",
    "same_text_positives",
    "near_duplicate_mask",
    "reference_scores",
    "ceilings",
    "build_exclusions",
    "select_negatives",
    "mine_batch",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

# Exclusion reasons in priority order: a document excluded for several reasons counts under the first.
REASONS: tuple[str, ...] = ("positive", "own_document", "duplicate_text", "near_duplicate")
SKIP_REASONS: tuple[str, ...] = (*REASONS, "above_ceiling")


@dataclass(frozen=True)
class Negatives:
    """Chosen negatives of a batch of queries, ``-1``/``nan`` padded to ``num_negatives`` columns.

    ``ranks`` are positions among valid candidates (0 = hardest); a judged negative taken by
    ``prefer_judged`` from outside the candidate pool has rank ``-1``.
    """

    ids: I64  # int64[q, n]
    scores: F32  # float32[q, n]
    ranks: npt.NDArray[np.int32]  # int32[q, n]
    reference: F32  # float32[q]: min positive score
    ceiling: F32  # float32[q]
    positive_scores: F32  # float32[nnz]: score of each positive, aligned with the positives' CSR

    def counts(self) -> npt.NDArray[np.int64]:
        return (self.ids >= 0).sum(axis=1)


@dataclass
class Summary:
    """Running count / mean / std / min / max of a stream of numbers."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")

    def add(self, values: npt.ArrayLike) -> None:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        v = v[np.isfinite(v)]
        if len(v):
            self.n += len(v)
            self.total += float(v.sum())
            self.total_sq += float((v * v).sum())
            self.lo = min(self.lo, float(v.min()))
            self.hi = max(self.hi, float(v.max()))

    def merge(self, other: Summary) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)

    def to_dict(self) -> dict[str, float | int | None]:
        if not self.n:
            return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.total / self.n
        var = max(self.total_sq / self.n - mean * mean, 0.0)
        return {
            "count": self.n,
            "mean": round(mean, 6),
            "std": round(var**0.5, 6),
            "min": round(self.lo, 6),
            "max": round(self.hi, 6),
        }


@dataclass
class SelectionStats:
    """Counts and score statistics of a run, mergeable across batches and parts."""

    queries: int = 0
    negatives: int = 0
    short_queries: int = 0  # fewer negatives than asked for
    empty_queries: int = 0  # no negative at all
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    positive_scores: Summary = field(default_factory=Summary)
    negative_scores: Summary = field(default_factory=Summary)
    margin: Summary = field(default_factory=Summary)  # reference (min positive) score - negative score

    def merge(self, other: SelectionStats) -> None:
        self.queries += other.queries
        self.negatives += other.negatives
        self.short_queries += other.short_queries
        self.empty_queries += other.empty_queries
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        self.positive_scores.merge(other.positive_scores)
        self.negative_scores.merge(other.negative_scores)
        self.margin.merge(other.margin)

    def to_dict(self) -> dict[str, object]:
        return {
            "queries": self.queries,
            "negatives": self.negatives,
            "short_queries": self.short_queries,
            "empty_queries": self.empty_queries,
            "skipped": dict(self.skipped),
            "scores": {
                "positive": self.positive_scores.to_dict(),
                "negative": self.negative_scores.to_dict(),
                "positive_minus_negative": self.margin.to_dict(),
            },
        }

    def to_state(self) -> dict[str, object]:
        """Exact, JSON-safe state (unrounded sums) for resuming; :meth:`to_dict` is the rounded report."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, object]) -> SelectionStats:
        summaries = {name: Summary(**state[name]) for name in ("positive_scores", "negative_scores", "margin")}  # type: ignore[arg-type]
        plain = {k: v for k, v in state.items() if k not in summaries}
        return cls(**plain, **summaries)  # type: ignore[arg-type]


def _row_dots(q_emb: F32, rows: I64, docs: F32, cols: I64) -> F32:
    """float32[m]: q_emb[rows[j]] . docs[cols[j]] for each pair j."""
    if len(cols) == 0:
        return np.zeros(0, dtype=np.float32)
    return np.einsum("ij,ij->i", q_emb[rows], docs[cols]).astype(np.float32, copy=False)


def reference_scores(q_emb: F32, docs: F32, pos_indptr: I64, pos_ids: I64) -> tuple[F32, F32]:
    """Score of every positive and each query's minimum positive score.

    Returns:
        ``(pos_scores float32[nnz], reference float32[q])``; a query without positives gets ``+inf``.
    """
    counts = np.diff(pos_indptr)
    rows = np.repeat(np.arange(len(counts)), counts)
    pos_scores = _row_dots(q_emb, rows, docs, pos_ids)
    reference = np.full(len(counts), np.inf, dtype=np.float32)
    has = counts > 0
    if has.any():
        reference[has] = np.minimum.reduceat(pos_scores, pos_indptr[:-1][has])
    return pos_scores, reference


def ceilings(reference: F32, config: SelectConfig) -> F32:
    """Per-query ceiling ``min(max_score, s - absolute_margin, s - relative_margin * |s|)``; +inf = none."""
    ceiling = np.full(reference.shape, np.inf, dtype=np.float32)
    finite = np.isfinite(reference)
    s = np.where(finite, reference, 0.0).astype(np.float64)  # queries without positives get no margin
    if config.max_score is not None:
        ceiling = np.minimum(ceiling, np.float32(config.max_score))
    if config.absolute_margin is not None:
        ceiling = np.where(finite, np.minimum(ceiling, s - config.absolute_margin), ceiling)
    if config.relative_margin is not None:
        ceiling = np.where(finite, np.minimum(ceiling, s - config.relative_margin * np.abs(s)), ceiling)
    return ceiling.astype(np.float32)


class DuplicateFinder:
    """Exact-text lookups over one corpus: which documents share a normalised text.

    Args:
        text_keys: int64[N] hashes of each document's normalised text.
    """

    def __init__(self, text_keys: I64) -> None:
        self.order = np.argsort(text_keys, kind="stable")
        self.sorted_keys = text_keys[self.order]

    def same_text_csr(self, keys: npt.ArrayLike) -> tuple[I64, I64]:
        """For each key, the documents whose normalised text has that key, as CSR ``(indptr int64[len(keys) + 1],
        doc rows)``."""
        keys = np.asarray(keys, dtype=np.int64)
        lo = np.searchsorted(self.sorted_keys, keys, side="left")
        counts = np.searchsorted(self.sorted_keys, keys, side="right") - lo
        indptr = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        take = np.repeat(lo - indptr[:-1], counts) + np.arange(indptr[-1])
        return indptr, self.order[take].astype(np.int64)


def same_text_positives(query_keys: I64, pos_indptr: I64, pos_ids: I64) -> tuple[I64, I64]:
    """CSR of the positives of every query that shares each query's normalised text (its own included).

    Datasets repeat a query under several ids with different judgements (SciFact train has such pairs); a
    document relevant to one copy must not be mined as a negative of the other.

    Example:
        >>> ptr, ids = same_text_positives(np.array([7, 7, 3]), np.array([0, 1, 2, 3]), np.array([10, 11, 12]))
        >>> ptr.tolist(), ids.tolist()
        ([0, 2, 4, 5], [10, 11, 10, 11, 12])
    """
    n = len(query_keys)
    counts = np.diff(pos_indptr)
    if n == 0 or len(np.unique(query_keys)) == n:
        return pos_indptr.astype(np.int64), pos_ids.astype(np.int64)
    _, group = np.unique(query_keys, return_inverse=True)
    rows = np.repeat(np.arange(n), counts)
    pairs = np.unique(np.stack([group[rows], pos_ids]), axis=1)  # (group, doc), sorted by group then doc
    g_ptr = np.searchsorted(pairs[0], np.arange(group.max() + 2))
    lengths = np.diff(g_ptr)[group]
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(lengths)
    ids = np.concatenate([pairs[1, g_ptr[g] : g_ptr[g + 1]] for g in group]) if indptr[-1] else pos_ids[:0]
    return indptr, ids.astype(np.int64)


def near_duplicate_mask(pool_ids: I64, docs: F32, pos_indptr: I64, pos_ids: I64, threshold: float) -> npt.NDArray[np.bool_]:
    """bool[q, K]: which pool candidates have similarity ``>= threshold`` with one of their query's positives.

    Args:
        pool_ids: int64[q, K] candidate rows, ``-1`` padded (padding is never a near-duplicate).
        docs: float32[N, d] document embeddings (similarity is their inner product).
        pos_indptr, pos_ids: CSR of each query's positive rows.
    """
    return topk.candidate_similarity(docs, pool_ids, pos_indptr, pos_ids) >= threshold


def build_exclusions(
    query_ids: Sequence[str],
    query_keys: I64,
    pos_indptr: I64,
    pos_ids: I64,
    *,
    doc_index: dict[str, int],
    doc_keys: I64,
    duplicates: DuplicateFinder,
    exclude_own_document: bool = True,
) -> tuple[I64, I64, npt.NDArray[np.int8]]:
    """Per-query excluded documents as CSR ``(indptr, ids, reason)``; ``reason`` indexes :data:`REASONS`.

    Near-duplicates are not listed here: :func:`mine_batch` finds them among the search's candidates.

    Args:
        query_ids, query_keys: ids and normalised-text keys of the batch's queries.
        pos_indptr, pos_ids: CSR of each query's positive corpus rows.
        doc_index: corpus id -> row (for the query's own document by id).
        doc_keys: int64[N] normalised-text keys of the corpus.
    """
    n = len(query_ids)
    query_rows = np.arange(n, dtype=np.int64)
    pos_rows = np.repeat(query_rows, np.diff(pos_indptr))
    rows, ids, reasons = [pos_rows], [pos_ids.astype(np.int64)], [np.zeros(len(pos_ids), dtype=np.int8)]

    def add(code: int, r: I64, i: I64) -> None:
        rows.append(r)
        ids.append(i)
        reasons.append(np.full(len(i), code, dtype=np.int8))

    if exclude_own_document:
        ptr, same = duplicates.same_text_csr(query_keys)
        add(1, np.repeat(query_rows, np.diff(ptr)), same)
        own = [(r, doc_index[qid]) for r, qid in enumerate(query_ids) if qid in doc_index]
        if own:
            add(1, np.array([r for r, _ in own], dtype=np.int64), np.array([d for _, d in own], dtype=np.int64))
    ptr, same = duplicates.same_text_csr(doc_keys[pos_ids])
    add(2, np.repeat(pos_rows, np.diff(ptr)), same)
    row, doc, reason = np.concatenate(rows), np.concatenate(ids), np.concatenate(reasons)
    order = np.lexsort((reason, doc, row))  # per (query, document), the highest-priority reason first
    row, doc, reason = row[order], doc[order], reason[order]
    first = np.ones(len(row), dtype=bool)
    first[1:] = (row[1:] != row[:-1]) | (doc[1:] != doc[:-1])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row[first], minlength=n), out=indptr[1:])
    return indptr, doc[first], reason[first]


def _csr_take(indptr: I64, ids: I64, rows: I64) -> tuple[I64, I64]:
    """The CSR of the (not necessarily contiguous) ``rows`` only."""
    counts = np.diff(indptr)[rows]
    sub = np.zeros(len(rows) + 1, dtype=np.int64)
    sub[1:] = np.cumsum(counts)
    take = np.concatenate([np.arange(indptr[r], indptr[r + 1]) for r in rows]) if sub[-1] else np.zeros(0, np.int64)
    return sub, ids[take]


def _search_without_near_duplicates(
    q_emb: F32,
    k: int,
    *,
    index: Index,
    docs: F32,
    ceiling: F32 | None,
    floor: F32 | None,
    exclude: tuple[I64, I64],
    positives: tuple[I64, I64],
    threshold: float,
) -> tuple[SearchResult, I64, F32]:
    """The top ``k`` valid candidates with near-duplicates of the positives dropped.

    Over-fetches ``k + max(8, k // 4)`` candidates, drops near-duplicates and searches the queries that
    kept fewer than ``k`` deeper (doubling) until they have ``k`` or the corpus is exhausted.

    Returns:
        ``(result, near_rows, near_scores)``: the search result cut to ``k``, and the query row and score
        of every near-duplicate dropped from a pool.
    """
    n_q = q_emb.shape[0]
    out_scores, out_ids = np.full((n_q, k), -np.inf, dtype=np.float32), np.full((n_q, k), -1, dtype=np.int64)
    above = np.zeros(n_q, dtype=np.int64)
    near_rows: list[I64] = [np.zeros(0, dtype=np.int64)]
    near_scores: list[F32] = [np.zeros(0, dtype=np.float32)]
    todo = np.arange(n_q)
    depth = min(index.n_docs, k + max(8, k // 4))
    while len(todo):
        every = len(todo) == n_q
        sub_exclude = exclude if every else _csr_take(*exclude, todo)
        sub_pos = positives if every else _csr_take(*positives, todo)
        pool = index.search(
            q_emb if every else np.ascontiguousarray(q_emb[todo]),
            depth,
            ceiling=None if ceiling is None else ceiling[todo],
            floor=None if floor is None else floor[todo],
            exclude=sub_exclude,
        )
        near = near_duplicate_mask(pool.ids, docs, *sub_pos, threshold)
        keep = (pool.ids >= 0) & ~near
        enough = keep.sum(axis=1) >= k
        exhausted = (pool.ids[:, -1] < 0) | (depth >= index.n_docs)
        done = enough | exhausted
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept candidates first, in pool order
        ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(pool.ids, order, 1), -1)
        scores = np.where(ids >= 0, np.take_along_axis(pool.scores, order, 1), -np.inf).astype(np.float32)
        rows = todo[done]
        width = ids.shape[1]  # < k where the corpus is smaller than k
        out_ids[rows, :width], out_scores[rows, :width] = ids[done], scores[done]
        above[rows] = pool.above_ceiling[done]
        near_r, near_c = np.nonzero(near & done[:, None])
        near_rows.append(todo[near_r])
        near_scores.append(pool.scores[near_r, near_c])
        todo = todo[~done]
        depth = min(index.n_docs, depth * 2)
    return (
        SearchResult(out_scores, out_ids, above),
        np.concatenate(near_rows).astype(np.int64),
        np.concatenate(near_scores).astype(np.float32),
    )


def _query_rng(seed: int, query_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(query_id.encode("utf-8"))])


def select_negatives(
    pool_ids: I64,
    pool_scores: F32,
    query_ids: Sequence[str],
    config: SelectConfig,
    *,
    judged: Sequence[tuple[I64, F32]] | None = None,
) -> tuple[I64, F32, npt.NDArray[np.int32]]:
    """Choose ``num_negatives`` per query from a pool of valid candidates (best first, ``-1`` padded).

    Args:
        pool_ids, pool_scores: int64[q, K] / float32[q, K] valid candidates, K >= range_max.
        query_ids: the queries' ids (they key the per-query random streams).
        judged: per query, ``(ids, scores)`` of judged non-relevant documents to take first
            (``prefer_judged``), already filtered by the exclusion rules.

    Returns:
        ``(ids int64[q, n], scores float32[q, n], ranks int32[q, n])``, padded with ``-1``/``nan``/``-1``.
    """
    q = pool_ids.shape[0]
    n = config.num_negatives
    out_ids = np.full((q, n), -1, dtype=np.int64)
    out_scores = np.full((q, n), np.nan, dtype=np.float32)
    out_ranks = np.full((q, n), -1, dtype=np.int32)
    valid = (pool_ids >= 0).sum(axis=1)
    for r in range(q):
        taken: list[tuple[int, float, int]] = []  # (id, score, rank)
        if judged is not None:
            j_ids, j_scores = judged[r]
            for j in np.lexsort((j_ids, -j_scores))[:n]:
                hit = np.flatnonzero(pool_ids[r, : valid[r]] == j_ids[j])
                taken.append((int(j_ids[j]), float(j_scores[j]), int(hit[0]) if len(hit) else -1))
        lo, hi = config.range_min, min(config.range_max, int(valid[r]))
        window = np.arange(lo, hi)
        if taken:
            chosen = {t[0] for t in taken}
            window = window[~np.isin(pool_ids[r, lo:hi], list(chosen))]
        need = n - len(taken)
        if need > 0 and len(window):
            if len(window) <= need or config.sampling == "top":
                picks = window[:need]
            elif config.sampling == "random":
                picks = np.sort(_query_rng(config.seed, query_ids[r]).choice(window, size=need, replace=False))
            else:  # spread: evenly spaced over the window, hardest and easiest included
                picks = window[np.round(np.linspace(0, len(window) - 1, need)).astype(np.int64)]
            taken.extend((int(pool_ids[r, p]), float(pool_scores[r, p]), int(p)) for p in picks)
        for c, (doc, score, rank) in enumerate(taken[:n]):
            out_ids[r, c], out_scores[r, c], out_ranks[r, c] = doc, score, rank
    return out_ids, out_scores, out_ranks


def mine_batch(
    q_emb: F32,
    query_ids: Sequence[str],
    query_keys: I64,
    pos_indptr: I64,
    pos_ids: I64,
    *,
    docs: F32,
    index: Index,
    doc_index: dict[str, int],
    doc_keys: I64,
    duplicates: DuplicateFinder,
    config: SelectConfig,
    judged_indptr: I64 | None = None,
    judged_ids: I64 | None = None,
    excluded_positives: tuple[I64, I64] | None = None,
) -> tuple[Negatives, SelectionStats]:
    """Mine negatives for one batch of queries: ceilings, exclusions, fused search, selection, statistics.

    Args:
        q_emb: float32[q, d] query embeddings.
        pos_indptr, pos_ids: CSR of positive corpus rows per query (they set the ceiling).
        docs: float32[N, d] document embeddings; ``index`` searches them.
        judged_indptr, judged_ids: CSR of judged non-relevant corpus rows per query (grade 0).
        excluded_positives: CSR of the documents to exclude *as positives* (with their same-text copies and
            near-duplicates), e.g. from :func:`same_text_positives`; default ``(pos_indptr, pos_ids)``.
    """
    n_q = len(query_ids)
    pos_scores, reference = reference_scores(q_emb, docs, pos_indptr, pos_ids)
    ceiling = ceilings(reference, config)
    ex_pos = excluded_positives if excluded_positives is not None else (pos_indptr, pos_ids)
    ex_ptr, ex_ids, ex_reason = build_exclusions(
        query_ids,
        query_keys,
        *ex_pos,
        doc_index=doc_index,
        doc_keys=doc_keys,
        duplicates=duplicates,
        exclude_own_document=config.exclude_own_document,
    )
    floor = None if config.min_score is None else np.full(n_q, config.min_score, dtype=np.float32)
    has_ceiling = bool(np.isfinite(ceiling).any())
    if config.dup_threshold is None:
        pool = index.search(
            q_emb, config.range_max, ceiling=ceiling if has_ceiling else None, floor=floor, exclude=(ex_ptr, ex_ids)
        )
        near_rows, near_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    else:
        pool, near_rows, near_scores = _search_without_near_duplicates(
            q_emb, config.range_max, index=index, docs=docs, ceiling=ceiling if has_ceiling else None, floor=floor,
            exclude=(ex_ptr, ex_ids), positives=ex_pos, threshold=config.dup_threshold,
        )

    stats = SelectionStats(queries=n_q)
    # Excluded documents that took a place in the pool: score >= the pool's last valid score.
    ex_rows = np.repeat(np.arange(n_q), np.diff(ex_ptr))
    ex_scores = _row_dots(q_emb, ex_rows, docs, ex_ids)
    full = pool.ids[:, -1] >= 0
    last = np.where(full, pool.scores[:, -1], -np.inf)
    passed = ex_scores >= last[ex_rows]
    if floor is not None:
        passed &= ex_scores >= floor[ex_rows]
    for code, reason in enumerate(REASONS[:-1]):
        stats.skipped[reason] = int(np.count_nonzero(passed & (ex_reason == code)))
    stats.skipped["near_duplicate"] = int(np.count_nonzero(near_scores >= last[near_rows]))
    ex_above = np.bincount(ex_rows[ex_scores > ceiling[ex_rows]], minlength=n_q)
    stats.skipped["above_ceiling"] = int((pool.above_ceiling - ex_above).clip(min=0).sum())

    judged = None
    if config.prefer_judged and judged_indptr is not None and judged_ids is not None:
        judged = []
        for r in range(n_q):
            ids = judged_ids[judged_indptr[r] : judged_indptr[r + 1]]
            ids = ids[~np.isin(ids, ex_ids[ex_ptr[r] : ex_ptr[r + 1]])]
            judged.append((ids, _row_dots(q_emb, np.full(len(ids), r), docs, ids)))
    ids, scores, ranks = select_negatives(pool.ids, pool.scores, query_ids, config, judged=judged)

    got = (ids >= 0).sum(axis=1)
    stats.negatives = int(got.sum())
    stats.short_queries = int(np.count_nonzero(got < config.num_negatives))
    stats.empty_queries = int(np.count_nonzero(got == 0))
    stats.positive_scores.add(pos_scores)
    stats.negative_scores.add(scores[ids >= 0])
    stats.margin.add((reference[:, None] - scores)[ids >= 0])
    return Negatives(ids, scores, ranks, reference, ceiling, pos_scores), stats
