"""One contrastive training step on mined negatives, for the training loops in ``examples/`` and benchmarks.

miner does not train models; these three helpers are what every loop around :class:`miner.Miner` repeats:
MultipleNegativesRankingLoss imported from wherever the installed sentence-transformers keeps it (3.x to
6.x), texts turned into the model's features on its device, and one optimiser step over columns of texts
(anchors, positives, then any number of negative columns; row i's positive is column 1's row i).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

__all__ = ["mnrl_loss", "features", "mnrl_step"]


def mnrl_loss(model: SentenceTransformer) -> torch.nn.Module:
    """``MultipleNegativesRankingLoss(model)`` (its module moved in sentence-transformers 5)."""
    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # before sentence-transformers 5
        from sentence_transformers.losses import MultipleNegativesRankingLoss
    return MultipleNegativesRankingLoss(model)


def features(model: SentenceTransformer, texts: Sequence[str]) -> dict[str, Any]:
    """The model's input features for ``texts`` (as the encoder makes them), on the model's device."""
    from miner.encode import _preprocess

    return {k: v.to(model.device) if hasattr(v, "to") else v for k, v in _preprocess(model, list(texts), "").items()}


def mnrl_step(
    model: SentenceTransformer,
    loss_fn: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    columns: Sequence[Sequence[str]],
    *,
    max_grad_norm: float | None = 1.0,
) -> float:
    """One optimiser step of ``loss_fn`` on ``columns`` (anchors, positives, negatives...); returns the loss.

    The model must be in training mode (``model.train()``); gradients are clipped to ``max_grad_norm``.
    """
    import torch

    if len(columns) < 2 or len({len(c) for c in columns}) != 1:
        raise ValueError(f"columns must be >= 2 text lists of one length, got lengths {[len(c) for c in columns]}")
    value = loss_fn([features(model, texts) for texts in columns], None)  # MNRL builds its own labels
    value.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    return float(value.item())
