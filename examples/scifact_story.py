"""The whole story on SciFact: mine -> train -> build a stratified eval set -> evaluate per stratum.

1. **mine** positive-aware hard negatives for the training queries with the base model (:func:`miner.mine`);
2. **train** the model briefly on (query, positive, hard negative) triplets with
   ``MultipleNegativesRankingLoss`` (a plain torch loop: no ``datasets`` dependency);
3. **build an evaluation set** from the test queries (:func:`miner.build_evalset`): strata by difficulty
   under the base model and number of positives, a query budget split with a minimum per stratum, a
   reduced corpus of positives + mined distractors + random background, and a leakage check against the
   training split;
4. **evaluate** the base and the fine-tuned model on it (:func:`miner.evaluate`): nDCG@10, MRR@10 and
   Recall per stratum and population-weighted, with bootstrap intervals, and print the change per stratum.

Run it on all of SciFact (minutes on a CPU; the embedding cache makes reruns faster)::

    python examples/scifact_story.py --data ../shared/data/scifact --out /tmp/story

or on a small cut (the test suite does this)::

    python examples/scifact_story.py --data ../shared/data/scifact --out /tmp/story \\
        --max-train-queries 48 --max-test-queries 60 --max-docs 300 --budget 30 --steps 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import miner
from miner import EncodeConfig, EvalsetConfig, EvaluateConfig, MineConfig, SelectConfig
from miner.data import Dataset, load_beir
from miner.encode import default_cache_dir, load_model
from miner.errors import MinerError, ModelError
from miner.training import mnrl_loss, mnrl_step

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["cut_beir", "train_on_triplets", "run_story", "build_parser", "main"]


def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")


def cut_beir(
    data: Path, out: Path, *, max_train_queries: int | None, max_test_queries: int | None, max_docs: int | None, seed: int
) -> Path:
    """Write a smaller BEIR folder: some train and test queries, all their positives, random other documents.

    Returns ``data`` itself when nothing is to be cut.
    """
    if max_train_queries is None and max_test_queries is None and max_docs is None:
        return data
    rng = np.random.default_rng(seed)
    splits = {"train": load_beir(data, "train"), "test": load_beir(data, "test")}
    keep_queries: dict[str, list[int]] = {}
    for name, limit in (("train", max_train_queries), ("test", max_test_queries)):
        n = len(splits[name].queries)
        rows = np.arange(n) if limit is None or limit >= n else np.sort(rng.choice(n, limit, replace=False))
        keep_queries[name] = rows.tolist()
    corpus_ids = splits["train"].corpus.ids
    wanted = {corpus_ids[d] for name, ds in splits.items() for r in keep_queries[name] for d in ds.qrels.doc_idx[
        ds.qrels.indptr[r]:ds.qrels.indptr[r + 1]]}
    if max_docs is not None and max_docs > len(wanted):
        others = [d for d in corpus_ids if d not in wanted]
        wanted |= set(rng.choice(others, size=min(max_docs - len(wanted), len(others)), replace=False).tolist())
    elif max_docs is None:
        wanted = set(corpus_ids)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "corpus.jsonl", [line for line in (data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
                                        if line.strip() and json.loads(line)["_id"] in wanted])
    qids = {ds.queries.ids[r] for name, ds in splits.items() for r in keep_queries[name]}
    _write_jsonl(out / "queries.jsonl", [line for line in (data / "queries.jsonl").read_text(encoding="utf-8").splitlines()
                                         if line.strip() and json.loads(line)["_id"] in qids])
    for name, ds in splits.items():
        lines = ["query-id\tcorpus-id\tscore"]
        for r in keep_queries[name]:
            lo, hi = ds.qrels.indptr[r], ds.qrels.indptr[r + 1]
            for d, g in zip(ds.qrels.doc_idx[lo:hi].tolist(), ds.qrels.grades[lo:hi].tolist()):
                lines.append(f"{ds.queries.ids[r]}\t{ds.corpus.ids[d]}\t{g}")
        _write_jsonl(out / "qrels" / f"{name}.tsv", lines)
    return out


def train_on_triplets(
    model: SentenceTransformer, triplets: list[tuple[str, str, str]], *, steps: int, batch_size: int, lr: float, seed: int
) -> list[float]:
    """Train ``model`` in place with MultipleNegativesRankingLoss; batches never repeat a text. Returns losses."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    loss_fn = mnrl_loss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    pool: list[tuple[str, str, str]] = []
    while len(losses) < steps:
        if not pool:
            pool = list(triplets)
            rng.shuffle(pool)
        batch: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        rest = []
        for t in pool:
            if len(batch) < batch_size and seen.isdisjoint(t):
                batch.append(t)
                seen.update(t)
            else:
                rest.append(t)
        pool = rest
        losses.append(mnrl_step(model, loss_fn, optimizer, [[t[i] for t in batch] for i in range(3)]))
    model.eval()
    return losses


def _comparison(base: miner.evaluate.EvaluationReport, tuned: miner.evaluate.EvaluationReport, measure: str) -> str:
    lines = [f"{measure}: base -> fine-tuned (change), per stratum and for the population"]
    width = max(len(s) for s in [*base.by_stratum, "population (weighted)"])
    for s in base.by_stratum:
        b, t = base.by_stratum[s][measure], tuned.by_stratum[s][measure]
        lines.append(f"  {s:<{width}}  n={base.stratum_sizes[s][0]:<4} {b.value:.4f} -> {t}  ({t.value - b.value:+.4f})")
    b, t = base.population[measure], tuned.population[measure]
    lines.append(f"  {'population (weighted)':<{width}}  n={len(base.query_ids):<4} {b} -> {t}  ({t.value - b.value:+.4f})")
    return "\n".join(lines)


def run_story(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = None if args.no_cache else str(args.cache_dir or default_cache_dir())
    encode = EncodeConfig(cache_dir=cache, device=args.device)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    data = cut_beir(Path(args.data), out / "data", max_train_queries=args.max_train_queries,
                    max_test_queries=args.max_test_queries, max_docs=args.max_docs, seed=args.seed)
    model = load_model(args.model, args.device)
    if args.max_seq_length is not None:
        model.max_seq_length = args.max_seq_length

    # 1. mine hard negatives for the training queries with the base model
    config = MineConfig(encode=encode, select=SelectConfig(num_negatives=args.negatives, seed=args.seed))
    train: Dataset = load_beir(data, "train")
    mined = miner.mine(train, None, config, model=model)
    negatives = mined.negatives
    if negatives is None:  # mine(..., out=None) keeps them in memory
        raise RuntimeError("miner.mine returned no in-memory negatives")
    texts = train.corpus.texts
    rng = random.Random(args.seed)
    triplets = []
    for r in range(len(train.queries)):
        negs = [d for d in negatives.ids[r].tolist() if d >= 0]
        if negs:
            pos = rng.choice(train.qrels.positives(r).tolist())
            triplets.append((train.queries.texts[r], texts[pos], texts[rng.choice(negs)]))
    print(f"1. mined {mined.stats.negatives} negatives for {len(train.queries)} training queries "
          f"(skipped as likely false negatives: {mined.stats.skipped['above_ceiling']} above the ceiling)", flush=True)
    timings["mine"] = time.perf_counter() - started

    # 2. build the stratified eval set with the *base* model (difficulty is defined by it), before training
    started = time.perf_counter()
    evalset_dir = out / "evalset"
    population = len(load_beir(data, "test").queries)
    eval_config = EvalsetConfig(
        budget=min(args.budget, population), strata=("difficulty", "n_positives"),
        min_per_stratum=min(args.min_per_stratum, args.budget // 8), distractors=args.distractors,
        background=args.background, train="train", seed=args.seed,
    )
    built = miner.build_evalset(data, evalset_dir, eval_config, config, split="test", model=model)
    m = built.manifest
    print(f"2. eval set: {m['selected_queries']} of {m['population']['queries']} test queries in {len(m['strata'])} "
          f"strata ({len(m['too_small'])} too small for the minimum, taken whole); corpus of "
          f"{m['corpus']['documents']} documents; leakage: {m['leakage']['queries_in_training']} test queries in "
          f"training, {m['leakage']['queries_with_positive_as_training_positive']} with a positive that training "
          "also uses", flush=True)
    timings["evalset"] = time.perf_counter() - started

    # 3. evaluate the base model, train, evaluate again
    started = time.perf_counter()
    eval_cfg = EvaluateConfig(recall_at=(10, 100), bootstrap=args.bootstrap, seed=args.seed)
    base = miner.evaluate(evalset_dir, encode, eval_cfg, model=model)
    timings["evaluate_base"] = time.perf_counter() - started

    started = time.perf_counter()
    losses = train_on_triplets(model, triplets, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"3. trained {len(losses)} steps on {len(triplets)} triplets: loss {losses[0]:.4f} -> {losses[-1]:.4f}",
          flush=True)
    timings["train"] = time.perf_counter() - started

    started = time.perf_counter()
    tuned = miner.evaluate(evalset_dir, encode, eval_cfg, model=model)
    timings["evaluate_tuned"] = time.perf_counter() - started

    print("\n4. base model\n" + base.table() + "\n\n   fine-tuned model\n" + tuned.table() + "\n", flush=True)
    print(_comparison(base, tuned, "nDCG@10"), flush=True)
    report = {
        "evalset": m,
        "base": base.to_dict(per_query=False),
        "tuned": tuned.to_dict(per_query=False),
        "losses": losses,
        "triplets": len(triplets),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "story.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scifact_story", description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/scifact", help="SciFact (or any BEIR folder with train and test qrels)")
    p.add_argument("--out", required=True, help="work folder: the cut data, the eval set, story.json")
    p.add_argument("--model", default="default", help="model name or folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-train-queries", type=int, default=None, help="use this many random training queries")
    p.add_argument("--max-test-queries", type=int, default=None, help="use this many random test queries")
    p.add_argument("--max-docs", type=int, default=None, help="corpus: the kept queries' judged documents plus random ones up to this many")
    p.add_argument("--max-seq-length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument("--negatives", type=int, default=3, help="negatives mined per training query (default 3)")
    p.add_argument("--steps", type=int, default=50, help="training steps (default 50)")
    p.add_argument("--batch-size", type=int, default=16, help="triplets per step (default 16)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--budget", type=int, default=200, help="eval queries (default 200)")
    p.add_argument("--min-per-stratum", type=int, default=10, help="eval queries at least per stratum (default 10)")
    p.add_argument("--distractors", type=int, default=50, help="mined distractors per eval query (default 50)")
    p.add_argument("--background", type=int, default=500, help="random background documents (default 500)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default $MINER_CACHE_DIR or ~/.cache/miner)")
    p.add_argument("--no-cache", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_story(args)
    except KeyboardInterrupt:
        print("scifact_story: interrupted", file=sys.stderr)
        return 130
    except ModelError as exc:
        print(f"scifact_story: error: {exc}", file=sys.stderr)
        return 3
    except (MinerError, ValueError, OSError) as exc:
        print(f"scifact_story: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
