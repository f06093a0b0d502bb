"""The ``miner`` command: a thin layer over :func:`miner.mine` and friends.

``main(argv)`` returns an exit code: 0 success, 2 bad input, settings or a missing optional package, 3 the model could not be loaded,
130 interrupted (rerun the same command to resume), 1 anything unexpected. Errors are one line on stderr;
``MINER_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]

DEMO_DIR = Path(__file__).with_name("demo_data")


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with integers, e.g. 0:100; got {text!r}") from None
    return lo, hi


def _optional_float(text: str) -> float | None:
    if text.lower() in {"none", "off"}:
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _add_mining_flags(p: argparse.ArgumentParser, *, demo: bool) -> None:
    from miner.config import SelectConfig

    d = SelectConfig()
    g = p.add_argument_group("selection")
    g.add_argument("--num-negatives", type=int, default=d.num_negatives, help="negatives per query (default %(default)s)")
    g.add_argument("--range", type=_range, default=(d.range_min, d.range_max), metavar="MIN:MAX",
                   help="rank window among valid candidates, 0 = hardest (default 0:100)")
    g.add_argument("--relative-margin", type=_optional_float, default=d.relative_margin,
                   help="skip candidates above s - m*|s|, s = lowest positive score (default %(default)s; 'none' = off)")
    g.add_argument("--absolute-margin", type=_optional_float, default=None, help="skip candidates above s - m")
    g.add_argument("--max-score", type=_optional_float, default=None, help="skip candidates scoring above this")
    g.add_argument("--min-score", type=_optional_float, default=None, help="skip candidates scoring below this")
    g.add_argument("--sampling", choices=["top", "random", "spread"], default=d.sampling,
                   help="how negatives are drawn from the window (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of random sampling (default %(default)s)")
    g.add_argument("--dup-threshold", type=_optional_float, default=d.dup_threshold,
                   help="exclude documents at least this similar to a positive (default %(default)s; 'none' = off)")
    g.add_argument("--prefer-judged", action="store_true", help="take judged non-relevant documents (grade 0) first")
    g.add_argument("--keep-own-document", action="store_true",
                   help="do not exclude the document with the query's id or text")
    e = _add_encoding_flags(p, title="encoding and search", index_default="auto")
    e.add_argument("--query-batch-size", type=int, default=1024, help="queries per batch and per output part")
    e.add_argument("--nprobe", type=int, default=32,
                   help="IVF lists visited per query (default %(default)s; higher: closer to exact, slower)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="miner-demo/triplets.parquet" if demo else None, required=not demo,
                   help="output file, .parquet or .jsonl; the manifest and parts live beside it")
    o.add_argument("--format", choices=["triplet", "n-tuple", "labeled-pair", "labeled-list"], default="triplet",
                   help="rows per negative, per positive, per document or per query (default %(default)s)")
    o.add_argument("--no-texts", action="store_true", help="write ids, scores and ranks only")
    o.add_argument("--columns", choices=["miner", "sentence-transformers"], default="miner",
                   help="'sentence-transformers': trainer-ready columns, ids and scores in a .meta file beside")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="miner", description="Hard-negative mining for retrieval and ranking models.")
    from miner import __version__

    parser.add_argument("--version", action="version", version=f"miner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mine", help="mine negatives for a BEIR folder or a pairs file")
    m.add_argument("--data", required=True, help="BEIR folder, or a pairs file (.parquet, .jsonl, .csv, .tsv)")
    m.add_argument("--corpus", default=None, help="extra documents for a pairs file (table with a 'text' column)")
    m.add_argument("--split", default="train", help="qrels split of a BEIR folder (default %(default)s)")
    m.add_argument("--query-column", default="query", help="query column of a pairs file (default %(default)s)")
    m.add_argument("--positive-column", default="positive", help="positive column of a pairs file (default %(default)s)")
    m.add_argument("--strict", action="store_true", help="unknown ids in the qrels are an error, not a count")
    _add_mining_flags(m, demo=False)

    s = sub.add_parser("stats", help="print the statistics of a mined file")
    s.add_argument("path", help="a file written by 'miner mine'")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    d = sub.add_parser("demo", help="mine the bundled SciFact sample with the default model")
    _add_mining_flags(d, demo=True)
    _add_evalset_parser(sub)
    _add_evaluate_parser(sub)
    return parser


def _add_speed_flags(e: Any) -> None:
    e.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="encoder precision; auto (default): the fastest precision that passed the quality guard "
                        "and runs fast on this machine, else fp32 (today fp32: bf16 failed the guard); bf16: "
                        "faster on CPUs with AVX512-BF16/AMX, same nDCG, ~8%% of negatives differ")
    e.add_argument("--token-budget", type=_optional_int, default=8192, metavar="N",
                   help="padded tokens per forward pass, texts sorted by length (default %(default)s; "
                        "'none' = fixed batches of --batch-size texts)")
    e.add_argument("--no-dedupe", action="store_true", help="encode repeated texts every time (to measure dedupe)")


def _optional_int(text: str) -> int | None:
    if text.lower() in {"none", "off"}:
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _encoding_speed(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "token_budget": args.token_budget, "dedupe": not args.no_dedupe}


def _add_encoding_flags(p: argparse.ArgumentParser, *, title: str = "encoding", index_default: str = "exact") -> Any:
    """The encoder, cache and index flags every subcommand shares (and ``--quiet``); returns their group."""
    e = p.add_argument_group(title)
    e.add_argument("--model", default="default",
                   help="sentence-transformers model name or local folder (default: all-MiniLM-L6-v2)")
    e.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch (default %(default)s)")
    e.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    _add_speed_flags(e)
    e.add_argument("--query-prompt", default="", help="text prepended to queries (e.g. 'query: ')")
    e.add_argument("--document-prompt", default="", help="text prepended to documents (e.g. 'passage: ')")
    e.add_argument("--cache-dir", default=None, help="embedding cache (default $MINER_CACHE_DIR or ~/.cache/miner)")
    e.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    e.add_argument("--index", default=index_default,
                   help="exact, flat, ivf, hnsw, auto (exact up to 2M documents) or a faiss factory string "
                        "(default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary table")
    return e


def _encode_config(args: argparse.Namespace) -> Any:
    from miner.config import EncodeConfig
    from miner.encode import default_cache_dir

    return EncodeConfig(model=args.model, batch_size=args.batch_size, device=args.device,
                        query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                        cache_dir=None if args.no_cache else str(args.cache_dir or default_cache_dir()),
                        **_encoding_speed(args))


def _add_evalset_parser(sub: Any) -> None:
    from miner.config import SelectConfig

    p = sub.add_parser("evalset", help="build a stratified evaluation set with a reduced, hard corpus")
    p.add_argument("--data", required=True, help="BEIR folder, or a pairs file (.parquet, .jsonl, .csv, .tsv)")
    p.add_argument("--corpus", default=None, help="extra documents for a pairs file (table with a 'text' column)")
    p.add_argument("--split", default="test", help="qrels split whose judged queries are the population (default %(default)s)")
    p.add_argument("--out", required=True, help="output folder (BEIR layout plus strata.tsv and manifest.json)")
    s = p.add_argument_group("strata and allocation")
    s.add_argument("--budget", type=int, required=True, help="queries to select")
    s.add_argument("--strata", default="difficulty,n_positives",
                   help="comma-separated: difficulty, n_positives, topic, mapping, field:NAME (default %(default)s)")
    s.add_argument("--strata-file", default=None, help="query-id<TAB>stratum file for the 'mapping' stratum")
    s.add_argument("--topics", type=int, default=8, help="k-means clusters of the 'topic' stratum (default %(default)s)")
    s.add_argument("--allocation", choices=["proportional", "equal", "neyman"], default="proportional",
                   help="how the budget is split over strata (default %(default)s)")
    s.add_argument("--min-per-stratum", type=int, default=0, help="queries at least per stratum; smaller strata are taken whole")
    s.add_argument("--pilot-variance", default=None, help="stratum<TAB>variance file for --allocation neyman")
    s.add_argument("--seed", type=int, default=0, help="seeds the draw, k-means and the background (default %(default)s)")
    c = p.add_argument_group("reduced corpus")
    c.add_argument("--distractors", type=int, default=50, help="positive-aware mined distractors per query (default %(default)s)")
    c.add_argument("--bm25-distractors", type=int, default=0, help="BM25 distractors per query (needs bm25s; default 0)")
    c.add_argument("--background", type=int, default=500, help="random other documents (default %(default)s)")
    c.add_argument("--relative-margin", type=_optional_float, default=SelectConfig().relative_margin,
                   help="distractors scoring above s - m*|s| are skipped as likely false negatives (default %(default)s)")
    c.add_argument("--dup-threshold", type=_optional_float, default=SelectConfig().dup_threshold,
                   help="near-duplicates of a positive are never distractors (default %(default)s; 'none' = off)")
    g = p.add_argument_group("leakage guard")
    g.add_argument("--train", default=None,
                   help="training set: a 'miner mine' file, a BEIR folder, or a qrels split of --data (e.g. train)")
    g.add_argument("--train-split", default="train", help="qrels split when --train is a BEIR folder (default %(default)s)")
    g.add_argument("--exclude-leaked-positives", action="store_true",
                   help="drop eval positives that training used (default: report them)")
    _add_encoding_flags(p)


def _add_evaluate_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model on an evaluation folder, per stratum, with intervals")
    p.add_argument("--data", required=True, help="evaluation folder (from 'miner evalset', or any BEIR folder)")
    p.add_argument("--split", default="test", help="qrels split (default %(default)s)")
    p.add_argument("--strata", default=None, help="strata file (default: DATA/strata.tsv when it exists)")
    p.add_argument("--k", type=int, default=10, help="cutoff of nDCG and MRR (default %(default)s)")
    p.add_argument("--recall-at", default="10,100", help="comma-separated Recall cutoffs (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples, 0 = none (default %(default)s)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap (default %(default)s)")
    p.add_argument("--out", default=None, help="write the JSON report (with per-query values) here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_encoding_flags(p)


def _config(args: argparse.Namespace) -> Any:
    from miner.config import MineConfig, OutputConfig, SearchConfig, SelectConfig
    from miner.errors import ConfigError

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in {".parquet", ".jsonl"}:
        raise ConfigError(f"--out must end in .parquet or .jsonl, got {out.name!r}")
    return MineConfig(
        encode=_encode_config(args),
        search=SearchConfig(index=args.index, query_batch_size=args.query_batch_size, nprobe=args.nprobe),
        select=SelectConfig(
            num_negatives=args.num_negatives,
            range_min=args.range[0],
            range_max=args.range[1],
            relative_margin=args.relative_margin,
            absolute_margin=args.absolute_margin,
            max_score=args.max_score,
            min_score=args.min_score,
            sampling=args.sampling,
            seed=args.seed,
            dup_threshold=args.dup_threshold,
            exclude_own_document=not args.keep_own_document,
            prefer_judged=args.prefer_judged,
        ),
        output=OutputConfig(
            format=args.format,
            file_format="jsonl" if suffix == ".jsonl" else "parquet",
            texts=not args.no_texts,
            column_names=args.columns,
        ),
    )


def _table(rows: Sequence[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _fmt(summary: dict[str, Any]) -> str:
    if not summary.get("count"):
        return "-"
    return f"mean {summary['mean']:.4f}  std {summary['std']:.4f}  min {summary['min']:.4f}  max {summary['max']:.4f}"


def _summary(manifest: dict[str, Any], out: Path) -> str:
    counts, timings, enc = manifest["counts"], manifest["timings"], manifest["encoding"]
    rows: list[tuple[str, object]] = [
        ("output", f"{out}  ({manifest['output']['rows']} rows, {manifest['output']['format']})"),
        ("manifest", str(out.with_name(out.name + ".manifest.json"))),
        ("queries", f"{counts['queries']}  ({counts['short_queries']} with fewer negatives than asked)"),
        ("negatives", counts["negatives"]),
        ("documents", f"{manifest['inputs']['documents']}  (index: {manifest['search']['index']}, "
                      f"kernel: {manifest['search']['kernel']['backend']})"),
    ]
    rows += [(f"skipped: {k}", v) for k, v in manifest["skipped"].items()]
    rows += [
        ("positive scores", _fmt(manifest["scores"]["positive"])),
        ("negative scores", _fmt(manifest["scores"]["negative"])),
        ("positive - negative", _fmt(manifest["scores"]["positive_minus_negative"])),
        ("encoded", f"documents {enc['documents']['encoded']} (cached {enc['documents']['cache_hits']}), "
                    f"queries {enc['queries']['encoded']} (cached {enc['queries']['cache_hits']})"
                    + (f", {enc['documents']['precision']}" if enc["documents"].get("precision") else "")),
    ]
    rows += [(f"time: {k}", f"{v:.2f} s") for k, v in timings.items()]
    return _table(rows)


def _quiet_third_parties() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency of sentence-transformers; nothing to quiet without it
        pass


def _run_mine(args: argparse.Namespace, argv: Sequence[str], *, data: Path, split: str) -> int:
    from miner.data import load_data
    from miner.pipeline import mine

    config = _config(args)
    _quiet_third_parties()
    dataset = load_data(
        data,
        split=split,
        corpus=getattr(args, "corpus", None),
        query_column=getattr(args, "query_column", "query"),
        positive_column=getattr(args, "positive_column", "positive"),
        strict=getattr(args, "strict", False),
    )
    out = Path(args.out)
    result = mine(dataset, out, config, progress=not args.quiet, command=["miner", *argv])
    if not args.quiet:
        print(_summary(result.manifest, out))
        if args.command == "demo" and config.output.format == "triplet" and config.output.texts:
            print(_examples(out))
    return 0


def _examples(out: Path, n: int = 2) -> str:
    from miner.write import read_rows

    def cut(text: str, width: int = 100) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    lines = ["", "examples:"]
    seen: set[str] = set()
    for row in read_rows(out):
        if row["query_id"] in seen or len(seen) == n:
            continue
        seen.add(row["query_id"])
        lines += [
            f"  query     {cut(row['query'])}",
            f"  positive  {cut(row['positive'])}  (score {row['positive_score']:.3f})",
            f"  negative  {cut(row['negative'])}  (score {row['negative_score']:.3f}, rank {row['negative_rank']})",
            "",
        ]
    return "\n".join(lines)


def _run_stats(args: argparse.Namespace) -> int:
    from miner.stats import file_stats

    stats = file_stats(Path(args.path))
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        print(_table([(k, v) for k, v in stats.items() if not isinstance(v, dict)]))
        for name, value in stats.items():
            if isinstance(value, dict):
                print(f"{name}:")
                print(_table([(k, v) for k, v in value.items()]))
    return 0


def _run_evalset(args: argparse.Namespace) -> int:
    from miner.config import MineConfig, SearchConfig, SelectConfig
    from miner.evalset import EvalsetConfig, build_evalset, read_pilot_variance

    config = EvalsetConfig(
        budget=args.budget,
        strata=args.strata,
        allocation=args.allocation,
        min_per_stratum=args.min_per_stratum,
        pilot_variance=None if args.pilot_variance is None else read_pilot_variance(args.pilot_variance),
        mapping=args.strata_file,
        topics=args.topics,
        distractors=args.distractors,
        bm25_distractors=args.bm25_distractors,
        background=args.background,
        train=args.train,
        train_split=args.train_split,
        leaked_positives="exclude" if args.exclude_leaked_positives else "report",
        seed=args.seed,
    )
    mine_config = MineConfig(
        encode=_encode_config(args),
        search=SearchConfig(index=args.index),
        select=SelectConfig(relative_margin=args.relative_margin, dup_threshold=args.dup_threshold),
    )
    _quiet_third_parties()
    result = build_evalset(args.data, args.out, config, mine_config, split=args.split, corpus=args.corpus,
                           progress=not args.quiet)
    if not args.quiet:
        m = result.manifest
        width = max(len(s["stratum"]) for s in m["strata"])
        print(f"  {'stratum':<{width}}  {'population':>10}  {'selected':>8}  {'weight':>8}")
        for s in m["strata"]:
            note = "  (too small for the minimum: taken whole)" if s["too_small"] else ""
            print(f"  {s['stratum']:<{width}}  {s['population']:>10}  {s['selected']:>8}  {s['weight']:>8.4f}{note}")
        rows: list[tuple[str, object]] = [
            ("output", f"{result.out}  (corpus.jsonl, queries.jsonl, qrels/test.tsv, strata.tsv, manifest.json)"),
            ("queries", f"{m['selected_queries']} of a population of {m['population']['queries']} "
                        f"(weights sum to {m['weights_sum']:g})"),
            ("corpus", ", ".join(f"{k} {v}" for k, v in m["corpus"].items())),
        ]
        if m["leakage"] is not None:
            leak = m["leakage"]
            rows.append(("leakage", f"{leak['queries_in_training']} eval queries in training (left out); "
                                    f"{leak['queries_with_positive_as_training_positive']} queries with a positive "
                                    f"used as a training positive, {leak['queries_with_positive_as_training_negative']} "
                                    f"as a training negative ({leak['leaked_positives']})"))
        rows += [(f"time: {k}", f"{v:.2f} s") for k, v in m["timings"].items()]
        print(_table(rows))
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from miner.errors import ConfigError
    from miner.evaluate import EvaluateConfig, evaluate

    try:
        recall_at = tuple(int(x) for x in args.recall_at.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--recall-at must be comma-separated integers, got {args.recall_at!r}") from None
    config = EvaluateConfig(k=args.k, recall_at=recall_at, bootstrap=args.bootstrap, confidence=args.confidence,
                            seed=args.seed, index=args.index)
    _quiet_third_parties()
    report = evaluate(args.data, _encode_config(args), config, split=args.split, strata_file=args.strata,
                      progress=not args.quiet)
    if args.out is not None:
        Path(args.out).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps(report.to_dict(per_query=False), indent=2))
    elif not args.quiet:
        print(report.table())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``miner`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
                        format="miner: %(levelname)s: %(message)s")
    from miner.errors import MinerError, ModelError

    try:
        if args.command == "mine":
            return _run_mine(args, argv, data=Path(args.data), split=args.split)
        if args.command == "demo":
            return _run_mine(args, argv, data=DEMO_DIR, split="train")
        if args.command == "evalset":
            return _run_evalset(args)
        if args.command == "evaluate":
            return _run_evaluate(args)
        return _run_stats(args)
    except KeyboardInterrupt:
        print("miner: interrupted; rerun the same command to resume from the last complete part", file=sys.stderr)
        return 130
    except ModelError as exc:
        _report(exc)
        return 3
    except (MinerError, ValueError, ImportError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        _report(exc)
        return 2
    except Exception as exc:  # the CLI's last line of defence: one line, not a traceback
        _report(exc, unexpected=True)
        return 1


def _report(exc: BaseException, *, unexpected: bool = False) -> None:
    if os.environ.get("MINER_DEBUG"):
        traceback.print_exc()
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    prefix = f"{type(exc).__name__}: " if unexpected or isinstance(exc, (OSError,)) else ""
    print(f"miner: error: {prefix}{message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
