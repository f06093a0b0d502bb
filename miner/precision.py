"""Encoder precision: fp32 or bf16 autocast, the quality guard they are held to, and ``auto``.

Every reduced precision is measured against fp32 by ``benchmarks/encode.py`` on SciFact with the default
model (all-MiniLM-L6-v2): the overlap of the mined negative sets with the fp32 run must be at least 0.95 and
nDCG@10 on SciFact test within 0.005 of fp32. :data:`GUARD` holds those figures; ``auto`` takes the fastest
precision that passed and that this machine runs fast, and fp32 otherwise. The guard was measured on one
model: for another model ``auto`` assumes it transfers, and ``fp32`` is the setting to reproduce results
bit for bit.

bf16 is kept as an explicit choice (1.3x on passages, 1.9x on queries here; nDCG@10 +0.0005) although it
failed the negative-overlap guard (0.92). Measured and left out: dynamic int8 (ONNX Runtime with per-channel
weights, ``torch.ao.quantization.quantize_dynamic``) is faster still on AVX512-VNNI CPUs but changes a third
of the mined negatives (overlap 0.66 with ONNX Runtime) and needs an extra runtime; the benchmark keeps
measuring it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from miner.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

__all__ = [
    "Precision",
    "PRECISIONS",
    "GuardFigures",
    "GUARD",
    "AUTO_ORDER",
    "cpu_flags",
    "unavailable_reason",
    "resolve_precision",
    "make_runner",
]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

MIN_OVERLAP = 0.95
MAX_NDCG_DELTA = 0.005


@dataclass(frozen=True)
class GuardFigures:
    """One precision against fp32 on SciFact (all-MiniLM-L6-v2), from ``benchmarks/encode.py``.

    Args:
        negative_overlap: mean over the 809 training queries of ``|N_p & N_fp32| / |N_fp32|``, the mined
            negative id sets (5 per query, default selection).
        ndcg_delta: nDCG@10 on SciFact test (300 queries, full corpus) minus that of fp32.
        speedup: passages (SciFact abstracts) per second relative to plain fp32
            ``SentenceTransformer.encode``, measured in the same rounds.
    """

    negative_overlap: float
    ndcg_delta: float
    speedup: float

    @property
    def passed(self) -> bool:
        return self.negative_overlap >= MIN_OVERLAP and abs(self.ndcg_delta) <= MAX_NDCG_DELTA


# Measured on an AMD EPYC with AVX512-BF16 (2 cores); see benchmarks/results/encode.md. bf16 keeps nDCG but
# changes the negatives of 22% of the queries (the 5th and 6th candidates are often within 1e-3 of each
# other), so it fails, and auto stays on fp32 until a precision passes.
GUARD: dict[str, GuardFigures] = {
    "bf16": GuardFigures(negative_overlap=0.9224, ndcg_delta=0.0005, speedup=1.27),
}

# Precisions auto may pick, fastest first (by the same benchmark); the first that passed the guard and runs
# fast on this machine wins.
AUTO_ORDER: tuple[str, ...] = ("bf16",)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def unavailable_reason(precision: str, device: str) -> str | None:
    """Why ``precision`` would not run fast on ``device`` here (``None``: it would)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device == "cpu" and not cpu_flags() & {"avx512_bf16", "amx_bf16"}:
            return "the CPU has neither AVX512-BF16 nor AMX: no hardware bf16 (only measured with AVX512-BF16)"
        return None
    raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


def resolve_precision(precision: str, device: str) -> str:
    """The precision to encode with: ``auto`` resolved for ``device`` (``"cpu"``, ``"cuda"``, ...).

    ``auto`` is the first of :data:`AUTO_ORDER` that passed the guard and runs fast here, else ``fp32``;
    off the CPU it is ``fp32`` (no guard was measured there). An explicit precision is returned as is
    (with a logged warning where it would be slow).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "auto":
        if device != "cpu":
            return "fp32"
        for candidate in AUTO_ORDER:
            figures = GUARD.get(candidate)
            if figures is not None and figures.passed and unavailable_reason(candidate, device) is None:
                return candidate
        return "fp32"
    reason = unavailable_reason(precision, device)
    if reason is not None:
        log.warning("precision %s: %s", precision, reason)
    return precision


Runner = Callable[[dict[str, Any]], "torch.Tensor"]


def make_runner(model: SentenceTransformer, precision: str) -> Runner:
    """A function from preprocessed features to sentence embeddings (float32 ``[n, d]`` on the CPU).

    Both run the model itself, ``bf16`` under ``torch.autocast``: matrix multiplies in bf16, layer norms,
    softmax and pooling in fp32.
    """
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16 once resolved; got {precision!r}")
    import torch
    from sentence_transformers.util import batch_to_device

    device = model.device

    def run(features: dict[str, Any]) -> torch.Tensor:
        model.eval()
        context = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )
        with torch.inference_mode(), context:
            out = model(batch_to_device(features, device))["sentence_embedding"]
        return out.float().cpu()

    return run
