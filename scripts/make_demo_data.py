"""Cut the bundled demo sample (miner/demo_data) out of SciFact.

Usage: python scripts/make_demo_data.py ../shared/data/scifact miner/demo_data

Keeps 200 training queries (seeded draw) with every positive, 100 test queries with theirs, and a seeded
sample of other documents to 1,000 in all. SciFact is CC BY-NC 2.0; the README written beside the data says so.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path


def main(src: Path, dst: Path, n_train: int = 200, n_test: int = 100, n_docs: int = 1000, seed: int = 0) -> None:
    rng = random.Random(seed)
    qrels = {}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = (src / "qrels" / f"{split}.tsv").read_text().splitlines()
        rows = [line.split("\t") for line in lines[1:] if line.strip()]
        qids = sorted({r[0] for r in rows}, key=lambda q: int(q))
        keep = set(rng.sample(qids, n))
        qrels[split] = [r for r in rows if r[0] in keep]
    needed = {r[1] for rows in qrels.values() for r in rows}
    docs = [json.loads(line) for line in (src / "corpus.jsonl").read_text().splitlines() if line.strip()]
    others = [d["_id"] for d in docs if d["_id"] not in needed]
    keep_docs = needed | set(rng.sample(others, n_docs - len(needed)))
    query_ids = {r[0] for rows in qrels.values() for r in rows}
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    with open(dst / "corpus.jsonl", "w") as out:
        for d in docs:
            if d["_id"] in keep_docs:
                out.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(dst / "queries.jsonl", "w") as out:
        for line in (src / "queries.jsonl").read_text().splitlines():
            q = json.loads(line)
            if q["_id"] in query_ids:
                out.write(json.dumps(q, ensure_ascii=False) + "\n")
    for split, rows in qrels.items():
        with open(dst / "qrels" / f"{split}.tsv", "w") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for r in rows:
                out.write("\t".join(r) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
