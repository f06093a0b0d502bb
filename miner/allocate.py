"""Sample sizes per stratum for a query budget, and the seeded stratified draw.

Allocation (Cochran, *Sampling Techniques*, ch. 5): the budget ``n`` is split over strata of sizes ``N_h``

* ``proportional``: ``n_h ∝ N_h`` (the sample mirrors the population);
* ``equal``: the same ``n_h`` everywhere (rare strata measured as well as common ones);
* ``neyman``: ``n_h ∝ N_h * S_h`` with ``S_h`` the pilot standard deviation of the metric in stratum h
  (the smallest variance of the population estimate for the budget);

each subject to ``min(minimum, N_h) <= n_h <= N_h``. A stratum smaller than the minimum is taken whole and
reported as too small; it is never merged into another. Within a stratum queries are drawn by simple
random sampling without replacement, so a query's inclusion probability is ``n_h / N_h`` and its weight
``N_h / n_h``; the weights of a stratum sum to ``N_h`` and all weights to the population size.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from miner.errors import ConfigError

__all__ = ["Allocation", "ALLOCATIONS", "StratumPlan", "allocate", "stratified_sample", "pilot_variances"]

Allocation = Literal["proportional", "equal", "neyman"]
ALLOCATIONS: tuple[str, ...] = ("proportional", "equal", "neyman")


@dataclass(frozen=True)
class StratumPlan:
    """One stratum's share of the budget."""

    name: str
    population: int  # N_h
    sample: int  # n_h
    too_small: bool  # N_h < the minimum per stratum: taken whole

    @property
    def inclusion_probability(self) -> float:
        return self.sample / self.population

    @property
    def weight(self) -> float:
        return self.population / self.sample


def _water_fill(a: np.ndarray, lower: np.ndarray, upper: np.ndarray, budget: int) -> np.ndarray:
    """x = clip(lam * a, lower, upper) with sum(x) == budget (a > 0), solved exactly on the breakpoints."""
    points = np.unique(np.concatenate([lower / a, upper / a]))

    def total(lam: float) -> float:
        return float(np.clip(lam * a, lower, upper).sum())

    hi = int(np.searchsorted([total(p) for p in points], budget))  # first breakpoint with total >= budget
    if hi == 0:
        return lower.astype(np.float64)
    lo_lam, hi_lam = points[hi - 1], points[min(hi, len(points) - 1)]
    lo_t, hi_t = total(lo_lam), total(hi_lam)
    lam = hi_lam if hi_t == lo_t else lo_lam + (budget - lo_t) * (hi_lam - lo_lam) / (hi_t - lo_t)
    return np.clip(lam * a, lower, upper)


def allocate(
    sizes: Mapping[str, int],
    budget: int,
    *,
    method: Allocation = "proportional",
    min_per_stratum: int = 0,
    variances: Mapping[str, float] | None = None,
) -> list[StratumPlan]:
    """Split ``budget`` queries over strata.

    Args:
        sizes: population size of each stratum, in the order used for tie-breaking.
        budget: total queries to select.
        method: ``proportional``, ``equal`` or ``neyman``.
        min_per_stratum: every stratum gets at least this many (all of it when it is smaller).
        variances: pilot variance of the metric per stratum (``neyman`` only; every stratum needs one).

    Returns:
        One :class:`StratumPlan` per stratum, in the order of ``sizes``; the samples sum to ``budget``.

    Raises:
        ConfigError: unknown method, an empty stratum, a budget below the sum of the minima or above the
            population, or Neyman variances that are missing, negative or name unknown strata.

    Example:
        >>> [p.sample for p in allocate({"a": 90, "b": 10}, 20, min_per_stratum=5)]
        [15, 5]
    """
    if method not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {method!r}")
    if not isinstance(budget, (int, np.integer)) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"budget must be a positive integer, got {budget!r}")
    if not isinstance(min_per_stratum, (int, np.integer)) or min_per_stratum < 0:
        raise ConfigError(f"the minimum per stratum must be an integer >= 0, got {min_per_stratum!r}")
    if not sizes:
        raise ConfigError("there are no strata to allocate over")
    names = list(sizes)
    n = np.array([int(sizes[s]) for s in names], dtype=np.int64)
    if (n <= 0).any():
        raise ConfigError(f"stratum {names[int(np.argmax(n <= 0))]!r} is empty (0 queries in the population)")
    population = int(n.sum())
    lower = np.minimum(n, min_per_stratum)
    if budget > population:
        raise ConfigError(f"budget {budget} is larger than the population ({population} queries); "
                          f"use a budget of at most {population}")
    if budget < int(lower.sum()):
        raise ConfigError(
            f"budget {budget} is below the sum of the minima ({int(lower.sum())} = {min_per_stratum} per stratum "
            f"over {len(names)} strata, smaller strata taken whole); raise the budget or lower the minimum"
        )

    if method == "proportional":
        a = n.astype(np.float64)
    elif method == "equal":
        a = np.ones(len(n))
    else:
        if variances is None:
            raise ConfigError("neyman allocation needs a pilot variance per stratum (--pilot-variance FILE)")
        unknown = sorted(set(variances) - set(names))
        if unknown:
            raise ConfigError(f"pilot variance given for unknown stratum {unknown[0]!r}; strata are: {', '.join(names)}")
        missing = [s for s in names if s not in variances]
        if missing:
            raise ConfigError(f"no pilot variance for stratum {missing[0]!r} ({len(missing)} strata lack one)")
        var = np.array([float(variances[s]) for s in names])
        if not np.isfinite(var).all() or (var < 0).any():
            raise ConfigError(f"pilot variances must be finite and >= 0, got {var[~(np.isfinite(var) & (var >= 0))][0]}")
        a = n * np.sqrt(var)
        if a.max() == 0:
            a = n.astype(np.float64)  # no variance anywhere: every allocation is optimal, take proportional
        else:
            a = np.where(a > 0, a, 1e-9 * a.max() * n / n.max())  # zero-variance strata only get leftovers

    x = _water_fill(a, lower.astype(np.float64), n.astype(np.float64), int(budget))
    sample = np.floor(x + 1e-9).astype(np.int64)
    sample = np.clip(sample, lower, n)
    remainder = int(budget) - int(sample.sum())
    if remainder > 0:  # largest fractional parts first, ties to the earlier stratum
        frac = np.where(sample < n, x - sample, -np.inf)
        for i in np.lexsort((np.arange(len(n)), -frac))[:remainder]:
            sample[i] += 1
    elif remainder < 0:  # float slack pushed a floor up: take back from the smallest fractional parts
        frac = np.where(sample > lower, x - sample, np.inf)
        for i in np.lexsort((np.arange(len(n)), frac))[:-remainder]:
            sample[i] -= 1
    return [StratumPlan(s, int(N), int(k), bool(N < min_per_stratum)) for s, N, k in zip(names, n, sample)]


def stratified_sample(
    strata: Sequence[str], plan: Sequence[StratumPlan], *, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Draw each stratum's sample by simple random sampling without replacement.

    Each stratum draws from its own random stream keyed by ``seed`` and the stratum's name, so adding a
    stratum does not change the draw of the others.

    Args:
        strata: the stratum of every population query (row order = population order).
        plan: from :func:`allocate`.

    Returns:
        ``(rows int64[n], inclusion_probability float64[n])``, rows ascending.
    """
    labels = np.asarray(list(strata), dtype=object)
    rows: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for p in plan:
        members = np.flatnonzero(labels == p.name)
        if len(members) != p.population:
            raise ValueError(f"stratum {p.name!r} has {len(members)} queries but the plan says {p.population}")
        rng = np.random.default_rng([seed, zlib.crc32(p.name.encode("utf-8"))])
        chosen = np.sort(rng.choice(members, size=p.sample, replace=False))
        rows.append(chosen)
        probs.append(np.full(len(chosen), p.sample / p.population))
    all_rows = np.concatenate(rows).astype(np.int64)
    all_probs = np.concatenate(probs)
    order = np.argsort(all_rows, kind="stable")
    return all_rows[order], all_probs[order]


def pilot_variances(strata: Sequence[str], values: npt.ArrayLike) -> dict[str, float]:
    """Per-stratum sample variance (ddof=1; 0 for a single query) of a pilot metric, for Neyman allocation."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) != len(strata):
        raise ValueError(f"values must hold one number per query: got {len(v)} for {len(strata)} queries")
    out: dict[str, float] = {}
    labels = np.asarray(list(strata), dtype=object)
    for name in dict.fromkeys(strata):
        x = v[labels == name]
        out[name] = float(np.var(x, ddof=1)) if len(x) > 1 else 0.0
        if not math.isfinite(out[name]):
            raise ValueError(f"the pilot values of stratum {name!r} are not finite")
    return out
