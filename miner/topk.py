"""Streaming top-k with filtering: the one module over the compiled kernel ``miner._topk``.

The hot path of the search stage is "keep the k best *valid* candidates of every query while
streaming blocks of scores". A block is ``scores float32[q, b]`` whose column ``j`` is document
``offset + j``; the running state is ``(vals float32[q, k], ids int64[q, k])`` from `new_state`.

Contract, identical for both backends (the compiled kernel and the numpy fallback):

- rows of the state are sorted best first: higher score first, ties to the lower document id;
- a score ``s`` of query ``i`` is a candidate iff ``floor[i] <= s <= ceiling[i]``, ``s > -inf``
  and its document id is not excluded for that query; ``+inf`` is a valid score;
- a row with fewer than k candidates is padded with ``-inf`` / ``-1``;
- NaN scores, NaN bounds, bad shapes and bad values raise `ValueError` naming them; a state of the
  wrong type raises `TypeError`; on any error the state is left unchanged;
- the state is updated in place and never copied: it must be C-contiguous, writable, float32 /
  int64, and come from `new_state`, `update_topk` or `merge_topk` (rows sorted, padding last: the
  last slot of a row is read as its current k-th value). Other inputs are converted here, visibly,
  with `numpy.ascontiguousarray`.

The backend is chosen per call from the environment variable ``MINER_BACKEND``: unset or
``auto`` (compiled if ``miner._topk`` imports, else numpy), ``numpy`` (force the fallback) or
``compiled`` (require the kernel; `ImportError` with a hint if it is missing). ``MINER_NUM_THREADS``
caps the kernel's threads (default: the CPUs this process may run on). `backend_info` says which
backend runs and why.

Example:
    >>> vals, ids = new_state(n_queries=2, k=3)
    >>> for offset in range(0, n_docs, block):
    ...     update_topk(queries @ docs[offset:offset + block].T, offset, vals, ids)
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["backend_info", "candidate_similarity", "fold_whitespace", "merge_topk", "new_state", "update_topk"]

BACKEND_ENV = "MINER_BACKEND"
THREADS_ENV = "MINER_NUM_THREADS"
_BACKENDS = ("auto", "numpy", "compiled")
# The numpy fallback works on row chunks of about this many scores, so its temporaries stay small.
_CHUNK_SCORES = 1 << 20


@dataclass(frozen=True)
class _Backend:
    name: str  # "compiled" | "numpy"
    reason: str
    threads: int
    update: Callable[..., None]
    merge: Callable[..., tuple[np.ndarray, np.ndarray]]
    similarity: Callable[..., np.ndarray]
    fold: Callable[[list[str]], list[bytes]]


@functools.cache
def _compiled_module() -> tuple[ModuleType | None, str]:
    """Try the compiled kernel once: (module, "") or (None, why it is missing)."""
    try:
        from miner import _topk
    except ImportError as exc:
        return None, f"miner._topk not built: {exc}"
    return _topk, ""


@functools.cache
def _scan_isa(module: ModuleType) -> str:
    return str(module.simd()[0])


def _threads() -> int:
    raw = os.environ.get(THREADS_ENV, "").strip()
    if raw:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}")
        return n
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _backend(name: str | None = None) -> _Backend:
    """Resolve the backend: `name`, or else ``MINER_BACKEND`` (re-read on every call)."""
    if name is None:
        name = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if name not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(_BACKENDS)}; got {name!r}")
    if name == "numpy":
        return _Backend("numpy", f"{BACKEND_ENV}=numpy", 1, _update_numpy, _merge_numpy, _similarity_numpy, _fold_numpy)
    module, missing = _compiled_module()
    if module is None:
        if name == "compiled":
            raise ImportError(
                f"{BACKEND_ENV}=compiled but {missing}. Build it with "
                "`pip install --no-build-isolation -e .` (needs CMake and a C++17 compiler), "
                f"or set {BACKEND_ENV}=numpy to use the numpy fallback."
            )
        return _Backend("numpy", missing, 1, _update_numpy, _merge_numpy, _similarity_numpy, _fold_numpy)
    reason = f"{BACKEND_ENV}=compiled" if name == "compiled" else "miner._topk is importable"
    reason += f" (scan: {_scan_isa(module)})"
    return _Backend(
        "compiled", reason, _threads(), module.update_topk, module.merge_topk, module.candidate_similarity,
        functools.partial(_fold_compiled, module),
    )


def backend_info() -> dict[str, object]:
    """Which top-k backend runs, why, and on how many threads.

    Returns:
        ``{"backend": "compiled" | "numpy", "reason": str, "threads": int}``.
    """
    b = _backend()
    return {"backend": b.name, "reason": b.reason, "threads": b.threads}


def new_state(n_queries: int, k: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """An empty running top-k: ``vals float32[n_queries, k]`` of -inf, ``ids int64[n_queries, k]`` of -1."""
    n_queries, k = _integer(n_queries, "n_queries"), _integer(k, "k")
    if n_queries < 0:
        raise ValueError(f"n_queries must be >= 0, got {n_queries}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return np.full((n_queries, k), -np.inf, np.float32), np.full((n_queries, k), -1, np.int64)


def update_topk(
    scores: npt.ArrayLike,
    offset: int,
    vals: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    *,
    ceiling: npt.ArrayLike | None = None,
    floor: npt.ArrayLike | None = None,
    exclude_indptr: npt.ArrayLike | None = None,
    exclude_ids: npt.ArrayLike | None = None,
    above_ceiling: npt.NDArray[np.int64] | None = None,
) -> None:
    """Stream one block of scores into the running top-k state, in place.

    Args:
        scores: ``float32[q, b]``, column ``j`` is document id ``offset + j``. Anything else is
            converted with ``np.ascontiguousarray(scores, dtype=np.float32)`` (a copy).
        offset: document id of column 0, >= 0.
        vals: ``float32[q, k]`` state from `new_state`, C-contiguous and writable.
        ids: ``int64[q, k]`` state from `new_state`, C-contiguous and writable.
        ceiling: ``float32[q]``, scores above ``ceiling[i]`` are skipped (compared in float32).
        floor: ``float32[q]``, scores below ``floor[i]`` are skipped.
        exclude_indptr: ``int64[q + 1]`` CSR row pointer of the excluded documents.
        exclude_ids: ``int64[nnz]`` excluded *global* document ids, per query
            ``exclude_ids[exclude_indptr[i]:exclude_indptr[i + 1]]``, any order, ids outside the
            block allowed.
        above_ceiling: ``int64[q]``, incremented in place by the number of scores of this block
            strictly above the ceiling (excluded documents included; nothing without a ceiling).

    Raises:
        ValueError: NaN in scores or bounds, bad shapes, negative offset, a malformed CSR.
        TypeError: a state or counter array of the wrong type (it is never converted).
    """
    _check_state(vals, ids)
    q, k = vals.shape
    offset = _integer(offset, "offset")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_queries, n_docs), got shape {scores.shape}")
    if scores.shape[0] != q:
        raise ValueError(
            f"scores has {scores.shape[0]} rows but the state has {q} "
            f"(scores shape {scores.shape}, vals shape {vals.shape})"
        )
    ceiling = _bound(ceiling, "ceiling", q)
    floor = _bound(floor, "floor", q)
    indptr, excluded = _csr(exclude_indptr, exclude_ids, q)
    if above_ceiling is not None:
        _check_inplace(above_ceiling, "above_ceiling", np.int64, (q,))
    backend = _backend()
    backend.update(
        scores, offset, vals, ids, ceiling, floor, indptr, excluded, above_ceiling, backend.threads
    )


def merge_topk(
    vals_list: Sequence[npt.ArrayLike], ids_list: Sequence[npt.ArrayLike], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Merge several top-k lists of the same queries into one top-k.

    Args:
        vals_list: ``float32[q, k_i]`` scores per list (e.g. per index shard).
        ids_list: ``int64[q, k_i]`` document ids per list. Ids must be disjoint across lists
            (shards of one corpus): a document present twice is kept twice.
        k: entries per query in the result, >= 1.

    Returns:
        ``(vals float32[q, k], ids int64[q, k])``: best first, ties to the lower id, entries with
        id < 0 or score -inf dropped as padding, rows padded with -inf / -1.

    Raises:
        ValueError: NaN scores, no lists, mismatched shapes, k < 1.
        TypeError: non-integer ids.
    """
    k = _integer(k, "k")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(vals_list) != len(ids_list):
        raise ValueError(
            f"vals_list and ids_list must have the same length, got {len(vals_list)} and {len(ids_list)}"
        )
    if len(vals_list) == 0:
        raise ValueError("merge_topk needs at least one list")
    vals_parts, ids_parts = [], []
    for n, (v, d) in enumerate(zip(vals_list, ids_list)):
        v = np.asarray(v)
        d = np.asarray(d)
        if not np.issubdtype(d.dtype, np.integer):
            raise TypeError(f"ids_list[{n}] must hold integers, got dtype {d.dtype}")
        if v.ndim != 2 or v.shape != d.shape:
            raise ValueError(
                f"vals_list[{n}] and ids_list[{n}] must be 2-D (n_queries, k_i) with the same "
                f"shape, got {v.shape} and {d.shape}"
            )
        if v.shape[0] != np.shape(vals_list[0])[0]:
            raise ValueError(
                f"all lists must have the same number of queries: list 0 has "
                f"{np.shape(vals_list[0])[0]}, list {n} has {v.shape[0]}"
            )
        vals_parts.append(v)
        ids_parts.append(d)
    # One (q, sum k_i) matrix per dtype: a visible copy, small next to the scores it came from.
    vals = np.ascontiguousarray(np.concatenate(vals_parts, axis=1), dtype=np.float32)
    ids = np.ascontiguousarray(np.concatenate(ids_parts, axis=1), dtype=np.int64)
    backend = _backend()
    return backend.merge(vals, ids, k, backend.threads)


def candidate_similarity(
    docs: npt.ArrayLike, candidates: npt.ArrayLike, pos_indptr: npt.ArrayLike, pos_ids: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """Each candidate's highest similarity to its query's positives (the near-duplicate check).

    Args:
        docs: float32[N, d] document embeddings (similarity is the inner product).
        candidates: int64[q, K] document rows per query, ``-1`` padded.
        pos_indptr, pos_ids: CSR of each query's positive rows.

    Returns:
        ``float32[q, K]``: ``max over p of docs[candidates[i, c]] . docs[p]``; ``-inf`` for padding and
        for queries without positives.

    Example:
        >>> docs = np.eye(3, dtype=np.float32)
        >>> candidate_similarity(docs, np.array([[1, 2, -1]]), np.array([0, 1]), np.array([1])).tolist()
        [[1.0, 0.0, -inf]]
    """
    docs = np.ascontiguousarray(docs, dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    pos_indptr = np.ascontiguousarray(pos_indptr, dtype=np.int64)
    pos_ids = np.ascontiguousarray(pos_ids, dtype=np.int64)
    if docs.ndim != 2 or candidates.ndim != 2:
        raise ValueError(f"docs and candidates must be 2-D, got shapes {docs.shape} and {candidates.shape}")
    if pos_indptr.shape != (candidates.shape[0] + 1,):
        raise ValueError(f"pos_indptr must have shape ({candidates.shape[0] + 1},), got {pos_indptr.shape}")
    backend = _backend()
    return backend.similarity(docs, candidates, pos_indptr, pos_ids, backend.threads)


def fold_whitespace(texts: Sequence[str]) -> list[bytes]:
    """The UTF-8 of each text with its ASCII letters lower-cased and its words joined by one space.

    The same-text normalisation's character work (``miner.data.same_text_keys``): for an ASCII text, or
    any text already case-folded, the result is ``normalize_text(text)`` encoded. Whitespace is what
    ``str.split()`` splits on, Unicode spaces included; lone surrogates pass through (``surrogatepass``).
    Both backends return the same bytes.

    Example:
        >>> fold_whitespace(["  The\\tCAT\\n", "a\\u00a0b"])
        [b'the cat', b'a b']
    """
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("fold_whitespace takes a sequence of str")
    return _backend().fold(texts)


def _fold_numpy(texts: list[str]) -> list[bytes]:
    out = []
    for text in texts:
        lowered = text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")  # A-Z only
        out.append(" ".join(lowered.split()).encode("utf-8", "surrogatepass"))
    return out


def _fold_compiled(module: ModuleType, texts: list[str]) -> list[bytes]:
    data, offsets = module.fold_whitespace(texts)
    bounds = offsets.tolist()
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _similarity_numpy(
    docs: npt.NDArray[np.float32],
    candidates: npt.NDArray[np.int64],
    pos_indptr: npt.NDArray[np.int64],
    pos_ids: npt.NDArray[np.int64],
    threads: int,
    chunk: int = 256,
) -> npt.NDArray[np.float32]:
    del threads
    n, q, k = docs.shape[0], candidates.shape[0], candidates.shape[1]
    if len(pos_ids) and (pos_ids.min() < 0 or pos_ids.max() >= n):
        raise ValueError(f"pos_ids must lie in 0..{n - 1}")
    if candidates.size and candidates.max() >= n:
        raise ValueError(f"candidate ids must lie in 0..{n - 1} (or be -1)")
    out = np.full((q, k), -np.inf, dtype=np.float32)
    counts = np.diff(pos_indptr)
    for lo in range(0, q, chunk):  # bounds the gathered chunk x K x d candidate buffer
        rows = lo + np.flatnonzero(counts[lo : lo + chunk] > 0)
        if not len(rows):
            continue
        gathered = docs[np.maximum(candidates[rows], 0)]  # float32[r, K, d]
        for j in range(int(counts[rows].max())):
            has = counts[rows] > j
            positive = docs[pos_ids[pos_indptr[rows[has]] + j]]  # float32[r', d]
            sims = np.matmul(gathered[has], positive[:, :, None])[:, :, 0]
            out[rows[has]] = np.maximum(out[rows[has]], sims)
    out[candidates < 0] = -np.inf
    return out


# --- validation ----------------------------------------------------------------------------------


def _integer(x: Any, name: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None


def _check_inplace(a: Any, name: str, dtype: type, shape: tuple[int, ...] | None = None) -> None:
    """An array updated in place: it must already be right, since a converted copy would be lost."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of {np.dtype(dtype).name}, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(
            f"{name} must have dtype {np.dtype(dtype).name}, got {a.dtype}; it is updated in place, "
            "so it is never converted (create the state with new_state())"
        )
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name} must be C-contiguous, it is updated in place (a contiguous copy would be "
            "updated instead); create the state with new_state()"
        )
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only, it is updated in place")


def _check_state(vals: Any, ids: Any) -> None:
    _check_inplace(vals, "vals", np.float32)
    _check_inplace(ids, "ids", np.int64)
    if vals.ndim != 2:
        raise ValueError(f"vals must be 2-D (n_queries, k), got shape {vals.shape}")
    if vals.shape != ids.shape:
        raise ValueError(f"vals and ids must have the same shape, got {vals.shape} and {ids.shape}")
    if vals.shape[1] < 1:
        raise ValueError(f"k must be >= 1, got state shape {vals.shape}")


def _bound(x: npt.ArrayLike | None, name: str, q: int) -> npt.NDArray[np.float32] | None:
    if x is None:
        return None
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.shape != (q,):
        raise ValueError(f"{name} must have shape ({q},) (one value per query), got {a.shape}")
    nan = np.flatnonzero(np.isnan(a))
    if nan.size:
        raise ValueError(f"{name} contains NaN (query {nan[0]})")
    return a


def _csr(
    indptr: npt.ArrayLike | None, excluded: npt.ArrayLike | None, q: int
) -> tuple[npt.NDArray[np.int64] | None, npt.NDArray[np.int64] | None]:
    if indptr is None and excluded is None:
        return None, None
    if indptr is None or excluded is None:
        raise ValueError("exclude_indptr and exclude_ids must be given together")
    p, e = np.asarray(indptr), np.asarray(excluded)
    for name, a in (("exclude_indptr", p), ("exclude_ids", e)):
        if not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    p = np.ascontiguousarray(p, dtype=np.int64)
    e = np.ascontiguousarray(e, dtype=np.int64)
    if p.shape != (q + 1,):
        raise ValueError(f"exclude_indptr must have shape ({q + 1},) (n_queries + 1), got {p.shape}")
    if e.ndim != 1:
        raise ValueError(f"exclude_ids must be 1-D, got shape {e.shape}")
    if p[0] != 0 or p[-1] != e.size:
        raise ValueError(
            f"exclude_indptr must start at 0 and end at len(exclude_ids) = {e.size}, "
            f"got {p[0]} ... {p[-1]}"
        )
    if q and np.any(np.diff(p) < 0):
        raise ValueError(f"exclude_indptr must be non-decreasing (first drop after query {np.argmax(np.diff(p) < 0)})")
    return p, e


# --- the numpy fallback --------------------------------------------------------------------------


def _nan_error(a: npt.NDArray[np.float32], name: str, offset: int | None = None) -> ValueError:
    row, col = np.argwhere(np.isnan(a))[0]
    where = f" (document id {offset + col})" if offset is not None else ""
    return ValueError(f"{name} contains NaN at row {row}, column {col}{where}")


def _update_numpy(
    scores: npt.NDArray[np.float32],
    offset: int,
    vals: npt.NDArray[np.float32],
    ids: npt.NDArray[np.int64],
    ceiling: npt.NDArray[np.float32] | None,
    floor: npt.NDArray[np.float32] | None,
    indptr: npt.NDArray[np.int64] | None,
    excluded: npt.NDArray[np.int64] | None,
    above_ceiling: npt.NDArray[np.int64] | None,
    threads: int,
) -> None:
    """Same contract as the kernel: stage the new state, commit it only if no NaN was found."""
    del threads  # numpy runs on one thread
    q, b = scores.shape
    k = vals.shape[1]
    if q == 0 or b == 0:
        return
    new_vals, new_ids = np.empty_like(vals), np.empty_like(ids)
    above = np.zeros(q, np.int64)
    step = max(1, _CHUNK_SCORES // b)
    for r0 in range(0, q, step):
        r1 = min(q, r0 + step)
        s = scores[r0:r1]  # [r, b]
        if np.isnan(s).any():
            raise _nan_error(scores, "scores", offset)
        valid = s > -np.inf  # [r, b]
        if ceiling is not None:
            over = s > ceiling[r0:r1, None]
            above[r0:r1] = over.sum(axis=1)
            valid &= ~over
        if floor is not None:
            valid &= s >= floor[r0:r1, None]
        if indptr is not None:
            e = excluded[indptr[r0] : indptr[r1]]
            row = np.repeat(np.arange(r1 - r0), np.diff(indptr[r0 : r1 + 1]))
            inside = (e >= offset) & (e < offset + b)
            valid[row[inside], e[inside] - offset] = False
        cand = np.where(valid, s, np.float32(-np.inf))  # [r, b]
        # Only scores >= the k-th best of the block and >= the state's k-th value can enter;
        # ">=" keeps every tie, the sort below breaks them by id.
        kb = min(k, b)
        kth = np.partition(cand, b - kb, axis=1)[:, b - kb]
        threshold = np.maximum(kth, vals[r0:r1, k - 1])
        br, bc = np.nonzero(valid & (cand >= threshold[:, None]))
        sr, sc = np.nonzero(ids[r0:r1] >= 0)
        row = np.concatenate([br, sr])
        v = np.concatenate([cand[br, bc], vals[r0:r1][sr, sc]])
        d = np.concatenate([bc + offset, ids[r0:r1][sr, sc]])
        _scatter_topk(row, v, d, new_vals[r0:r1], new_ids[r0:r1])
    vals[...] = new_vals
    ids[...] = new_ids
    if above_ceiling is not None and ceiling is not None:
        above_ceiling += above


def _scatter_topk(
    row: npt.NDArray[np.intp],
    v: npt.NDArray[np.float32],
    d: npt.NDArray[np.int64],
    out_vals: npt.NDArray[np.float32],
    out_ids: npt.NDArray[np.int64],
) -> None:
    """Write the k best (v, d) of each row, best first, ties to the lower id, padded."""
    n_rows, k = out_vals.shape
    order = np.lexsort((d, -v, row))
    row, v, d = row[order], v[order], d[order]
    rank = np.arange(row.size) - np.searchsorted(row, np.arange(n_rows))[row]
    keep = rank < k
    out_vals.fill(-np.inf)
    out_ids.fill(-1)
    out_vals[row[keep], rank[keep]] = v[keep]
    out_ids[row[keep], rank[keep]] = d[keep]


def _merge_numpy(
    vals: npt.NDArray[np.float32], ids: npt.NDArray[np.int64], k: int, threads: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    del threads
    if np.isnan(vals).any():
        raise _nan_error(vals, "vals")
    q = vals.shape[0]
    row, col = np.nonzero((ids >= 0) & (vals > -np.inf))
    out_vals, out_ids = new_state(q, k)
    _scatter_topk(row, vals[row, col], ids[row, col], out_vals, out_ids)
    return out_vals, out_ids
