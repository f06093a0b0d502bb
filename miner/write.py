"""Training files: rows for each format, written in parts as mining goes, assembled at the end.

``--out triplets.parquet`` produces, beside it:

* ``triplets.parquet.parts/`` while the run is going: ``run.json`` (the run's key) and one
  ``part-NNNNNN.<ext>`` plus ``part-NNNNNN.stats.json`` per query batch, each renamed into place only when
  complete. A rerun with the same key skips the parts that exist, so an interrupted run resumes.
* ``triplets.parquet`` once every part is done (written to a temporary name, then renamed), then
  ``triplets.parquet.manifest.json``; the parts folder is removed last. A file without its manifest, or a
  parts folder, means the run did not finish.
* with ``column_names="sentence-transformers"``: ``triplets.meta.parquet``, row-aligned, with the ids,
  scores and ranks that the trainer-ready file leaves out.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from miner.config import OutputConfig
from miner.errors import ConfigError

__all__ = ["BatchRows", "DocColumns", "build_rows", "PartWriter", "manifest_path", "parts_dir", "meta_path", "read_rows"]

Columns = dict[str, Any]  # column name -> list of values, or a pyarrow Array


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def meta_path(out: Path) -> Path:
    return out.with_name(f"{out.stem}.meta{out.suffix}")


@dataclass(frozen=True)
class BatchRows:
    """What the writer needs of one mined batch."""

    query_ids: Sequence[str]
    query_texts: Sequence[str]
    pos_indptr: npt.NDArray[np.int64]  # int64[q + 1]
    pos_ids: npt.NDArray[np.int64]  # corpus rows
    pos_scores: npt.NDArray[np.float32]  # float32[nnz]
    neg_ids: npt.NDArray[np.int64]  # int64[q, n], -1 padded
    neg_scores: npt.NDArray[np.float32]
    neg_ranks: npt.NDArray[np.int32]


# Per format: (miner column, sentence-transformers column or None when it goes to the meta file, type).
def _schema(fmt: str, n: int) -> list[tuple[str, str | None, str]]:
    query = [("query_id", None, "str"), ("query", "anchor", "str")]
    positive = [("positive_id", None, "str"), ("positive", "positive", "str"), ("positive_score", None, "f32")]
    if fmt == "triplet":
        return [
            *query,
            *positive,
            ("negative_id", None, "str"),
            ("negative", "negative", "str"),
            ("negative_score", None, "f32"),
            ("negative_rank", None, "i32"),
        ]
    if fmt == "n-tuple":
        negatives = []
        for i in range(1, n + 1):
            negatives += [
                (f"negative_{i}_id", None, "str"),
                (f"negative_{i}", f"negative_{i}", "str"),
                (f"negative_{i}_score", None, "f32"),
                (f"negative_{i}_rank", None, "i32"),
            ]
        return [*query, *positive, *negatives]
    if fmt == "labeled-pair":
        return [
            *query,
            ("document_id", None, "str"),
            ("document", "document", "str"),
            ("label", "label", "i8"),
            ("score", None, "f32"),
            ("rank", None, "i32"),
        ]
    return [
        *query,
        ("document_ids", None, "list_str"),
        ("documents", "documents", "list_str"),
        ("labels", "labels", "list_i8"),
        ("scores", None, "list_f32"),
        ("ranks", None, "list_i32"),
    ]


class DocColumns:
    """The corpus ids and texts as given, and as Arrow string arrays built once, on first use, for every batch.

    Example:
        >>> docs = DocColumns(["d0", "d1"], ["first", "second"])
        >>> docs.arrow()[1].take([1, 1]).to_pylist()
        ['second', 'second']
    """

    def __init__(self, ids: Sequence[str], texts: Sequence[str]) -> None:
        self.ids = ids
        self.texts = texts
        self._arrow: tuple[Any, Any] | None = None

    def arrow(self) -> tuple[Any, Any]:
        if self._arrow is None:
            import pyarrow as pa

            self._arrow = (pa.array(self.ids, type=pa.string()), pa.array(self.texts, type=pa.string()))
        return self._arrow


def build_rows(batch: BatchRows, docs: DocColumns, config: OutputConfig) -> Columns:
    """Columns (miner names) of one batch in ``config.format``; texts are included when ``config.texts``.

    ``n-tuple`` rows need exactly ``num_negatives`` negatives: queries with fewer are left out (counted by
    the caller from the negatives' padding). Triplets, the default, are built with array gathers; the other
    formats row by row.
    """
    if config.format == "triplet":
        return _triplet_columns(batch, docs, texts=config.texts)
    cols = _rows_by_query(batch, docs, config)
    if not config.texts:
        for name, _, kind in _schema(config.format, batch.neg_ids.shape[1]):
            if kind in ("str", "list_str") and not name.endswith(("_id", "_ids")):
                del cols[name]
    return cols


def _triplet_columns(batch: BatchRows, docs: DocColumns, *, texts: bool = True) -> Columns:
    """Triplet columns as Arrow arrays: per query, every positive with every valid negative, in order. Without
    ``texts`` the query, positive and negative texts are not gathered at all."""
    import pyarrow as pa

    valid = batch.neg_ids >= 0
    n_neg = valid.sum(axis=1)
    per_query = np.diff(batch.pos_indptr) * n_neg
    q = np.repeat(np.arange(len(n_neg)), per_query)
    k = np.arange(int(per_query.sum())) - np.repeat(np.cumsum(per_query) - per_query, per_query)
    pos = batch.pos_indptr[q] + k // n_neg[q]
    neg_col = np.argsort(~valid, axis=1, kind="stable")[q, k % n_neg[q]]  # the (k % n)-th valid negative
    neg = batch.neg_ids[q, neg_col]
    doc_ids, doc_texts = docs.arrow()
    pos_rows = pa.array(batch.pos_ids[pos])
    neg_rows = pa.array(neg)
    query_rows = pa.array(q)
    cols: Columns = {
        "query_id": pa.array(list(batch.query_ids), type=pa.string()).take(query_rows),
        "query": pa.array(list(batch.query_texts), type=pa.string()).take(query_rows) if texts else None,
        "positive_id": doc_ids.take(pos_rows),
        "positive": doc_texts.take(pos_rows) if texts else None,
        "positive_score": pa.array(batch.pos_scores[pos].astype(np.float32)),
        "negative_id": doc_ids.take(neg_rows),
        "negative": doc_texts.take(neg_rows) if texts else None,
        "negative_score": pa.array(batch.neg_scores[q, neg_col].astype(np.float32)),
        "negative_rank": pa.array(batch.neg_ranks[q, neg_col].astype(np.int32)),
    }
    return {name: column for name, column in cols.items() if column is not None}


def _rows_by_query(batch: BatchRows, docs: DocColumns, config: OutputConfig) -> Columns:
    """Columns as Python lists, query by query (every format; triplets are the vectorised path's oracle)."""
    doc_ids, doc_texts = docs.ids, docs.texts
    n = batch.neg_ids.shape[1]
    cols: Columns = {name: [] for name, _, _ in _schema(config.format, n)}
    for r, (qid, qtext) in enumerate(zip(batch.query_ids, batch.query_texts)):
        lo, hi = int(batch.pos_indptr[r]), int(batch.pos_indptr[r + 1])
        positives = list(zip(batch.pos_ids[lo:hi].tolist(), batch.pos_scores[lo:hi].tolist()))
        valid = batch.neg_ids[r] >= 0
        negatives = list(
            zip(batch.neg_ids[r][valid].tolist(), batch.neg_scores[r][valid].tolist(), batch.neg_ranks[r][valid].tolist())
        )
        if config.format == "triplet":
            for p, ps in positives:
                for d, s, k in negatives:
                    _append(cols, qid, qtext, positive_id=doc_ids[p], positive=doc_texts[p], positive_score=ps,
                            negative_id=doc_ids[d], negative=doc_texts[d], negative_score=s, negative_rank=k)
        elif config.format == "n-tuple":
            if len(negatives) < n:
                continue
            for p, ps in positives:
                row: dict[str, Any] = {"positive_id": doc_ids[p], "positive": doc_texts[p], "positive_score": ps}
                for i, (d, s, k) in enumerate(negatives, start=1):
                    row.update({f"negative_{i}_id": doc_ids[d], f"negative_{i}": doc_texts[d],
                                f"negative_{i}_score": s, f"negative_{i}_rank": k})
                _append(cols, qid, qtext, **row)
        elif config.format == "labeled-pair":
            for p, ps in positives:
                _append(cols, qid, qtext, document_id=doc_ids[p], document=doc_texts[p], label=1, score=ps, rank=None)
            for d, s, k in negatives:
                _append(cols, qid, qtext, document_id=doc_ids[d], document=doc_texts[d], label=0, score=s, rank=k)
        else:
            listed = [(p, 1, ps, None) for p, ps in positives] + [(d, 0, s, k) for d, s, k in negatives]
            _append(cols, qid, qtext, document_ids=[doc_ids[d] for d, *_ in listed],
                    documents=[doc_texts[d] for d, *_ in listed], labels=[x[1] for x in listed],
                    scores=[x[2] for x in listed], ranks=[x[3] for x in listed])
    return cols


def _append(cols: Columns, qid: str, qtext: str, **values: Any) -> None:
    cols["query_id"].append(qid)
    cols["query"].append(qtext)
    for name, value in values.items():
        cols[name].append(value)


def _arrow_type(kind: str) -> Any:
    import pyarrow as pa

    scalar = {"str": pa.string(), "f32": pa.float32(), "i32": pa.int32(), "i8": pa.int8()}
    if kind.startswith("list_"):
        return pa.list_(scalar[kind[5:]])
    return scalar[kind]


def _split(cols: Columns, config: OutputConfig, n: int) -> tuple[Columns, Columns | None, dict[str, str]]:
    """(main columns, meta columns or None, main column -> type) in the naming ``config`` asks for."""
    schema = [(m, st, kind) for m, st, kind in _schema(config.format, n) if m in cols]
    if config.column_names == "miner":
        return cols, None, {m: kind for m, _, kind in schema}
    main = {st: cols[m] for m, st, _ in schema if st is not None}
    meta = {m: cols[m] for m, st, _ in schema if st is None}
    return main, meta, {st: kind for _, st, kind in schema if st is not None}


def _types_of(config: OutputConfig, n: int, *, meta: bool) -> dict[str, str]:
    schema = _schema(config.format, n)
    if config.column_names == "miner":
        return {m: kind for m, _, kind in schema}
    if meta:
        return {m: kind for m, st, kind in schema if st is None}
    return {st: kind for _, st, kind in schema if st is not None}


def _write_table(path: Path, cols: Columns, types: dict[str, str], file_format: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = (pa.Array, pa.ChunkedArray)  # gathers from a corpus over 2 GB of text come back chunked
        arrays = {
            name: values if isinstance(values, arrow) else pa.array(values, type=_arrow_type(types[name]))
            for name, values in cols.items()
        }
        pq.write_table(pa.table(arrays), tmp)
    else:
        names = list(cols)
        lists = [cols[name] if isinstance(cols[name], list) else cols[name].to_pylist() for name in names]
        with open(tmp, "w", encoding="utf-8") as handle:
            for values in zip(*lists):
                handle.write(json.dumps(dict(zip(names, values)), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _concat(parts: list[Path], dest: Path, file_format: str) -> None:
    if len(parts) == 1:  # one part is already the file: move it instead of copying
        os.replace(parts[0], dest)
        return
    tmp = dest.with_name(dest.name + ".tmp")
    if file_format == "parquet":
        import pyarrow.parquet as pq

        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    else:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out)
    os.replace(tmp, dest)


class PartWriter:
    """Writes one part per query batch under ``<out>.parts/`` and assembles them into ``out``.

    Args:
        out: the final file.
        run_key: identifies the run (config, inputs, model); parts of another run are discarded.
        config: output settings.
        num_negatives: columns of the n-tuple format.
    """

    def __init__(self, out: Path, run_key: str, config: OutputConfig, num_negatives: int) -> None:
        self.out = out
        self.config = config
        self.n = num_negatives
        self.dir = parts_dir(out)
        self.ext = "parquet" if config.file_format == "parquet" else "jsonl"
        if out.exists() and out.is_dir():
            raise ConfigError(f"--out {out} is a directory; name the output file, e.g. {out / 'triplets.parquet'}")
        out.parent.mkdir(parents=True, exist_ok=True)
        run_file = self.dir / "run.json"
        previous = json.loads(run_file.read_text()) if run_file.is_file() else None
        self.resumed = previous is not None and previous.get("run_key") == run_key
        if not self.resumed and self.dir.exists():
            shutil.rmtree(self.dir)
        for stale in (out, manifest_path(out), meta_path(out)):  # never leave an old file that looks current
            stale.unlink(missing_ok=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            tmp = run_file.with_name("run.json.tmp")
            tmp.write_text(json.dumps({"run_key": run_key, "output": out.name}))
            os.replace(tmp, run_file)

    def _part(self, index: int, *, meta: bool = False, stats: bool = False) -> Path:
        stem = f"part-{index:06d}"
        if stats:
            return self.dir / f"{stem}.stats.json"
        return self.dir / f"{stem}{'.meta' if meta else ''}.{self.ext}"

    def has_part(self, index: int) -> bool:
        return self._part(index).is_file() and self._part(index, stats=True).is_file()

    def write_part(self, index: int, cols: Columns, stats: dict[str, Any]) -> None:
        """Write one batch; the data file is renamed into place last, so it marks the part complete."""
        main, meta, types = _split(cols, self.config, self.n)
        tmp = self._part(index, stats=True).with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self._part(index, stats=True))
        if meta is not None:
            _write_table(self._part(index, meta=True), meta, _types_of(self.config, self.n, meta=True), self.config.file_format)
        _write_table(self._part(index), main, types, self.config.file_format)

    def part_stats(self, index: int) -> dict[str, Any]:
        return json.loads(self._part(index, stats=True).read_text())

    def finalize(self, n_parts: int, manifest: dict[str, Any]) -> None:
        """Assemble the parts into ``out`` (and the meta file), write the manifest, remove the parts."""
        missing = [i for i in range(n_parts) if not self.has_part(i)]
        if missing:
            raise RuntimeError(f"cannot assemble {self.out}: parts {missing[:5]} are missing")
        if self.config.column_names == "sentence-transformers":
            _concat([self._part(i, meta=True) for i in range(n_parts)], meta_path(self.out), self.config.file_format)
        _concat([self._part(i) for i in range(n_parts)], self.out, self.config.file_format)
        path = manifest_path(self.out)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        shutil.rmtree(self.dir)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a mined file (Parquet or JSONL) as a list of row dicts."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
