"""Evaluate a retrieval model on an evaluation folder, per stratum and population-weighted, with intervals.

:func:`evaluate` encodes the folder's corpus and queries (with the embedding cache), retrieves by exact
inner-product search, and computes nDCG@k, MRR@k and Recall@k per query with ``ir-measures``
(``pytrec_eval`` underneath, the reference trec_eval implementation). With a ``strata.tsv`` from
``miner evalset`` it reports every stratum's mean and the population estimate
``sum(w_i m_i) / sum(w_i)`` (w = N_h / n_h), each with a stratified bootstrap percentile interval
(queries resampled within their stratum), next to the plain, unweighted sample mean.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from miner.config import EncodeConfig, SearchConfig
from miner.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["EvaluateConfig", "Estimate", "EvaluationReport", "evaluate", "per_query_measures", "stratified_bootstrap"]

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class EvaluateConfig:
    """What is measured.

    Args:
        k: cutoff of nDCG and MRR.
        recall_at: cutoffs of Recall.
        bootstrap: bootstrap resamples for the intervals (0: no intervals).
        confidence: coverage of the intervals.
        seed: seeds the bootstrap.
        ignore_identical_ids: never retrieve a document whose id equals the query's id (BEIR's default).
        index: search index (``exact`` or a faiss spec, as for mining).
    """

    k: int = 10
    recall_at: tuple[int, ...] = (10, 100)
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    ignore_identical_ids: bool = True
    index: str = "exact"

    def __post_init__(self) -> None:
        object.__setattr__(self, "recall_at", tuple(int(r) for r in self.recall_at))
        if self.k < 1 or not self.recall_at or min(self.recall_at) < 1:
            raise ConfigError(f"cutoffs must be >= 1, got k={self.k}, recall_at={self.recall_at}")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap must be >= 0, got {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"confidence must be in (0, 1), got {self.confidence}")

    @property
    def measures(self) -> list[str]:
        return [f"nDCG@{self.k}", f"MRR@{self.k}", *(f"Recall@{r}" for r in self.recall_at)]

    @property
    def depth(self) -> int:
        return max(self.k, *self.recall_at)


def _ir_measure(name: str) -> Any:
    import ir_measures

    kind, cutoff = name.split("@")
    measure = {"nDCG": ir_measures.nDCG, "MRR": ir_measures.RR, "Recall": ir_measures.R}[kind]
    return measure @ int(cutoff)


def per_query_measures(
    qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]], measures: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per-query values of ``measures`` (``nDCG@k``, ``MRR@k``, ``Recall@k``) computed by ir-measures.

    Queries of ``qrels`` without any retrieved document score 0.

    Returns:
        measure name -> query id -> value.
    """
    try:
        import ir_measures
    except ImportError:
        raise ImportError("miner evaluate needs ir-measures: pip install ir-measures") from None
    by_measure = {str(_ir_measure(m)): m for m in measures}
    out: dict[str, dict[str, float]] = {m: dict.fromkeys(qrels, 0.0) for m in measures}
    for metric in ir_measures.iter_calc([_ir_measure(m) for m in measures], qrels, run):
        name = by_measure[str(metric.measure)]
        if metric.query_id in out[name]:
            out[name][metric.query_id] = float(metric.value)
    return out


@dataclass(frozen=True)
class Estimate:
    """A mean with its bootstrap percentile interval (``None`` bounds without bootstrap)."""

    value: float
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, float | None]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.value:.4f}"
        return f"{self.value:.4f} [{self.low:.4f}, {self.high:.4f}]"


def stratified_bootstrap(
    values: F64,
    strata: Sequence[str],
    population: dict[str, float],
    *,
    resamples: int,
    confidence: float,
    seed: int,
) -> tuple[Estimate, dict[str, Estimate]]:
    """Population-weighted mean and per-stratum means of ``values``, with stratified bootstrap intervals.

    Args:
        values: float[n] a per-query metric.
        strata: the stratum of each query.
        population: N_h of each stratum (the weight of a query is N_h / n_h).
        resamples: bootstrap resamples (0: point estimates only).
        confidence: interval coverage.
        seed: each stratum resamples from its own stream keyed by ``seed`` and its name.

    Returns:
        ``(population estimate, {stratum: estimate})``.
    """
    labels = np.asarray(list(strata), dtype=object)
    names = list(dict.fromkeys(strata))
    total = float(sum(population[s] for s in names))
    alpha = (1.0 - confidence) / 2.0
    boot_pop = np.zeros(resamples)
    per: dict[str, Estimate] = {}
    point = 0.0
    for name in names:
        x = values[labels == name]
        share = population[name] / total
        point += share * float(x.mean())
        if resamples:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
            means = np.empty(resamples)
            chunk = max(1, 4_000_000 // max(len(x), 1))
            for lo in range(0, resamples, chunk):
                hi = min(resamples, lo + chunk)
                means[lo:hi] = x[rng.integers(0, len(x), size=(hi - lo, len(x)))].mean(axis=1)
            boot_pop += share * means
            q = np.quantile(means, [alpha, 1.0 - alpha])
            per[name] = Estimate(float(x.mean()), float(q[0]), float(q[1]))
        else:
            per[name] = Estimate(float(x.mean()), None, None)
    if resamples:
        q = np.quantile(boot_pop, [alpha, 1.0 - alpha])
        return Estimate(point, float(q[0]), float(q[1])), per
    return Estimate(point, None, None), per


@dataclass
class EvaluationReport:
    """Per-query metrics and their summaries; :meth:`to_dict` is the JSON, :meth:`table` the text."""

    measures: list[str]
    query_ids: list[str]
    strata: list[str]
    weights: F64
    per_query: dict[str, F64]  # measure -> float[n]
    population: dict[str, Estimate]  # measure -> population-weighted estimate
    unweighted: dict[str, Estimate]  # measure -> plain sample mean
    by_stratum: dict[str, dict[str, Estimate]]  # stratum -> measure -> estimate
    stratum_sizes: dict[str, tuple[int, float]]  # stratum -> (n selected, N population)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, per_query: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "measures": self.measures,
            "queries": len(self.query_ids),
            "population_size": float(self.weights.sum()),
            "population": {m: e.to_dict() for m, e in self.population.items()},
            "unweighted": {m: e.to_dict() for m, e in self.unweighted.items()},
            "strata": [
                {"stratum": s, "queries": n, "population": N, **{m: e.to_dict() for m, e in self.by_stratum[s].items()}}
                for s, (n, N) in self.stratum_sizes.items()
            ],
            **self.info,
        }
        if per_query:
            out["per_query"] = {
                qid: {"stratum": s, "weight": float(w), **{m: float(self.per_query[m][i]) for m in self.measures}}
                for i, (qid, s, w) in enumerate(zip(self.query_ids, self.strata, self.weights.tolist()))
            }
        return out

    def table(self) -> str:
        head = ["stratum", "n", "N", *self.measures]
        rows = [[s, str(n), f"{N:g}", *(str(self.by_stratum[s][m]) for m in self.measures)]
                for s, (n, N) in self.stratum_sizes.items()]
        rows.append(["population (weighted)", str(len(self.query_ids)), f"{self.weights.sum():g}",
                     *(str(self.population[m]) for m in self.measures)])
        rows.append(["sample (unweighted)", str(len(self.query_ids)), "-",
                     *(str(self.unweighted[m]) for m in self.measures)])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows[:-2])]
        lines += [fmt(["-" * w for w in widths]), *(fmt(r) for r in rows[-2:])]
        return "\n".join(lines)


def _strata_for(folder: Path, query_ids: list[str], strata_file: str | Path | None) -> tuple[list[str], F64, str | None]:
    from miner.evalset import STRATA_FILE, read_strata

    path = Path(strata_file) if strata_file is not None else folder / STRATA_FILE
    if strata_file is None and not path.is_file():
        return ["all"] * len(query_ids), np.ones(len(query_ids)), None
    qids, strata, _, weights = read_strata(path)
    index = {q: i for i, q in enumerate(qids)}
    missing = [q for q in query_ids if q not in index]
    if missing:
        raise DataError(f"{path}: {len(missing)} evaluated queries have no stratum (first: {missing[0]!r})")
    extra = len(qids) - len(query_ids)
    if extra:
        raise DataError(f"{path}: {extra} queries are not judged queries of the folder (is it the right strata file?)")
    return [strata[index[q]] for q in query_ids], np.array([weights[index[q]] for q in query_ids]), str(path)


def evaluate(
    folder: str | Path,
    encode: EncodeConfig = EncodeConfig(),
    config: EvaluateConfig = EvaluateConfig(),
    *,
    model: SentenceTransformer | None = None,
    split: str = "test",
    strata_file: str | Path | None = None,
    progress: bool = False,
) -> EvaluationReport:
    """Retrieve with ``model`` over the BEIR ``folder`` and measure, per stratum and for the population.

    Args:
        folder: an evaluation folder (e.g. written by ``miner evalset``), or any BEIR folder.
        encode: the encoder settings (model, prompts, cache).
        config: cutoffs, bootstrap.
        model: an already loaded ``SentenceTransformer`` (e.g. freshly fine-tuned); overrides
            ``encode.model``.
        split: the qrels split to evaluate.
        strata_file: the strata (default: ``folder/strata.tsv`` when it exists; else one stratum, weight 1).
        progress: progress bars while encoding.
    """
    import time

    from miner.data import load_beir
    from miner.encode import Encoder
    from miner.search import build_index, to_csr
    from miner.strata import sort_key

    started = time.perf_counter()
    folder = Path(folder)
    dataset = load_beir(folder, split)
    query_ids = list(dataset.queries.ids)
    strata, weights, strata_path = _strata_for(folder, query_ids, strata_file)

    encoder = Encoder(encode, model, show_progress=progress)
    doc_emb = encoder.encode(dataset.corpus.texts, kind="document")
    q_emb = encoder.encode(dataset.queries.texts, kind="query")
    index = build_index(doc_emb, SearchConfig(index=config.index))
    exclude = None
    if config.ignore_identical_ids:
        exclude = [[dataset.corpus.index[q]] if q in dataset.corpus.index else [] for q in query_ids]
    depth = min(config.depth, len(dataset.corpus))
    found = index.search(q_emb, depth, exclude=to_csr(exclude, len(query_ids)))
    run: dict[str, dict[str, float]] = {}
    for qid, ids in zip(query_ids, found.ids.tolist()):
        # scores by rank, so trec_eval's order is exactly the search order (no tie re-sorting by doc id)
        run[qid] = {dataset.corpus.ids[d]: float(depth - r) for r, d in enumerate(ids) if d >= 0}
    qrels: dict[str, dict[str, int]] = {}
    for r, qid in enumerate(query_ids):
        lo, hi = dataset.qrels.indptr[r], dataset.qrels.indptr[r + 1]
        qrels[qid] = {dataset.corpus.ids[d]: int(g) for d, g in
                      zip(dataset.qrels.doc_idx[lo:hi].tolist(), dataset.qrels.grades[lo:hi].tolist())}
    values = per_query_measures(qrels, run, config.measures)
    per_query = {m: np.array([values[m][q] for q in query_ids]) for m in config.measures}

    labels = np.asarray(strata, dtype=object)
    names = sorted(set(strata), key=sort_key)
    population = {s: float(weights[labels == s].sum()) for s in names}
    pop_est: dict[str, Estimate] = {}
    by_stratum: dict[str, dict[str, Estimate]] = {s: {} for s in names}
    unweighted: dict[str, Estimate] = {}
    for m in config.measures:
        est, per = stratified_bootstrap(per_query[m], strata, population, resamples=config.bootstrap,
                                        confidence=config.confidence, seed=config.seed)
        pop_est[m] = est
        for s in names:
            by_stratum[s][m] = per[s]
        un, _ = stratified_bootstrap(per_query[m], ["all"] * len(query_ids), {"all": float(len(query_ids))},
                                     resamples=config.bootstrap, confidence=config.confidence, seed=config.seed)
        unweighted[m] = un
    info = {
        "folder": str(folder),
        "split": split,
        "strata_file": strata_path,
        "model": {"fingerprint": encoder.fingerprint},
        "documents": len(dataset.corpus),
        "bootstrap": {"resamples": config.bootstrap, "confidence": config.confidence, "seed": config.seed,
                      "method": "stratified percentile bootstrap (queries resampled within strata)"},
        "seconds": round(time.perf_counter() - started, 3),
    }
    sizes = {s: (int((labels == s).sum()), population[s]) for s in names}
    return EvaluationReport(config.measures, query_ids, strata, weights, per_query, pop_est, unweighted,
                            by_stratum, sizes, info)


def write_report(report: EvaluationReport, path: str | Path) -> None:
    """Write the report's JSON (with per-query values) to ``path``."""
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
