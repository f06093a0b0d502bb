"""Calibration under class imbalance: the known-base-rate simulation, prior correction, metrics, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import miner
from miner.calibrate import (
    brier_score,
    expected_calibration_error,
    prior_correction,
    prior_correction_per_class,
    reliability_curve,
    temperature_sampling,
    undersample,
    undersample_file,
)
from miner.errors import ConfigError
from miner.simulate import simulate_undersampling


# ----------------------------------------------------------------------------------------------------
# The simulation the issue asks for: 0.5% positives, a logistic model trained on 1:r undersampled data.


@pytest.mark.parametrize("ratio", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_prior_correction_restores_calibration_of_an_undersampled_model(ratio: float, seed: int) -> None:
    result = simulate_undersampling(base_rate=0.005, ratio=ratio, train_rows=200_000, test_rows=200_000, seed=seed)
    ece = result.ece
    assert abs(result.base_rate - 0.005) < 0.001
    assert ece["undersampled"] > 0.02, "undersampling should visibly break calibration"
    assert ece["corrected"] <= ece["undersampled"] / 3
    assert abs(ece["corrected"] - ece["full"]) <= 0.01
    # the corrected model predicts the true base rate on average; the uncorrected one the sample's
    assert result.mean_prediction["corrected"] == pytest.approx(result.base_rate, rel=0.15)
    sample_rate = 1.0 / (1.0 + ratio)
    assert result.mean_prediction["undersampled"] > 0.5 * sample_rate
    # training with the sampling weights is the other honest route
    assert abs(ece["weighted"] - ece["full"]) <= 0.01
    assert result.brier["corrected"] < result.brier["undersampled"]


def test_simulation_with_quantile_bins_agrees() -> None:
    result = simulate_undersampling(ratio=4.0, train_rows=200_000, test_rows=200_000, strategy="quantile", seed=3)
    assert result.ece["corrected"] <= result.ece["undersampled"] / 3
    assert abs(result.ece["corrected"] - result.ece["full"]) <= 0.01


# ----------------------------------------------------------------------------------------------------
# prior_correction


def test_prior_correction_formula_by_hand() -> None:
    # q = p / (p + (1 - p) / w)
    assert prior_correction(0.5, 0.1) == pytest.approx(0.5 / (0.5 + 0.5 / 0.1))
    assert prior_correction(0.2, 1.0) == pytest.approx(0.2)  # no undersampling, no change
    assert prior_correction([0.0, 1.0], 0.01).tolist() == [0.0, 1.0]
    assert miner.prior_correction is prior_correction


def test_prior_correction_is_vectorised_and_broadcasts() -> None:
    p = np.linspace(0.0, 1.0, 12).reshape(3, 4)
    w = np.array([0.1, 0.2, 0.5, 1.0])
    q = prior_correction(p, w)
    assert q.shape == (3, 4)
    expected = np.array([[prior_correction(float(p[i, j]), float(w[j])) for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(q, expected)


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(1e-4, 0.5),
    logit=st.floats(-8, 8),
    w=st.floats(1e-3, 1.0),
)
def test_prior_correction_inverts_the_prior_shift(base: float, logit: float, w: float) -> None:
    """Undersampling negatives at rate w turns true probability q into p = q / (q + w (1 - q)); correction undoes it."""
    q = 1.0 / (1.0 + np.exp(-logit))
    p = q / (q + w * (1.0 - q))
    assert prior_correction(p, w) == pytest.approx(q, rel=1e-9, abs=1e-12)
    # monotone: ranking is unchanged
    assert prior_correction(min(p * 1.01, 1.0), w) >= prior_correction(p, w)


def test_per_class_general_form_matches_the_binary_one() -> None:
    p = np.array([0.9, 0.5, 0.1, 0.0])
    two = prior_correction_per_class(np.stack([1 - p, p], axis=1), [0.05, 1.0])
    np.testing.assert_allclose(two[:, 1], prior_correction(p, 0.05))
    np.testing.assert_allclose(two.sum(axis=1), 1.0)
    # positives kept at rate 0.5 too: the general binary form
    np.testing.assert_allclose(prior_correction_per_class(np.stack([1 - p, p], axis=1), [0.05, 0.5])[:, 1],
                               prior_correction(p, 0.05, positive_rate=0.5))
    three = prior_correction_per_class([[0.2, 0.3, 0.5]], [1.0, 0.5, 0.25])
    np.testing.assert_allclose(three, [[0.2 / 2.8, 0.6 / 2.8, 2.0 / 2.8]])


@pytest.mark.parametrize(
    ("p", "w", "match"),
    [(1.5, 0.1, "p must be probabilities"), (np.nan, 0.1, "p must be probabilities"), (0.5, 0.0, "w must be"),
     (0.5, -1.0, "w must be")],
)
def test_prior_correction_rejects_bad_values(p: float, w: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prior_correction(p, w)


# ----------------------------------------------------------------------------------------------------
# Metrics


def test_ece_and_brier_by_hand() -> None:
    y = [0, 0, 1, 1]
    p = [0.1, 0.3, 0.6, 0.9]
    # 2 bins: [0, .5) holds 0.1, 0.3 (mean .2, observed 0); [.5, 1] holds .6, .9 (mean .75, observed 1)
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.25)
    assert brier_score(y, p) == pytest.approx((0.01 + 0.09 + 0.16 + 0.01) / 4)
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0
    # weights count examples: weight 2 equals duplicating the row
    dup = expected_calibration_error([0, 0, 0, 1, 1], [0.1, 0.3, 0.3, 0.6, 0.9], n_bins=2)
    assert expected_calibration_error(y, p, n_bins=2, sample_weight=[1, 2, 1, 1]) == pytest.approx(dup)


def test_reliability_curve_bins() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(20_000)
    y = (rng.random(20_000) < p).astype(int)  # calibrated by construction
    curve = reliability_curve(y, p, n_bins=10)
    assert len(curve.mean_predicted) == 10 and curve.count.sum() == 20_000
    np.testing.assert_allclose(curve.mean_predicted, curve.observed, atol=0.03)
    assert expected_calibration_error(y, p, n_bins=10) < 0.02
    q = reliability_curve(y, p, n_bins=4, strategy="quantile")
    assert np.all(np.abs(q.count - 5000) <= 1)
    assert set(curve.to_dict()) == {"bin_lower", "bin_upper", "mean_predicted", "observed", "weight", "count"}


def test_metric_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="same length"):
        brier_score([0, 1], [0.5])
    with pytest.raises(ValueError, match="0/1"):
        expected_calibration_error([0, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match="strategy"):
        reliability_curve([0, 1], [0.2, 0.8], strategy="log")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Undersampling


def test_undersample_keeps_every_positive_and_the_ratio() -> None:
    labels = np.array([1] * 10 + [0] * 1000)
    s = undersample(labels, 4, seed=1)
    assert (labels[s.rows] == 1).sum() == 10 and (labels[s.rows] == 0).sum() == 40
    assert s.negative_rate == pytest.approx(40 / 1000)
    np.testing.assert_allclose(s.weights[labels[s.rows] == 0], 1000 / 40)
    np.testing.assert_allclose(s.weights[labels[s.rows] == 1], 1.0)
    # weights reproduce the class counts of the full data
    assert s.weights[labels[s.rows] == 0].sum() == pytest.approx(1000)
    assert np.array_equal(undersample(labels, 4, seed=1).rows, s.rows)
    assert not np.array_equal(undersample(labels, 4, seed=2).rows, s.rows)


def test_undersample_per_group() -> None:
    labels = np.array([1, 0, 0, 0, 0, 0, 1, 1, 0, 0])
    groups = ["a"] * 6 + ["b"] * 4
    s = undersample(labels, 1, groups=groups, seed=0)
    kept = labels[s.rows]
    assert kept.sum() == 3
    a_neg = [i for i in s.rows if groups[i] == "a" and labels[i] == 0]
    b_neg = [i for i in s.rows if groups[i] == "b" and labels[i] == 0]
    assert len(a_neg) == 1 and len(b_neg) == 2  # b has only 2 negatives for 2 positives: all kept
    weight = dict(zip(s.rows.tolist(), s.weights.tolist()))
    assert weight[a_neg[0]] == pytest.approx(5.0) and weight[b_neg[0]] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="ratio"):
        undersample(labels, 0)


def test_undersample_file_writes_weights_and_rate(tmp_path: Path) -> None:
    src = tmp_path / "pairs.jsonl"
    rows = []
    for q in range(5):
        rows.append({"query_id": f"q{q}", "document_id": f"p{q}", "label": 1})
        rows += [{"query_id": f"q{q}", "document_id": f"n{q}-{i}", "label": 0} for i in range(20)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for suffix in (".jsonl", ".parquet"):
        out = tmp_path / f"under{suffix}"
        sample = undersample_file(src, out, 2.0, seed=0)
        back = miner.write.read_rows(out)
        assert len(back) == 15 and sum(r["label"] for r in back) == 5
        assert [r["sampling_weight"] for r in back if r["label"] == 0] == [pytest.approx(10.0)] * 10
        manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
        assert manifest["negative_rate"] == pytest.approx(0.1) == sample.negative_rate
    with pytest.raises(miner.DataError, match="not a labeled-pair file"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"query_id": "q", "positive": "x"}\n')
        undersample_file(bad, tmp_path / "o.jsonl", 1.0)


# ----------------------------------------------------------------------------------------------------
# Temperature-balanced query sampling


def test_temperature_sampling_probabilities_and_undoing_weights() -> None:
    strata = ["common"] * 90 + ["rare"] * 10
    flat = temperature_sampling(strata, 1.0)
    np.testing.assert_allclose(flat.probability, 0.01)
    np.testing.assert_allclose(flat.weight, 1.0)
    equal = temperature_sampling(strata, 0.0)
    np.testing.assert_allclose(equal.stratum_probability, [0.5, 0.5])
    half = temperature_sampling(strata, 0.5)
    share = np.array([90, 10]) ** 0.5
    np.testing.assert_allclose(half.stratum_probability, share / share.sum())
    assert half.probability.sum() == pytest.approx(1.0)
    # weights undo the sampling exactly in expectation: sum_i p_i w_i f_i = mean(f)
    f = np.arange(100, dtype=float) ** 1.5
    assert np.sum(half.probability * half.weight * f) == pytest.approx(f.mean())
    # and approximately on a draw
    idx, w = half.sample(200_000, seed=0)
    assert (np.asarray(strata)[idx] == "rare").mean() == pytest.approx(share[1] / share.sum(), abs=0.01)
    assert np.mean(w * f[idx]) == pytest.approx(f.mean(), rel=0.02)
    with pytest.raises(ConfigError, match="alpha"):
        temperature_sampling(strata, 1.5)
