"""Nearest-neighbour search that returns the k best *valid* candidates of each query.

A candidate is valid when its score lies in ``[floor, ceiling]`` of its query and its id is not in the
query's exclusion list. :func:`exact_search` streams matrix-multiply tiles of the corpus through the fused
top-k kernel (:mod:`miner.topk`), so it returns exactly k valid candidates in one pass with memory
bounded by the tile size. Faiss indexes (flat, IVF, HNSW, any factory string) cannot filter inside the
search: :class:`FaissIndex` over-fetches and filters, doubling the depth for queries that come up short.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from miner import topk
from miner.config import SearchConfig
from miner.errors import ConfigError

if TYPE_CHECKING:
    import faiss

__all__ = ["exact_search", "SearchResult", "ExactIndex", "FaissIndex", "build_index", "to_csr", "Exclude"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
Exclude = Sequence[npt.ArrayLike] | tuple[I64, I64] | None


@dataclass(frozen=True)
class SearchResult:
    """Top-k valid candidates, best first, ties to the lower id, ``-1``/``-inf`` padded.

    ``above_ceiling[i]`` counts documents that scored above query i's ceiling (excluded ids included).
    """

    scores: F32  # float32[Q, k]
    ids: I64  # int64[Q, k]
    above_ceiling: I64  # int64[Q]


def to_csr(exclude: Exclude, n_queries: int) -> tuple[I64, I64] | tuple[None, None]:
    """Per-query id lists (or a ready ``(indptr, ids)`` pair) as int64 CSR arrays."""
    if exclude is None:
        return None, None
    if (
        isinstance(exclude, tuple)
        and len(exclude) == 2
        and isinstance(exclude[0], np.ndarray)
        and isinstance(exclude[1], np.ndarray)
        and exclude[0].ndim == 1
        and len(exclude[0]) == n_queries + 1
    ):
        indptr = np.ascontiguousarray(exclude[0], dtype=np.int64)
        ids = np.ascontiguousarray(exclude[1], dtype=np.int64)
        if indptr[0] != 0 or indptr[-1] != len(ids) or np.any(np.diff(indptr) < 0):
            raise ValueError(
                f"exclude indptr must start at 0, be non-decreasing and end at len(ids)={len(ids)}"
            )
        return indptr, ids
    if len(exclude) != n_queries:
        raise ValueError(f"exclude must hold one id list per query: got {len(exclude)} for {n_queries} queries")
    rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in exclude]
    indptr = np.zeros(n_queries + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(r) for r in rows])
    ids = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return indptr, np.ascontiguousarray(ids, dtype=np.int64)


def _bounds(values: npt.ArrayLike | None, n: int, name: str) -> F32 | None:
    if values is None:
        return None
    array = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if array.shape != (n,):
        raise ValueError(f"{name} must have one value per query, shape ({n},); got {array.shape}")
    return array


def _check_matrix(x: npt.ArrayLike, name: str) -> F32:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def exact_search_counts(
    queries: npt.ArrayLike,
    docs: npt.ArrayLike,
    k: int,
    *,
    ceiling: npt.ArrayLike | None = None,
    floor: npt.ArrayLike | None = None,
    exclude: Exclude = None,
    doc_block_size: int = 16384,
    query_block_size: int = 1024,
) -> SearchResult:
    """:func:`exact_search` that also returns how many documents scored above each ceiling."""
    q = _check_matrix(queries, "queries")
    d = _check_matrix(docs, "docs")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but docs have {d.shape[1]}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    n_q, n_d = q.shape[0], d.shape[0]
    ceil = _bounds(ceiling, n_q, "ceiling")
    flo = _bounds(floor, n_q, "floor")
    indptr, excl = to_csr(exclude, n_q)
    scores_out = np.empty((n_q, k), dtype=np.float32)
    ids_out = np.empty((n_q, k), dtype=np.int64)
    above = np.zeros(n_q, dtype=np.int64)
    # One flat buffer: every tile, the ragged last ones included, is a C-contiguous view of it (no copies).
    tile = np.empty(min(query_block_size, max(n_q, 1)) * min(doc_block_size, max(n_d, 1)), dtype=np.float32)
    for q0 in range(0, n_q, query_block_size):
        q1 = min(q0 + query_block_size, n_q)
        vals, ids = topk.new_state(q1 - q0, int(k))
        sub_ptr = sub_ids = None
        if indptr is not None and excl is not None:
            sub_ids = excl[indptr[q0] : indptr[q1]]
            sub_ptr = indptr[q0 : q1 + 1] - indptr[q0]
        sub_above = np.zeros(q1 - q0, dtype=np.int64)
        for d0 in range(0, n_d, doc_block_size):
            d1 = min(d0 + doc_block_size, n_d)
            block = tile[: (q1 - q0) * (d1 - d0)].reshape(q1 - q0, d1 - d0)
            np.matmul(q[q0:q1], d[d0:d1].T, out=block)  # float32[q, b], one BLAS sgemm
            topk.update_topk(
                block,
                d0,
                vals,
                ids,
                ceiling=None if ceil is None else ceil[q0:q1],
                floor=None if flo is None else flo[q0:q1],
                exclude_indptr=sub_ptr,
                exclude_ids=sub_ids,
                above_ceiling=None if ceil is None else sub_above,
            )
        scores_out[q0:q1], ids_out[q0:q1], above[q0:q1] = vals, ids, sub_above
    return SearchResult(scores_out, ids_out, above)


def exact_search(
    queries: npt.ArrayLike,
    docs: npt.ArrayLike,
    k: int,
    *,
    ceiling: npt.ArrayLike | None = None,
    floor: npt.ArrayLike | None = None,
    exclude: Exclude = None,
) -> tuple[F32, I64]:
    """Exact inner-product top-k with filtering fused into the scan.

    Args:
        queries: float32[Q, d].
        docs: float32[N, d].
        k: candidates per query.
        ceiling, floor: float32[Q]; a score s is valid iff floor <= s <= ceiling.
        exclude: per-query sequences of document ids to skip, or a CSR pair ``(indptr int64[Q+1], ids)``.

    Returns:
        ``(scores float32[Q, k], ids int64[Q, k])``, best first, ties to the lower id, ``-inf``/``-1``
        padding where fewer than k valid documents exist.

    Example:
        >>> import numpy as np
        >>> docs = np.eye(3, dtype=np.float32)
        >>> exact_search(docs[:1], docs, 2, exclude=[[0]])[1].tolist()
        [[1, 2]]
    """
    result = exact_search_counts(queries, docs, k, ceiling=ceiling, floor=floor, exclude=exclude)
    return result.scores, result.ids


class Index(Protocol):
    n_docs: int
    name: str

    def search(
        self,
        queries: F32,
        k: int,
        *,
        ceiling: F32 | None = None,
        floor: F32 | None = None,
        exclude: tuple[I64, I64] | tuple[None, None] = (None, None),
    ) -> SearchResult: ...


class ExactIndex:
    """Exact search over in-memory (or memory-mapped) document embeddings."""

    def __init__(self, docs: F32, config: SearchConfig = SearchConfig()) -> None:
        self.docs = _check_matrix(docs, "docs")
        self.config = config
        self.n_docs = self.docs.shape[0]
        self.name = "exact"

    def search(
        self,
        queries: F32,
        k: int,
        *,
        ceiling: F32 | None = None,
        floor: F32 | None = None,
        exclude: tuple[I64, I64] | tuple[None, None] = (None, None),
    ) -> SearchResult:
        return exact_search_counts(
            queries,
            self.docs,
            k,
            ceiling=ceiling,
            floor=floor,
            exclude=None if exclude[0] is None else exclude,
            doc_block_size=self.config.doc_block_size,
            query_block_size=self.config.query_batch_size,
        )


def _factory_string(spec: str, n_docs: int) -> str:
    if spec == "flat":
        return "Flat"
    if spec == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n_docs)), n_docs // 39 or 1))
        return f"IVF{nlist},Flat"
    if spec == "hnsw":
        return "HNSW32,Flat"
    return spec


class FaissIndex:
    """A faiss inner-product index; filtering happens after the search, with adaptive over-fetch."""

    def __init__(self, docs: F32, spec: str, config: SearchConfig = SearchConfig()) -> None:
        import faiss

        docs = _check_matrix(docs, "docs")
        self.n_docs, dim = docs.shape
        self.config = config
        factory = _factory_string(spec, self.n_docs)
        try:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ConfigError(f"faiss cannot build index {factory!r}: {str(exc).splitlines()[0]}") from None
        if not index.is_trained:
            train = docs
            if self.n_docs > 256 * 1024:
                rng = np.random.default_rng(0)
                train = docs[np.sort(rng.choice(self.n_docs, 256 * 1024, replace=False))]
            index.train(train)
        index.add(docs)
        self._tune(index)
        self.index: faiss.Index = index
        self.name = factory

    def _tune(self, index: faiss.Index) -> None:
        import faiss

        try:
            ivf = faiss.extract_index_ivf(index)
        except RuntimeError:  # not an IVF index
            ivf = None
        if ivf is not None:
            ivf.nprobe = min(self.config.nprobe, ivf.nlist)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = self.config.ef_search

    def _raw(self, queries: F32, depth: int) -> tuple[F32, I64]:
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(self.config.ef_search, depth)
        scores, ids = self.index.search(queries, depth)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def search(
        self,
        queries: F32,
        k: int,
        *,
        ceiling: F32 | None = None,
        floor: F32 | None = None,
        exclude: tuple[I64, I64] | tuple[None, None] = (None, None),
    ) -> SearchResult:
        queries = _check_matrix(queries, "queries")
        n_q = queries.shape[0]
        indptr, excl = exclude
        n_excl = np.zeros(n_q, dtype=np.int64) if indptr is None else np.diff(indptr)
        out_scores, out_ids = topk.new_state(n_q, k)
        above = np.zeros(n_q, dtype=np.int64)
        todo = np.arange(n_q)
        depth = min(self.n_docs, k + int(n_excl.max(initial=0)) + max(16, k // 4))
        while len(todo):
            raw_scores, raw_ids = self._raw(queries[todo], depth)
            done = []
            for row, qi in enumerate(todo):
                s, i = raw_scores[row], raw_ids[row]
                keep = i >= 0
                if ceiling is not None:
                    hit = keep & (s > ceiling[qi])
                    above[qi] = int(hit.sum())
                    keep &= ~hit
                if floor is not None:
                    keep &= s >= floor[qi]
                if indptr is not None and excl is not None and n_excl[qi]:
                    keep &= ~np.isin(i, excl[indptr[qi] : indptr[qi + 1]])
                s, i = s[keep], i[keep]
                order = np.lexsort((i, -s))[:k]
                exhausted = depth >= self.n_docs or raw_ids[row, -1] < 0
                below_floor = floor is not None and raw_scores[row, -1] < floor[qi]
                complete = len(order) == k or exhausted or below_floor
                if complete:
                    out_scores[qi, : len(order)] = s[order]
                    out_ids[qi, : len(order)] = i[order]
                    done.append(row)
            todo = np.delete(todo, done)
            depth = min(self.n_docs, depth * 2)
        return SearchResult(out_scores, out_ids, above)


def build_index(docs: F32, config: SearchConfig = SearchConfig()) -> ExactIndex | FaissIndex:
    """The index ``config.index`` names; ``auto`` is exact up to ``config.auto_exact_max`` documents."""
    spec = config.index
    if spec == "auto":
        spec = "exact" if docs.shape[0] <= config.auto_exact_max else "ivf"
    if spec == "exact":
        return ExactIndex(docs, config)
    return FaissIndex(docs, spec, config)
