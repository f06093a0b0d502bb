"""Statistics of a mined file, read back from the file itself and its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from miner.errors import DataError
from miner.select import Summary
from miner.write import manifest_path, meta_path, read_rows

__all__ = ["file_stats"]


def _negative_scores(row: dict[str, Any]) -> list[float]:
    if "negative_score" in row:
        return [row["negative_score"]]
    if "label" in row and "score" in row:
        return [row["score"]] if row["label"] == 0 else []
    if "labels" in row and "scores" in row:
        return [s for label, s in zip(row["labels"], row["scores"]) if label == 0]
    return [v for k, v in row.items() if k.startswith("negative_") and k.endswith("_score")]


def file_stats(path: Path) -> dict[str, Any]:
    """Rows, queries, negatives per query and score statistics of ``path``, plus its manifest's summary.

    Raises:
        DataError: the file does not exist or is not a mined file.
    """
    if not path.is_file():
        hint = " (the run did not finish: rerun it to resume)" if path.with_name(path.name + ".parts").is_dir() else ""
        raise DataError(f"{path} not found{hint}")
    if path.suffix not in {".parquet", ".jsonl"}:
        raise DataError(f"{path}: expected a .parquet or .jsonl file written by 'miner mine'")
    rows = read_rows(path)
    meta = meta_path(path)
    if rows and "query_id" not in rows[0] and meta.is_file():  # sentence-transformers columns: ids in meta
        rows = [{**a, **b} for a, b in zip(rows, read_rows(meta))]
    if rows and "query_id" not in rows[0]:
        raise DataError(f"{path}: no query_id column; was it written by 'miner mine'?")
    per_query: dict[str, int] = {}
    scores = Summary()
    for row in rows:
        neg = _negative_scores(row)
        per_query[row["query_id"]] = per_query.get(row["query_id"], 0) + len(neg)
        scores.add([s for s in neg if s is not None])
    counts = np.array(list(per_query.values()) or [0])
    out: dict[str, Any] = {
        "file": str(path),
        "rows": len(rows),
        "queries": len(per_query),
        "negative rows per query": f"mean {counts.mean():.2f}  min {counts.min()}  max {counts.max()}",
        "negative scores": scores.to_dict(),
    }
    manifest = manifest_path(path)
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        out["complete"] = "yes (manifest present)"
        out["manifest"] = {
            "format": data["output"]["format"],
            "model": data["model"]["name"],
            "created": data["created"],
            "queries": data["counts"]["queries"],
            "negatives": data["counts"]["negatives"],
            "short queries": data["counts"]["short_queries"],
            **{f"skipped: {k}": v for k, v in data["skipped"].items()},
            **{f"time: {k}": v for k, v in data["timings"].items()},
        }
    else:
        out["complete"] = "unknown (no manifest beside the file)"
    return out
