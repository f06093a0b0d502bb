"""Would a bf16 screen speed up exact search? The matrix product and a screened top-k, timed side by side.

    python benchmarks/bf16_screen.py --workdir /tmp/scale200      # compare_peer's 200k set, 4,096 queries

Exact search is a float32 matrix product per tile plus the top-k kernel. A bf16 screen would multiply in
bf16 (each score off by at most ~3 * 2^-8 for unit vectors), keep a wider top-(k + margin) under the
screened scores, and re-score those candidates in float32 to return the exact top k. This script times the
parts that decide whether that pays: the tile products in float32 and bf16 (torch), and the screen itself
(bf16 product, conversion to float32 for the kernel, top-(k + margin)) against miner's exact search on the
same queries. The fp32 re-scoring of the wider set is not included, so the screen's time is a lower bound.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_peer import make_scale  # noqa: E402
from machine import describe, git_commit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workdir", type=Path, required=True, help="compare_peer scale vectors (made if missing)")
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--k", type=int, default=131, help="miner's pool for range_max 100 (100 + 25 + margin)")
    p.add_argument("--margin", type=int, default=256, help="extra candidates the screen keeps")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bf16_screen")
    args = p.parse_args(argv)

    import torch

    from miner import topk
    from miner.config import SearchConfig
    from miner.search import exact_search_counts

    if not (args.workdir / "docs.npy").is_file():
        args.workdir.mkdir(parents=True, exist_ok=True)
        make_scale(args.workdir, args.docs, 20_000)
    docs = np.load(args.workdir / "docs.npy")
    queries = np.load(args.workdir / "queries.npy")[: args.queries]
    qb, db = SearchConfig().query_batch_size, SearchConfig().doc_block_size
    q16, d16 = torch.from_numpy(queries).bfloat16(), torch.from_numpy(docs).bfloat16()

    def tiles(fn: Any) -> None:
        for q0 in range(0, len(queries), qb):
            for d0 in range(0, len(docs), db):
                fn(q0, d0)

    out32 = np.empty((qb, db), dtype=np.float32)

    def product_fp32(q0: int, d0: int) -> None:
        block = docs[d0 : d0 + db]
        np.matmul(queries[q0 : q0 + qb], block.T, out=out32[: min(qb, len(queries) - q0), : len(block)])

    def product_bf16(q0: int, d0: int) -> None:
        q16[q0 : q0 + qb] @ d16[d0 : d0 + db].T

    def screen() -> None:
        for q0 in range(0, len(queries), qb):
            vals, ids = topk.new_state(min(qb, len(queries) - q0), args.k + args.margin)
            for d0 in range(0, len(docs), db):
                scores = (q16[q0 : q0 + qb] @ d16[d0 : d0 + db].T).float().numpy()
                topk.update_topk(scores, d0, vals, ids)

    times: dict[str, float] = {}
    for name, fn in (
        ("exact search (miner, fp32)", lambda: exact_search_counts(queries, docs, args.k)),
        ("tile products, fp32 (numpy)", lambda: tiles(product_fp32)),
        ("tile products, bf16 (torch)", lambda: tiles(product_bf16)),
        (f"bf16 screen: product + to fp32 + top-{args.k + args.margin}", screen),
    ):
        t0 = time.perf_counter()
        fn()
        times[name] = time.perf_counter() - t0
        print(f"{name}: {times[name]:.2f} s", flush=True)

    report = {
        "command": "python benchmarks/bf16_screen.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": describe(), "load_average": os.getloadavg(),
        "docs": int(len(docs)), "queries": int(len(queries)), "k": args.k, "margin": args.margin,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": times,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    exact = next(iter(times.values()))
    lines = [
        "# bf16 screen for exact search: the parts, timed side by side",
        "",
        f"Command: `{report['command']}`",
        "",
        f"- date: {report['date']}, commit {report['commit']}; machine: {report['machine']}; load average "
        f"{tuple(round(x, 2) for x in report['load_average'])}; torch {report['torch']}, {report['threads']} threads",
        f"- {report['docs']:,} documents x {report['queries']:,} queries (compare_peer's synthetic set), d = 384, "
        f"k = {args.k}, screen keeps k + {args.margin}; tiles {qb} x {db}",
        "- the screen's time leaves out re-scoring its candidates in fp32, so it is a lower bound",
        "",
        "| step | seconds | exact search / step |",
        "|---|---:|---:|",
        *[f"| {name} | {sec:.2f} | {exact / sec:.2f}x |" for name, sec in times.items()],
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
