"""Training value of the negatives: fine-tune all-MiniLM-L6-v2 on SciFact with five kinds of negatives.

    python benchmarks/downstream.py --cache-dir /tmp/scifact-cache   # writes benchmarks/results/downstream.*
    python benchmarks/downstream.py --quick                          # tiny smoke run (writes nothing unless --out)

Every arm trains a fresh copy of the base model with ``MultipleNegativesRankingLoss`` on the same
(query, positive) pairs, in the same seed-controlled batches, for the same number of steps; only the
third column differs:

(a) ``in-batch``: no mined negative (pairs only; the other rows of the batch are the negatives);
(b) ``random``: documents drawn uniformly from the corpus minus the query's labeled positives, per seed;
(c) ``naive-top-k``: the base model's top-k documents minus the labeled positives, nothing else filtered;
(d) ``st-mined``: ``sentence_transformers.util.mine_hard_negatives`` with ``relative_margin=0.05``;
(e) ``miner``: ``miner.mine`` with its default positive-aware settings.

Each query gets ``--num-negatives`` candidates per arm (mined once with the base model, except random ones,
which are drawn per seed); each training row takes one of them, drawn per seed, skipping any whose text is
already in the batch (the rule of sentence-transformers' ``NoDuplicatesBatchSampler``); a row left without
one (its arm mined nothing for the query) takes a random document that is neither a positive nor in the
batch, so that every arm keeps the same rows and steps, and the runs table counts these. Each trained model
is scored with :func:`miner.evaluate` (ir-measures: nDCG@10, MRR@10, Recall@100) on the SciFact test
queries over a fixed evaluation corpus (every test positive plus a seeded sample of other documents, or the
full corpus with ``--eval-docs 0``), the same for every arm. Seeds and arms are interleaved so that outside
load on a shared machine hits every arm alike.

The false-negative audit checks every mined candidate of every arm: a labeled positive of the query, an
exact duplicate (normalised text, :func:`miner.data.normalize_text`) of a positive, a near-duplicate
(cosine >= 0.95 under the base model) of a positive, the query's own document (same id or same normalised
text), and, as a proxy for unlabeled positives, a labeled positive (train or test qrels) of a near-identical
claim (query cosine >= 0.95).

The defaults (256 training queries per seed, 8 steps of 32, max_seq_length 128, an evaluation corpus of 1,000
documents, 3 seeds) are sized for a two-core CPU (the results file gives the wall time and the load it ran
under); ``--train-queries 0
--eval-docs 0`` trains on every training query and evaluates on the full corpus. Embeddings of the base model
come from miner's cache (``--cache-dir``) for arms (c) and (e) and from ``mine_hard_negatives``'
``cache_folder`` (``<cache-dir>/sentence-transformers-hard-negatives``) for arm (d). Finished runs are kept
in ``<out>.partial.json``; rerunning the same command resumes after the last one.

Needs ``datasets`` for arm (d): ``pip install -r benchmarks/requirements.txt``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

# benchmarks/kernel.py (this script's folder is on sys.path): the same machine and load lines
from kernel import load, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
from train_with_remining import batches_without_duplicates

from miner.training import mnrl_loss, mnrl_step

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from miner import Dataset

RESULTS = Path(__file__).resolve().parent / "results" / "downstream.md"
ARMS: tuple[str, ...] = ("in-batch", "random", "naive-top-k", "st-mined", "miner")
LABELS = {
    "in-batch": "(a) in-batch negatives only",
    "random": "(b) random negatives",
    "naive-top-k": "(c) naive top-k",
    "st-mined": "(d) sentence-transformers, relative margin 0.05",
    "miner": "(e) miner defaults",
}
MEASURES = ("nDCG@10", "MRR@10", "Recall@100")
AUDIT = ("labeled_positive", "duplicate_text", "near_duplicate", "own_document")
DUP_THRESHOLD = 0.95
I64 = npt.NDArray[np.int64]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (a resumed run must match it exactly)."""

    data: str
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    train_queries: int | None  # None: every training query
    mine_docs: int | None  # None: the full corpus
    test_queries: int | None
    eval_docs: int | None  # None: the full corpus
    batch_size: int
    lr: float
    train_seq_length: int
    eval_seq_length: int
    num_negatives: int
    sample_seed: int

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


# --- data ------------------------------------------------------------------------------------------


def positives_of(dataset: Dataset) -> list[I64]:
    return [dataset.qrels.positives(r) for r in range(len(dataset.queries))]


def cut_train(dataset: Dataset, max_queries: int | None, max_docs: int | None, seed: int) -> Dataset:
    """The training queries (a seeded subset) over a corpus of their positives plus random other documents."""
    from miner import Corpus, Dataset, Qrels, Queries

    if max_queries is None and max_docs is None:
        return dataset
    rng = np.random.default_rng(seed)
    n_q, n_d = len(dataset.queries), len(dataset.corpus)
    rows = np.arange(n_q) if max_queries is None or max_queries >= n_q else np.sort(rng.choice(n_q, max_queries, replace=False))
    keep = np.unique(np.concatenate([dataset.qrels.positives(int(r)) for r in rows]))
    if max_docs is None:
        keep = np.arange(n_d)
    elif max_docs > len(keep):
        others = np.setdiff1d(np.arange(n_d), keep)
        keep = np.sort(np.concatenate([keep, rng.choice(others, min(max_docs - len(keep), len(others)), replace=False)]))
    new_row = {int(d): i for i, d in enumerate(keep)}
    indptr, docs = [0], []
    for r in rows:
        docs += [new_row[int(d)] for d in dataset.qrels.positives(int(r))]
        indptr.append(len(docs))
    corpus = Corpus([dataset.corpus.ids[d] for d in keep], [dataset.corpus.texts[d] for d in keep])
    queries = Queries([dataset.queries.ids[r] for r in rows], [dataset.queries.texts[r] for r in rows])
    qrels = Qrels(np.array(indptr, np.int64), np.array(docs, np.int64), np.ones(len(docs), np.int32))
    return Dataset(corpus, queries, qrels)


def write_eval_folder(data: Path, test: Dataset, out: Path, max_queries: int | None, max_docs: int | None,
                      seed: int) -> dict[str, int]:
    """A BEIR folder of test queries over every one of their positives plus a seeded sample of other documents."""
    rng = np.random.default_rng([seed, 1])
    n_q, n_d = len(test.queries), len(test.corpus)
    rows = np.arange(n_q) if max_queries is None or max_queries >= n_q else np.sort(rng.choice(n_q, max_queries, replace=False))
    positives = np.unique(np.concatenate([test.qrels.positives(int(r)) for r in rows]))
    if max_docs is None or max_docs >= n_d:
        keep = np.arange(n_d)
    else:
        others = np.setdiff1d(np.arange(n_d), positives)
        extra = rng.choice(others, max(0, min(max_docs - len(positives), len(others))), replace=False)
        keep = np.sort(np.concatenate([positives, extra]))
    doc_ids = {test.corpus.ids[d] for d in keep}
    query_ids = {test.queries.ids[r] for r in rows}
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    for name, wanted in (("corpus.jsonl", doc_ids), ("queries.jsonl", query_ids)):
        lines = (data / name).read_text(encoding="utf-8").splitlines()
        (out / name).write_text("".join(f"{line}\n" for line in lines if line.strip() and json.loads(line)["_id"] in wanted),
                                encoding="utf-8")
    qrels = ["query-id\tcorpus-id\tscore"] + [f"{test.queries.ids[r]}\t{test.corpus.ids[d]}\t1"
                                             for r in rows for d in test.qrels.positives(int(r))]
    (out / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return {"queries": len(rows), "documents": len(keep), "positives": len(positives)}


# --- negatives -------------------------------------------------------------------------------------


def naive_top_k(q_emb: npt.NDArray[np.float32], d_emb: npt.NDArray[np.float32], positives: list[I64], k: int) -> list[list[int]]:
    """The k best documents of each query, leaving out its labeled positives and nothing else."""
    from miner import exact_search

    _, ids = exact_search(q_emb, d_emb, k, exclude=[p.tolist() for p in positives])
    return [[int(d) for d in row if d >= 0] for row in ids]


def miner_negatives(train: Dataset, model: SentenceTransformer, cache_dir: str | None, k: int) -> tuple[list[list[int]], dict[str, Any]]:
    """``miner.mine`` with its default selection (relative margin 0.05, duplicates, own document)."""
    import miner

    config = miner.MineConfig().replace(encode={"cache_dir": cache_dir}, select={"num_negatives": k})
    result = miner.mine(train, None, config, model=model)
    if result.negatives is None:
        raise RuntimeError("miner.mine with out=None returned no negatives")
    return [[int(d) for d in row if d >= 0] for row in result.negatives.ids], result.manifest["skipped"]


def st_negatives(train: Dataset, model: SentenceTransformer, cache_dir: str | None, k: int) -> list[list[int]]:
    """``sentence_transformers.util.mine_hard_negatives`` (TopK-PercPos 95%), mapped back to corpus rows."""
    try:
        from datasets import Dataset as HFDataset
    except ImportError:
        raise ImportError("arm st-mined needs the datasets package: pip install -r benchmarks/requirements.txt") from None
    from sentence_transformers.util import mine_hard_negatives

    anchors, positives = [], []
    for r, pos in enumerate(positives_of(train)):
        for d in pos:
            anchors.append(train.queries.texts[r])
            positives.append(train.corpus.texts[d])
    mined = mine_hard_negatives(
        HFDataset.from_dict({"anchor": anchors, "positive": positives}),
        model,
        corpus=list(train.corpus.texts),
        range_max=100,
        relative_margin=0.05,
        num_negatives=k,
        sampling_strategy="top",
        output_format="triplet",
        batch_size=64,
        verbose=False,
        cache_folder=None if cache_dir is None else str(Path(cache_dir) / "sentence-transformers-hard-negatives"),
    )
    row_of_text: dict[str, int] = {}
    for d, text in enumerate(train.corpus.texts):
        row_of_text.setdefault(text, d)
    by_anchor: dict[str, list[int]] = {}
    for anchor, negative in zip(mined["anchor"], mined["negative"]):
        rows = by_anchor.setdefault(anchor, [])
        if row_of_text[negative] not in rows:
            rows.append(row_of_text[negative])
    return [by_anchor.get(text, [])[:k] for text in train.queries.texts]


def random_negatives(n_docs: int, positives: list[I64], k: int, seed: int) -> list[list[int]]:
    """k documents per query, uniform over the corpus minus the query's labeled positives (a stream per query)."""
    out = []
    for r, pos in enumerate(positives):
        rng = np.random.default_rng([seed, r, 7])
        draw = rng.choice(n_docs, min(n_docs, k + len(pos)), replace=False)  # in draw order: uniform
        out.append(draw[~np.isin(draw, pos)][:k].tolist())
    return out


# --- audit -----------------------------------------------------------------------------------------


def audit_counts(
    negatives: list[list[int]],
    train: Dataset,
    d_emb: npt.NDArray[np.float32],
    near_claim_positives: list[set[int]],
    k: int,
) -> dict[str, int]:
    """Count the mined candidates that are likely false negatives, by reason (a candidate may have several).

    ``negatives[r]`` are the candidates (corpus rows) of training query ``r``.
    """
    from miner.data import normalize_text

    doc_norm = [normalize_text(t) for t in train.corpus.texts]
    positives = positives_of(train)
    counts = dict.fromkeys(("negatives", "queries_short", *AUDIT, "any", "near_claim_positive"), 0)
    for r, row in enumerate(negatives):
        counts["negatives"] += len(row)
        counts["queries_short"] += len(row) < k
        if not row:
            continue
        pos = positives[r]
        pos_set = set(pos.tolist())
        pos_norm = {doc_norm[p] for p in pos}
        q_norm = normalize_text(train.queries.texts[r])
        sims = d_emb[row] @ d_emb[pos].T  # [n_candidates, n_positives]
        for j, d in enumerate(row):
            flags = {
                "labeled_positive": d in pos_set,
                "duplicate_text": d not in pos_set and doc_norm[d] in pos_norm,
                "near_duplicate": d not in pos_set and float(sims[j].max()) >= DUP_THRESHOLD,
                "own_document": train.corpus.ids[d] == train.queries.ids[r] or doc_norm[d] == q_norm,
            }
            for name, hit in flags.items():
                counts[name] += hit
            counts["any"] += any(flags.values())
            counts["near_claim_positive"] += d not in pos_set and d in near_claim_positives[r]
    return counts


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float | int]:
    """How alike two arms' candidates are: queries with the same set, share of candidates of ``a`` also in ``b``."""
    same = sum(set(x) == set(y) for x, y in zip(a, b))
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b))
    total = sum(len(x) for x in a)
    return {"queries": len(a), "identical_sets": same, "shared_candidates": shared, "candidates": total,
            "shared_share": shared / total if total else 0.0}


def audit_report(counts: dict[str, int]) -> dict[str, Any]:
    total = counts["negatives"]
    reasons = (*AUDIT, "any", "near_claim_positive")
    return {"negatives": total, "queries_short": counts["queries_short"],
            "counts": {name: counts[name] for name in reasons},
            "shares": {name: (counts[name] / total if total else 0.0) for name in reasons}}


def near_claim_positive_sets(train: Dataset, test: Dataset, encoder: Any) -> list[set[int]]:
    """Per training query, the positives (train or test qrels, as rows of ``train.corpus``) of every other claim
    with the same normalised text or query cosine >= 0.95.

    SciFact pairs claims with their negations and numeric variants, which cite the same abstract: such an
    abstract is relevant to both, whatever the qrels of one of them say.
    """
    from miner.data import normalize_text

    row_of = train.corpus.index
    claims = [(text, {row_of[ds.corpus.ids[d]] for d in pos.tolist() if ds.corpus.ids[d] in row_of})
              for ds in (train, test) for text, pos in zip(ds.queries.texts, positives_of(ds))]
    emb = encoder.encode([text for text, _ in claims], kind="query")  # [n_claims, dim]
    norm = np.array([normalize_text(text) for text, _ in claims], dtype=object)
    out = []
    for r in range(len(train.queries)):
        near: set[int] = set()
        for j in np.flatnonzero((emb @ emb[r] >= DUP_THRESHOLD) | (norm == norm[r])).tolist():
            if j != r:
                near |= claims[j][1]
        out.append(near)
    return out


# --- training and evaluation -----------------------------------------------------------------------


def training_rows(n_queries: int, n_trained: int, seed: int) -> list[int]:
    """The training queries of a seed: all of them, or a sample drawn with the seed (the same in every arm)."""
    if n_trained >= n_queries:
        return list(range(n_queries))
    return sorted(np.random.default_rng([seed, 2]).choice(n_queries, n_trained, replace=False).tolist())


def pair_batches(train: Dataset, rows: Sequence[int], batch_size: int, seed: int) -> list[list[tuple[int, int]]]:
    """One (query row, positive row) per training query, shuffled into batches without a repeated text.

    The same for every arm of a seed: the arms differ only in the negative column.
    """
    rng = random.Random(seed)
    positives = positives_of(train)
    pairs = [(r, int(rng.choice(positives[r].tolist()))) for r in rows]
    by_text = {(train.queries.texts[r], train.corpus.texts[d]): (r, d) for r, d in pairs}
    text_batches = batches_without_duplicates(list(by_text), batch_size, rng)
    return [[by_text[t] for t in batch] for batch in text_batches]


def choose_negatives(
    batch: list[tuple[int, int]], candidates: list[list[int]], train: Dataset, seed: int, step: int
) -> tuple[list[int], int]:
    """One negative per row, drawn per seed from its candidates, never a text already in the batch.

    A row whose candidates all collide (or that has none) gets a random document that is neither a positive
    nor in the batch; returns ``(negative rows, how many rows needed that fallback)``.
    """
    texts = train.corpus.texts
    used = {train.queries.texts[r] for r, _ in batch} | {texts[d] for _, d in batch}
    positives = positives_of(train)
    chosen, fallbacks = [], 0
    for r, _ in batch:
        rng = np.random.default_rng([seed, r, step])
        pick = next((d for d in rng.permutation(candidates[r]).tolist() if texts[d] not in used), None)
        if pick is None:
            fallbacks += 1
            pos = set(positives[r].tolist())
            while pick is None or pick in pos or texts[pick] in used:
                pick = int(rng.integers(len(texts)))
        chosen.append(int(pick))
        used.add(texts[pick])
    return chosen, fallbacks


def train_arm(
    base: SentenceTransformer,
    train: Dataset,
    batches: list[list[tuple[int, int]]],
    candidates: list[list[int]] | None,
    *,
    seed: int,
    lr: float,
    seq_length: int,
) -> tuple[SentenceTransformer, dict[str, Any]]:
    """Fine-tune a copy of ``base`` on ``batches``; ``candidates=None`` trains on pairs (in-batch negatives)."""
    import torch

    started = time.perf_counter()
    model = copy.deepcopy(base)
    model.max_seq_length = seq_length
    torch.manual_seed(seed)
    loss_fn = mnrl_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses, fallbacks = [], 0
    for step, batch in enumerate(batches):
        columns = [[train.queries.texts[r] for r, _ in batch], [train.corpus.texts[d] for _, d in batch]]
        if candidates is not None:
            negatives, missing = choose_negatives(batch, candidates, train, seed, step)
            fallbacks += missing
            columns.append([train.corpus.texts[d] for d in negatives])
        losses.append(mnrl_step(model, loss_fn, optimizer, columns))
    model.eval()
    return model, {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1],
                   "loss_mean": float(np.mean(losses)), "fallback_negatives": fallbacks,
                   "train_seconds": round(time.perf_counter() - started, 1)}


def evaluate_model(model: SentenceTransformer, folder: Path, seq_length: int) -> dict[str, Any]:
    """nDCG@10, MRR@10, Recall@100 (ir-measures) of ``model`` on the evaluation folder, with per-query nDCG@10."""
    import miner

    model.max_seq_length = seq_length
    report = miner.evaluate(folder, miner.EncodeConfig(cache_dir=None), miner.EvaluateConfig(k=10, recall_at=(100,), bootstrap=0),
                            model=model)
    return {
        **{m: report.unweighted[m].value for m in MEASURES},
        "per_query_ndcg": dict(zip(report.query_ids, report.per_query["nDCG@10"].round(6).tolist())),
        "eval_seconds": report.info["seconds"],
    }


# --- summary ---------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_bootstrap(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over queries with a 95% percentile interval (queries resampled with replacement)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def summarise(runs: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    arms = [a for a in settings.arms if any(r["arm"] == a for r in runs)]
    by_arm = {a: sorted((r for r in runs if r["arm"] == a), key=lambda r: r["seed"]) for a in arms}
    table = {a: {m: dict(zip(("mean", "std"), mean_std([r[m] for r in by_arm[a]]))) for m in MEASURES} for a in arms}
    paired: dict[str, Any] = {}
    if "miner" in by_arm:
        qids = list(by_arm["miner"][0]["per_query_ndcg"])
        avg = {a: np.mean([[r["per_query_ndcg"][q] for q in qids] for r in by_arm[a]], axis=0) for a in arms}
        ours = {r["seed"]: r["nDCG@10"] for r in by_arm["miner"]}
        for a in arms:
            if a == "miner":
                continue
            deltas = [ours[r["seed"]] - r["nDCG@10"] for r in by_arm[a] if r["seed"] in ours]
            mean, low, high = paired_bootstrap(avg["miner"], avg[a])
            paired[a] = {"per_seed": deltas, "mean": mean_std(deltas)[0], "std": mean_std(deltas)[1],
                         "wins": sum(d > 0 for d in deltas), "seeds": len(deltas),
                         "query_bootstrap": {"mean": mean, "low": low, "high": high}}
    return {"arms": table, "paired_vs_miner": paired}


def fmt(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def markdown(report: dict[str, Any]) -> str:
    s, summary, runs, base = report["settings"], report["summary"], report["runs"], report["base_model"]
    t, tr, ev = report["timings"], report["train"], report["eval"]
    sample = "all of them" if tr["trained_queries"] >= tr["queries"] else "a different seeded sample per seed"
    steps = dict(sorted({r["seed"]: r["steps"] for r in runs}.items()))
    steps_text = (f"{next(iter(steps.values()))} steps" if len(set(steps.values())) == 1 else
                  "steps per seed " + ", ".join(f"{n} (seed {seed})" for seed, n in steps.items()))
    head = (
        f"Command: `{report['command']}`  \n"
        f"Date: {report['date']}; machine: {report['machine']}; torch threads: {report['threads']}; "
        f"load average at start / end: {report['load_start']} / {report['load_end']}  \n"
        f"Wall time: {report['wall_seconds'] / 60:.1f} min (mining and audit {t['mining']:.0f} s, "
        f"training {t['training']:.0f} s, evaluation {t['evaluation']:.0f} s)"
    )
    if report.get("resumed_runs"):
        head += (f"; {report['resumed_runs']} runs came from an earlier, interrupted invocation of the same command "
                 "(their train and eval seconds are in the runs table, not in this wall time)")
    kernel = report.get("kernel") or {}
    if kernel:
        head += f"  \ntop-k backend: {kernel.get('backend')} ({kernel.get('reason', '')})"
    setup = [
        (f"- Model: all-MiniLM-L6-v2, a fresh copy per run; MultipleNegativesRankingLoss (scale 20, cosine); AdamW "
        f"lr {s['lr']:g}; batch {s['batch_size']}; {steps_text}: one epoch over {tr['trained_queries']} "
        f"training queries ({sample}), one positive each, in batches that never repeat a text (a seed whose "
        f"sample shares positives gets a short last batch); max_seq_length {s['train_seq_length']} in training, "
        f"{s['eval_seq_length']} in evaluation; seeds {', '.join(map(str, s['seeds']))}; every arm of a seed trains "
        "on the same batches."),
        (f"- Mining: the base model (max_seq_length {report['mining_seq_length']}) over {tr['documents']} documents "
        f"for all {tr['queries']} training queries, {s['num_negatives']} candidates per query; each training row "
        "takes one of its query's candidates, drawn per seed."),
        (f"- Evaluation: {ev['queries']} SciFact test queries over {ev['documents']} documents ({ev['subsample']}); "
        "nDCG@10, MRR@10, Recall@100 by `miner.evaluate` (ir-measures)."),
    ]
    lines = ["# Training value of the negatives (benchmarks/downstream.py)", "", head, "", "## Setup", "", *setup, "",
             "## Retrieval quality after fine-tuning (mean ± std over seeds)", "",
             "| arm | nDCG@10 | MRR@10 | Recall@100 | nDCG@10 per seed |", "|---|---:|---:|---:|---|"]
    for arm, row in summary["arms"].items():
        seeds = ", ".join(f"{r['nDCG@10']:.4f}" for r in sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"]))
        lines.append(f"| {LABELS[arm]} | {fmt(**row['nDCG@10'])} | {fmt(**row['MRR@10'])} | {fmt(**row['Recall@100'])} | {seeds} |")
    lines.append(f"| base model, not fine-tuned | {base['nDCG@10']:.4f} | {base['MRR@10']:.4f} | {base['Recall@100']:.4f} | |")
    if summary["paired_vs_miner"]:
        lines += ["", "## (e) miner minus each arm, nDCG@10", "",
                  ("Per seed (same batches, same seed), and over queries: the per-query nDCG@10 averaged over seeds, "
                  "paired bootstrap (10,000 resamples of the test queries) 95% interval."), "",
                  "| vs | per-seed differences | mean ± std | seeds (e) ahead | over queries [95% interval] |",
                  "|---|---|---:|---:|---|"]
        for arm, d in summary["paired_vs_miner"].items():
            qb = d["query_bootstrap"]
            lines.append(f"| {LABELS[arm]} | {', '.join(f'{x:+.4f}' for x in d['per_seed'])} | {d['mean']:+.4f} ± {d['std']:.4f} "
                         f"| {d['wins']}/{d['seeds']} | {qb['mean']:+.4f} [{qb['low']:+.4f}, {qb['high']:+.4f}] |")
    lines += ["", "## False-negative audit of the mined candidates", "",
              (f"Every candidate of every training query ({tr['queries']} queries; random: all seeds together), as "
              "counts and shares of the candidates; one candidate can count under several reasons. Near-duplicate: "
              f"cosine >= {DUP_THRESHOLD} to a positive under the base model. Own document: same id or same normalised "
              "text as the query. Near-claim positive, a proxy for unlabeled positives that no arm uses: a labeled "
              "positive (train or test qrels) of another claim with the same normalised text or query cosine >= "
              f"{DUP_THRESHOLD}. Queries short: queries with fewer than {s['num_negatives']} candidates."), "",
              ("| arm | candidates | queries short | labeled positive | exact duplicate | near-duplicate | own document "
              "| any of the four | near-claim positive |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm in s["arms"]:
        a = report["audit"].get(arm)
        if a is None:
            lines.append(f"| {LABELS[arm]} | none mined | | | | | | | |")
            continue
        cells = " | ".join(f"{a['counts'][k]} ({a['shares'][k]:.2%})" for k in (*AUDIT, "any", "near_claim_positive"))
        lines.append(f"| {LABELS[arm]} | {a['negatives']} | {a['queries_short']} | {cells} |")
    if report.get("miner_vs_st_mined"):
        o = report["miner_vs_st_mined"]
        lines += ["", (f"Arms (d) and (e) share {o['shared_candidates']} of {o['candidates']} candidates "
                  f"({o['shared_share']:.1%}); {o['identical_sets']} of {o['queries']} queries get the same set.")]
    if report.get("miner_skipped"):
        lines += ["", f"miner's skipped-by-reason counts while mining arm (e): `{json.dumps(report['miner_skipped'])}`"]
    lines += ["", "## Runs", "",
              ("Fallback negatives: rows whose arm had no usable candidate (none mined, or every one already in the "
              "batch) and took a random document that is neither a positive nor in the batch."), "",
              "| arm | seed | nDCG@10 | MRR@10 | Recall@100 | mean loss | fallback negatives | train s | eval s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(runs, key=lambda r: (s["arms"].index(r["arm"]), r["seed"])):
        lines.append(f"| {r['arm']} | {r['seed']} | {r['nDCG@10']:.4f} | {r['MRR@10']:.4f} | {r['Recall@100']:.4f} | "
                     f"{r['loss_mean']:.3f} | {r['fallback_negatives']} | {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count_or_all(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 (0: all), got {value}")
    return value or None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="downstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "scifact"), help="SciFact BEIR folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all five)")
    p.add_argument("--train-queries", type=_count_or_all, default=256,
                   help="train each seed on a seeded sample of this many training queries, one epoch (0: all 809; default 256)")
    p.add_argument("--test-queries", type=_count_or_all, default=None, help="evaluate on this many test queries (0: all)")
    p.add_argument("--eval-docs", type=_count_or_all, default=1000,
                   help="evaluation corpus: every test positive plus random documents up to this many (0: full corpus; default 1000)")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-seq-length", type=_positive_int, default=128, help="max_seq_length in training")
    p.add_argument("--eval-seq-length", type=_positive_int, default=128, help="max_seq_length in evaluation")
    p.add_argument("--num-negatives", type=_positive_int, default=5, help="candidates mined per query")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of every subsample (queries, corpora)")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: 2)")
    p.add_argument("--cache-dir", default=None, help="embedding cache of the base model (default: miner's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 48 training queries over 300 documents, 50 test queries over 300, 2 seeds, batch 16")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the .md beside this results .json from it, running nothing")
    p.add_argument("--out", default=None, help="results .md (the .json beside it); default benchmarks/results/downstream.md")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(args.data, tuple(args.seeds[:2]), tuple(args.arms), 48, 300, 50, 300, 16, args.lr,
                        min(args.train_seq_length, 64), min(args.eval_seq_length, 64), args.num_negatives, args.sample_seed)
    return Settings(args.data, tuple(args.seeds), tuple(args.arms), args.train_queries, None, args.test_queries,
                    args.eval_docs, args.batch_size, args.lr, args.train_seq_length, args.eval_seq_length,
                    args.num_negatives, args.sample_seed)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import torch

    import miner
    from miner.encode import Encoder, default_cache_dir, load_model

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = load()
    s = _settings(args)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS)
    partial_path = None if out is None else out.with_suffix(".partial.json")
    cache_dir = str(args.cache_dir or default_cache_dir())
    timings = {"mining": 0.0, "training": 0.0, "evaluation": 0.0}

    data = Path(s.data)
    full_train = miner.load_beir(data, "train")
    test = miner.load_beir(data, "test")
    train = cut_train(full_train, 48 if args.quick else None, s.mine_docs, s.sample_seed)
    positives = positives_of(train)
    n_q = len(train.queries)
    n_trained = n_q if s.train_queries is None else min(s.train_queries, n_q)
    say(f"training data: {n_q} queries mined over {len(train.corpus)} documents; training on {n_trained} per seed")

    base = load_model("default")
    mining_seq_length = base.max_seq_length
    encoder = Encoder(miner.EncodeConfig(cache_dir=cache_dir), base)
    t0 = time.perf_counter()
    d_emb = encoder.encode(train.corpus.texts, kind="document")
    q_emb = encoder.encode(train.queries.texts, kind="query")
    candidates: dict[str, list[list[int]] | None] = {"in-batch": None}
    mining_seconds: dict[str, float] = {"base embeddings": round(time.perf_counter() - t0, 1)}
    miner_skipped = None
    for arm, fn in (
        ("naive-top-k", lambda: naive_top_k(q_emb, d_emb, positives, s.num_negatives)),
        ("miner", lambda: miner_negatives(train, base, cache_dir, s.num_negatives)),
        ("st-mined", lambda: st_negatives(train, base, cache_dir, s.num_negatives)),
    ):
        if arm not in s.arms:
            continue
        t0 = time.perf_counter()
        result = fn()
        if arm == "miner":
            result, miner_skipped = result
        candidates[arm] = result
        mining_seconds[arm] = round(time.perf_counter() - t0, 1)
        say(f"mined {arm}: {sum(len(r) for r in result)} candidates in {mining_seconds[arm]:.1f} s")
    random_by_seed = {seed: random_negatives(len(train.corpus), positives, s.num_negatives, seed) for seed in s.seeds}

    near_claims = near_claim_positive_sets(train, test, encoder)
    audits = {arm: audit_report(audit_counts(c, train, d_emb, near_claims, s.num_negatives))
              for arm, c in candidates.items() if c is not None}
    if "random" in s.arms:
        per_seed = [audit_counts(random_by_seed[seed], train, d_emb, near_claims, s.num_negatives) for seed in s.seeds]
        audits["random"] = audit_report({name: sum(c[name] for c in per_seed) for name in per_seed[0]})
    for arm, a in audits.items():
        say(f"audit {arm}: {json.dumps(a['counts'])}")
    overlap = None
    if candidates.get("miner") is not None and candidates.get("st-mined") is not None:
        overlap = agreement(candidates["miner"], candidates["st-mined"])
        say(f"miner vs st-mined candidates: {json.dumps(overlap)}")
    timings["mining"] = time.perf_counter() - started

    done: list[dict[str, Any]] = []
    if partial_path is not None and partial_path.is_file():
        previous = json.loads(partial_path.read_text())
        if previous.get("settings_key") == s.key():
            done = previous["runs"]
            say(f"resuming: {len(done)} runs already done in {partial_path}")

    with tempfile.TemporaryDirectory(prefix="downstream-eval-") as tmp:
        folder = Path(tmp)
        eval_info = write_eval_folder(data, test, folder, s.test_queries, s.eval_docs, s.sample_seed)
        eval_info["subsample"] = ("the full corpus" if s.eval_docs is None or eval_info["documents"] >= len(test.corpus) else
                                  f"every test positive ({eval_info['positives']}) plus a seeded random sample of other "
                                  f"documents, of {len(test.corpus)}")
        say(f"evaluation: {eval_info['queries']} queries over {eval_info['documents']} documents")
        t0 = time.perf_counter()
        base_eval = evaluate_model(copy.deepcopy(base), folder, s.eval_seq_length)
        timings["evaluation"] += time.perf_counter() - t0
        say("base model: " + ", ".join(f"{m} {base_eval[m]:.4f}" for m in MEASURES))

        runs = list(done)
        steps = None
        for seed in s.seeds:
            batches = pair_batches(train, training_rows(n_q, n_trained, seed), s.batch_size, seed)
            steps = len(batches)
            for arm in s.arms:
                if any(r["arm"] == arm and r["seed"] == seed for r in runs):
                    continue
                arm_candidates = random_by_seed[seed] if arm == "random" else candidates[arm]
                model, stats = train_arm(base, train, batches, arm_candidates, seed=seed, lr=s.lr,
                                         seq_length=s.train_seq_length)
                timings["training"] += stats["train_seconds"]
                t0 = time.perf_counter()
                scores = evaluate_model(model, folder, s.eval_seq_length)
                timings["evaluation"] += time.perf_counter() - t0
                runs.append({"arm": arm, "seed": seed, **stats, **scores})
                say(f"{arm} seed {seed}: " + ", ".join(f"{m} {scores[m]:.4f}" for m in MEASURES)
                    + f" (loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}, train {stats['train_seconds']:.0f} s, "
                    f"eval {scores['eval_seconds']:.0f} s)")
                if partial_path is not None:
                    partial_path.parent.mkdir(parents=True, exist_ok=True)
                    partial_path.write_text(json.dumps({"settings_key": s.key(), "runs": runs}) + "\n")

    report = {
        "command": shlex.join(["python", "benchmarks/downstream.py", *argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "threads": args.threads,
        "load_start": load_start,
        "load_end": load(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "resumed_runs": len(done),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "mining_seconds": mining_seconds,
        "settings": asdict(s),
        "steps": steps,
        "mining_seq_length": mining_seq_length,
        "train": {"queries": n_q, "documents": len(train.corpus), "trained_queries": n_trained},
        "eval": eval_info,
        "base_model": {m: base_eval[m] for m in MEASURES},
        "audit": audits,
        "miner_skipped": miner_skipped,
        "miner_vs_st_mined": overlap,
        "summary": summarise(runs, s),
        "runs": runs,
        "code": code_state(),
        "kernel": miner.backend_info(),
        "versions": {"miner": miner.__version__, "torch": torch.__version__,
                     "sentence-transformers": __import__("sentence_transformers").__version__},
    }
    text = markdown(report)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        if partial_path is not None and partial_path.is_file():
            partial_path.unlink()
        say(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def code_state() -> dict[str, Any]:
    """The commit the run used and the files that differed from it (uncommitted work changes the numbers)."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    status = git("status", "--porcelain", "--", "miner", "benchmarks/downstream.py")  # "XY path" lines
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted": [line[3:] for line in status.splitlines()]}


def render(path: Path) -> int:
    """Rewrite the Markdown beside a results JSON from that JSON (after a change to the tables' layout)."""
    report = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown(report))
    say(f"wrote {path.with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.render is not None:
            return render(Path(args.render))
        return run(args, argv)
    except KeyboardInterrupt:
        print("downstream: interrupted (finished runs are kept in the .partial.json; rerun to resume)", file=sys.stderr)
        return 130
    except (ImportError, ValueError, OSError) as exc:
        print(f"downstream: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
