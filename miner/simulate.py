"""A simulation with a known base rate: what undersampling does to calibration, and what undoes it.

Data come from a known logistic model with a rare positive class (0.5% by default). Four models are fitted
by logistic regression (Newton / IRLS, in numpy) and scored on a fresh sample of the *true* distribution:

* ``full``: every training row (the reference);
* ``undersampled``: all positives and ``ratio`` negatives per positive (:func:`miner.calibrate.undersample`);
* ``corrected``: the undersampled model's probabilities through :func:`miner.prior_correction` with the
  negative keep rate ``w``;
* ``weighted``: fitted on the undersampled rows with their sampling weights (inverse inclusion probability).

``python -m miner.simulate`` prints the table that the README shows; the test suite asserts on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from miner.calibrate import brier_score, expected_calibration_error, prior_correction, undersample

__all__ = ["SimulationResult", "fit_logistic", "simulate_undersampling"]

F64 = npt.NDArray[np.float64]


def _sigmoid(z: F64) -> F64:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def fit_logistic(x: F64, y: F64, *, sample_weight: F64 | None = None, iterations: int = 50) -> F64:
    """Unpenalised (weighted) logistic regression by Newton's method; returns ``[intercept, *coef]``."""
    design = np.hstack([np.ones((len(x), 1)), x])
    w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    theta = np.zeros(design.shape[1])
    theta[0] = np.log((np.sum(w * y) + 0.5) / (np.sum(w * (1 - y)) + 0.5))
    for _ in range(iterations):
        p = _sigmoid(design @ theta)
        grad = design.T @ (w * (y - p))
        hess = (design * (w * p * (1 - p))[:, None]).T @ design
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(theta)), grad)
        theta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta


@dataclass(frozen=True)
class SimulationResult:
    """Calibration of the four models on the true distribution (see the module docstring)."""

    base_rate: float  # the true distribution's positive rate
    ratio: float  # negatives per positive in the undersampled set
    negative_rate: float  # w: fraction of negatives kept
    train_rows: int
    undersampled_rows: int
    test_rows: int
    ece: dict[str, float] = field(default_factory=dict)
    brier: dict[str, float] = field(default_factory=dict)
    mean_prediction: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def table(self) -> str:
        lines = ["| model | ECE | Brier | mean prediction |", "|---|---|---|---|"]
        for name in self.ece:
            lines.append(f"| {name} | {self.ece[name]:.4f} | {self.brier[name]:.5f} | {self.mean_prediction[name]:.4f} |")
        return "\n".join(lines)


def _intercept_for(base_rate: float, logits: F64) -> float:
    lo, hi = -30.0, 30.0
    for _ in range(100):  # bisection: the mean of sigmoid(b + logits) is increasing in b
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + logits).mean() < base_rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def simulate_undersampling(
    *,
    base_rate: float = 0.005,
    ratio: float = 4.0,
    train_rows: int = 400_000,
    test_rows: int = 400_000,
    n_features: int = 4,
    n_bins: int = 15,
    strategy: str = "uniform",
    seed: int = 0,
) -> SimulationResult:
    """Run the simulation; every number is a function of the arguments (seeded).

    Args:
        base_rate: the true positive rate.
        ratio: negatives kept per positive (1:ratio undersampling).
        train_rows, test_rows: sizes of the training sample and of the fresh test sample.
        n_features: standard-normal features of the true logistic model.
        n_bins, strategy: ECE bins (see :func:`miner.calibrate.expected_calibration_error`).
        seed: seeds the data, the labels and the undersampling.
    """
    if not 0.0 < base_rate < 0.5:
        raise ValueError(f"base_rate must be in (0, 0.5), got {base_rate}")
    rng = np.random.default_rng(seed)
    beta = np.linspace(1.2, 0.3, n_features)
    x_train = rng.standard_normal((train_rows, n_features))
    x_test = rng.standard_normal((test_rows, n_features))
    b0 = _intercept_for(base_rate, x_train @ beta)
    y_train = (rng.random(train_rows) < _sigmoid(b0 + x_train @ beta)).astype(np.float64)
    y_test = (rng.random(test_rows) < _sigmoid(b0 + x_test @ beta)).astype(np.float64)

    sample = undersample(y_train.astype(np.int64), ratio, seed=seed)
    xs, ys = x_train[sample.rows], y_train[sample.rows]
    design_test = np.hstack([np.ones((test_rows, 1)), x_test])
    full = _sigmoid(design_test @ fit_logistic(x_train, y_train))
    under = _sigmoid(design_test @ fit_logistic(xs, ys))
    weighted = _sigmoid(design_test @ fit_logistic(xs, ys, sample_weight=sample.weights))
    predictions = {
        "full": full,
        "undersampled": under,
        "corrected": prior_correction(under, sample.negative_rate),
        "weighted": weighted,
    }
    return SimulationResult(
        base_rate=float(y_test.mean()),
        ratio=ratio,
        negative_rate=sample.negative_rate,
        train_rows=train_rows,
        undersampled_rows=len(sample.rows),
        test_rows=test_rows,
        ece={k: expected_calibration_error(y_test, p, n_bins=n_bins, strategy=strategy)  # type: ignore[arg-type]
             for k, p in predictions.items()},
        brier={k: brier_score(y_test, p) for k, p in predictions.items()},
        mean_prediction={k: float(p.mean()) for k, p in predictions.items()},
    )


if __name__ == "__main__":
    for r in (1.0, 4.0, 20.0):
        result = simulate_undersampling(ratio=r)
        print(f"\n1:{r:g} undersampling (w = {result.negative_rate:.5f}, {result.undersampled_rows} of "
              f"{result.train_rows} training rows), test base rate {result.base_rate:.4f}\n")
        print(result.table())
