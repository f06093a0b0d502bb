"""miner: hard-negative mining for retrieval and ranking models.

The stages, each a module of functions over arrays: :mod:`miner.data` (inputs), :mod:`miner.encode`
(sentence-transformers + embedding cache), :mod:`miner.search` (exact fused top-k or faiss),
:mod:`miner.select` (positive-aware selection), :mod:`miner.write` (training files in parts),
:mod:`miner.pipeline` (:func:`mine` and :class:`Miner`), :mod:`miner.cli` (the ``miner`` command).
Evaluation and imbalance: :mod:`miner.evalset` (stratified evaluation sets), :mod:`miner.evaluate`
(per-stratum metrics with intervals), :mod:`miner.calibrate` (undersampling weights, prior correction,
calibration metrics).
"""

from __future__ import annotations

__version__ = "0.1.0"

from miner.allocate import allocate
from miner.calibrate import (
    brier_score,
    expected_calibration_error,
    prior_correction,
    prior_correction_per_class,
    reliability_curve,
    temperature_sampling,
    undersample,
)
from miner.config import EncodeConfig, MineConfig, OutputConfig, SearchConfig, SelectConfig
from miner.data import Corpus, Dataset, Qrels, Queries, from_pairs, load_beir, load_data, load_pairs
from miner.errors import ConfigError, DataError, MinerError, ModelError
from miner.evalset import EvalsetConfig, build_evalset
from miner.evaluate import EvaluateConfig, evaluate
from miner.pipeline import MinedBatch, Miner, MineResult, mine
from miner.search import exact_search
from miner.select import Negatives
from miner.topk import backend_info

__all__ = [
    "__version__",
    # config
    "MineConfig",
    "EncodeConfig",
    "SearchConfig",
    "SelectConfig",
    "OutputConfig",
    # data
    "Corpus",
    "Queries",
    "Qrels",
    "Dataset",
    "load_beir",
    "load_pairs",
    "load_data",
    "from_pairs",
    # pipeline
    "mine",
    "Miner",
    "MineResult",
    "MinedBatch",
    "Negatives",
    # search
    "exact_search",
    "backend_info",
    # evalset, evaluate
    "EvalsetConfig",
    "build_evalset",
    "allocate",
    "EvaluateConfig",
    "evaluate",
    # calibrate
    "prior_correction",
    "prior_correction_per_class",
    "undersample",
    "expected_calibration_error",
    "brier_score",
    "reliability_curve",
    "temperature_sampling",
    # errors
    "MinerError",
    "DataError",
    "ConfigError",
    "ModelError",
]
