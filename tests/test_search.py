"""Search: the streamed exact search against a one-shot faiss oracle, and faiss indexes with filtering."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from miner.config import SearchConfig
from miner.search import ExactIndex, FaissIndex, build_index, exact_search, exact_search_counts, to_csr


def _oracle(q: np.ndarray, d: np.ndarray, k: int, ceiling, floor, exclude) -> tuple[np.ndarray, np.ndarray]:
    """faiss IndexFlatIP over everything, then the same filtering in numpy."""
    index = faiss.IndexFlatIP(d.shape[1])
    index.add(d)
    scores, ids = index.search(q, d.shape[0])
    out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(q), k), -1, dtype=np.int64)
    for r in range(len(q)):
        keep = np.ones(d.shape[0], dtype=bool)
        if ceiling is not None:
            keep &= scores[r] <= ceiling[r]
        if floor is not None:
            keep &= scores[r] >= floor[r]
        keep &= ~np.isin(ids[r], exclude[r])
        s, i = scores[r][keep], ids[r][keep]
        order = np.lexsort((i, -s))[:k]
        out_s[r, : len(order)], out_i[r, : len(order)] = s[order], i[order]
    return out_s, out_i


@pytest.mark.parametrize("seed", range(6))
def test_exact_search_matches_faiss_plus_filtering(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_q, n_d, dim, k = 37, 1500, 24, 25
    q = rng.standard_normal((n_q, dim)).astype(np.float32)
    d = rng.standard_normal((n_d, dim)).astype(np.float32)
    ceiling = np.quantile(q @ d.T, 0.99, axis=1).astype(np.float32)
    floor = np.full(n_q, -1e9 if seed % 2 else 2.0, dtype=np.float32)
    exclude = [rng.choice(n_d, size=3, replace=False) for _ in range(n_q)]
    got_s, got_i = exact_search(q, d, k, ceiling=ceiling, floor=floor, exclude=exclude)
    want_s, want_i = _oracle(q, d, k, ceiling, floor, exclude)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-4)
    # Ids agree except where two scores are equal up to float rounding (GEMM vs faiss summation order).
    same = got_i == want_i
    assert same.mean() > 0.99
    for r, c in zip(*np.nonzero(~same)):
        assert abs(float(got_s[r, c]) - float(want_s[r, c])) < 1e-4


def test_exact_search_small_blocks_equal_one_block_and_count_ceiling() -> None:
    rng = np.random.default_rng(1)
    q = rng.integers(-2, 3, size=(9, 5)).astype(np.float32)  # integer scores: many exact ties
    d = rng.integers(-2, 3, size=(300, 5)).astype(np.float32)
    ceiling = np.full(9, 3.0, dtype=np.float32)
    a = exact_search_counts(q, d, 40, ceiling=ceiling, doc_block_size=7, query_block_size=4)
    b = exact_search_counts(q, d, 40, ceiling=ceiling, doc_block_size=1000, query_block_size=100)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.above_ceiling, ((q @ d.T) > 3.0).sum(axis=1))
    want_s, want_i = _oracle(q, d, 40, ceiling, None, [[] for _ in range(9)])
    np.testing.assert_array_equal(a.ids, want_i)  # ties to the lower id, like the oracle's lexsort


def test_exclusions_covering_everything_pad() -> None:
    d = np.eye(4, dtype=np.float32)
    s, i = exact_search(d[:2], d, 3, exclude=(np.array([0, 4, 4]), np.arange(4)))
    assert i.tolist() == [[-1, -1, -1], [1, 0, 2]]
    assert np.isneginf(s[0]).all()


def test_exact_search_rejects_bad_input() -> None:
    d = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="dimension"):
        exact_search(np.ones((1, 2), np.float32), d, 1)
    with pytest.raises(ValueError, match="2-D"):
        exact_search(np.ones(3, np.float32), d, 1)
    with pytest.raises(ValueError, match="ceiling must have one value per query"):
        exact_search(d, d, 1, ceiling=np.ones(2))
    with pytest.raises(ValueError, match="one id list per query"):
        exact_search(d, d, 1, exclude=[[0]])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        exact_search(d, d, 0)


@pytest.mark.parametrize("spec", ["flat", "hnsw", "ivf", "IVF8,Flat"])
def test_faiss_indexes_filter_like_exact(spec: str) -> None:
    rng = np.random.default_rng(3)
    d = rng.standard_normal((2000, 16)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    q = d[:20] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    ceiling = np.quantile(q @ d.T, 0.995, axis=1).astype(np.float32)
    exclude = to_csr([rng.choice(2000, size=5, replace=False) for _ in range(20)], 20)
    config = SearchConfig(index=spec, nprobe=64)
    index = build_index(d, config)
    assert isinstance(index, FaissIndex)
    got = index.search(q, 30, ceiling=ceiling, exclude=exclude)
    want = ExactIndex(d).search(q, 30, ceiling=ceiling, exclude=exclude)
    assert (got.ids >= 0).all()
    for r in range(20):
        assert not np.isin(got.ids[r], exclude[1][exclude[0][r] : exclude[0][r + 1]]).any()
        assert (got.scores[r] <= ceiling[r]).all()
    recall = np.mean([len(set(got.ids[r]) & set(want.ids[r])) / 30 for r in range(20)])
    assert recall >= (1.0 if spec == "flat" else 0.9)
    if spec == "flat":
        np.testing.assert_array_equal(got.above_ceiling, want.above_ceiling)


def test_auto_picks_exact_for_small_corpora_and_bad_factory_is_clear() -> None:
    d = np.eye(8, dtype=np.float32)
    assert isinstance(build_index(d, SearchConfig(index="auto")), ExactIndex)
    with pytest.raises(ValueError, match="faiss cannot build index"):
        build_index(d, SearchConfig(index="NotAnIndex,Flat"))
