"""Encoder speed and quality: sentences per second per lever, the quality guard, and cold end to end on SciFact.

    python benchmarks/encode.py guard        # every reduced precision against fp32 on SciFact (~15 min here)
    python benchmarks/encode.py throughput   # sentences/s per lever, interleaved with plain encode (~10 min)
    python benchmarks/encode.py e2e          # cold SciFact train: sentence-transformers vs miner (~20 min)
    python benchmarks/encode.py report       # re-render results/encode.md from the parts already measured

Each part writes ``benchmarks/results/encode-<part>.json`` (command line, date, machine, figures) and
re-renders ``benchmarks/results/encode.md`` from every part measured so far.

- **throughput**: a seeded sample of SciFact abstracts (passage length, ~240 tokens, most cut at 256) and of
  SciFact claims (short queries, ~20 tokens), encoded by plain ``SentenceTransformer.encode`` (fp32, batch
  64: the baseline) and by miner's encoder with each lever alone and combined. The arms run in a new random
  order every round, so outside load hits all alike; ratios are medians of same-round ratios to the
  baseline. Models are loaded and int8 exported before the rounds.
- **guard**: for each reduced precision, :func:`miner.mine` on SciFact train (default selection, 5
  negatives) and :func:`miner.evaluate` on SciFact test (nDCG@10, full corpus), against the same in fp32.
  Overlap is the mean over queries of ``|N_p & N_fp32| / |N_fp32|``. A path passes with overlap >= 0.95
  and ``|delta nDCG@10| <= 0.005``; ``miner.precision.GUARD`` copies these figures.
- **e2e**: SciFact train from a cold start (no embedding cache, model already loaded):
  ``sentence_transformers.util.mine_hard_negatives`` with the same model and the nearest settings (5
  negatives, ranks 0-100, relative margin 0.05, top sampling), miner with the CLI's defaults
  (``--precision auto``, token budget 8192), miner with ``--precision bf16``, and with ``--with-before``
  miner's encoder as it was before these levers (fp32, fixed batches of 64).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SCIFACT = REPO.parent / "shared" / "data" / "scifact"


def machine() -> str:
    from miner.precision import cpu_flags

    simd = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "avx512_vnni", "amx")))
    return describe(", ".join(simd) or "no bf16/vnni/amx")


def header() -> dict[str, Any]:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
    }


def scifact_texts(data: Path) -> tuple[list[str], list[str]]:
    from miner.data import load_beir

    ds = load_beir(data, "train")
    queries = [json.loads(line)["text"] for line in (data / "queries.jsonl").read_text().splitlines() if line]
    return list(ds.corpus.texts), queries


def load(model_name: str) -> Any:
    from miner.encode import load_model

    return load_model(model_name, "cpu")


# ---------------------------------------------------------------- paths measured but not shipped

ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def onnx_int8_runner(model: Any) -> Callable[[dict[str, Any]], Any]:
    """ONNX Runtime on the transformer exported and dynamically quantised (int8 weights, per channel), then
    the model's own pooling modules. Needs ``pip install onnxruntime onnx``."""
    import logging

    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    backbone = model[0].auto_model
    probe = model.preprocess(["a probe text", "another"])
    inputs = [name for name in ONNX_INPUTS if isinstance(probe.get(name), torch.Tensor)]

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.backbone(**dict(zip(inputs, args)), return_dict=True).last_hidden_state

    model.eval()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="miner-onnx-") as tmp:
        fp32_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        axes = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "token_embeddings"]}
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it needs no onnxscript
            torch.onnx.export(Backbone().eval(), tuple(probe[name] for name in inputs), str(fp32_path),
                              input_names=inputs, output_names=["token_embeddings"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
        logging.disable(logging.WARNING)  # quantize_dynamic logs advice through the root logger
        try:
            quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        session = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    tail = list(model)[1:]

    def run(features: dict[str, Any]) -> Any:
        feed = {name: features[name].numpy().astype(np.int64, copy=False) for name in inputs}
        (hidden,) = session.run(["token_embeddings"], feed)
        out = dict(features, token_embeddings=torch.from_numpy(hidden))
        with torch.inference_mode():
            for module in tail:
                out = module(out)
        return out["sentence_embedding"].float()

    return run


def torch_int8_runner(model: Any) -> Callable[[dict[str, Any]], Any]:
    """``torch.ao.quantization.quantize_dynamic`` of every Linear (int8 weights per tensor)."""
    import torch

    from miner.precision import make_runner

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return make_runner(quantized, "fp32")


UNSHIPPED = {"int8-onnx": onnx_int8_runner, "int8-torch": torch_int8_runner}


def has_onnxruntime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


@contextlib.contextmanager
def unshipped(name: str) -> Any:
    """Let miner's Encoder run a path it does not ship: precision ``name`` in its cache key, its runner."""
    import miner.encode as enc

    old = enc.resolve_precision, enc.make_runner
    enc.resolve_precision = lambda precision, device: name  # type: ignore[assignment]
    enc.make_runner = lambda model, precision: UNSHIPPED[name](model)  # type: ignore[assignment]
    try:
        yield
    finally:
        enc.resolve_precision, enc.make_runner = old


def encode_config(precision: str, **kwargs: Any) -> Any:
    from miner.config import EncodeConfig

    return EncodeConfig(precision="fp32" if precision in UNSHIPPED else precision, **kwargs)


def precision_context(precision: str) -> Any:
    return unshipped(precision) if precision in UNSHIPPED else contextlib.nullcontext()


# ---------------------------------------------------------------- throughput


def throughput_arms(model: Any) -> dict[str, Callable[[list[str]], np.ndarray]]:
    """Name -> function(texts) -> float32[n, d]. Built once: loading and int8 export stay out of the timing."""
    from miner.encode import Encoder

    def plain(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    def miner_arm(precision: str, budget: int | None) -> Callable[[list[str]], np.ndarray]:
        with precision_context(precision):
            encoder = Encoder(encode_config(precision, token_budget=budget, cache_dir=None), model)
            encoder.encode(["warm up", "the first call builds the runner"], kind="document")
        return lambda texts: encoder.encode(texts, kind="document")

    arms: dict[str, Callable[[list[str]], np.ndarray]] = {
        "sentence-transformers encode, fp32, batch 64 (baseline)": plain,
        "miner fp32, batch 64": miner_arm("fp32", None),
        "miner fp32, token budget 8192": miner_arm("fp32", 8192),
        "miner fp32, token budget 16384": miner_arm("fp32", 16384),
        "miner bf16, batch 64": miner_arm("bf16", None),
        "miner bf16, token budget 8192": miner_arm("bf16", 8192),
    }
    if has_onnxruntime():
        arms["int8, ONNX Runtime, token budget 8192 (not shipped)"] = miner_arm("int8-onnx", 8192)
    arms["int8, torch quantize_dynamic, token budget 8192 (not shipped)"] = miner_arm("int8-torch", 8192)
    return arms


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    info = header()
    docs, queries = scifact_texts(args.data)
    rng = np.random.default_rng(args.seed)
    sample = {
        "documents": [docs[i] for i in rng.choice(len(docs), args.docs, replace=False)],
        "queries": [queries[i] for i in rng.choice(len(queries), args.queries, replace=False)],
    }
    model = load(args.model)
    tok = model.tokenizer
    tokens = {k: float(np.mean([len(x) for x in tok(v, truncation=True, max_length=model.max_seq_length)["input_ids"]]))
              for k, v in sample.items()}
    arms = throughput_arms(model)
    base = next(iter(arms))
    reference = {k: arms[base](v) for k, v in sample.items()}
    times: dict[str, dict[str, list[float]]] = {a: {k: [] for k in sample} for a in arms}
    cosine: dict[str, dict[str, float]] = {a: {} for a in arms}
    for rnd in range(args.rounds):
        order = list(arms)
        rng.shuffle(order)
        for name in order:
            for kind, texts in sample.items():
                started = time.perf_counter()
                vectors = arms[name](texts)
                times[name][kind].append(time.perf_counter() - started)
                if rnd == 0:
                    cosine[name][kind] = float(np.min(np.sum(vectors * reference[kind], axis=1)))
        print(f"round {rnd + 1}/{args.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rows = []
    for name in arms:
        row: dict[str, Any] = {"arm": name}
        for kind, texts in sample.items():
            t = np.array(times[name][kind])
            row[kind] = {
                "per_second_median": len(texts) / float(np.median(t)),
                "per_second_best": len(texts) / float(t.min()),
                "ratio_to_baseline": float(np.median(np.array(times[base][kind]) / t)),
                "min_cosine_to_fp32": cosine[name][kind],
            }
        rows.append(row)
    return {**info, "sample": {k: len(v) for k, v in sample.items()}, "mean_tokens": tokens,
            "rounds": args.rounds, "arms": rows}


# ---------------------------------------------------------------- guard


def negative_sets(negatives: Any) -> list[set[int]]:
    return [{int(d) for d in row if d >= 0} for row in negatives.ids.tolist()]


def overlap(reference: list[set[int]], other: list[set[int]]) -> dict[str, float]:
    """Mean over queries of |A & B| / |A| (A: fp32), mean Jaccard, and the share of identical sets."""
    if len(reference) != len(other):
        raise ValueError(f"query counts differ: {len(reference)} vs {len(other)}")
    share, jaccard, same = [], [], 0
    for a, b in zip(reference, other):
        share.append(len(a & b) / len(a) if a else float(not b))
        jaccard.append(len(a & b) / len(a | b) if a | b else 1.0)
        same += a == b
    return {"overlap": float(np.mean(share)), "jaccard": float(np.mean(jaccard)),
            "identical_sets": same / max(1, len(reference))}


def run_guard(args: argparse.Namespace) -> dict[str, Any]:
    import miner
    from miner.config import MineConfig
    from miner.evaluate import EvaluateConfig
    from miner.precision import MAX_NDCG_DELTA, MIN_OVERLAP

    info = header()
    model = load(args.model)
    ev = EvaluateConfig(bootstrap=0)

    def measure(precision: str, cache: str) -> tuple[Any, float, dict[str, Any]]:
        enc = encode_config(precision, model=args.model, cache_dir=cache)
        with precision_context(precision):
            started = time.perf_counter()
            result = miner.mine(args.data, None, MineConfig(encode=enc), split="train", model=model)
            seconds = time.perf_counter() - started
            report = miner.evaluate(args.data, enc, ev, model=model, split="test")
        ndcg = report.population["nDCG@10"].value
        manifest = result.manifest
        print(f"{precision}: mined in {seconds:.1f} s, nDCG@10 {ndcg:.4f}", file=sys.stderr, flush=True)
        return result, ndcg, {"mine_seconds": seconds, "timings": manifest["timings"],
                              "encoding": manifest["encoding"]}

    root = Path(args.cache_root or tempfile.mkdtemp(prefix="miner-guard-"))
    base, base_ndcg, base_info = measure("fp32", args.fp32_cache or str(root / "fp32"))
    base_sets = negative_sets(base.negatives)
    paths = []
    for precision in args.precisions:
        # a cache per precision, kept: a rerun after a crash reuses what was encoded (its timing then says so)
        result, ndcg, run_info = measure(precision, str(root / precision))
        figures = overlap(base_sets, negative_sets(result.negatives))
        delta = ndcg - base_ndcg
        paths.append({
            "precision": precision, **figures, "ndcg@10": ndcg, "ndcg_delta": delta,
            "passed": figures["overlap"] >= MIN_OVERLAP and abs(delta) <= MAX_NDCG_DELTA, **run_info,
        })
        print(json.dumps({k: v for k, v in paths[-1].items() if k not in ("timings", "encoding")}), file=sys.stderr,
              flush=True)
    return {**info, "fp32": {"ndcg@10": base_ndcg, **base_info}, "fp32_cache": args.fp32_cache,
            "min_overlap": MIN_OVERLAP, "max_ndcg_delta": MAX_NDCG_DELTA, "paths": paths}


# ---------------------------------------------------------------- end to end


def run_e2e(args: argparse.Namespace) -> dict[str, Any]:
    import miner
    from miner.config import EncodeConfig, MineConfig
    from miner.data import load_beir
    from miner.precision import resolve_precision

    info = header()
    model = load(args.model)
    ds = load_beir(args.data, "train")
    anchors, positives = [], []
    for row in range(len(ds.queries)):
        for p in ds.qrels.positives(row):
            anchors.append(ds.queries.texts[row])
            positives.append(ds.corpus.texts[p])
    auto = resolve_precision("auto", "cpu")

    def st_run() -> dict[str, Any]:
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives

        pairs = Dataset.from_dict({"anchor": anchors, "positive": positives})
        out = mine_hard_negatives(pairs, model, corpus=list(ds.corpus.texts), num_negatives=5, range_max=100,
                                  relative_margin=0.05, sampling_strategy="top", batch_size=64, verbose=False)
        return {"rows": len(out)}

    def miner_run(precision: str, budget: int | None) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            enc = EncodeConfig(model=args.model, precision=precision, token_budget=budget, cache_dir=None)
            result = miner.mine(ds, None, MineConfig(encode=enc), model=model)
            return {"negatives": int(result.stats.negatives), "timings": result.manifest["timings"]}
        return run

    runs: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("sentence-transformers mine_hard_negatives (fp32, batch 64)", st_run),
        (f"miner, CLI defaults: --precision auto ({auto}), token budget 8192", miner_run("auto", 8192)),
        ("miner --precision bf16, token budget 8192 (fails the guard)", miner_run("bf16", 8192)),
    ]
    if args.with_before:
        runs.insert(1, ("miner before this benchmark: fp32, fixed batches of 64", miner_run("fp32", None)))
    results = []
    for name, fn in runs:
        started = time.perf_counter()
        extra = fn()
        seconds = time.perf_counter() - started
        print(f"{name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        results.append({"run": name, "seconds": seconds, **extra})
    return {**info, "pairs": len(anchors), "documents": len(ds.corpus), "queries": len(ds.queries),
            "auto": auto, "runs": results}


# ---------------------------------------------------------------- report


def _cold(path: dict[str, Any]) -> str:
    """Seconds of the guard's mining run, or what made them meaningless (a cache from an earlier run)."""
    if path["encoding"]["documents"]["encoded"] == 0:
        return "cached"
    return f"{path['mine_seconds']:.0f}"


def render() -> str:
    parts = {p: json.loads((RESULTS / f"encode-{p}.json").read_text())
             for p in ("throughput", "guard", "e2e") if (RESULTS / f"encode-{p}.json").is_file()}
    lines = ["# Encoder speed and quality", "",
             "Written by `benchmarks/encode.py` from `encode-<part>.json` beside this file; the machine is shared, so",
             "every part records the load average at its start. Ratios are against plain",
             "`SentenceTransformer.encode` (fp32, batch 64) measured in the same rounds.", ""]
    if "throughput" in parts:
        t = parts["throughput"]
        lines += ["## Throughput", "", f"`{t['command']}` on {t['date']}, {t['machine']}, torch {t['torch']}, "
                  f"{t['threads']} threads, load {t['load_average_at_start']:.1f} at start; "
                  f"{t['sample']['documents']} SciFact abstracts (mean {t['mean_tokens']['documents']:.0f} tokens) and "
                  f"{t['sample']['queries']} claims (mean {t['mean_tokens']['queries']:.0f} tokens), {t['rounds']} rounds.", "",
                  "| arm | documents/s | × | queries/s | × | min cosine to fp32 |", "|---|---:|---:|---:|---:|---:|"]
        for row in t["arms"]:
            d, q = row["documents"], row["queries"]
            lines.append(f"| {row['arm']} | {d['per_second_median']:.1f} | {d['ratio_to_baseline']:.2f} | "
                         f"{q['per_second_median']:.1f} | {q['ratio_to_baseline']:.2f} | "
                         f"{min(d['min_cosine_to_fp32'], q['min_cosine_to_fp32']):.5f} |")
        lines.append("")
    if "guard" in parts:
        g = parts["guard"]
        lines += ["## Quality guard", "", f"`{g['command']}` on {g['date']}, {g['machine']}. SciFact train (809 queries, "
                  f"5 negatives each) mined and SciFact test (300 queries, 5,183 documents) evaluated per precision; "
                  f"pass: overlap ≥ {g['min_overlap']} and |Δ nDCG@10| ≤ {g['max_ndcg_delta']}. fp32 nDCG@10 = "
                  f"{g['fp32']['ndcg@10']:.4f}.", "",
                  "| precision | negative overlap | Jaccard | identical sets | nDCG@10 | Δ | passed | cold mine, s |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for p in g["paths"]:
            lines.append(f"| {p['precision']} | {p['overlap']:.4f} | {p['jaccard']:.4f} | {p['identical_sets']:.3f} | "
                         f"{p['ndcg@10']:.4f} | {p['ndcg_delta']:+.4f} | {'yes' if p['passed'] else 'no'} | "
                         f"{_cold(p)} |")
        lines.append("")
    if "e2e" in parts:
        e = parts["e2e"]
        base = e["runs"][0]["seconds"]
        lines += ["## Cold end to end, SciFact train", "", f"`{e['command']}` on {e['date']}, {e['machine']}, load "
                  f"{e['load_average_at_start']:.1f} at start. {e['queries']} queries ({e['pairs']} query-positive pairs), "
                  f"{e['documents']} documents, no embedding cache, model loaded beforehand; `auto` resolved to "
                  f"{e['auto']}.", "", "| run | seconds | speed-up |", "|---|---:|---:|"]
        for r in e["runs"]:
            lines.append(f"| {r['run']} | {r['seconds']:.0f} | {base / r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("part", choices=["throughput", "guard", "e2e", "report"])
    parser.add_argument("--data", type=Path, default=SCIFACT, help="SciFact BEIR folder")
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=96, help="abstracts in the throughput sample")
    parser.add_argument("--queries", type=int, default=768, help="claims in the throughput sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["bf16", "int8-onnx", "int8-torch"],
                        help="guard: bf16, and the unshipped int8-onnx (needs onnxruntime, onnx) and int8-torch")
    parser.add_argument("--fp32-cache", default=None, help="an embedding cache already holding SciFact in fp32")
    parser.add_argument("--cache-root", default=None,
                        help="guard: keep each precision's embedding cache under DIR/<precision> (default: a new temp dir)")
    parser.add_argument("--with-before", action="store_true",
                        help="e2e: also run miner's encoder as it was (fp32, fixed batches of 64)")
    parser.add_argument("--no-save", action="store_true", help="print, write nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.part != "report":
        result = {"throughput": run_throughput, "guard": run_guard, "e2e": run_e2e}[args.part](args)
        text = json.dumps(result, indent=2)
        if args.no_save:
            print(text)
            return 0
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"encode-{args.part}.json").write_text(text + "\n")
    md = render()
    (RESULTS / "encode.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
