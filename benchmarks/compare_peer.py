"""miner against sentence-transformers' ``mine_hard_negatives``: speed, peak memory, agreement.

    python benchmarks/compare_peer.py                  # SciFact train warm + synthetic 200k scale case
    python benchmarks/compare_peer.py --cold           # also cold runs (encoding; ~5+ min each on 2 cores)
    python benchmarks/compare_peer.py --quick          # small scale case, 1 repeat (smoke test)

Both tools get the same settings: rank window 0-100, relative margin 0.05, 5 negatives, ``top``
sampling, all-MiniLM-L6-v2, triplet output written to parquet. Every measured run is its own subprocess
(so ``ru_maxrss`` is that run's peak resident memory) and the tools alternate across repeats.

SciFact train (``--data``, BEIR folder):
- ``warm``: both embedding caches already filled. miner reads its cache (``--miner-cache``); the peer
  reads ``cache_folder`` (``--peer-cache``). The model is loaded before the clock starts, for both, and
  so are the modules either tool imports lazily (``_preimport``: faiss for the peer, pandas, which the
  first ``pyarrow.array`` call imports, for miner; the peer's ``datasets`` imports pandas at import time).
- ``cold`` (``--cold``): empty caches, so the time includes encoding 5,183 documents and the queries.
- agreement: share of the peer's negatives per query that miner also chose (same 5 slots), and why
  the others differ (labeled positive, near-duplicate of a positive, rank shift).

Synthetic scale case (precomputed embeddings, no encoding): ``--docs`` unit vectors (d = 384) around
planted clusters, 2% of them near-copies of another document, ``--queries`` queries with one positive
each. The *peer* is its real ``mine_hard_negatives`` function, given the real model and a
``cache_folder`` pre-filled with these vectors under the exact file names it computes, so it loads
them instead of encoding; its time is everything after encoding (loading the ``.npy`` cache, faiss or
torch search, filtering, building the output ``datasets.Dataset``). *miner* is its mining step on the
same arrays (loaded from the same ``.npy`` files): ``build_index`` (``auto``), the duplicate finder and
``mine_batch`` per query batch, i.e. :meth:`miner.Miner` without its encoder. Neither writes a file.
``miner-nodup`` is the same with near-duplicate detection off (``dup_threshold=None``): the peer has no
such step; miner checks each candidate against the query's positives and searches deeper where
near-duplicates crowd a pool.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import git_commit  # noqa: E402

RESULTS = HERE / "results" / "compare_peer"
SETTINGS = {"range_min": 0, "range_max": 100, "relative_margin": 0.05, "num_negatives": 5, "sampling": "top"}


# --- workers (one measured run each, in a subprocess) ----------------------------------------------


def _peak_mib() -> float:
    """Peak resident memory of this process. ``VmHWM`` restarts at exec; ``ru_maxrss`` would keep the
    high-water mark of the parent that forked the worker."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _preimport() -> None:
    """Import what either tool would otherwise import lazily inside the timed call, for every tool alike."""
    import datasets  # noqa: F401  (the peer's output type; imports pandas)
    import faiss  # noqa: F401  (the peer imports it inside mine_hard_negatives)
    import pandas  # noqa: F401  (pyarrow imports it on the first pyarrow.array call)
    import pyarrow.parquet  # noqa: F401


def _load_model() -> tuple[Any, float]:
    from miner.encode import load_model

    t0 = time.perf_counter()
    model = load_model("default")
    return model, time.perf_counter() - t0


def _scifact_pairs(dataset: Any) -> tuple[list[str], list[str]]:
    anchors, positives = [], []
    q = dataset.qrels
    for r in range(len(dataset.queries)):
        for d in q.positives(r).tolist():
            anchors.append(dataset.queries.texts[r])
            positives.append(dataset.corpus.texts[d])
    return anchors, positives


class _Clock:
    """Accumulates the wall time of wrapped calls under a phase name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def wrap(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0

        return timed


def _patch_peer_search(clock: _Clock, model: Any) -> None:
    """Time the peer's faiss search and its torch similarity, without changing what they compute."""
    import faiss

    base = faiss.IndexFlatIP

    class TimedFlatIP(base):  # type: ignore[misc, valid-type]
        def search(self, *args: Any, **kwargs: Any) -> Any:
            return clock.wrap("search", super().search)(*args, **kwargs)

    faiss.IndexFlatIP = TimedFlatIP
    model.similarity = clock.wrap("search", model.similarity)


def worker_scifact(args: argparse.Namespace) -> dict[str, Any]:
    import miner

    _preimport()
    model, load_s = _load_model()
    out_dir = Path(args.workdir)
    if args.tool == "miner":
        config = miner.MineConfig().replace(
            encode={"cache_dir": args.cache},
            select={k: v for k, v in SETTINGS.items() if k != "sampling"} | {"sampling": "top"},
        )
        t0 = time.perf_counter()
        result = miner.mine(args.data, out_dir / "miner.parquet", config, model=model)
        total = time.perf_counter() - t0
        import pyarrow.parquet as pq

        table = pq.read_table(out_dir / "miner.parquet", columns=["query_id", "negative_id"])
        phases = dict(result.manifest["timings"])
        extra = {"encoding": result.manifest["encoding"], "skipped": result.manifest["skipped"]}
        rows = table.num_rows
        negatives: dict[str, list[str]] = {}
        for qid, did in zip(table.column("query_id").to_pylist(), table.column("negative_id").to_pylist()):
            lst = negatives.setdefault(qid, [])
            if did not in lst:
                lst.append(did)
    else:
        from datasets import Dataset as HFDataset
        from sentence_transformers.util import mine_hard_negatives

        clock = _Clock()
        _patch_peer_search(clock, model)
        model.encode_document = clock.wrap("encode_documents", model.encode_document)
        model.encode_query = clock.wrap("encode_queries", model.encode_query)
        t0 = time.perf_counter()
        t_load = time.perf_counter()
        dataset = miner.load_beir(args.data, "train")
        anchors, positives = _scifact_pairs(dataset)
        hf = HFDataset.from_dict({"anchor": anchors, "positive": positives})
        clock.phases["load_data"] = time.perf_counter() - t_load
        t_mine = time.perf_counter()
        mined = mine_hard_negatives(
            hf,
            model,
            corpus=list(dataset.corpus.texts),
            range_min=SETTINGS["range_min"],
            range_max=SETTINGS["range_max"],
            relative_margin=SETTINGS["relative_margin"],
            num_negatives=SETTINGS["num_negatives"],
            sampling_strategy="top",
            output_format="triplet",
            batch_size=64,
            use_faiss=args.tool == "peer-faiss",
            verbose=False,
            cache_folder=args.cache,
        )
        mine_s = time.perf_counter() - t_mine
        t_write = time.perf_counter()
        mined.to_parquet(str(out_dir / "peer.parquet"))
        clock.phases["write"] = time.perf_counter() - t_write
        total = time.perf_counter() - t0
        enc = clock.phases.get("encode_documents", 0.0) + clock.phases.get("encode_queries", 0.0)
        clock.phases["search"] = clock.phases.get("search", 0.0)
        clock.phases["select_and_build_dataset"] = mine_s - enc - clock.phases["search"]
        phases = clock.phases
        extra = {}
        rows = len(mined)
        qid_of = {t: dataset.queries.ids[r] for r, t in reversed(list(enumerate(dataset.queries.texts)))}
        did_of = {t: dataset.corpus.ids[d] for d, t in reversed(list(enumerate(dataset.corpus.texts)))}
        negatives = {}
        for anchor, neg in zip(mined["anchor"], mined["negative"]):
            lst = negatives.setdefault(qid_of[anchor], [])
            if did_of[neg] not in lst:
                lst.append(did_of[neg])
    return {
        "tool": args.tool,
        "total_s": total,
        "model_load_s": load_s,
        "phases": {k: round(v, 4) for k, v in phases.items()},
        "peak_rss_mib": _peak_mib(),
        "rows": rows,
        "negatives": negatives,
        **extra,
    }


def _peer_hash(items: list[str], model: Any) -> str:
    """The cache key ``mine_hard_negatives`` computes (model name, prompt, prompt name, texts)."""
    name = model.model_card_data.base_model or ""
    return hashlib.sha256(repr((name, None, None, items)).encode(), usedforsecurity=False).hexdigest()


def make_scale(folder: Path, n_docs: int, n_queries: int, seed: int = 0) -> dict[str, Any]:
    """Synthetic unit vectors with planted clusters and near-copies; one positive per query."""
    rng = np.random.default_rng(seed)
    dim, n_clusters = 384, max(8, n_docs // 100)
    centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    assign = rng.integers(0, n_clusters, n_docs)
    docs = centers[assign] + 0.09 * rng.standard_normal((n_docs, dim), dtype=np.float32)  # cos to centre ~0.5
    n_copies = n_docs // 50  # 2% near-copies (cos ~0.98) of another document
    src = rng.choice(n_docs, n_copies, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n_docs), src), n_copies, replace=False)
    docs[dst] = docs[src] + 0.01 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    pos = rng.integers(0, n_docs, n_queries)
    queries = docs[pos] + 0.07 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    np.save(folder / "docs.npy", docs.astype(np.float32))
    np.save(folder / "queries.npy", queries.astype(np.float32))
    np.save(folder / "positives.npy", pos.astype(np.int64))
    return {"docs": n_docs, "queries": n_queries, "dim": dim, "clusters": n_clusters, "near_copies": n_copies}


def _scale_texts(n_docs: int, n_queries: int, pos: np.ndarray) -> tuple[list[str], list[str], list[str]]:
    corpus = [f"d{j}" for j in range(n_docs)]
    anchors = [f"q{i}" for i in range(n_queries)]
    return corpus, anchors, [corpus[p] for p in pos.tolist()]


def prefill_peer_cache(folder: Path, model: Any) -> Path:
    """Write the synthetic vectors where ``mine_hard_negatives(cache_folder=...)`` will look for them."""
    pos = np.load(folder / "positives.npy")
    docs = np.load(folder / "docs.npy", mmap_mode="r")
    corpus, anchors, positives = _scale_texts(docs.shape[0], len(pos), pos)
    deduped_corpus = list(dict.fromkeys(corpus + positives))
    assert deduped_corpus == corpus  # every positive is a corpus text: the peer's corpus order is ours
    cache = folder / "peer-cache"
    cache.mkdir(exist_ok=True)
    for kind, items, src in (("query", anchors, "queries.npy"), ("corpus", corpus, "docs.npy")):
        target = cache / f"{kind}_embeddings_{_peer_hash(items, model)}.npy"
        if not target.exists():
            os.link(folder / src, target) if hasattr(os, "link") else target.write_bytes((folder / src).read_bytes())
    return cache


def worker_scale(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.workdir)
    pos = np.load(folder / "positives.npy")
    n_docs = int(np.load(folder / "docs.npy", mmap_mode="r").shape[0])
    if args.tool in ("miner", "miner-nodup"):
        from miner.config import SearchConfig, SelectConfig
        from miner.data import Corpus, same_text_keys
        from miner.search import build_index
        from miner.select import DuplicateFinder, mine_batch

        corpus_texts, anchors, _ = _scale_texts(n_docs, len(pos), pos)
        corpus = Corpus(corpus_texts, corpus_texts)
        doc_keys = corpus.normalized_keys
        doc_index = corpus.index
        query_keys = same_text_keys(anchors)
        search_cfg = SearchConfig(index=args.index)
        select_cfg = SelectConfig(**{k: v for k, v in SETTINGS.items() if k != "sampling"}, sampling="top",
                                  dup_threshold=None if args.tool == "miner-nodup" else 0.95)
        phases: dict[str, float] = {}
        t0 = time.perf_counter()
        docs = np.load(folder / "docs.npy")
        q_emb = np.load(folder / "queries.npy")
        phases["load_embeddings"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        index = build_index(docs, search_cfg)
        dup = DuplicateFinder(doc_keys)
        phases["build_index"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        ids_out = []
        batch = search_cfg.query_batch_size
        for lo in range(0, len(pos), batch):
            hi = min(lo + batch, len(pos))
            neg, _ = mine_batch(
                q_emb[lo:hi], anchors[lo:hi], query_keys[lo:hi],
                np.arange(hi - lo + 1, dtype=np.int64), pos[lo:hi].astype(np.int64),
                docs=docs, index=index, doc_index=doc_index, doc_keys=doc_keys, duplicates=dup, config=select_cfg,
            )
            ids_out.append(neg.ids)
        phases["search_select"] = time.perf_counter() - t2
        total = time.perf_counter() - t0
        ids = np.concatenate(ids_out)
        name = index.name
    else:
        from datasets import Dataset as HFDataset
        from sentence_transformers.util import mine_hard_negatives

        model, _ = _load_model()
        clock = _Clock()
        _patch_peer_search(clock, model)
        model.encode_document = clock.wrap("encode_documents", model.encode_document)
        model.encode_query = clock.wrap("encode_queries", model.encode_query)
        corpus_texts, anchors, positives = _scale_texts(n_docs, len(pos), pos)
        hf = HFDataset.from_dict({"anchor": anchors, "positive": positives})
        np_load = np.load
        np.load = clock.wrap("load_embeddings", np_load)  # type: ignore[assignment]
        t0 = time.perf_counter()
        mined = mine_hard_negatives(
            hf, model, corpus=corpus_texts,
            range_min=SETTINGS["range_min"], range_max=SETTINGS["range_max"],
            relative_margin=SETTINGS["relative_margin"], num_negatives=SETTINGS["num_negatives"],
            sampling_strategy="top", output_format="triplet", use_faiss=args.tool == "peer-faiss",
            verbose=False, cache_folder=args.cache,
        )
        total = time.perf_counter() - t0
        np.load = np_load  # type: ignore[assignment]
        if clock.phases.get("encode_documents") or clock.phases.get("encode_queries"):
            raise RuntimeError("the peer encoded: its cache was not hit, the scale comparison would be wrong")
        phases = dict(clock.phases)
        phases["select_and_build_dataset"] = total - phases.get("search", 0.0) - phases.get("load_embeddings", 0.0)
        ids = np.full((len(pos), SETTINGS["num_negatives"]), -1, dtype=np.int64)
        fill = np.zeros(len(pos), dtype=np.int64)
        for a, n in zip(mined["anchor"], mined["negative"]):
            r, d = int(a[1:]), int(n[1:])
            if fill[r] < ids.shape[1] and d not in ids[r, : fill[r]]:
                ids[r, fill[r]] = d
                fill[r] += 1
        name = "faiss IndexFlatIP" if args.tool == "peer-faiss" else "torch matmul + topk"
    np.save(Path(args.result).with_suffix(".ids.npy"), ids)
    return {"tool": args.tool, "index": name, "total_s": total, "phases": {k: round(v, 4) for k, v in phases.items()},
            "peak_rss_mib": _peak_mib()}


# --- driver ----------------------------------------------------------------------------------------


def run_worker(kind: str, tool: str, extra: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "_worker", kind, "--tool", tool, "--result", str(result), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {kind}/{tool} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(result.read_text())
        ids_file = result.with_suffix(".ids.npy")
        if ids_file.exists():
            out["_ids"] = np.load(ids_file)
        return out


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["total_s"] for r in runs]
    phases = {k: statistics.median(r["phases"].get(k, 0.0) for r in runs) for k in runs[0]["phases"]}
    return {
        "runs": len(runs),
        "total_s": totals,
        "median_s": statistics.median(totals),
        "best_s": min(totals),
        "phases_median_s": {k: round(v, 3) for k, v in phases.items()},
        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in runs),
    }


def agreement_scifact(data: str, miner_negs: dict[str, list[str]], peer_negs: dict[str, list[str]], cache: str) -> dict[str, Any]:
    """Per query: share of the peer's negatives miner also chose, and what the peer's others are."""
    import miner
    from miner.data import normalize_text
    from miner.encode import Encoder, load_model
    from miner.config import EncodeConfig

    ds = miner.load_beir(data, "train")
    enc = Encoder(EncodeConfig(cache_dir=cache), load_model("default"))
    docs = enc.encode(ds.corpus.texts, kind="document")
    idx = ds.corpus.index
    norm = [normalize_text(t) for t in ds.corpus.texts]
    shares, identical, reasons = [], 0, {"near_duplicate_of_positive": 0, "same_text_as_positive": 0, "other": 0}
    miner_only = short_peer = short_miner = 0
    for r, qid in enumerate(ds.queries.ids):
        p, m = peer_negs.get(qid, []), miner_negs.get(qid, [])
        if not p and not m:
            continue
        shares.append(len(set(p) & set(m)) / max(len(p), len(m)))
        identical += p == m
        pos = ds.qrels.positives(r)
        for d in set(p) - set(m):
            row = idx[d]
            sim = float((docs[pos] @ docs[row]).max())
            if any(norm[row] == norm[x] for x in pos.tolist()):
                reasons["same_text_as_positive"] += 1
            elif sim >= 0.95:
                reasons["near_duplicate_of_positive"] += 1
            else:
                reasons["other"] += 1
        miner_only += len(set(m) - set(p))
        short_peer += len(p) < SETTINGS["num_negatives"]
        short_miner += len(m) < SETTINGS["num_negatives"]
    return {
        "queries_compared": len(shares),
        "mean_share_identical": float(np.mean(shares)),
        "queries_with_identical_lists": identical,
        "peer_negatives_not_chosen_by_miner": reasons,
        "miner_negatives_not_chosen_by_peer": miner_only,
        "queries_short_peer": short_peer,
        "queries_short_miner": short_miner,
        "peer_negatives": sum(len(v) for v in peer_negs.values()),
        "miner_negatives": sum(len(v) for v in miner_negs.values()),
    }


def agreement_scale(miner_ids: np.ndarray, peer_ids: np.ndarray, folder: Path) -> dict[str, Any]:
    docs = np.load(folder / "docs.npy", mmap_mode="r")
    pos = np.load(folder / "positives.npy")
    shares = []
    near = 0
    for r in range(len(miner_ids)):
        m, p = set(miner_ids[r][miner_ids[r] >= 0].tolist()), set(peer_ids[r][peer_ids[r] >= 0].tolist())
        if m or p:
            shares.append(len(m & p) / max(len(m), len(p)))
        for d in p - m:
            near += float(docs[pos[r]] @ docs[d]) >= 0.95
    return {"mean_share_identical": float(np.mean(shares)), "identical_rows": int((miner_ids == peer_ids).all(1).sum()),
            "short_rows_miner": int((miner_ids < 0).any(1).sum()), "short_rows_peer": int((peer_ids < 0).any(1).sum()),
            "peer_negatives_near_duplicate_of_positive": int(near)}


def recall_vs_exact(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) for a, e in zip(approx, exact))
    return hits / max(1, int((exact >= 0).sum()))


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import faiss
    import sentence_transformers
    import torch

    import miner

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__,
            "faiss": faiss.__version__, "miner": miner.__version__, "kernel": miner.backend_info(),
            "commit": git_commit()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        p = argparse.ArgumentParser()
        p.add_argument("kind", choices=["scifact", "scale"])
        p.add_argument("--tool", required=True)
        p.add_argument("--result", required=True)
        p.add_argument("--data")
        p.add_argument("--cache")
        p.add_argument("--workdir")
        p.add_argument("--index", default="auto")
        a = p.parse_args(argv[1:])
        out = worker_scifact(a) if a.kind == "scifact" else worker_scale(a)
        Path(a.result).write_text(json.dumps(out))
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "scifact"))
    p.add_argument("--miner-cache", default="/tmp/scifact-cache", help="miner's filled embedding cache (warm runs)")
    p.add_argument("--peer-cache", default=None, help="the peer's filled cache_folder (warm runs); default: fill one")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--scale-repeats", type=int, default=2)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--cold", action="store_true", help="also run both tools with empty caches (slow)")
    p.add_argument("--ivf", action="store_true", help="scale case: also miner with an IVF index (recall vs exact)")
    p.add_argument("--scale-peer-torch", action="store_true",
                   help="scale case: also the peer's torch path (a 16,384 x docs float32 matrix: 13 GB at 200k)")
    p.add_argument("--skip-scifact", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--quick", action="store_true", help="20k x 2k scale case, 1 repeat")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.quick:
        a.docs, a.queries, a.repeats, a.scale_repeats = 20_000, 2_000, 1, 1

    report: dict[str, Any] = {
        "command": "python benchmarks/compare_peer.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "settings": SETTINGS,
    }
    work = Path(tempfile.mkdtemp(prefix="compare-peer-"))
    print(f"work folder {work}", file=sys.stderr)

    if not a.skip_scifact:
        peer_cache = a.peer_cache or str(work / "peer-cache")
        sci: dict[str, Any] = {}
        runs: dict[str, list[dict[str, Any]]] = {"miner": [], "peer-faiss": [], "peer-torch": []}
        order = ["miner", "peer-faiss", "peer-torch"]
        if not a.peer_cache:  # fill the peer's cache once (an unmeasured cold run)
            print("filling the peer's cache (encodes SciFact)...", file=sys.stderr)
            wd = work / "fill"
            wd.mkdir()
            run_worker("scifact", "peer-faiss", ["--data", a.data, "--cache", peer_cache, "--workdir", str(wd)])
        for rep in range(a.repeats):
            for tool in order if rep % 2 == 0 else order[::-1]:
                wd = work / f"sci-{tool}-{rep}"
                wd.mkdir()
                cache = a.miner_cache if tool == "miner" else peer_cache
                res = run_worker("scifact", tool, ["--data", a.data, "--cache", cache, "--workdir", str(wd)])
                if tool != "miner" and res["phases"].get("encode_documents", 0) + res["phases"].get("encode_queries", 0):
                    raise RuntimeError(f"{tool} encoded in a warm run: {cache} does not hold its embeddings")
                print(f"scifact warm {tool} rep {rep}: {res['total_s']:.2f} s, {res['peak_rss_mib']:.0f} MiB",
                      file=sys.stderr)
                runs[tool].append(res)
        sci["warm"] = {t: _summary(r) for t, r in runs.items()}
        sci["warm_miner_encoding"] = runs["miner"][-1].get("encoding")
        sci["miner_skipped"] = runs["miner"][-1].get("skipped")
        sci["agreement"] = {
            tool: agreement_scifact(a.data, runs["miner"][-1]["negatives"], runs[tool][-1]["negatives"], a.miner_cache)
            for tool in ("peer-faiss", "peer-torch")
        }
        sci["peer_faiss_vs_torch_identical"] = runs["peer-faiss"][-1]["negatives"] == runs["peer-torch"][-1]["negatives"]
        if a.cold:
            cold: dict[str, list[dict[str, Any]]] = {"miner": [], "peer-faiss": []}
            for rep in range(max(1, a.repeats // 2)):
                for tool in ["miner", "peer-faiss"] if rep % 2 == 0 else ["peer-faiss", "miner"]:
                    wd = work / f"cold-{tool}-{rep}"
                    wd.mkdir()
                    res = run_worker("scifact", tool, ["--data", a.data, "--cache", str(wd / "cache"), "--workdir", str(wd)])
                    print(f"scifact cold {tool} rep {rep}: {res['total_s']:.2f} s", file=sys.stderr)
                    cold[tool].append(res)
            sci["cold"] = {t: _summary(r) for t, r in cold.items()}
        for runs_ in (runs,):
            for lst in runs_.values():
                for r in lst:
                    r.pop("negatives", None)
        report["scifact"] = sci

    if not a.skip_scale:
        folder = work / "scale"
        folder.mkdir()
        report["scale_data"] = make_scale(folder, a.docs, a.queries)
        from miner.encode import load_model

        cache = prefill_peer_cache(folder, load_model("default"))
        tools = ["miner", "peer-faiss", "miner-nodup"] + (["peer-torch"] if a.scale_peer_torch else [])
        sruns: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
        for rep in range(a.scale_repeats):
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                res = run_worker("scale", tool, ["--workdir", str(folder), "--cache", str(cache)])
                print(f"scale {tool} rep {rep}: {res['total_s']:.2f} s, {res['peak_rss_mib']:.0f} MiB", file=sys.stderr)
                sruns[tool].append(res)
        scale: dict[str, Any] = {t: _summary(r) | {"index": r[0]["index"]} for t, r in sruns.items()}
        scale["agreement_vs_peer_faiss"] = agreement_scale(sruns["miner"][-1]["_ids"], sruns["peer-faiss"][-1]["_ids"], folder)
        if a.ivf:
            ivf = run_worker("scale", "miner", ["--workdir", str(folder), "--cache", str(cache), "--index", "ivf"])
            scale["miner-ivf"] = _summary([ivf]) | {"index": ivf["index"],
                                                    "recall_vs_exact": recall_vs_exact(ivf["_ids"], sruns["miner"][-1]["_ids"])}
        report["scale"] = scale

    report["load_average_end"] = os.getloadavg()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=lambda o: None) + "\n")
    out.with_suffix(".md").write_text(render(report))
    print(out.with_suffix(".md").read_text())
    return 0


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "n/a"


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# miner vs sentence-transformers `mine_hard_negatives`",
        "",
        f"Command: `{r['command']}`",
        "",
        f"- date: {r['date']}, commit {m.get('commit', 'not recorded')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; python {m['python']}, torch {m['torch']}, "
        f"sentence-transformers {m['sentence_transformers']}, faiss {m['faiss']}, miner {m['miner']} ({m['kernel'].get('backend')})",
        f"- load average at start {tuple(round(x, 2) for x in r['load_average_start'])}, "
        f"at end {tuple(round(x, 2) for x in r['load_average_end'])} (a shared machine: medians of alternating runs)",
        f"- settings for both: {r['settings']}, all-MiniLM-L6-v2, triplet output",
        "",
    ]
    if "scifact" in r:
        s = r["scifact"]
        w = s["warm"]
        lines += [
            "## SciFact train, warm (both embedding caches filled; model loaded before the clock)",
            "",
            "| tool | runs (s) | median (s) | time / miner (>1: miner faster) | peak RSS (MiB) | phases, median (s) |",
            "|---|---|---:|---:|---:|---|",
        ]
        for t, v in w.items():
            runs = ", ".join(f"{x:.2f}" for x in v["total_s"])
            ph = ", ".join(f"{k} {x:.2f}" for k, x in v["phases_median_s"].items())
            lines.append(f"| {t} | {runs} | {v['median_s']:.2f} | {_ratio(w['miner']['median_s'], v['median_s'])} | "
                         f"{v['peak_rss_mib_max']:.0f} | {ph} |")
        lines += ["", "Agreement on SciFact (last run of each):", ""]
        for t, ag in s["agreement"].items():
            lines.append(f"- miner vs {t}: {ag['mean_share_identical']:.1%} of negatives identical per query "
                         f"(mean over {ag['queries_compared']} queries), {ag['queries_with_identical_lists']} queries with "
                         f"the same list in the same order; the peer's negatives miner did not choose: "
                         f"{ag['peer_negatives_not_chosen_by_miner']}; miner's not chosen by the peer: "
                         f"{ag['miner_negatives_not_chosen_by_peer']} (negatives: peer {ag['peer_negatives']}, miner {ag['miner_negatives']}; "
                         f"queries with fewer than 5: peer {ag['queries_short_peer']}, miner {ag['queries_short_miner']})")
        lines.append(f"- peer faiss and peer torch identical: {s['peer_faiss_vs_torch_identical']}")
        lines.append(f"- miner's skipped candidates by reason: {s['miner_skipped']}")
        if "cold" in s:
            c = s["cold"]
            lines += ["", "## SciFact train, cold (empty caches: encoding included)", "",
                      "| tool | runs (s) | median (s) | time / miner (>1: miner faster) | peak RSS (MiB) | phases, median (s) |", "|---|---|---:|---:|---:|---|"]
            for t, v in c.items():
                ph = ", ".join(f"{k} {x:.2f}" for k, x in v["phases_median_s"].items())
                lines.append(f"| {t} | {', '.join(f'{x:.2f}' for x in v['total_s'])} | {v['median_s']:.2f} | "
                             f"{_ratio(c['miner']['median_s'], v['median_s'])} | {v['peak_rss_mib_max']:.0f} | {ph} |")
        else:
            lines += ["", "Cold runs (encoding included) were not measured in this run (`--cold`)."]
        lines.append("")
    if "scale" in r:
        sc, d = r["scale"], r["scale_data"]
        lines += [
            f"## Synthetic scale case: mining step on precomputed embeddings ({d['docs']:,} docs x {d['queries']:,} queries, d = {d['dim']})",
            "",
            "| tool | index | runs (s) | median (s) | time / miner (>1: miner faster) | peak RSS (MiB) | phases, median (s) |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for t, v in sc.items():
            if not isinstance(v, dict) or "median_s" not in v:
                continue
            ph = ", ".join(f"{k} {x:.2f}" for k, x in v["phases_median_s"].items())
            lines.append(f"| {t} | {v['index']} | {', '.join(f'{x:.2f}' for x in v['total_s'])} | {v['median_s']:.2f} | "
                         f"{_ratio(sc['miner']['median_s'], v['median_s'])} | {v['peak_rss_mib_max']:.0f} | {ph} |")
        ag = sc["agreement_vs_peer_faiss"]
        lines += ["", f"Agreement with peer-faiss: {ag['mean_share_identical']:.1%} identical per query, "
                  f"{ag['identical_rows']:,} identical rows; peer negatives that are near-copies (cos >= 0.95) of the "
                  f"positive: {ag['peer_negatives_near_duplicate_of_positive']:,}; queries with fewer than 5 negatives: "
                  f"miner {ag['short_rows_miner']:,}, peer {ag['short_rows_peer']:,}."]
        if "miner-ivf" in sc:
            lines.append(f"miner with IVF: recall of the chosen negatives vs exact {sc['miner-ivf']['recall_vs_exact']:.3f}.")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
