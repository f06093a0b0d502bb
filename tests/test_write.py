"""Row building: the vectorised triplet columns against the row-by-row builder."""

from __future__ import annotations

import numpy as np
import pytest

from miner.config import OutputConfig
from miner.write import BatchRows, DocColumns, _rows_by_query, build_rows


def _batch(seed: int) -> BatchRows:
    rng = np.random.default_rng(seed)
    n_q, n_neg, n_docs = 7, 4, 30
    counts = rng.integers(0, 3, n_q)  # some queries without positives
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    neg_ids = rng.integers(0, n_docs, (n_q, n_neg)).astype(np.int64)
    fill = rng.integers(0, n_neg + 1, n_q)  # padding last, some rows all padding
    for r in range(n_q):
        neg_ids[r, fill[r]:] = -1
    return BatchRows(
        [f"q{r}" for r in range(n_q)], [f"query {r}" for r in range(n_q)], indptr,
        rng.integers(0, n_docs, indptr[-1]).astype(np.int64), rng.random(indptr[-1]).astype(np.float32),
        neg_ids, rng.random((n_q, n_neg)).astype(np.float32), rng.integers(0, 100, (n_q, n_neg)).astype(np.int64),
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("texts", [True, False])
def test_triplet_columns_equal_the_row_by_row_builder(seed: int, texts: bool) -> None:
    batch = _batch(seed)
    docs = DocColumns([f"d{i}" for i in range(30)], [f"text {i}" for i in range(30)])
    config = OutputConfig(format="triplet", texts=texts)
    got = build_rows(batch, docs, config)
    want = _rows_by_query(batch, docs, config)
    if not texts:
        want = {k: v for k, v in want.items() if k in got}
    assert list(got) == list(want)
    assert sum(np.diff(batch.pos_indptr) * (batch.neg_ids >= 0).sum(axis=1)) == len(got["query_id"])
    for name, column in got.items():
        values = column.to_pylist()
        if name.endswith("_score"):
            np.testing.assert_allclose(values, want[name], rtol=1e-6)
        else:
            assert values == want[name], name
