"""Stratified evaluation sets for ranking models, with a reduced corpus of mined distractors.

:func:`build_evalset` takes the judged queries of one split (the population), labels each with a stratum
(:mod:`miner.strata`), splits a query budget over the strata (:mod:`miner.allocate`), draws the queries,
and writes a BEIR folder that evaluates quickly but stays hard:

* ``corpus.jsonl``: every positive (and judged document) of the selected queries, the top-K distractors
  mined for each with positive-aware selection (the same code as ``miner mine``: likely false negatives
  above the ceiling and near-duplicates of positives are left out), optional BM25 distractors, and a
  seeded random background sample of the rest of the corpus;
* ``queries.jsonl`` and ``qrels/test.tsv``: the selected queries and their judgements (original records);
* ``strata.tsv``: ``query-id``, ``stratum``, ``inclusion_probability``, ``weight`` (= N_h / n_h), so that
  ``sum(weight * metric) / sum(weight)`` estimates the metric over the whole population, and the weights
  sum to the population size;
* ``manifest.json``: settings, inputs' sha256, model fingerprint, per-stratum counts, strata too small for
  the minimum, leakage report, corpus composition, file checksums and timings.

The same inputs, settings and seed give byte-identical files (only the manifest's timings differ).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from miner import __version__
from miner.allocate import ALLOCATIONS, Allocation, StratumPlan, allocate, stratified_sample
from miner.config import MineConfig
from miner.data import Dataset, load_data
from miner.encode import resolve_model
from miner.errors import ConfigError, DataError
from miner.leakage import LeakageReport, TrainingSet, check_leakage, load_training
from miner.strata import (
    DIFFICULTY_BANDS,
    DIFFICULTY_DEPTH,
    N_POSITIVE_BANDS,
    band,
    combine,
    first_positive_ranks,
    parse_strata,
    read_field,
    read_mapping,
    topic_clusters,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from miner.pipeline import Miner

__all__ = ["EvalsetConfig", "EvalsetResult", "build_evalset", "read_strata", "read_pilot_variance", "STRATA_FILE"]

log = logging.getLogger(__name__)

STRATA_FILE = "strata.tsv"
STRATA_HEADER = ("query-id", "stratum", "inclusion_probability", "weight")
LeakedPositives = Literal["report", "exclude"]


@dataclass(frozen=True)
class EvalsetConfig:
    """How an evaluation set is drawn.

    Args:
        budget: queries to select.
        strata: stratum kinds, combined (see :mod:`miner.strata`): ``difficulty``, ``n_positives``,
            ``topic``, ``mapping``, ``field:NAME``.
        allocation: ``proportional``, ``equal`` or ``neyman`` (needs ``pilot_variance``).
        min_per_stratum: queries at least per stratum; smaller strata are taken whole and reported.
        pilot_variance: Neyman's pilot variance of the metric per stratum (stratum name -> variance).
        mapping: the ``query-id<TAB>stratum`` file of the ``mapping`` kind.
        topics: k-means clusters of the ``topic`` kind.
        distractors: top-K positive-aware mined distractors per selected query (0: none).
        bm25_distractors: top-K BM25 distractors per selected query (needs ``bm25s``; 0: none).
        background: random other documents added to the corpus.
        train: a training set to guard against: a ``miner mine`` file, a BEIR folder, or a qrels split
            name of the data folder; eval queries found in it are left out of the population.
        train_split: the qrels split read when ``train`` is a BEIR folder.
        leaked_positives: ``report`` eval positives that training used, or ``exclude`` them (their
            judgement is dropped, the document is kept out of the corpus, and queries left without a
            positive leave the population).
        seed: seeds the draw within strata, k-means and the background sample.
    """

    budget: int
    strata: tuple[str, ...] = ("difficulty", "n_positives")
    allocation: Allocation = "proportional"
    min_per_stratum: int = 0
    pilot_variance: Mapping[str, float] | None = None
    mapping: str | None = None
    topics: int = 8
    distractors: int = 50
    bm25_distractors: int = 0
    background: int = 500
    train: str | None = None
    train_split: str = "train"
    leaked_positives: LeakedPositives = "report"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strata", parse_strata(self.strata))
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {self.allocation!r}")
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 1:
            raise ConfigError(f"budget must be a positive integer, got {self.budget!r}")
        for name in ("min_per_stratum", "distractors", "bm25_distractors", "background"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if "mapping" in self.strata and self.mapping is None:
            raise ConfigError("the 'mapping' stratum needs a mapping file (--strata-file FILE)")
        if self.mapping is not None and "mapping" not in self.strata:
            raise ConfigError("a mapping file was given but 'mapping' is not among the strata")
        if self.allocation == "neyman" and self.pilot_variance is None:
            raise ConfigError("neyman allocation needs a pilot variance per stratum (--pilot-variance FILE)")
        if self.allocation != "neyman" and self.pilot_variance is not None:
            raise ConfigError(f"pilot variances are only used by neyman allocation, not {self.allocation}")
        if self.leaked_positives not in ("report", "exclude"):
            raise ConfigError(f"leaked_positives must be 'report' or 'exclude', got {self.leaked_positives!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["strata"] = list(self.strata)
        out["pilot_variance"] = None if self.pilot_variance is None else dict(self.pilot_variance)
        return out


@dataclass
class EvalsetResult:
    """What :func:`build_evalset` returns (everything it wrote is also in ``out``)."""

    out: Path
    query_ids: list[str]
    strata: list[str]
    inclusion_probability: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float64]
    plan: list[StratumPlan]
    manifest: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Population and strata


def _population(
    dataset: Dataset, config: EvalsetConfig, training: TrainingSet | None
) -> tuple[np.ndarray, list[np.ndarray], LeakageReport | None, set[int]]:
    """Population rows, each row's positives after leakage handling, the report, and documents kept out."""
    rows = np.arange(len(dataset.queries), dtype=np.int64)
    positives = [dataset.qrels.positives(int(r)) for r in rows]
    report = check_leakage(dataset, rows, training) if training is not None else None
    banned: set[int] = set()
    if report is None:
        return rows, positives, None, banned
    in_training = set(report.queries_in_training)
    if config.leaked_positives == "exclude":
        leaked = {**report.positive_as_training_positive}
        for qid, docs in report.positive_as_training_negative.items():
            leaked[qid] = sorted(set(leaked.get(qid, [])) | set(docs))
        for docs in leaked.values():
            banned.update(dataset.corpus.index[d] for d in docs)
        positives = [p[~np.isin(p, list(banned))] for p in positives]
    keep = np.array(
        [dataset.queries.ids[r] not in in_training and len(positives[r]) > 0 for r in rows.tolist()], dtype=bool
    )
    return rows[keep], [positives[r] for r in rows[keep].tolist()], report, banned


def _csr(lists: Sequence[np.ndarray]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    ids = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    return indptr, ids


def _strata_labels(
    dataset: Dataset,
    rows: np.ndarray,
    positives: list[np.ndarray],
    config: EvalsetConfig,
    q_emb: npt.NDArray[np.float32] | None,
    miner: Miner | None,
    data_path: Path,
) -> tuple[list[str], dict[str, tuple[int, ...]], dict[str, Any]]:
    qids = [dataset.queries.ids[r] for r in rows.tolist()]
    columns: list[tuple[str, Sequence[str], Sequence[int]]] = []
    extra: dict[str, Any] = {}
    for kind in config.strata:
        if kind == "difficulty" and miner is not None and q_emb is not None:  # both exist when asked for
            ranks = first_positive_ranks(miner.index, q_emb, *_csr(positives), depth=DIFFICULTY_DEPTH)
            bands = [band(int(r), DIFFICULTY_BANDS) for r in ranks]
            columns.append((kind, [b[1] for b in bands], [b[0] for b in bands]))
            extra["first_positive_rank"] = ranks
        elif kind == "n_positives":
            bands = [band(len(p), N_POSITIVE_BANDS) for p in positives]
            columns.append((kind, [b[1] for b in bands], [b[0] for b in bands]))
        elif kind == "topic" and q_emb is not None:
            topics = topic_clusters(q_emb, config.topics, config.seed)
            columns.append((kind, [str(t) for t in topics.tolist()], topics.tolist()))
        else:
            if kind == "mapping":
                labels = read_mapping(config.mapping, qids)  # type: ignore[arg-type]
            else:
                queries_path = data_path / "queries.jsonl"
                if not queries_path.is_file():
                    raise ConfigError(f"{kind} needs a BEIR folder with queries.jsonl; {data_path} has none")
                labels = read_field(queries_path, kind[len("field:"):], qids)
            order = {name: i for i, name in enumerate(sorted(set(labels)))}
            columns.append((kind.replace("field:", ""), labels, [order[x] for x in labels]))
    strata, keys = combine(columns)
    return strata, keys, extra


# ----------------------------------------------------------------------------------------------------
# Reduced corpus


def _bm25_distractors(dataset: Dataset, query_rows: np.ndarray, positives: list[np.ndarray], k: int) -> list[np.ndarray]:
    try:
        import bm25s
    except ImportError:
        raise ImportError(
            "BM25 distractors need the bm25s package: pip install bm25s (or pip install 'miner[bm25]')"
        ) from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG on import
    tokens = bm25s.tokenize(dataset.corpus.texts, stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    texts = [dataset.queries.texts[r] for r in query_rows.tolist()]
    q_tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    depth = min(len(dataset.corpus), k + max((len(p) for p in positives), default=0))
    docs, _ = retriever.retrieve(q_tokens, k=depth, show_progress=False, n_threads=1)
    out = []
    for row, pos in zip(np.asarray(docs, dtype=np.int64), positives):
        out.append(row[~np.isin(row, pos)][:k])
    return out


def _corpus_rows(
    dataset: Dataset,
    selected: np.ndarray,
    positives: list[np.ndarray],
    config: EvalsetConfig,
    miner: Miner | None,
    banned: set[int],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Corpus rows of the reduced corpus, ascending, and its composition."""
    parts: dict[str, set[int]] = {"positives": set(), "judged": set(), "mined": set(), "bm25": set(), "background": set()}
    for r, pos in zip(selected.tolist(), positives):
        parts["positives"].update(pos.tolist())
        parts["judged"].update(dataset.qrels.judged_negatives(r).tolist())
    stats: dict[str, Any] = {}
    if config.distractors and miner is not None:
        batch = miner.mine(
            [dataset.queries.texts[r] for r in selected.tolist()],
            [p.tolist() for p in positives],
            query_ids=[dataset.queries.ids[r] for r in selected.tolist()],
        )
        ids = batch.negatives.ids
        parts["mined"].update(int(d) for d in ids[ids >= 0].tolist())
        stats["mined_per_query"] = {
            "asked": config.distractors,
            "short_queries": int(((ids >= 0).sum(axis=1) < config.distractors).sum()),
            "skipped": dict(batch.stats.skipped),
        }
    if config.bm25_distractors:
        for row in _bm25_distractors(dataset, selected, positives, config.bm25_distractors):
            parts["bm25"].update(row.tolist())
    taken = set().union(*parts.values()) - banned
    if config.background:
        rest = np.setdiff1d(np.arange(len(dataset.corpus)), np.fromiter(taken | banned, dtype=np.int64))
        n = min(config.background, len(rest))
        rng = np.random.default_rng([config.seed, 0xB4C6])
        parts["background"] = set(rng.choice(rest, size=n, replace=False).tolist()) if n else set()
        taken |= parts["background"]
    # composition: each document counted once, under the first part that brought it
    seen: set[int] = set()
    composition: dict[str, int] = {}
    for name, docs in parts.items():
        new = (docs - banned) - seen
        composition[name] = len(new)
        seen |= new
    composition["documents"] = len(taken)
    composition["excluded_leaked_positives"] = len(banned)
    stats["composition"] = composition
    return np.array(sorted(taken), dtype=np.int64), stats


# ----------------------------------------------------------------------------------------------------
# Writing


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _jsonl_lines(path: Path, wanted: set[str]) -> list[str]:
    """The original lines of a BEIR jsonl file whose ``_id`` is wanted, in file order."""
    lines = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and str(json.loads(line).get("_id")) in wanted:
                lines.append(line.rstrip("\r\n"))
    return lines


def _write_folder(
    out: Path,
    dataset: Dataset,
    data_path: Path,
    selected: np.ndarray,
    positives: list[np.ndarray],
    corpus_rows: np.ndarray,
    banned: set[int],
    strata: list[str],
    inclusion: np.ndarray,
    weights: np.ndarray,
) -> dict[str, str]:
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    doc_ids = {dataset.corpus.ids[d] for d in corpus_rows.tolist()}
    qids = [dataset.queries.ids[r] for r in selected.tolist()]
    beir = (data_path / "corpus.jsonl").is_file() and (data_path / "queries.jsonl").is_file()
    if beir:
        corpus_lines = _jsonl_lines(data_path / "corpus.jsonl", doc_ids)
        query_lines = _jsonl_lines(data_path / "queries.jsonl", set(qids))
    else:
        corpus_lines = [json.dumps({"_id": dataset.corpus.ids[d], "title": "", "text": dataset.corpus.texts[d]},
                                   ensure_ascii=False) for d in corpus_rows.tolist()]
        query_lines = [json.dumps({"_id": dataset.queries.ids[r], "text": dataset.queries.texts[r]}, ensure_ascii=False)
                       for r in selected.tolist()]
    qrels = ["query-id\tcorpus-id\tscore"]
    for r, pos in zip(selected.tolist(), positives):
        lo, hi = dataset.qrels.indptr[r], dataset.qrels.indptr[r + 1]
        for d, g in zip(dataset.qrels.doc_idx[lo:hi].tolist(), dataset.qrels.grades[lo:hi].tolist()):
            if int(d) in banned:
                continue
            qrels.append(f"{dataset.queries.ids[r]}\t{dataset.corpus.ids[d]}\t{g}")
    strata_lines = ["\t".join(STRATA_HEADER)]
    for qid, s, p, w in zip(qids, strata, inclusion.tolist(), weights.tolist()):
        strata_lines.append(f"{qid}\t{s}\t{p!r}\t{w!r}")
    files = {
        "corpus.jsonl": "\n".join(corpus_lines) + "\n",
        "queries.jsonl": "\n".join(query_lines) + "\n",
        "qrels/test.tsv": "\n".join(qrels) + "\n",
        STRATA_FILE: "\n".join(strata_lines) + "\n",
    }
    for name, text in files.items():
        _write_atomic(out / name, text)
    return {name: hashlib.sha256(text.encode("utf-8")).hexdigest() for name, text in files.items()}


def read_strata(path: str | Path) -> tuple[list[str], list[str], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Read ``strata.tsv``: ``(query ids, strata, inclusion probabilities, weights)``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    qids: list[str] = []
    strata: list[str] = []
    probs: list[float] = []
    weights: list[float] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.rstrip("\r\n").split("\t")
            if lineno == 1 and parts[0] == STRATA_HEADER[0]:
                continue
            if not line.strip():
                continue
            if len(parts) != 4:
                raise DataError(f"{path}:{lineno}: expected 4 tab-separated columns ({', '.join(STRATA_HEADER)})")
            try:
                p, w = float(parts[2]), float(parts[3])
            except ValueError:
                raise DataError(f"{path}:{lineno}: inclusion probability and weight must be numbers") from None
            if not (0 < p <= 1) or not w > 0:
                raise DataError(f"{path}:{lineno}: need 0 < inclusion probability <= 1 and weight > 0")
            qids.append(parts[0])
            strata.append(parts[1])
            probs.append(p)
            weights.append(w)
    if len(set(qids)) != len(qids):
        raise DataError(f"{path}: a query id appears twice")
    return qids, strata, np.array(probs), np.array(weights)


def read_pilot_variance(path: str | Path) -> dict[str, float]:
    """Read ``stratum<TAB>variance`` lines (an optional header line is skipped) for Neyman allocation."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found (the pilot variance file: stratum<TAB>variance per line)")
    out: dict[str, float] = {}
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 2:
                raise DataError(f"{path}:{lineno}: expected 2 tab-separated columns (stratum, variance)")
            try:
                out[parts[0].strip()] = float(parts[1])
            except ValueError:
                if lineno == 1:
                    continue  # a header
                raise DataError(f"{path}:{lineno}: variance must be a number, got {parts[1]!r}") from None
    return out


# ----------------------------------------------------------------------------------------------------
# The whole build


def build_evalset(
    data: str | Path,
    out: str | Path,
    config: EvalsetConfig,
    mine_config: MineConfig = MineConfig(),
    *,
    split: str = "test",
    corpus: str | Path | None = None,
    model: SentenceTransformer | None = None,
    progress: bool = False,
) -> EvalsetResult:
    """Build a stratified evaluation set (see the module docstring) and write it to the folder ``out``.

    Args:
        data: a BEIR folder (or a pairs file, with ``corpus``).
        out: output folder (created; files of a previous build are replaced).
        config: how queries are stratified and drawn, and what the reduced corpus holds.
        mine_config: the encoder, search and positive-aware selection settings of the distractors and of
            the difficulty strata (``select.num_negatives`` is set to ``config.distractors``).
        split: the qrels split whose judged queries form the population.
        model: an already loaded ``SentenceTransformer`` (overrides ``mine_config.encode.model``).
        progress: progress bars while encoding.

    Returns:
        An :class:`EvalsetResult`.

    Raises:
        ConfigError: bad settings: unknown stratum, budget below the sum of the minima or above the
            population, Neyman without (or with mismatched) pilot variances.
        DataError: malformed input, or an empty stratum in a mapping file.
    """
    from miner.pipeline import Miner, Timings

    timings = Timings()
    data_path, out = Path(data), Path(out)
    with timings.phase("load_data"):
        dataset = load_data(data_path, split=split, corpus=corpus)
        training = None
        if config.train is not None:
            training = load_training(config.train, data_folder=data_path if data_path.is_dir() else None,
                                     split=config.train_split)
    rows, positives, leakage, banned = _population(dataset, config, training)
    if len(rows) == 0:
        raise DataError("no query is left in the population (every eval query is in the training set?)")

    need_model = bool(config.distractors) or bool({"difficulty", "topic"} & set(config.strata))
    miner = q_emb = None
    if need_model:
        select = dataclasses.replace(
            mine_config.select, num_negatives=max(config.distractors, 1),
            range_min=0, range_max=max(config.distractors, 1), sampling="top",
        )
        with timings.phase("encode_documents"):
            miner = Miner(dataset.corpus, model, mine_config.replace(select=select), progress=progress)
        with timings.phase("encode_queries"):
            q_emb = miner.encoder.encode([dataset.queries.texts[r] for r in rows.tolist()], kind="query")

    with timings.phase("strata"):
        labels, keys, extra = _strata_labels(dataset, rows, positives, config, q_emb, miner, data_path)
    order = sorted(keys, key=lambda s: keys[s])
    sizes = {s: 0 for s in order}
    for s in labels:
        sizes[s] += 1
    plan = allocate(sizes, config.budget, method=config.allocation, min_per_stratum=config.min_per_stratum,
                    variances=config.pilot_variance)
    picked, inclusion = stratified_sample(labels, plan, seed=config.seed)
    selected = rows[picked]
    sel_positives = [positives[i] for i in picked.tolist()]
    sel_strata = [labels[i] for i in picked.tolist()]
    by_name = {p.name: p for p in plan}
    weights = np.array([by_name[s].weight for s in sel_strata])  # N_h / n_h exactly

    with timings.phase("distractors"):
        corpus_rows, corpus_stats = _corpus_rows(dataset, selected, sel_positives, config, miner, banned)
    with timings.phase("write"):
        out.mkdir(parents=True, exist_ok=True)
        checksums = _write_folder(out, dataset, data_path, selected, sel_positives, corpus_rows, banned,
                                  sel_strata, inclusion, weights)

    manifest: dict[str, Any] = {
        "miner_version": __version__,
        "kind": "evalset",
        "config": config.to_dict(),
        "mining": {**mine_config.to_dict(), "encode": {**mine_config.to_dict()["encode"], "cache_dir": None}},
        "model": None if miner is None else {
            "name": resolve_model(mine_config.encode.model) if model is None else type(model).__name__,
            "fingerprint": miner.encoder.fingerprint,
        },
        "inputs": {
            "sources": {k: v for k, v in dataset.sources.items()},
            "split": split,
            "documents": len(dataset.corpus),
            "judged_queries": len(dataset.queries),
        },
        "population": {
            "queries": int(len(rows)),
            "left_out_in_training": 0 if leakage is None else len(leakage.queries_in_training),
            "left_out_without_positives": int(len(dataset.queries) - len(rows)
                                              - (0 if leakage is None else len(leakage.queries_in_training))),
        },
        "strata": [
            {"stratum": p.name, "population": p.population, "selected": p.sample,
             "inclusion_probability": p.inclusion_probability, "weight": p.weight, "too_small": p.too_small}
            for p in plan
        ],
        "too_small": [p.name for p in plan if p.too_small],
        "selected_queries": int(len(selected)),
        "weights_sum": math.fsum(weights.tolist()),
        "corpus": corpus_stats["composition"],
        "distractors": {k: v for k, v in corpus_stats.items() if k != "composition"},
        "leakage": None if leakage is None else {**leakage.to_dict(), "leaked_positives": config.leaked_positives},
        "files": checksums,
    }
    if "first_positive_rank" in extra:
        ranks = extra["first_positive_rank"]
        manifest["difficulty"] = {label: int(((ranks >= lo) & (ranks <= hi)).sum()) for lo, hi, label in DIFFICULTY_BANDS}
    manifest["timings"] = timings.rounded()
    _write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return EvalsetResult(out, [dataset.queries.ids[r] for r in selected.tolist()], sel_strata, inclusion, weights,
                         plan, manifest)

