"""The stages put together: :func:`mine` for a whole dataset, :class:`Miner` for a training loop.

Both stream over query batches; memory is O(corpus embeddings + batch x K). With ``out`` set, every
batch becomes one part on disk as soon as it is mined, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import xxhash

from miner import __version__, topk
from miner.config import MineConfig
from miner.data import Corpus, Dataset, load_data, same_text_keys
from miner.encode import Encoder, EncodeStats, resolve_model
from miner.errors import DataError
from miner.search import build_index
from miner.select import DuplicateFinder, Negatives, SelectionStats, mine_batch, same_text_positives
from miner.write import BatchRows, DocColumns, PartWriter, build_rows, manifest_path, meta_path

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["mine", "Miner", "MineResult", "MinedBatch"]

log = logging.getLogger(__name__)


class Timings(dict[str, float]):
    """Seconds per phase, accumulated."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.items()}


@dataclass
class MineResult:
    """What :func:`mine` returns.

    ``negatives`` holds every query's negatives (rows aligned with ``dataset.queries``) when no output
    file was asked for; with ``out`` they are in the file and ``negatives`` is ``None``.
    """

    dataset: Dataset
    stats: SelectionStats
    manifest: dict[str, Any]
    negatives: Negatives | None = None
    out: Path | None = None


def _dataset_fingerprint(dataset: Dataset) -> str:
    """xxh3-128 of ids, texts and judgements; each list is hashed as one NUL-joined buffer (one call, not one
    per text: this was 0.02 s of a 0.3 s warm SciFact run), with its length so that boundaries count."""
    digest = xxhash.xxh3_128()
    for values in (dataset.corpus.ids, dataset.corpus.texts, dataset.queries.ids, dataset.queries.texts):
        digest.update(str(len(values)).encode())
        digest.update("\x00".join(values).encode("utf-8", "surrogatepass"))
        digest.update(np.array([len(v) for v in values], dtype=np.int64).tobytes())
    for array in (dataset.qrels.indptr, dataset.qrels.doc_idx, dataset.qrels.grades):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="query", disable=not enabled, leave=False)


def _csr_rows(indptr: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], lo: int, hi: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    return indptr[lo : hi + 1] - indptr[lo], ids[indptr[lo] : indptr[hi]]


def _split_qrels(dataset: Dataset) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """CSR of positives (grade > 0) and of judged non-relevant documents (grade 0) per query."""
    q = dataset.qrels
    rows = np.repeat(np.arange(q.n_queries), np.diff(q.indptr))
    out = []
    for mask in (q.grades > 0, q.grades <= 0):
        counts = np.bincount(rows[mask], minlength=q.n_queries)
        indptr = np.zeros(q.n_queries + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(counts)
        out += [indptr, q.doc_idx[mask].astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def mine(
    data: Dataset | str | Path,
    out: str | Path | None = None,
    config: MineConfig = MineConfig(),
    *,
    split: str = "train",
    strict: bool = False,
    model: SentenceTransformer | None = None,
    progress: bool = False,
    command: Sequence[str] | None = None,
) -> MineResult:
    """Mine positive-aware hard negatives for every query of a dataset.

    Args:
        data: a :class:`~miner.data.Dataset`, a BEIR folder or a pairs file.
        out: output file (``.parquet`` or ``.jsonl`` per ``config.output.file_format``); the manifest and
            the parts folder live beside it. ``None`` returns the negatives in memory.
        config: every setting (see :class:`~miner.config.MineConfig`).
        split: qrels split of a BEIR folder.
        strict: unknown ids in the qrels are an error instead of a count.
        model: an already loaded ``SentenceTransformer``; overrides ``config.encode.model``.
        progress: progress bars on stderr.
        command: the command line, recorded in the manifest.

    Returns:
        A :class:`MineResult` with statistics and the manifest.

    Example:
        >>> from miner import from_pairs, mine
        >>> ds = from_pairs(["what do cats eat"], ["Cats eat mice."], corpus=["Dogs bark.", "Fish swim."])
        >>> result = mine(ds)  # doctest: +SKIP
        >>> result.negatives.ids.shape  # doctest: +SKIP
        (1, 5)
    """
    timings = Timings()
    with timings.phase("load_data"):
        dataset = data if isinstance(data, Dataset) else load_data(data, split=split, strict=strict)
    with timings.phase("load_model"):
        encoder = Encoder(config.encode, model, show_progress=progress)
    miner = Miner._from_parts(dataset.corpus, encoder, config, timings=timings, progress=progress)

    # same-text keys, qrels split, the run's key and the parts folder: every step before the batches
    with timings.phase("prepare"):
        queries, n_q = dataset.queries, len(dataset.queries)
        pos_ptr, pos_ids, judged_ptr, judged_ids = _split_qrels(dataset)
        query_keys = same_text_keys(queries.texts)
        shared_ptr, shared_ids = same_text_positives(query_keys, pos_ptr, pos_ids)  # across batches
        batch = config.search.query_batch_size
        n_parts = (n_q + batch - 1) // batch
        if isinstance(data, Dataset):  # the caller's object: its content is the key
            fingerprint = _dataset_fingerprint(dataset)
        else:  # loaded here: the files' sha256 (computed while loading) and the loader's options are the key
            fingerprint = json.dumps({"sources": dataset.sources, "split": split, "strict": strict}, sort_keys=True)
        settings = config.to_dict()
        run_key = hashlib.sha256(
            json.dumps(
                {
                    # the precision that ran ("auto" resolves per machine), not the one asked for
                    "config": {
                        **settings,
                        "encode": {**settings["encode"], "cache_dir": None, "precision": encoder.precision},
                    },
                    "dataset": fingerprint,
                    "model": encoder.fingerprint,
                    "version": __version__,
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()

        writer = PartWriter(Path(out), run_key, config.output, config.select.num_negatives) if out is not None else None
        doc_columns = DocColumns(dataset.corpus.ids, dataset.corpus.texts)
    stats = SelectionStats()
    all_neg: list[Negatives] = []
    rows_total = 0
    resumed = 0
    bar = _progress(n_q, "mining", progress)
    for part in range(n_parts):
        lo, hi = part * batch, min((part + 1) * batch, n_q)
        if writer is not None and writer.has_part(part):
            done = writer.part_stats(part)
            stats.merge(SelectionStats.from_state(done["selection"]))
            rows_total += int(done["rows"])
            resumed += 1
            bar.update(hi - lo)
            continue
        b_ptr, b_pos = _csr_rows(pos_ptr, pos_ids, lo, hi)
        j_ptr, j_ids = _csr_rows(judged_ptr, judged_ids, lo, hi)
        negatives, batch_stats = miner._mine_rows(
            queries.ids[lo:hi], queries.texts[lo:hi], query_keys[lo:hi], b_ptr, b_pos, j_ptr, j_ids, timings,
            excluded_positives=_csr_rows(shared_ptr, shared_ids, lo, hi),
        )
        stats.merge(batch_stats)
        if writer is None:
            all_neg.append(negatives)
        else:
            with timings.phase("write"):
                cols = build_rows(
                    BatchRows(queries.ids[lo:hi], queries.texts[lo:hi], b_ptr, b_pos, negatives.positive_scores,
                              negatives.ids, negatives.scores, negatives.ranks),
                    doc_columns,
                    config.output,
                )
                n_rows = len(next(iter(cols.values()))) if cols else 0
                rows_total += n_rows
                writer.write_part(part, cols, {"rows": n_rows, "selection": batch_stats.to_state()})
        bar.update(hi - lo)
    bar.close()

    manifest = {
        "miner_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(command) if command is not None else None,
        "output": None
        if out is None
        else {
            "file": Path(out).name,
            "format": config.output.format,
            "file_format": config.output.file_format,
            "meta_file": meta_path(Path(out)).name if config.output.column_names == "sentence-transformers" else None,
            "rows": rows_total,
        },
        "config": config.to_dict(),
        "model": {
            "name": resolve_model(config.encode.model) if model is None else type(model).__name__,
            "fingerprint": encoder.fingerprint,
            "dimension": encoder.dim,
            "max_seq_length": encoder.model.max_seq_length,
        },
        "inputs": {
            "sources": dataset.sources,
            "dataset_fingerprint": fingerprint,
            "documents": len(dataset.corpus),
            "queries": n_q,
            "judgements": int(len(dataset.qrels.doc_idx)),
            "load_report": dataset.report.to_dict(),
        },
        "search": {"index": miner.index.name, "kernel": topk.backend_info()},
        "counts": {
            "queries": stats.queries,
            "queries_with_negatives": stats.queries - stats.empty_queries,
            "short_queries": stats.short_queries,
            "negatives": stats.negatives,
            "rows": rows_total,
        },
        "skipped": stats.skipped,
        "scores": stats.to_dict()["scores"],
        "encoding": {"documents": miner.doc_stats.to_dict(), "queries": miner._query_stats.to_dict()},
        "timings": timings.rounded(),
        "resumed_parts": resumed,
        "parts": n_parts,
        "run_key": run_key,
    }
    if writer is not None:
        with timings.phase("write"):
            writer.finalize(n_parts, manifest)
        manifest["timings"] = timings.rounded()
        manifest_path(Path(out)).write_text(json.dumps(manifest, indent=2) + "\n")  # type: ignore[arg-type]
        return MineResult(dataset, stats, manifest, None, Path(out))  # type: ignore[arg-type]
    negatives = _concat_negatives(all_neg, config.select.num_negatives)
    return MineResult(dataset, stats, manifest, negatives, None)


def _concat_negatives(parts: list[Negatives], n: int) -> Negatives:
    if not parts:
        empty = np.zeros((0, n))
        none = np.zeros(0, np.float32)
        return Negatives(empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int32), none, none, none)
    return Negatives(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.ranks for p in parts]),
        np.concatenate([p.reference for p in parts]),
        np.concatenate([p.ceiling for p in parts]),
        np.concatenate([p.positive_scores for p in parts]),
    )


@dataclass
class MinedBatch:
    """Negatives of an ad-hoc batch, from :meth:`Miner.mine`.

    ``negatives`` holds padded arrays (``-1`` where a query got fewer than ``num_negatives``);
    ``doc_ids`` and ``doc_texts`` are ragged lists per query with the padding dropped.
    """

    negatives: Negatives
    stats: SelectionStats
    doc_ids: list[list[str]] = field(default_factory=list)
    doc_texts: list[list[str]] = field(default_factory=list)


class Miner:
    """Holds a corpus, an encoder, its embeddings and an index; mines for query batches on demand.

    Use it inside a training loop: mine negatives for the next batches, train, then :meth:`refresh` with
    the updated model to re-encode the corpus and rebuild the index (ANCE-style).

    Args:
        corpus: a :class:`~miner.data.Corpus`, a sequence of texts, or ``(ids, texts)``.
        model: a loaded ``SentenceTransformer``, or ``None`` to load ``config.encode.model``.
        config: every setting; ``config.select`` governs which negatives are chosen.
        progress: progress bars while encoding.

    Example:
        >>> miner = Miner(["Cats eat mice.", "Dogs bark.", "Fish swim."])  # doctest: +SKIP
        >>> batch = miner.mine(["what do cats eat"], [[0]])  # doctest: +SKIP
        >>> batch.doc_texts  # doctest: +SKIP
        [['Dogs bark.', 'Fish swim.']]
    """

    def __init__(
        self,
        corpus: Corpus | Sequence[str] | tuple[Sequence[str], Sequence[str]],
        model: SentenceTransformer | None = None,
        config: MineConfig = MineConfig(),
        *,
        progress: bool = False,
    ) -> None:
        encoder = Encoder(config.encode, model, show_progress=progress)
        self._setup(_as_corpus(corpus), encoder, config, Timings(), progress)

    @classmethod
    def _from_parts(cls, corpus: Corpus, encoder: Encoder, config: MineConfig, *, timings: Timings, progress: bool) -> Miner:
        self = cls.__new__(cls)
        self._setup(corpus, encoder, config, timings, progress)
        return self

    def _setup(self, corpus: Corpus, encoder: Encoder, config: MineConfig, timings: Timings, progress: bool) -> None:
        if len(corpus) == 0:
            raise DataError("the corpus is empty: there is nothing to mine negatives from")
        self.corpus = corpus
        self.config = config
        self.timings = timings
        self.progress = progress
        self.encoder = encoder
        self._build()

    def _build(self) -> None:
        with self.timings.phase("encode_documents"):
            self.doc_emb = self.encoder.encode(self.corpus.texts, kind="document")
        self.doc_stats = self.encoder.last_stats
        self._query_stats = EncodeStats()
        with self.timings.phase("build_index"):
            self.index = build_index(self.doc_emb, self.config.search)
        with self.timings.phase("prepare"):
            self.duplicates = DuplicateFinder(self.corpus.normalized_keys)

    @property
    def fingerprint(self) -> str:
        """xxh3-128 of the weights the corpus embeddings and index were built with."""
        return self.encoder.fingerprint

    def refresh(self, model: SentenceTransformer | str | None = None, *, cache: bool = True) -> EncodeStats:
        """Re-encode the corpus with an updated model and rebuild the index.

        Args:
            model: the fine-tuned ``SentenceTransformer`` (or a path to one); ``None`` re-encodes with the
                current model object, whose weights may have changed in place during training.
            cache: write the new embeddings to the cache. Intermediate training checkpoints are rarely
                reused, so ``cache=False`` keeps the cache from growing by one corpus per refresh.

        Returns:
            The corpus encoding statistics (texts encoded, cache hits, seconds).
        """
        config = self.config.encode if cache else dataclasses.replace(self.config.encode, cache_dir=None)
        if isinstance(model, str):
            self.encoder = Encoder(dataclasses.replace(config, model=model), show_progress=self.progress)
        else:
            current = model if model is not None else self.encoder.model
            self.encoder = Encoder(config, current, show_progress=self.progress)
        self._build()
        return self.doc_stats

    def _mine_rows(
        self,
        query_ids: Sequence[str],
        query_texts: Sequence[str],
        query_keys: npt.NDArray[np.int64],
        pos_ptr: npt.NDArray[np.int64],
        pos_ids: npt.NDArray[np.int64],
        judged_ptr: npt.NDArray[np.int64] | None,
        judged_ids: npt.NDArray[np.int64] | None,
        timings: Timings,
        *,
        excluded_positives: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]],
    ) -> tuple[Negatives, SelectionStats]:
        with timings.phase("encode_queries"):
            q_emb = self.encoder.encode(list(query_texts), kind="query")
        self._query_stats.add(self.encoder.last_stats)
        with timings.phase("search_select"):
            return mine_batch(
                q_emb,
                list(query_ids),
                query_keys,
                pos_ptr,
                pos_ids,
                docs=self.doc_emb,
                index=self.index,
                doc_index=self.corpus.index,
                doc_keys=self.corpus.normalized_keys,
                duplicates=self.duplicates,
                config=self.config.select,
                judged_indptr=judged_ptr,
                judged_ids=judged_ids,
                excluded_positives=excluded_positives,
            )

    def mine(
        self,
        queries: Sequence[str],
        positives: Sequence[Sequence[str | int]],
        *,
        query_ids: Sequence[str] | None = None,
        judged_negatives: Sequence[Sequence[str | int]] | None = None,
    ) -> MinedBatch:
        """Mine negatives for a batch of queries against the held corpus.

        Args:
            queries: query texts.
            positives: for each query, its positive documents as corpus ids (str) or rows (int) of *this*
                Miner's corpus (rows of another corpus, e.g. before subsampling, would name other documents).
            query_ids: ids keying the per-query random streams and own-document checks (default: the text).
            judged_negatives: for each query, judged non-relevant documents (used with ``prefer_judged``).

        Returns:
            A :class:`MinedBatch` with ids (corpus rows), scores, ranks, and the negatives' ids and texts.
        """
        if len(queries) != len(positives):
            raise DataError(f"got {len(queries)} queries but {len(positives)} positive lists")
        ids = list(query_ids) if query_ids is not None else list(queries)
        pos_ptr, pos_rows = self._rows_csr(positives)
        j_ptr, j_rows = self._rows_csr(judged_negatives) if judged_negatives is not None else (None, None)
        keys = same_text_keys(queries)
        negatives, stats = self._mine_rows(ids, queries, keys, pos_ptr, pos_rows, j_ptr, j_rows, self.timings,
                                           excluded_positives=same_text_positives(keys, pos_ptr, pos_rows))
        doc_ids = [[self.corpus.ids[d] for d in row if d >= 0] for row in negatives.ids.tolist()]
        doc_texts = [[self.corpus.texts[d] for d in row if d >= 0] for row in negatives.ids.tolist()]
        return MinedBatch(negatives, stats, doc_ids, doc_texts)

    def _rows_csr(self, lists: Sequence[Sequence[str | int]]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        rows: list[int] = []
        indptr = [0]
        for i, items in enumerate(lists):
            for item in items:
                if isinstance(item, (int, np.integer)):
                    if not 0 <= int(item) < len(self.corpus):
                        raise DataError(f"query {i}: document row {item} is outside the corpus (0..{len(self.corpus) - 1})")
                    rows.append(int(item))
                elif item in self.corpus.index:
                    rows.append(self.corpus.index[item])
                else:
                    raise DataError(f"query {i}: document id {item!r} is not in the corpus")
            indptr.append(len(rows))
        return np.array(indptr, dtype=np.int64), np.array(rows, dtype=np.int64)


def _as_corpus(corpus: Corpus | Sequence[str] | tuple[Sequence[str], Sequence[str]]) -> Corpus:
    if isinstance(corpus, Corpus):
        return corpus
    if isinstance(corpus, tuple) and len(corpus) == 2 and not isinstance(corpus[0], str):
        return Corpus(list(corpus[0]), list(corpus[1]))
    texts = [str(t) for t in corpus]
    return Corpus([f"c{i}" for i in range(len(texts))], texts)
