"""Selection rules against hand-computed cases (3-D unit vectors, so every score is checkable by eye)."""

from __future__ import annotations

import numpy as np
import pytest

from miner.config import SearchConfig, SelectConfig
from miner.data import Corpus
from miner.search import ExactIndex, FaissIndex
from miner.select import (
    DuplicateFinder,
    build_exclusions,
    ceilings,
    mine_batch,
    same_text_positives,
    select_negatives,
)


def test_ceilings_are_sign_aware_and_take_the_minimum() -> None:
    s = np.array([0.8, -0.5, np.inf], dtype=np.float32)
    got = ceilings(s, SelectConfig(relative_margin=0.1))
    np.testing.assert_allclose(got, [0.72, -0.55, np.inf], rtol=1e-6)
    got = ceilings(s, SelectConfig(relative_margin=0.1, absolute_margin=0.2, max_score=0.6))
    np.testing.assert_allclose(got, [0.6, -0.7, 0.6], rtol=1e-6)
    got = ceilings(s, SelectConfig(relative_margin=None))
    assert np.isinf(got).all()


# Query q = e1, so a document's score is its first coordinate. Document 0 is the positive.
DOCS = np.array(
    [
        [0.9, 0.4359, 0.0],  # 0 positive, score 0.9 -> ceiling 0.9 - 0.05 * 0.9 = 0.855
        [0.95, 0.0, 0.3122],  # 1 above the ceiling
        [0.85, 0.0, 0.5268],  # 2 valid, rank 0
        [0.8, 0.0, 0.6],  # 3 valid, ties with 4 -> lower id first, rank 1
        [0.8, 0.0, -0.6],  # 4 valid, rank 2
        [-0.5, 0.0, 0.866],  # 5 valid, rank 3
        [0.7, -0.714, 0.0],  # 6 same text as the positive (other case and spacing)
        [0.8, 0.6, 0.0],  # 7 near-duplicate of the positive: sim 0.72 + 0.2615 = 0.98
        [0.84, 0.0, -0.5426],  # 8 the query's own document (id "q1")
    ],
    dtype=np.float32,
)
TEXTS = ["The Positive.", "a", "b", "c", "d", "e", "the   positive.", "f", "g"]
IDS = ["p", "d1", "d2", "d3", "d4", "d5", "dup", "near", "q1"]


def _mine(config: SelectConfig, query_texts: list[str] | None = None):
    corpus = Corpus(IDS, TEXTS)
    index = ExactIndex(DOCS, SearchConfig(doc_block_size=4))  # several blocks on purpose
    dups = DuplicateFinder(corpus.normalized_keys)
    q = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    from miner.data import same_text_keys

    texts = query_texts or ["what is the query"]
    return mine_batch(
        q,
        ["q1"],
        same_text_keys(texts),
        np.array([0, 1], dtype=np.int64),
        np.array([0], dtype=np.int64),
        docs=DOCS,
        index=index,
        doc_index=corpus.index,
        doc_keys=corpus.normalized_keys,
        duplicates=dups,
        config=config,
    )


def test_hand_computed_case_top() -> None:
    neg, stats = _mine(SelectConfig(num_negatives=3))
    assert neg.ids.tolist() == [[2, 3, 4]]
    assert neg.ranks.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(neg.scores, [[0.85, 0.8, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(neg.ceiling, [0.855], rtol=1e-6)
    assert stats.skipped == {
        "positive": 1,
        "own_document": 1,
        "duplicate_text": 1,
        "near_duplicate": 1,
        "above_ceiling": 1,
    }
    assert stats.negatives == 3 and stats.short_queries == 0


def test_rank_window_and_short_windows() -> None:
    neg, _ = _mine(SelectConfig(num_negatives=3, range_min=1, range_max=100))
    assert neg.ids.tolist() == [[3, 4, 5]]
    assert neg.ranks.tolist() == [[1, 2, 3]]
    # A window of two ranks cannot give three negatives: two, padded, and the query counts as short.
    neg, stats = _mine(SelectConfig(num_negatives=3, range_min=0, range_max=2))
    assert neg.ids.tolist() == [[2, 3, -1]]
    assert np.isnan(neg.scores[0, 2]) and neg.ranks[0, 2] == -1
    assert stats.short_queries == 1 and stats.negatives == 2
    # Fewer valid candidates than asked for.
    neg, stats = _mine(SelectConfig(num_negatives=10))
    assert neg.ids[0, :4].tolist() == [2, 3, 4, 5] and (neg.ids[0, 4:] == -1).all()


def test_switches_turn_rules_off() -> None:
    # No margin: the above-ceiling document and nothing else comes back.
    neg, stats = _mine(SelectConfig(num_negatives=2, relative_margin=None))
    assert neg.ids.tolist() == [[1, 2]] and stats.skipped["above_ceiling"] == 0
    # No near-duplicate check: document 7 (score 0.8, id 7) ranks after 3 and 4.
    neg, _ = _mine(SelectConfig(num_negatives=4, dup_threshold=None))
    assert neg.ids.tolist() == [[2, 3, 4, 7]]
    # Keeping the own document: document 8 (0.84) ranks right after 2.
    neg, _ = _mine(SelectConfig(num_negatives=2, exclude_own_document=False))
    assert neg.ids.tolist() == [[2, 8]]
    # max_score and min_score bound the candidates.
    neg, _ = _mine(SelectConfig(num_negatives=5, relative_margin=None, max_score=0.82, min_score=0.0))
    assert neg.ids.tolist() == [[3, 4, -1, -1, -1]]


def test_own_document_by_text() -> None:
    # A query whose text equals document 3's text ("c") excludes document 3 as its own document.
    neg, stats = _mine(SelectConfig(num_negatives=2), query_texts=["  C "])
    assert neg.ids.tolist() == [[2, 4]]
    assert stats.skipped["own_document"] == 2  # by id (8) and by text (3)


def test_everything_excluded_gives_no_negatives() -> None:
    docs = np.eye(3, dtype=np.float32)
    corpus = Corpus(["a", "b", "c"], ["x", "y", "z"])
    index = ExactIndex(docs)
    dups = DuplicateFinder(corpus.normalized_keys)
    neg, stats = mine_batch(
        np.ones((1, 3), dtype=np.float32),
        ["q"],
        np.zeros(1, dtype=np.int64),
        np.array([0, 3], dtype=np.int64),
        np.array([0, 1, 2], dtype=np.int64),
        docs=docs,
        index=index,
        doc_index=corpus.index,
        doc_keys=corpus.normalized_keys,
        duplicates=dups,
        config=SelectConfig(num_negatives=2),
    )
    assert (neg.ids == -1).all()
    assert stats.empty_queries == 1 and stats.skipped["positive"] == 3


def _pool(n_valid: int, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((1, k), -1, dtype=np.int64)
    scores = np.full((1, k), -np.inf, dtype=np.float32)
    ids[0, :n_valid] = np.arange(100, 100 + n_valid)
    scores[0, :n_valid] = np.linspace(0.9, 0.1, n_valid)
    return ids, scores


def test_spread_sampling_is_evenly_spaced() -> None:
    ids, scores = _pool(9)
    got, _, ranks = select_negatives(ids, scores, ["q"], SelectConfig(num_negatives=3, sampling="spread", range_max=20))
    assert ranks.tolist() == [[0, 4, 8]] and got.tolist() == [[100, 104, 108]]


def test_random_sampling_is_seeded_per_query_and_stays_in_window() -> None:
    ids, scores = _pool(20)
    config = SelectConfig(num_negatives=4, sampling="random", range_min=5, range_max=15, seed=7)
    a = select_negatives(ids, scores, ["q"], config)[2]
    b = select_negatives(ids, scores, ["q"], config)[2]
    assert a.tolist() == b.tolist()
    assert ((a >= 5) & (a < 15)).all() and (np.diff(a) > 0).all()
    draws = {tuple(select_negatives(ids, scores, ["q"], SelectConfig(
        num_negatives=4, sampling="random", range_min=5, range_max=15, seed=s))[2][0]) for s in range(10)}
    assert len(draws) > 1  # the seed matters
    # The same query draws the same negatives whatever batch it is in.
    ids2, scores2 = np.vstack([_pool(20)[0], ids]), np.vstack([_pool(20)[1], scores])
    both = select_negatives(ids2, scores2, ["other", "q"], config)[2]
    assert both[1].tolist() == a[0].tolist()


def test_prefer_judged_takes_judged_negatives_first() -> None:
    ids, scores = _pool(10)
    judged = [(np.array([105, 999], dtype=np.int64), np.array([0.3, 0.5], dtype=np.float32))]
    got, sc, ranks = select_negatives(ids, scores, ["q"], SelectConfig(num_negatives=3, prefer_judged=True),
                                      judged=judged)
    # Judged first, hardest first (999 is outside the pool: rank -1), then the pool's best not yet taken.
    assert got.tolist() == [[999, 105, 100]]
    assert ranks.tolist() == [[-1, 5, 0]]


def test_build_exclusions_priority() -> None:
    corpus = Corpus(IDS, TEXTS)
    dups = DuplicateFinder(corpus.normalized_keys)
    ptr, ids, reason = build_exclusions(
        ["q1"], np.zeros(1, dtype=np.int64), np.array([0, 1]), np.array([0]),
        doc_index=corpus.index, doc_keys=corpus.normalized_keys, duplicates=dups,
    )
    got = dict(zip(ids.tolist(), reason.tolist()))
    assert got == {0: 0, 8: 1, 6: 2}  # near-duplicates are found among the candidates, not listed here
    assert ptr.tolist() == [0, 3]


@pytest.mark.parametrize("seed", range(5))
def test_build_exclusions_matches_a_per_query_reference(seed: int) -> None:
    """The vectorised CSR equals a plain loop: per query, the positives (0), documents with the query's text or
    id (1) and documents with a positive's text (2), each document once under its highest-priority reason."""
    rng = np.random.default_rng(seed)
    n_docs, n_q = 60, 25
    doc_keys = rng.integers(0, 20, n_docs)  # many shared texts
    query_keys = rng.integers(10, 40, n_q)  # some queries share a text with documents
    doc_ids = [f"d{i}" for i in range(n_docs)]
    query_ids = [f"d{rng.integers(0, n_docs)}" if rng.random() < 0.3 else f"q{i}" for i in range(n_q)]
    counts = rng.integers(0, 4, n_q)
    pos_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    pos_ids = rng.integers(0, n_docs, pos_indptr[-1]).astype(np.int64)
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    ptr, ids, reason = build_exclusions(query_ids, query_keys, pos_indptr, pos_ids, doc_index=doc_index,
                                        doc_keys=doc_keys, duplicates=DuplicateFinder(doc_keys))
    for r in range(n_q):
        want: dict[int, int] = {}
        for d in sorted(pos_ids[pos_indptr[r] : pos_indptr[r + 1]].tolist()):
            want.setdefault(d, 0)
        for d in range(n_docs):
            if doc_keys[d] == query_keys[r] or doc_ids[d] == query_ids[r]:
                want.setdefault(d, 1)
        for p in pos_ids[pos_indptr[r] : pos_indptr[r + 1]].tolist():
            for d in range(n_docs):
                if doc_keys[d] == doc_keys[p]:
                    want.setdefault(d, 2)
        got_ids = ids[ptr[r] : ptr[r + 1]].tolist()
        assert got_ids == sorted(want)
        assert dict(zip(got_ids, reason[ptr[r] : ptr[r + 1]].tolist())) == want


@pytest.mark.parametrize("bad", [{"range_min": 5, "range_max": 5}, {"num_negatives": 0}, {"sampling": "best"},
                                 {"relative_margin": -0.1}, {"min_score": 0.9, "max_score": 0.1}])
def test_bad_settings_are_rejected_with_the_value(bad: dict) -> None:
    with pytest.raises(ValueError) as err:
        SelectConfig(**bad)
    assert any(str(v) in str(err.value) for v in bad.values())


def _oracle(q_emb, docs, pos, config, extra_pos=None):
    """Brute force over the whole corpus: the top range_max valid ids per query, ties to the lower id."""
    out = []
    for r, positives in enumerate(pos):
        excluded = set(positives) | set(extra_pos[r] if extra_pos else [])
        scores = docs @ q_emb[r]
        ref = min(scores[p] for p in positives)
        ceiling = np.inf if config.relative_margin is None else ref - config.relative_margin * abs(ref)
        near = (docs @ docs[sorted(excluded)].T >= config.dup_threshold).any(axis=1)
        valid = [i for i in range(len(docs)) if i not in excluded and not near[i] and scores[i] <= ceiling]
        valid.sort(key=lambda i: (-scores[i], i))
        out.append(valid[: config.range_max])
    return out


@pytest.mark.parametrize("index_kind", ["exact", "flat"])
@pytest.mark.parametrize("seed", range(4))
def test_near_duplicates_among_candidates_match_a_corpus_wide_oracle(seed: int, index_kind: str) -> None:
    """Positives with many near-copies close to the query: the pool loses them and must be refetched deeper."""
    rng = np.random.default_rng(seed)
    d, n_q = 16, 6
    base = rng.standard_normal((60, d)).astype(np.float32)
    pos_vecs = rng.standard_normal((n_q, d)).astype(np.float32)
    copies = np.repeat(pos_vecs, 12, axis=0) + 0.05 * rng.standard_normal((n_q * 12, d)).astype(np.float32)
    docs = np.vstack([base, pos_vecs, copies])
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    q_emb = docs[60 : 60 + n_q] + 0.6 * rng.standard_normal((n_q, d)).astype(np.float32)
    q_emb /= np.linalg.norm(q_emb, axis=1, keepdims=True)
    q_emb = q_emb.astype(np.float32)
    pos = [[60 + r] for r in range(n_q)]
    config = SelectConfig(num_negatives=5, range_max=8, relative_margin=None if seed % 2 else 0.0, dup_threshold=0.95)
    corpus = Corpus([f"d{i}" for i in range(len(docs))], [f"text {i}" for i in range(len(docs))])
    index = ExactIndex(docs, SearchConfig(doc_block_size=32)) if index_kind == "exact" else FaissIndex(docs, "flat")
    neg, stats = mine_batch(
        q_emb, [f"q{r}" for r in range(n_q)], np.arange(n_q, dtype=np.int64),
        np.arange(n_q + 1, dtype=np.int64), np.array([p[0] for p in pos], dtype=np.int64),
        docs=docs, index=index, doc_index=corpus.index, doc_keys=corpus.normalized_keys,
        duplicates=DuplicateFinder(corpus.normalized_keys), config=config,
    )
    expected = _oracle(q_emb, docs, pos, config)
    assert neg.ids.tolist() == [row[:5] + [-1] * (5 - len(row[:5])) for row in expected]
    assert stats.skipped["near_duplicate"] > 0  # the copies did crowd the pools


def test_positives_of_a_same_text_query_are_excluded() -> None:
    # Two ids with one text: q1's positive is 0, q2's positive is 2 (score 0.85, the best candidate otherwise).
    ptr, ids = same_text_positives(np.array([5, 5], dtype=np.int64), np.array([0, 1, 2]), np.array([0, 2]))
    assert ptr.tolist() == [0, 2, 4] and ids.tolist() == [0, 2, 0, 2]
    corpus = Corpus(IDS, TEXTS)
    q = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    common = dict(docs=DOCS, index=ExactIndex(DOCS), doc_index=corpus.index, doc_keys=corpus.normalized_keys,
                  duplicates=DuplicateFinder(corpus.normalized_keys), config=SelectConfig(num_negatives=2))
    args = (q, ["x1", "x2"], np.array([5, 5], dtype=np.int64), np.array([0, 1, 2]), np.array([0, 2]))
    alone, _ = mine_batch(*args, **common)
    assert 2 in alone.ids[0].tolist()  # without pooling, q1 gets q2's positive as a negative
    pooled, stats = mine_batch(*args, **common, excluded_positives=(ptr, ids))
    assert 2 not in pooled.ids.ravel().tolist() and 0 not in pooled.ids.ravel().tolist()
    assert stats.skipped["positive"] == 4
    np.testing.assert_array_equal(pooled.reference, alone.reference)  # the ceiling stays the query's own


def test_an_empty_batch_gives_empty_arrays() -> None:
    corpus = Corpus(IDS, TEXTS)
    neg, stats = mine_batch(
        np.zeros((0, 3), dtype=np.float32), [], np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64),
        np.zeros(0, dtype=np.int64), docs=DOCS, index=ExactIndex(DOCS), doc_index=corpus.index,
        doc_keys=corpus.normalized_keys, duplicates=DuplicateFinder(corpus.normalized_keys), config=SelectConfig(),
    )
    assert neg.ids.shape == (0, 5) and stats.queries == 0 and stats.negatives == 0
