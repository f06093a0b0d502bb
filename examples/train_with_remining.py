"""Fine-tune a sentence-transformers model on hard negatives that are re-mined between epochs (ANCE-style).

Each epoch:

1. mine negatives for every training query with the model *as it is now* (:meth:`miner.Miner.mine`);
2. train one epoch of ``MultipleNegativesRankingLoss`` on (query, positive, hard negative) triplets;
3. re-encode the corpus with the updated weights and rebuild the index (:meth:`miner.Miner.refresh`),
   so that the next epoch's negatives are hard for the updated model, not for the base model.

After each epoch the script prints how many negatives changed since the previous epoch: that is the
re-mining at work. Run it on the bundled SciFact sample (small enough for a laptop CPU)::

    python examples/train_with_remining.py --max-queries 64 --max-docs 400 --epochs 2 --out /tmp/remined

or on any BEIR folder with ``--data path/to/beir/folder --split train``.

The loop is plain torch (tokenise, loss, AdamW step) rather than ``SentenceTransformerTrainer``, because the
trainer needs the ``datasets`` package, which miner does not depend on. No text appears twice in a batch
(the rule of sentence-transformers' ``NoDuplicatesBatchSampler``), so a document shared by two queries never
serves as a false in-batch negative of one of them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import miner
from miner import Corpus, MineConfig, Miner, load_beir
from miner.encode import default_cache_dir, load_model, model_fingerprint
from miner.errors import MinerError, ModelError
from miner.training import mnrl_loss, mnrl_step

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

__all__ = ["TrainingSet", "EpochReport", "RemineResult", "subsample", "train_with_remining", "build_parser", "main"]

DEMO_DIR = Path(miner.__file__).with_name("demo_data")

Triplet = tuple[str, str, str]  # (anchor, positive, negative)


@dataclass(frozen=True)
class TrainingSet:
    """The queries to train on, their positives (corpus ids) and the corpus the negatives come from."""

    corpus: Corpus
    query_ids: list[str]
    query_texts: list[str]
    positives: list[list[str]]  # corpus ids, per query


@dataclass
class EpochReport:
    """What happened in one epoch.

    ``mined_with`` is the fingerprint of the weights that encoded the corpus and the queries for this
    epoch's negatives; with re-mining it equals the previous epoch's ``trained_to``.
    """

    epoch: int  # 1-based
    mined_with: str
    trained_to: str
    negatives: list[list[str]]  # mined negative corpus ids, per query
    changed: int | None  # negatives that the same query did not get in the previous epoch (None: first epoch)
    queries_changed: int | None  # queries whose set of negatives changed
    triplets: int
    queries_without_negatives: int
    steps: int
    loss: float | None  # mean training loss over the epoch's steps (None: no step, no query had a negative)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_negatives(self) -> int:
        return sum(len(row) for row in self.negatives)


@dataclass
class RemineResult:
    """What :func:`train_with_remining` returns; ``main`` writes it as JSON with ``--report``."""

    base_fingerprint: str
    epochs: list[EpochReport]

    def to_dict(self) -> dict[str, Any]:
        return {"base_fingerprint": self.base_fingerprint, "epochs": [asdict(report) for report in self.epochs]}


def subsample(dataset: miner.Dataset, max_queries: int | None, max_docs: int | None, seed: int) -> TrainingSet:
    """Keep ``max_queries`` random queries and a corpus of their positives plus random other documents.

    The corpus keeps every positive of the kept queries, then other documents up to ``max_docs`` in all (so
    it is larger than ``max_docs`` only when the positives alone are more). ``None`` keeps everything.
    """
    rng = np.random.default_rng(seed)
    n_queries = len(dataset.queries)
    rows = np.arange(n_queries)
    if max_queries is not None and max_queries < n_queries:
        rows = np.sort(rng.choice(n_queries, size=max_queries, replace=False))
    positive_rows = [dataset.qrels.positives(int(r)) for r in rows]
    keep = np.unique(np.concatenate(positive_rows)) if positive_rows else np.zeros(0, np.int64)
    if max_docs is None:
        keep = np.arange(len(dataset.corpus))
    elif max_docs > len(keep):
        others = np.setdiff1d(np.arange(len(dataset.corpus)), keep)
        extra = rng.choice(others, size=min(max_docs - len(keep), len(others)), replace=False)
        keep = np.sort(np.concatenate([keep, extra]))
    corpus = Corpus([dataset.corpus.ids[d] for d in keep], [dataset.corpus.texts[d] for d in keep])
    return TrainingSet(
        corpus=corpus,
        query_ids=[dataset.queries.ids[r] for r in rows],
        query_texts=[dataset.queries.texts[r] for r in rows],
        positives=[[dataset.corpus.ids[d] for d in pos] for pos in positive_rows],
    )


def batches_without_duplicates(triplets: Sequence[Triplet], batch_size: int, rng: random.Random) -> list[list[Triplet]]:
    """Shuffle, then fill batches greedily so that no text appears twice in one batch."""
    pending = list(triplets)
    rng.shuffle(pending)
    batches: list[list[Triplet]] = []
    while pending:
        batch: list[Triplet] = []
        seen: set[str] = set()
        rest: list[Triplet] = []
        for triplet in pending:
            if len(batch) < batch_size and seen.isdisjoint(triplet):
                batch.append(triplet)
                seen.update(triplet)
            else:
                rest.append(triplet)
        batches.append(batch)
        pending = rest
    return batches


def _train_epoch(
    model: SentenceTransformer,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[list[Triplet]],
) -> tuple[int, float | None]:
    """One pass over ``batches``; returns (steps, mean loss or None without a step)."""
    model.train()  # Miner.mine / refresh encode in eval mode
    losses = [mnrl_step(model, loss_fn, optimizer, [list(column) for column in zip(*batch)]) for batch in batches]
    return len(losses), float(np.mean(losses)) if losses else None


def train_with_remining(
    model: SentenceTransformer,
    data: TrainingSet,
    *,
    epochs: int = 2,
    batch_size: int = 16,
    steps_per_epoch: int | None = None,
    lr: float = 2e-5,
    config: MineConfig = MineConfig(),
    seed: int = 0,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> RemineResult:
    """Train ``model`` in place for ``epochs`` epochs, re-mining its hard negatives before each one.

    Args:
        model: the model to fine-tune (its weights change in place).
        data: queries, positives and corpus (see :func:`subsample`).
        epochs: mine-then-train rounds.
        batch_size: triplets per step; the other rows' positives and negatives are in-batch negatives.
        steps_per_epoch: cap on steps per epoch (``None``: one pass over the mined triplets).
        lr: AdamW learning rate.
        config: mining settings; ``config.select.num_negatives`` negatives are mined per query and one of
            them, drawn at random, makes that query's triplet for the epoch.
        seed: seeds the triplet choice, the batch order and dropout.
        on_epoch: called with each :class:`EpochReport` as soon as the epoch ends.

    Returns:
        A :class:`RemineResult` with one report per epoch.
    """
    import torch

    if epochs < 1 or batch_size < 1 or (steps_per_epoch is not None and steps_per_epoch < 1):
        raise ValueError(
            f"epochs, batch_size and steps_per_epoch must be >= 1, got {epochs}, {batch_size}, {steps_per_epoch}"
        )
    rng = random.Random(seed)
    torch.manual_seed(seed)
    texts = dict(zip(data.corpus.ids, data.corpus.texts))
    loss_fn = mnrl_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    started = time.perf_counter()
    index = Miner(data.corpus, model, config)  # encodes the corpus with the base model
    base = index.encoder.fingerprint
    reports: list[EpochReport] = []
    previous: list[list[str]] | None = None
    for epoch in range(1, epochs + 1):
        if epoch > 1:
            index.refresh(model)  # re-encode the corpus with this epoch's weights
        mined = index.mine(data.query_texts, data.positives, query_ids=data.query_ids)
        mine_seconds = time.perf_counter() - started

        triplets = [
            (query, texts[rng.choice(positives)], rng.choice(negatives))
            for query, positives, negatives in zip(data.query_texts, data.positives, mined.doc_texts)
            if negatives
        ]
        batches = batches_without_duplicates(triplets, batch_size, rng)[:steps_per_epoch]
        started = time.perf_counter()
        steps, mean_loss = _train_epoch(model, loss_fn, optimizer, batches)
        train_seconds = time.perf_counter() - started

        changed = queries_changed = None
        if previous is not None:
            changed = sum(len(set(new) - set(old)) for new, old in zip(mined.doc_ids, previous))
            queries_changed = sum(set(new) != set(old) for new, old in zip(mined.doc_ids, previous))
        previous = mined.doc_ids
        report = EpochReport(
            epoch=epoch,
            mined_with=index.encoder.fingerprint,
            trained_to=model_fingerprint(model),
            negatives=mined.doc_ids,
            changed=changed,
            queries_changed=queries_changed,
            triplets=len(triplets),
            queries_without_negatives=len(data.query_ids) - len(triplets),
            steps=steps,
            loss=mean_loss,
            seconds={"mine": round(mine_seconds, 3), "train": round(train_seconds, 3)},
        )
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
        started = time.perf_counter()
    return RemineResult(base, reports)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_with_remining",
        description="Fine-tune a sentence-transformers model with hard negatives re-mined between epochs.",
    )
    p.add_argument("--data", default=str(DEMO_DIR), help="BEIR folder (default: the bundled SciFact sample)")
    p.add_argument("--split", default="train", help="qrels split to train on (default: train)")
    p.add_argument("--model", default="default", help="model name or folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--epochs", type=_positive_int, default=2, help="mine-then-train rounds (default: 2)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="triplets per step (default: 16)")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="cap on steps per epoch (default: one pass over the mined triplets)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default: 2e-5)")
    p.add_argument("--negatives", type=_positive_int, default=3,
                   help="negatives mined per query; one drawn per epoch makes its triplet (default: 3)")
    p.add_argument("--max-queries", type=_positive_int, default=None, help="train on this many random queries")
    p.add_argument("--max-docs", type=_positive_int, default=None,
                   help="corpus: the kept queries' positives plus random other documents up to this many")
    p.add_argument("--max-seq-length", type=_positive_int, default=None,
                   help="truncate texts to this many tokens (default: the model's own limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of subsampling, triplets, batches, dropout")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $MINER_CACHE_DIR or ~/.cache/miner)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--out", default=None, help="save the fine-tuned model to this folder")
    p.add_argument("--report", default=None, help="write per-epoch statistics (and the negatives) as JSON here")
    return p


def _print_epoch(report: EpochReport) -> None:
    if report.changed is None:
        remined = f"{report.n_negatives} negatives mined with the base model"
    else:
        share = report.changed / report.n_negatives if report.n_negatives else 0.0
        remined = (f"re-mined with the epoch {report.epoch - 1} weights: {report.changed}/{report.n_negatives} "
                   f"negatives changed ({share:.0%}) in {report.queries_changed} queries")
    loss = "no loss" if report.loss is None else f"mean loss {report.loss:.4f}"
    seconds = f"mine {report.seconds['mine']:.1f}s, train {report.seconds['train']:.1f}s"
    steps = f"{report.steps} step{'' if report.steps == 1 else 's'} on {report.triplets} triplets"
    print(f"epoch {report.epoch}: {remined}; {steps}, {loss} ({seconds})", flush=True)


def _run(args: argparse.Namespace) -> int:
    dataset = load_beir(args.data, split=args.split)
    data = subsample(dataset, args.max_queries, args.max_docs, args.seed)
    print(f"training on {len(data.query_ids)} queries, corpus of {len(data.corpus)} documents", flush=True)
    model = load_model(args.model, args.device)
    if args.max_seq_length is not None:
        model.max_seq_length = args.max_seq_length
    cache = None if args.no_cache else str(args.cache_dir or default_cache_dir())
    config = MineConfig().replace(
        encode={"cache_dir": cache, "device": args.device},
        select={"num_negatives": args.negatives, "seed": args.seed},
    )
    result = train_with_remining(
        model,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        config=config,
        seed=args.seed,
        on_epoch=_print_epoch,
    )
    if args.out is not None:
        model.save(str(args.out))
        print(f"saved the fine-tuned model to {args.out}", flush=True)
    if args.report is not None:
        Path(args.report).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, train, return the exit code (0 done, 2 bad input, 3 model not loadable, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("train_with_remining: interrupted", file=sys.stderr)
        return 130
    except ModelError as exc:
        print(f"train_with_remining: error: {exc}", file=sys.stderr)
        return 3
    except (MinerError, ValueError, OSError) as exc:
        print(f"train_with_remining: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
