"""Approximate search against exact search on the synthetic scale set: recall@k and time, side by side.

    python benchmarks/ann_recall.py                          # 200k docs, 2,000 of the 20k queries, IVF sweep
    python benchmarks/ann_recall.py --quick                  # 20k docs, 500 queries (smoke test)
    python benchmarks/ann_recall.py --hnsw                   # also HNSW32 (slow to build on 2 cores)

The data is ``compare_peer.make_scale`` (the same vectors as its scale case): unit vectors in 384
dimensions around planted clusters, each query a noisy copy of its positive. Every index answers the same
``--sample`` queries for the top ``--k``; recall@k is the share of exact search's top k that the index
returns (ties at the k-th score counted as found), and the time is the search time of that sample, the
exact search timed on the same sample in the same run. ``miner``'s ``auto`` index picks exact search at
this size; this script is the evidence for that choice, and for the ``--nprobe`` an IVF user would need.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_peer import make_scale  # noqa: E402
from machine import describe, git_commit  # noqa: E402


def recall_at_k(found: np.ndarray, exact_ids: np.ndarray, exact_scores: np.ndarray, scores_of: Any) -> float:
    """Mean over queries of |found ∩ exact top k| / k, where a found document scoring at least the exact
    k-th score also counts (ties at the boundary are not misses)."""
    hits = 0
    k = exact_ids.shape[1]
    for r in range(len(found)):
        got = found[r][found[r] >= 0]
        inside = np.isin(got, exact_ids[r])
        tied = ~inside & (scores_of(r, got) >= exact_scores[r, -1])
        hits += min(k, int(inside.sum() + tied.sum()))
    return hits / (k * len(found))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=20_000, help="queries generated (as compare_peer)")
    p.add_argument("--sample", type=int, default=2_000, help="queries searched")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--nlist", type=int, nargs="+", default=[0, 1024], help="IVF lists (0: miner's default)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--hnsw", action="store_true", help="also HNSW32 at several efSearch")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--workdir", type=Path, default=None, help="reuse generated vectors here")
    p.add_argument("--out", type=Path, default=HERE / "results" / "ann_recall")
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.queries, args.sample, args.nprobe = 20_000, 2_000, 500, [8, 32]

    from miner.config import SearchConfig
    from miner.search import FaissIndex, _factory_string, exact_search

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="ann-recall-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "docs.npy").is_file():
        make_scale(folder, args.docs, args.queries)
    docs = np.load(folder / "docs.npy")
    queries = np.load(folder / "queries.npy")[: args.sample]
    if docs.shape[0] != args.docs:
        raise SystemExit(f"{folder} holds {docs.shape[0]} documents, not {args.docs}: pick another --workdir")

    def scores_of(r: int, ids: np.ndarray) -> np.ndarray:
        return docs[ids] @ queries[r]

    t0 = time.perf_counter()
    ex_scores, ex_ids = exact_search(queries, docs, args.k)
    exact_s = time.perf_counter() - t0
    rows: list[dict[str, Any]] = [{"index": "exact (miner)", "build_s": 0.0, "param": "", "search_s": exact_s,
                                   "recall": 1.0}]
    print(f"exact: {exact_s:.2f} s", flush=True)
    for nlist in args.nlist:
        spec = _factory_string("ivf", docs.shape[0]) if nlist == 0 else f"IVF{nlist},Flat"
        t0 = time.perf_counter()
        index = FaissIndex(docs, spec, SearchConfig(index=spec))
        build_s = time.perf_counter() - t0
        ivf = __import__("faiss").extract_index_ivf(index.index)
        for nprobe in args.nprobe:
            if nprobe > ivf.nlist:
                continue
            ivf.nprobe = nprobe
            t0 = time.perf_counter()
            _, ids = index.index.search(queries, args.k)
            search_s = time.perf_counter() - t0
            rec = recall_at_k(ids, ex_ids, ex_scores, scores_of)
            rows.append({"index": spec, "build_s": build_s, "param": f"nprobe={nprobe}", "search_s": search_s,
                         "recall": rec})
            print(f"{spec} nprobe={nprobe}: build {build_s:.1f} s, search {search_s:.2f} s, recall {rec:.3f}", flush=True)
    if args.hnsw:
        t0 = time.perf_counter()
        index = FaissIndex(docs, "HNSW32,Flat", SearchConfig(index="hnsw"))
        build_s = time.perf_counter() - t0
        for ef in (128, 256, 512):
            index.index.hnsw.efSearch = ef
            t0 = time.perf_counter()
            _, ids = index.index.search(queries, args.k)
            search_s = time.perf_counter() - t0
            rec = recall_at_k(ids, ex_ids, ex_scores, scores_of)
            rows.append({"index": "HNSW32,Flat", "build_s": build_s, "param": f"efSearch={ef}", "search_s": search_s,
                         "recall": rec})
            print(f"HNSW32 ef={ef}: build {build_s:.1f} s, search {search_s:.2f} s, recall {rec:.3f}", flush=True)

    import os

    report = {
        "command": "python benchmarks/ann_recall.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        "commit": git_commit(),
        "load_average": os.getloadavg(),
        "docs": int(docs.shape[0]), "sample": int(len(queries)), "k": args.k, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


def render(r: dict[str, Any]) -> str:
    exact_s = r["rows"][0]["search_s"]
    lines = [
        "# Approximate search vs exact on the synthetic scale set",
        "",
        f"Command: `{r['command']}`",
        "",
        f"- date: {r['date']}, commit {r['commit']}; machine: {r['machine']}; load average {tuple(round(x, 2) for x in r['load_average'])}",
        f"- {r['docs']:,} documents (compare_peer's synthetic set), {r['sample']:,} queries, top {r['k']}; recall@{r['k']}"
        " against miner's exact search (ties at the k-th score count as found)",
        "- search time is for these queries; `exact / index` > 1 means the index searched faster (build excluded)",
        "",
        f"| index | setting | build (s) | search (s) | exact / index | recall@{r['k']} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['index']} | {row['param']} | {row['build_s']:.1f} | {row['search_s']:.2f} | "
                     f"{exact_s / row['search_s']:.2f}x | {row['recall']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
