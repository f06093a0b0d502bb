"""Class imbalance without lying probabilities: undersampling with weights, prior correction, calibration.

A pointwise ranker trained on 1:r undersampled pairs learns the *sample's* base rate, not the world's: its
probabilities are too high by a known factor. Two ways to keep it honest, both supported here:

* correct after training: ``q = p / (p + (1 - p) / w)`` with ``w`` the rate at which negatives were kept
  (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads at Facebook") -> :func:`prior_correction`,
  and :func:`prior_correction_per_class` for a known sampling rate per class;
* or train with each row's sampling weight (inverse inclusion probability), which :func:`undersample` and
  :func:`undersample_file` write beside every kept row.

Then measure: :func:`expected_calibration_error`, :func:`brier_score`, :func:`reliability_curve`.

For training files over strata of queries, :func:`temperature_sampling` draws queries with stratum
probability proportional to ``n_h ** alpha`` (``alpha < 1`` oversamples rare query types) and returns the
weights that undo it, so that weighted averages still estimate the uniform-over-queries quantity.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from miner.errors import ConfigError, DataError

__all__ = [
    "prior_correction",
    "prior_correction_per_class",
    "Undersample",
    "undersample",
    "undersample_file",
    "expected_calibration_error",
    "brier_score",
    "ReliabilityCurve",
    "reliability_curve",
    "TemperatureSampling",
    "temperature_sampling",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BinStrategy = Literal["uniform", "quantile"]


# ----------------------------------------------------------------------------------------------------
# Prior correction


def _probabilities(p: npt.ArrayLike, name: str) -> F64:
    array = np.asarray(p, dtype=np.float64)
    if array.size and (np.isnan(array).any() or array.min() < 0.0 or array.max() > 1.0):
        bad = array[np.isnan(array) | (array < 0) | (array > 1)].reshape(-1)[0]
        raise ValueError(f"{name} must be probabilities in [0, 1], got {bad!r}")
    return array


def _rates(w: npt.ArrayLike, name: str) -> F64:
    array = np.asarray(w, dtype=np.float64)
    if array.size and not (np.isfinite(array).all() and (array > 0).all()):
        bad = array[~np.isfinite(array) | (array <= 0)].reshape(-1)[0]
        raise ValueError(f"{name} must be a sampling rate > 0 (the fraction of that class kept), got {bad!r}")
    return array


def prior_correction(p: npt.ArrayLike, w: npt.ArrayLike, *, positive_rate: npt.ArrayLike = 1.0) -> F64:
    """Undo the prior shift of a classifier trained on undersampled negatives.

    ``q = p / (p + (1 - p) / w)``: a model trained on data where only a fraction ``w`` of the negatives was
    kept over-predicts the positive class; ``q`` is its probability under the original class balance
    (He et al. 2014). With positives also sampled at ``positive_rate`` the general binary form is
    ``q = (p / r1) / (p / r1 + (1 - p) / w)``.

    Args:
        p: predicted probabilities of the positive class, any shape.
        w: rate at which negatives were kept (0 < w; 1 = no undersampling), a scalar or an array that
            broadcasts against ``p`` (e.g. a per-row rate from per-query undersampling).
        positive_rate: rate at which positives were kept (> 1 means they were oversampled).

    Returns:
        float64 array of corrected probabilities, the broadcast shape of ``p`` and ``w``.

    Example:
        >>> prior_correction([0.5, 0.2], 0.01).round(5).tolist()
        [0.0099, 0.00249]
    """
    p = _probabilities(p, "p")
    w = _rates(w, "w")
    r1 = _rates(positive_rate, "positive_rate")
    pos = p / r1
    with np.errstate(invalid="ignore"):
        q = pos / (pos + (1.0 - p) / w)
    return np.where(pos > 0, q, 0.0)


def prior_correction_per_class(probs: npt.ArrayLike, rates: npt.ArrayLike) -> F64:
    """The general form: class ``c`` was sampled at rate ``rates[c]``; ``q_c ∝ p_c / rates[c]``, renormalised.

    Args:
        probs: float[n, C] predicted class probabilities (rows sum to 1).
        rates: float[C] sampling rate of each class (or float[n, C] per row).

    Returns:
        float64[n, C] corrected probabilities; for C = 2 and rates ``(w, 1)`` column 1 equals
        :func:`prior_correction`.
    """
    p = _probabilities(probs, "probs")
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, n_classes), got shape {p.shape}")
    r = _rates(rates, "rates")
    if r.shape not in {(p.shape[1],), p.shape}:
        raise ValueError(f"rates must have one value per class, shape ({p.shape[1]},) or {p.shape}; got {r.shape}")
    scaled = p / r
    total = scaled.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("every row of probs needs a positive probability somewhere")
    return scaled / total


# ----------------------------------------------------------------------------------------------------
# Undersampling


@dataclass(frozen=True)
class Undersample:
    """Rows kept by :func:`undersample`, each with its inclusion probability and weight.

    ``negative_rate`` is the fraction of negatives kept overall: the ``w`` of :func:`prior_correction` when
    sampling was global (with ``groups`` it is the overall fraction, and ``keep_probability`` per row is the
    exact rate of that row's group).
    """

    rows: I64  # int64[m]: kept row indices, ascending
    keep_probability: F64  # float64[m]
    weights: F64  # float64[m] = 1 / keep_probability
    negative_rate: float
    positives: int
    negatives_kept: int
    negatives_total: int


def _row_rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def undersample(
    labels: npt.ArrayLike,
    ratio: float,
    *,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> Undersample:
    """Keep every positive and ``ratio`` negatives per positive, drawn uniformly without replacement.

    Args:
        labels: int[n] 1 for a positive row, 0 for a negative row.
        ratio: negatives kept per positive (a 1:r sample); every negative is kept where there are fewer.
        groups: a key per row (e.g. the query id); when given, each group keeps ``ratio`` negatives per
            positive of its own, so no query loses all its negatives. Without it the draw is global, so
            every negative has the same inclusion probability ``w`` (what :func:`prior_correction` assumes).
        seed: seeds the draw (per group, keyed by the group's name, when ``groups`` is given).

    Returns:
        An :class:`Undersample` with the kept rows and each row's weight ``1 / inclusion probability``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {np.unique(y)[~np.isin(np.unique(y), (0, 1))][0]!r}")
    if not np.isfinite(ratio) or ratio <= 0:
        raise ConfigError(f"ratio (negatives per positive) must be > 0, got {ratio!r}")
    n = len(y)
    prob = np.ones(n, dtype=np.float64)
    keep = y == 1
    if groups is None:
        neg = np.flatnonzero(y == 0)
        k = min(len(neg), int(round(ratio * int(keep.sum()))))
        chosen = np.random.default_rng(seed).choice(neg, size=k, replace=False) if k else np.zeros(0, np.int64)
        keep[chosen] = True
        if len(neg):
            prob[neg] = k / len(neg)
    else:
        if len(groups) != n:
            raise ValueError(f"groups must hold one key per row: got {len(groups)} for {n} rows")
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(str(g), []).append(i)
        for g in sorted(by_group):
            rows = np.asarray(by_group[g], dtype=np.int64)
            neg = rows[y[rows] == 0]
            k = min(len(neg), int(round(ratio * int((y[rows] == 1).sum()))))
            if k:
                keep[_row_rng(seed, g).choice(neg, size=k, replace=False)] = True
            if len(neg):
                prob[neg] = k / len(neg)
    rows = np.flatnonzero(keep).astype(np.int64)
    n_neg = int((y == 0).sum())
    kept_neg = int((y[rows] == 0).sum())
    return Undersample(
        rows=rows,
        keep_probability=prob[rows],
        weights=1.0 / prob[rows],
        negative_rate=kept_neg / n_neg if n_neg else 1.0,
        positives=int((y == 1).sum()),
        negatives_kept=kept_neg,
        negatives_total=n_neg,
    )


def undersample_file(
    src: str | Path,
    out: str | Path,
    ratio: float,
    *,
    per_query: bool = False,
    seed: int = 0,
) -> Undersample:
    """Undersample a labeled-pair file (``miner mine --format labeled-pair``) to 1:``ratio``.

    Writes ``out`` (Parquet or JSONL by suffix) with the kept rows, in their original order, plus two
    columns: ``keep_probability`` and ``sampling_weight`` (its inverse), and ``<out>.manifest.json`` with
    the negative keep rate ``w`` to pass to :func:`prior_correction`.

    Args:
        src: a labeled-pair file with ``query_id`` and ``label`` columns.
        out: the output file, ``.parquet`` or ``.jsonl``.
        ratio: negatives kept per positive.
        per_query: keep ``ratio`` negatives per positive within each query (weights then differ by query).
        seed: seeds the draw.
    """
    from miner.write import read_rows

    src, out = Path(src), Path(out)
    if out.suffix not in {".parquet", ".jsonl"}:
        raise ConfigError(f"out must end in .parquet or .jsonl, got {out.name!r}")
    if not src.is_file():
        raise DataError(f"{src} not found")
    rows = read_rows(src)
    if not rows or "label" not in rows[0] or "query_id" not in rows[0]:
        columns = ", ".join(rows[0]) if rows else "(no rows)"
        raise DataError(f"{src}: not a labeled-pair file (needs query_id and label columns); columns: {columns}")
    labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    groups = [str(r["query_id"]) for r in rows] if per_query else None
    sample = undersample(labels, ratio, groups=groups, seed=seed)
    kept = []
    for i, p, wt in zip(sample.rows.tolist(), sample.keep_probability.tolist(), sample.weights.tolist()):
        kept.append({**rows[i], "keep_probability": p, "sampling_weight": wt})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(kept), tmp)
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in kept:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    manifest = {
        "source": str(src),
        "ratio": ratio,
        "per_query": per_query,
        "seed": seed,
        "rows": len(kept),
        "positives": sample.positives,
        "negatives_kept": sample.negatives_kept,
        "negatives_total": sample.negatives_total,
        "negative_rate": sample.negative_rate,
        "prior_correction": "q = p / (p + (1 - p) / negative_rate)"
        + ("" if not per_query else "; per row use w = keep_probability of its negatives' query"),
    }
    out.with_name(out.name + ".manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return sample


# ----------------------------------------------------------------------------------------------------
# Calibration metrics


def _binary_inputs(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike, sample_weight: npt.ArrayLike | None
) -> tuple[F64, F64, F64]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = _probabilities(y_prob, "y_prob").reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_prob must have the same length, got {y.shape[0]} and {p.shape[0]}")
    if y.size == 0:
        raise ValueError("y_true is empty: calibration needs at least one example")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0/1 labels")
    if sample_weight is None:
        w = np.ones_like(p)
    else:
        w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if w.shape != p.shape:
            raise ValueError(f"sample_weight must have one value per example ({p.shape[0]}), got {w.shape[0]}")
        if not (np.isfinite(w).all() and (w >= 0).all()) or w.sum() <= 0:
            raise ValueError("sample_weight must be finite, >= 0 and not all zero")
    return y, p, w


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin calibration data; empty bins are dropped.

    Plot ``mean_predicted`` against ``observed`` (the diagonal is perfect calibration); ``weight`` is the
    (weighted) number of examples in each bin.
    """

    bin_lower: F64  # float64[b]
    bin_upper: F64  # float64[b]
    mean_predicted: F64  # float64[b]
    observed: F64  # float64[b]: (weighted) fraction of positives
    weight: F64  # float64[b]
    count: I64  # int64[b]: examples, unweighted

    def to_dict(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).tolist() for name in
                ("bin_lower", "bin_upper", "mean_predicted", "observed", "weight", "count")}


def _edges(p: F64, n_bins: int, strategy: str) -> F64:
    if not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0.0, 1.0, n_bins + 1)))
        edges[0], edges[-1] = 0.0, 1.0
        return edges if len(edges) > 1 else np.array([0.0, 1.0])
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def reliability_curve(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    n_bins: int = 15,
    strategy: BinStrategy = "uniform",
    sample_weight: npt.ArrayLike | None = None,
) -> ReliabilityCurve:
    """Mean prediction and observed positive rate per probability bin.

    Args:
        y_true: int[n] 0/1 labels.
        y_prob: float[n] predicted probability of the positive class.
        n_bins: number of bins.
        strategy: ``uniform`` (equal-width bins on [0, 1]) or ``quantile`` (equal-count bins; better for
            rare events, whose predictions crowd the lowest uniform bin).
        sample_weight: per-example weights, e.g. the sampling weights of an undersampled set, so that the
            curve describes the population the sample was drawn from.
    """
    y, p, w = _binary_inputs(y_true, y_prob, sample_weight)
    edges = _edges(p, n_bins, strategy)
    b = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    nb = len(edges) - 1
    weight = np.bincount(b, weights=w, minlength=nb)
    count = np.bincount(b, minlength=nb).astype(np.int64)
    pred = np.bincount(b, weights=w * p, minlength=nb)
    pos = np.bincount(b, weights=w * y, minlength=nb)
    keep = weight > 0
    return ReliabilityCurve(
        bin_lower=edges[:-1][keep],
        bin_upper=edges[1:][keep],
        mean_predicted=pred[keep] / weight[keep],
        observed=pos[keep] / weight[keep],
        weight=weight[keep],
        count=count[keep],
    )


def expected_calibration_error(
    y_true: npt.ArrayLike,
    y_prob: npt.ArrayLike,
    *,
    n_bins: int = 15,
    strategy: BinStrategy = "uniform",
    sample_weight: npt.ArrayLike | None = None,
) -> float:
    """ECE: the weight-averaged gap ``|mean prediction - observed rate|`` over the bins of
    :func:`reliability_curve` (same arguments).

    Example:
        >>> round(expected_calibration_error([0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9], n_bins=10), 6)
        0.1
    """
    curve = reliability_curve(y_true, y_prob, n_bins=n_bins, strategy=strategy, sample_weight=sample_weight)
    gap = np.abs(curve.mean_predicted - curve.observed)
    return float(np.sum(curve.weight * gap) / np.sum(curve.weight))


def brier_score(y_true: npt.ArrayLike, y_prob: npt.ArrayLike, *, sample_weight: npt.ArrayLike | None = None) -> float:
    """Mean squared error of the predicted probability against the 0/1 label (weighted if asked)."""
    y, p, w = _binary_inputs(y_true, y_prob, sample_weight)
    return float(np.sum(w * (p - y) ** 2) / np.sum(w))


# ----------------------------------------------------------------------------------------------------
# Temperature-balanced query sampling


@dataclass(frozen=True)
class TemperatureSampling:
    """Sampling probabilities over queries, and the weights that undo them.

    ``probability[i]`` is query i's chance per draw (stratum share ``∝ n_h ** alpha``, uniform within the
    stratum); ``weight[i] = (1 / n) / probability[i]``, so that for any per-query quantity ``f``,
    ``E_draw[weight * f]`` equals the plain mean of ``f`` over all queries.
    """

    strata: list[str]  # the distinct strata, sorted
    sizes: I64  # int64[h]: queries per stratum
    stratum_probability: F64  # float64[h]: share of draws per stratum
    probability: F64  # float64[n]: per query
    weight: F64  # float64[n]: per query

    def sample(self, size: int, *, seed: int = 0) -> tuple[I64, F64]:
        """Draw ``size`` query indices with replacement; returns ``(indices int64[size], weights float64[size])``."""
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        idx = np.random.default_rng(seed).choice(len(self.probability), size=size, replace=True, p=self.probability)
        return idx.astype(np.int64), self.weight[idx]


def temperature_sampling(strata: Sequence[str], alpha: float) -> TemperatureSampling:
    """Temperature-balanced sampling of queries across strata: ``P(stratum h) ∝ n_h ** alpha``.

    ``alpha = 1`` is uniform over queries (no rebalancing), ``alpha = 0`` gives every stratum the same
    share, values in between oversample rare query types while keeping some of the natural mix (the
    multilingual-pretraining recipe).

    Args:
        strata: the stratum of each query.
        alpha: temperature exponent, 0 <= alpha <= 1.
    """
    if not (0.0 <= alpha <= 1.0):
        raise ConfigError(f"alpha must be in [0, 1] (1 = no rebalancing, 0 = equal strata), got {alpha!r}")
    if len(strata) == 0:
        raise ValueError("strata is empty: there are no queries to sample")
    names, inverse, sizes = np.unique(np.asarray([str(s) for s in strata]), return_inverse=True, return_counts=True)
    share = sizes.astype(np.float64) ** alpha
    share /= share.sum()
    probability = share[inverse] / sizes[inverse]
    weight = (1.0 / len(strata)) / probability
    return TemperatureSampling(names.tolist(), sizes.astype(np.int64), share, probability, weight)
