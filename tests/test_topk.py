"""miner.topk against one plain numpy reference, for both backends.

The compiled backend is skipped when miner._topk is not built, unless MINER_BACKEND=compiled (then a
missing kernel fails), and when MINER_BACKEND=numpy (the run that tests the fallback alone).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from miner import topk
from miner.data import normalize_text


def _compiled_skip_reason() -> str | None:
    env = os.environ.get("MINER_BACKEND", "").strip().lower()
    if env == "numpy":
        return "MINER_BACKEND=numpy: testing the fallback alone"
    if env == "compiled":
        return None  # required: a missing kernel must fail, not skip
    module, missing = topk._compiled_module()
    return missing if module is None else None


_SKIP_COMPILED = _compiled_skip_reason()
BACKENDS = [
    "numpy",
    pytest.param(
        "compiled", marks=pytest.mark.skipif(_SKIP_COMPILED is not None, reason=str(_SKIP_COMPILED))
    ),
]
FUZZ = settings(max_examples=150, deadline=None)


def on(backend, fn, *args, **kwargs):
    """Call a miner.topk function with MINER_BACKEND set to `backend`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINER_BACKEND", backend)
        return fn(*args, **kwargs)


# --- the reference -------------------------------------------------------------------------------


def reference_topk(scores, k, ceiling=None, floor=None, excluded=None):
    """Top-k of each row of scores[q, n] (column j is document j): sort every valid candidate."""
    q, n = scores.shape
    vals, ids = np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
    for i in range(q):
        s = scores[i]
        ok = s > -np.inf
        if ceiling is not None:
            ok &= s <= ceiling[i]
        if floor is not None:
            ok &= s >= floor[i]
        if excluded is not None:
            ok[[d for d in excluded[i] if 0 <= d < n]] = False
        cand = np.flatnonzero(ok)
        best = cand[np.lexsort((cand, -s[cand]))][:k]
        vals[i, : best.size], ids[i, : best.size] = s[best], best
    return vals, ids


def reference_merge(vals_list, ids_list, k):
    q = vals_list[0].shape[0]
    vals, ids = np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)
    for i in range(q):
        v = np.concatenate([a[i] for a in vals_list])
        d = np.concatenate([a[i] for a in ids_list])
        keep = (d >= 0) & (v > -np.inf)
        v, d = v[keep], d[keep]
        order = np.lexsort((d, -v))[:k]
        vals[i, : order.size], ids[i, : order.size] = v[order], d[order]
    return vals, ids


def csr(excluded):
    indptr = np.zeros(len(excluded) + 1, np.int64)
    indptr[1:] = np.cumsum([len(e) for e in excluded])
    flat = np.concatenate([np.asarray(e, np.int64) for e in excluded]) if excluded else []
    return indptr, np.asarray(flat, np.int64)


def stream(backend, scores, k, bounds, order=None, ceiling=None, floor=None, excluded=None):
    """Feed scores[:, bounds[b]:bounds[b + 1]] block by block; returns (vals, ids, above)."""
    q = scores.shape[0]
    vals, ids = topk.new_state(q, k)
    above = np.zeros(q, np.int64)
    indptr, flat = csr(excluded) if excluded is not None else (None, None)
    blocks = list(range(len(bounds) - 1))
    for b in order if order is not None else blocks:
        lo, hi = bounds[b], bounds[b + 1]
        on(backend, topk.update_topk, scores[:, lo:hi], lo, vals, ids, ceiling=ceiling,
           floor=floor, exclude_indptr=indptr, exclude_ids=flat, above_ceiling=above)
    return vals, ids, above


def assert_same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


# --- data ----------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    """Random tie-heavy blocks: (scores, k, bounds, order, ceiling, floor, excluded)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, n = draw(st.integers(0, 5)), draw(st.integers(0, 90))
    k = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["ties", "normal", "inf"]))
    if kind == "ties":
        scores = rng.integers(-3, 3, size=(q, n)).astype(np.float32)
    else:
        scores = rng.standard_normal((q, n)).astype(np.float32)
    if kind == "inf":
        scores[rng.random((q, n)) < 0.1] = np.inf
        scores[rng.random((q, n)) < 0.2] = -np.inf
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    bounds = [0, *cuts, n]
    order = rng.permutation(len(bounds) - 1) if draw(st.booleans()) else None
    ceiling = floor = excluded = None
    if draw(st.booleans()):
        ceiling = rng.integers(-3, 4, size=q).astype(np.float32)
        ceiling[rng.random(q) < 0.2] = np.inf
    if draw(st.booleans()):
        floor = rng.integers(-4, 2, size=q).astype(np.float32)
        floor[rng.random(q) < 0.2] = -np.inf
    if draw(st.booleans()):
        everything = draw(st.booleans())
        excluded = [
            rng.permutation(n + 3) - 1 if everything else rng.integers(-2, n + 5, size=rng.integers(0, 8))
            for _ in range(q)
        ]
    return scores, k, bounds, order, ceiling, floor, excluded


# --- block update --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(problem=problems())
def test_streamed_blocks_equal_the_reference(backend, problem):
    scores, k, bounds, order, ceiling, floor, excluded = problem
    vals, ids, above = stream(backend, scores, k, bounds, order, ceiling, floor, excluded)
    assert_same((vals, ids), reference_topk(scores, k, ceiling, floor, excluded))
    want_above = (scores > ceiling[:, None]).sum(axis=1) if ceiling is not None else 0
    np.testing.assert_array_equal(above, want_above)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([1, 7, 100, 300]))
def test_long_rows_and_threads_equal_the_reference(backend, seed, k):
    """Rows long enough for the SIMD loop, the fresh-row seed bound and several worker threads."""
    rng = np.random.default_rng(seed)
    q, n = 32, 20_000
    scores = rng.standard_normal((q, n)).astype(np.float32)
    scores[:, rng.integers(0, n, 50)] = 0.5  # exact ties across columns
    ceiling = np.where(rng.random(q) < 0.5, np.float32(2.0), np.float32(np.inf)).astype(np.float32)
    excluded = [np.argsort(-scores[i])[: rng.integers(0, 2 * k)] for i in range(q)]  # the best ones
    bounds = [0, 15_000, 15_013, n] if rng.random() < 0.5 else [0, n]
    vals, ids, above = stream(backend, scores, k, bounds, None, ceiling, None, excluded)
    assert_same((vals, ids), reference_topk(scores, k, ceiling, None, excluded))
    np.testing.assert_array_equal(above, (scores > ceiling[:, None]).sum(axis=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_candidates_than_k_are_padded(backend):
    scores = np.array([[1, -np.inf, 2], [-np.inf, -np.inf, -np.inf]], np.float32)
    vals, ids = topk.new_state(2, 4)
    on(backend, topk.update_topk, scores, 10, vals, ids)
    np.testing.assert_array_equal(ids, [[12, 10, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(vals[0], [2, 1, -np.inf, -np.inf])
    assert np.all(vals[1] == -np.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_id_whatever_the_block_order(backend):
    scores = np.zeros((1, 10), np.float32)
    vals, ids = topk.new_state(1, 3)
    on(backend, topk.update_topk, scores[:, 5:], 5, vals, ids)
    on(backend, topk.update_topk, scores[:, :5], 0, vals, ids)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_is_a_score_but_minus_inf_is_not(backend):
    scores = np.array([[np.inf, -np.inf, 0.0, np.inf]], np.float32)
    vals, ids = topk.new_state(1, 4)
    on(backend, topk.update_topk, scores, 0, vals, ids, ceiling=np.array([np.inf], np.float32))
    np.testing.assert_array_equal(ids, [[0, 3, 2, -1]])
    vals, ids = topk.new_state(1, 4)
    on(backend, topk.update_topk, scores, 0, vals, ids, ceiling=np.array([1.0], np.float32))
    np.testing.assert_array_equal(ids, [[2, -1, -1, -1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclusions_covering_everything_leave_padding(backend):
    scores = np.arange(12, dtype=np.float32).reshape(2, 6)
    vals, ids = topk.new_state(2, 3)
    on(backend, topk.update_topk, scores, 100, vals, ids,
       exclude_indptr=[0, 6, 6], exclude_ids=[105, 104, 103, 102, 101, 100])
    np.testing.assert_array_equal(ids, [[-1, -1, -1], [105, 104, 103]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_converted_visibly_and_state_is_shared(backend):
    scores = np.asfortranarray(np.random.default_rng(0).standard_normal((3, 50)))  # float64, F order
    vals, ids = topk.new_state(3, 5)
    vals_before = vals
    on(backend, topk.update_topk, scores, 0, vals, ids, ceiling=[1.0, 2.0, 3.0],
       exclude_indptr=np.array([0, 1, 1, 2], np.int32), exclude_ids=[0, 2])
    assert vals is vals_before
    want = reference_topk(scores.astype(np.float32), 5, np.array([1, 2, 3], np.float32), None,
                          [[0], [], [2]])
    assert_same((vals, ids), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_scores_are_accepted(backend):
    scores = np.ones((2, 4), np.float32)
    scores.flags.writeable = False
    vals, ids = topk.new_state(2, 2)
    on(backend, topk.update_topk, scores, 0, vals, ids)
    np.testing.assert_array_equal(ids, [[0, 1], [0, 1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_blocks_and_queries_are_no_ops(backend):
    vals, ids = topk.new_state(2, 3)
    on(backend, topk.update_topk, np.zeros((2, 0), np.float32), 0, vals, ids)
    assert np.all(ids == -1)
    vals, ids = topk.new_state(0, 3)
    on(backend, topk.update_topk, np.zeros((0, 9), np.float32), 0, vals, ids)
    assert vals.shape == (0, 3)


def test_concurrent_callers_get_their_own_answers():
    """Two Python threads update separate states at once (the kernel runs without the GIL)."""
    rng = np.random.default_rng(3)
    scores = [rng.standard_normal((64, 20_000)).astype(np.float32) for _ in range(2)]
    states = [topk.new_state(64, 10) for _ in range(2)]
    threads = [
        threading.Thread(target=topk.update_topk, args=(scores[t], 0, *states[t])) for t in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in range(2):
        assert_same(states[t], reference_topk(scores[t], 10))


# --- merge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(seed=st.integers(0, 2**32 - 1), q=st.integers(0, 4), k=st.integers(1, 10),
       widths=st.lists(st.integers(0, 12), min_size=1, max_size=4))
def test_merge_equals_the_reference(backend, seed, q, k, widths):
    rng = np.random.default_rng(seed)
    ids_pool = rng.permutation(1000)  # disjoint ids across lists
    vals_list, ids_list, used = [], [], 0
    for w in widths:
        v = rng.integers(-3, 3, size=(q, w)).astype(np.float32)
        d = ids_pool[used : used + q * w].reshape(q, w).astype(np.int64)
        used += q * w
        pad = rng.random((q, w)) < 0.3
        v[pad], d[pad] = -np.inf, -1
        vals_list.append(v)
        ids_list.append(d)
    got = on(backend, topk.merge_topk, vals_list, ids_list, k)
    assert_same(got, reference_merge(vals_list, ids_list, k))
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 8), shards=st.integers(1, 4))
def test_merging_shard_results_equals_one_shot(backend, seed, k, shards):
    rng = np.random.default_rng(seed)
    scores = rng.integers(-3, 3, size=(3, 40)).astype(np.float32)
    cuts = [0, *sorted(rng.integers(0, 41, shards - 1)), 40]
    parts = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        vals, ids = topk.new_state(3, k)
        on(backend, topk.update_topk, scores[:, lo:hi], lo, vals, ids)
        parts.append((vals, ids))
    got = on(backend, topk.merge_topk, [p[0] for p in parts], [p[1] for p in parts], k)
    assert_same(got, reference_topk(scores, k))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", [(0, 0), (3, 40), (7, 19_999)])
def test_nan_scores_raise_and_leave_the_state_alone(backend, where):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 20_000)).astype(np.float32)
    vals, ids = topk.new_state(8, 5)
    on(backend, topk.update_topk, scores, 0, vals, ids)
    before = vals.copy(), ids.copy()
    scores[where] = np.nan
    with pytest.raises(ValueError, match=rf"scores contains NaN at row {where[0]}, column {where[1]}"):
        on(backend, topk.update_topk, scores, 0, vals, ids)
    assert_same((vals, ids), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_merge_raises(backend):
    v = np.array([[1.0, np.nan]], np.float32)
    with pytest.raises(ValueError, match="vals contains NaN at row 0, column 1"):
        on(backend, topk.merge_topk, [v], [np.array([[1, 2]])], 2)


def _state():
    return topk.new_state(2, 3)


BAD_UPDATES = [
    # (description, make kwargs from a fresh state, exception, message)
    ("float64 vals", lambda v, i: dict(vals=v.astype(np.float64)), TypeError, "vals must have dtype float32"),
    ("int32 ids", lambda v, i: dict(ids=i.astype(np.int32)), TypeError, "ids must have dtype int64"),
    ("list vals", lambda v, i: dict(vals=v.tolist()), TypeError, "vals must be a numpy.ndarray"),
    ("strided vals", lambda v, i: dict(vals=np.zeros((2, 6), np.float32)[:, ::2]), ValueError, "vals must be C-contiguous"),
    ("read-only ids", lambda v, i: dict(ids=_read_only(i)), ValueError, "ids is read-only"),
    ("1-D vals", lambda v, i: dict(vals=v[0], ids=i[0]), ValueError, r"vals must be 2-D \(n_queries, k\), got shape \(3,\)"),
    ("k = 0", lambda v, i: dict(vals=v[:, :0].copy(), ids=i[:, :0].copy()), ValueError, "k must be >= 1"),
    ("state shapes", lambda v, i: dict(ids=i[:, :2].copy()), ValueError, r"vals and ids must have the same shape, got \(2, 3\) and \(2, 2\)"),
    ("1-D scores", lambda v, i: dict(scores=np.zeros(4, np.float32)), ValueError, r"scores must be 2-D \(n_queries, n_docs\), got shape \(4,\)"),
    ("scores rows", lambda v, i: dict(scores=np.zeros((3, 4), np.float32)), ValueError, "scores has 3 rows but the state has 2"),
    ("negative offset", lambda v, i: dict(offset=-1), ValueError, "offset must be >= 0, got -1"),
    ("float offset", lambda v, i: dict(offset=1.5), TypeError, "offset must be an integer, got float"),
    ("ceiling shape", lambda v, i: dict(ceiling=np.zeros(3)), ValueError, r"ceiling must have shape \(2,\)"),
    ("NaN ceiling", lambda v, i: dict(ceiling=[0.0, np.nan]), ValueError, r"ceiling contains NaN \(query 1\)"),
    ("NaN floor", lambda v, i: dict(floor=[np.nan, 0.0]), ValueError, r"floor contains NaN \(query 0\)"),
    ("half a CSR", lambda v, i: dict(exclude_ids=[1]), ValueError, "must be given together"),
    ("indptr length", lambda v, i: dict(exclude_indptr=[0, 1], exclude_ids=[1]), ValueError, r"exclude_indptr must have shape \(3,\)"),
    ("indptr end", lambda v, i: dict(exclude_indptr=[0, 1, 1], exclude_ids=[1, 2]), ValueError, "end at len"),
    ("indptr order", lambda v, i: dict(exclude_indptr=[0, 2, 1], exclude_ids=[1]), ValueError, "non-decreasing"),
    ("float ids", lambda v, i: dict(exclude_indptr=[0, 1, 1], exclude_ids=[1.0]), TypeError, "exclude_ids must hold integers"),
    ("above dtype", lambda v, i: dict(above_ceiling=np.zeros(2, np.int32)), TypeError, "above_ceiling must have dtype int64"),
    ("above shape", lambda v, i: dict(above_ceiling=np.zeros(3, np.int64)), ValueError, r"above_ceiling must have shape \(2,\)"),
]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("what", "change", "error", "message"), BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_bad_updates_raise_naming_the_problem(backend, what, change, error, message):
    vals, ids = _state()
    args = dict(scores=np.zeros((2, 4), np.float32), offset=0, vals=vals, ids=ids)
    args.update(change(vals, ids))
    with pytest.raises(error, match=message):
        on(backend, topk.update_topk, **args)


BAD_MERGES = [
    ("no lists", lambda: ([], [], 2), ValueError, "at least one list"),
    ("lengths", lambda: ([np.zeros((1, 2))], [], 2), ValueError, "same length"),
    ("shapes", lambda: ([np.zeros((1, 2))], [np.zeros((1, 3), np.int64)], 2), ValueError, r"same shape, got \(1, 2\) and \(1, 3\)"),
    ("queries", lambda: ([np.zeros((1, 2)), np.zeros((2, 2))], [np.zeros((1, 2), np.int64), np.zeros((2, 2), np.int64)], 2), ValueError, "same number of queries"),
    ("float ids", lambda: ([np.zeros((1, 2))], [np.zeros((1, 2))], 2), TypeError, "must hold integers"),
    ("k", lambda: ([np.zeros((1, 2))], [np.zeros((1, 2), np.int64)], 0), ValueError, "k must be >= 1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("what", "make", "error", "message"), BAD_MERGES, ids=[b[0] for b in BAD_MERGES])
def test_bad_merges_raise_naming_the_problem(backend, what, make, error, message):
    with pytest.raises(error, match=message):
        on(backend, topk.merge_topk, *make())


def test_new_state_contract():
    vals, ids = topk.new_state(3, 4)
    assert vals.dtype == np.float32 and ids.dtype == np.int64 and vals.shape == ids.shape == (3, 4)
    assert np.all(vals == -np.inf) and np.all(ids == -1)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        topk.new_state(3, 0)
    with pytest.raises(ValueError, match="n_queries must be >= 0"):
        topk.new_state(-1, 3)


# --- the compiled binding itself -----------------------------------------------------------------


@pytest.mark.skipif(_SKIP_COMPILED is not None, reason=str(_SKIP_COMPILED))
def test_binding_refuses_to_copy():
    """The kernel takes float32 / int64 C-contiguous arrays as they are: no silent conversion."""
    from miner import _topk

    vals, ids = topk.new_state(2, 3)
    with pytest.raises(TypeError):
        _topk.update_topk(np.zeros((2, 4)), 0, vals, ids)  # float64
    with pytest.raises(TypeError):
        _topk.update_topk(np.zeros((4, 2), np.float32).T, 0, vals, ids)  # not C-contiguous
    with pytest.raises(TypeError):
        _topk.update_topk(np.zeros((2, 4), np.float32), 0, vals, ids.astype(np.int32))
    with pytest.raises(ValueError, match="same rows"):
        _topk.update_topk(np.zeros((3, 4), np.float32), 0, vals, ids)
    with pytest.raises(ValueError, match="exclude_indptr must be non-decreasing"):
        _topk.update_topk(np.zeros((2, 4), np.float32), 0, vals, ids,
                          exclude_indptr=np.array([0, 2, 1]), exclude_ids=np.array([1]))


@pytest.mark.skipif(_SKIP_COMPILED is not None, reason=str(_SKIP_COMPILED))
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([1, 5, 60]), ties=st.booleans())
def test_every_simd_path_equals_the_reference(seed, k, ties):
    """Each instruction set this CPU supports (AVX2, SSE2, scalar) gives the reference's answer."""
    from miner import _topk

    rng = np.random.default_rng(seed)
    q, n = 6, int(rng.integers(1, 3000))
    scores = (rng.integers(-3, 3, (q, n)) if ties else rng.standard_normal((q, n))).astype(np.float32)
    scores[rng.random((q, n)) < 0.01] = np.inf
    ceiling = rng.choice(np.array([0.5, 2.0, np.inf], np.float32), q)
    excluded = [rng.integers(0, n, rng.integers(0, 20)) for _ in range(q)]
    indptr, flat = csr(excluded)
    want = reference_topk(scores, k, ceiling, None, excluded)
    for simd in _topk.simd():
        vals, ids = topk.new_state(q, k)
        above = np.zeros(q, np.int64)
        _topk.update_topk(scores, 0, vals, ids, ceiling, None, indptr, flat, above, 2, simd)
        assert_same((vals, ids), want)
        np.testing.assert_array_equal(above, (scores > ceiling[:, None]).sum(axis=1), err_msg=simd)
        scores_nan = scores.copy()
        col = int(rng.integers(0, n))
        scores_nan[q - 1, col] = np.nan
        with pytest.raises(ValueError, match=f"NaN at row {q - 1}, column {col} "):
            _topk.update_topk(scores_nan, 0, vals, ids, None, None, None, None, None, 1, simd)
    with pytest.raises(ValueError, match="simd must be"):
        _topk.update_topk(scores, 0, vals, ids, simd="avx1024")


# --- backend choice ------------------------------------------------------------------------------


def test_backend_can_be_forced_to_numpy(monkeypatch):
    monkeypatch.setenv("MINER_BACKEND", "numpy")
    assert topk.backend_info() == {"backend": "numpy", "reason": "MINER_BACKEND=numpy", "threads": 1}


def test_missing_kernel_falls_back_or_fails_when_required(monkeypatch):
    monkeypatch.setattr(topk, "_compiled_module", lambda: (None, "miner._topk not built: boom"))
    monkeypatch.setenv("MINER_BACKEND", "auto")
    assert topk.backend_info() == {"backend": "numpy", "reason": "miner._topk not built: boom", "threads": 1}
    monkeypatch.setenv("MINER_BACKEND", "compiled")
    with pytest.raises(ImportError, match="pip install"):
        topk.backend_info()
    vals, ids = topk.new_state(1, 1)
    with pytest.raises(ImportError, match="MINER_BACKEND=compiled but miner._topk not built: boom"):
        topk.update_topk(np.zeros((1, 1), np.float32), 0, vals, ids)


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("MINER_BACKEND", "gpu")
    with pytest.raises(ValueError, match="MINER_BACKEND must be one of auto, numpy, compiled; got 'gpu'"):
        topk.backend_info()


def test_thread_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINER_NUM_THREADS", "3")
    assert topk._threads() == 3
    monkeypatch.setenv("MINER_NUM_THREADS", "zero")
    with pytest.raises(ValueError, match="MINER_NUM_THREADS must be a positive integer, got 'zero'"):
        topk._threads()


def test_compiled_kernel_is_present_when_required():
    if os.environ.get("MINER_BACKEND", "").strip().lower() != "compiled":
        pytest.skip("only checked when MINER_BACKEND=compiled")
    info = topk.backend_info()
    assert info["backend"] == "compiled", info


# --- candidate_similarity (the near-duplicate check) ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_candidate_similarity_matches_a_plain_loop(backend: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d, q, k = 50, int(rng.integers(1, 40)), 9, 7  # d not a multiple of 8 on purpose
    docs = rng.standard_normal((n, d)).astype(np.float32)
    cand = rng.integers(-1, n, size=(q, k))
    counts = rng.integers(0, 4, size=q)  # some queries have no positives
    indptr = np.concatenate([[0], np.cumsum(counts)])
    pos = rng.integers(0, n, size=indptr[-1])
    got = on(backend, topk.candidate_similarity, docs, cand, indptr, pos)
    for i in range(q):
        for c in range(k):
            ps = pos[indptr[i] : indptr[i + 1]]
            if cand[i, c] < 0 or not len(ps):
                assert got[i, c] == -np.inf
            else:
                expected = max(float(docs[cand[i, c]].astype(np.float64) @ docs[p].astype(np.float64)) for p in ps)
                assert got[i, c] == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidate_similarity_rejects_ids_outside_the_corpus(backend: str) -> None:
    docs = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="outside the corpus|must lie in"):
        on(backend, topk.candidate_similarity, docs, np.array([[0, 3]]), np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="outside the corpus|must lie in"):
        on(backend, topk.candidate_similarity, docs, np.array([[0, 1]]), np.array([0, 1]), np.array([5]))
    with pytest.raises(ValueError, match="pos_indptr"):
        on(backend, topk.candidate_similarity, docs, np.array([[0, 1]]), np.array([0]), np.array([0]))


_SPACES = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_whitespace_is_normalize_text_for_every_whitespace_code_point(backend: str) -> None:
    """Every code point str.split() treats as whitespace, alone, doubled and between words, and a few that it
    does not (zero-width space, NUL, lone surrogate), give normalize_text's bytes."""
    not_spaces = "\u200b\x00\ud800\u180eé\u00ad"
    texts = [f"{c}A{c}{c}b{c}" for c in _SPACES + not_spaces] + [_SPACES, "", "x", "ÀB  ß\u1680c", "\ufb03 K"]
    # spaces at every position of the kernel's 16-byte chunks: last of a chunk, runs across its edge, trailing
    texts += ["W" * i + " " * j + "d" * k for i in range(34) for j in (1, 2, 3) for k in (0, 1, 17)]
    got = on(backend, topk.fold_whitespace, [t.casefold() for t in texts])
    assert got == [normalize_text(t).encode("utf-8", "surrogatepass") for t in texts]


_PIECES = ["word", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", " ", "  ", "\t", "\n ", "é", "\u2003", "x" * 20, "\u00a0", "~\x7f!", "Ü"]


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(st.lists(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join), max_size=5))
def test_fold_whitespace_on_long_prose_matches_normalize_text(backend: str, texts: list[str]) -> None:
    """Long runs of words and single spaces take the kernel's 16-byte path; its edges (a space last in a
    chunk, runs of spaces, a non-ASCII byte mid-chunk) must give normalize_text's bytes too."""
    assert on(backend, topk.fold_whitespace, [t.casefold() for t in texts]) == [
        normalize_text(t).encode("utf-8") for t in texts
    ]
