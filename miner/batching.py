"""Batches bounded by a padded-token budget: tokenise a chunk once, sort by length, cut, trim the padding.

A fixed batch size pads every text of a batch to its longest member and runs as many texts per forward pass
whether they are 10 tokens long or 256. Sorting by token length and bounding ``rows x longest`` instead keeps
the padding small and the matrices large: long passages go a few at a time, short queries hundreds at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["token_batches", "can_slice", "slice_features"]


def token_batches(lengths: npt.ArrayLike, token_budget: int | None, batch_size: int) -> list[npt.NDArray[np.int64]]:
    """Group rows longest first, each group padded to its longest member.

    Args:
        lengths: int[n] tokens of each text (padding excluded).
        token_budget: most padded tokens (rows x longest) per group; ``None`` cuts fixed groups of
            ``batch_size`` rows instead.
        batch_size: rows per group without a budget.

    Returns:
        Row indices of each group, in order; every row appears once. A text longer than the budget
        is a group of its own.

    Example:
        >>> [g.tolist() for g in token_batches([3, 10, 5, 4], token_budget=12, batch_size=64)]
        [[1], [2, 3], [0]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D (n_texts,), got shape {lengths.shape}")
    if token_budget is not None and token_budget < 1:
        raise ValueError(f"token_budget must be a positive integer or None, got {token_budget}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    order = np.argsort(-lengths, kind="stable")
    groups: list[npt.NDArray[np.int64]] = []
    start = 0
    while start < len(order):
        if token_budget is None:
            rows = batch_size
        else:
            rows = max(1, token_budget // max(1, int(lengths[order[start]])))
        groups.append(order[start : start + rows])
        start += rows
    return groups


def can_slice(features: dict[str, Any], n: int, padding_side: str) -> bool:
    """Whether a padded batch of ``n`` texts can be cut into sub-batches by rows and trimmed columns.

    True for right-padded features whose tensors are ``[n]`` or ``[n, width]`` (``input_ids``,
    ``attention_mask``, ``token_type_ids``); anything else is tokenised again per sub-batch.
    """
    import torch

    mask = features.get("attention_mask")
    if padding_side != "right" or not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != n:
        return False
    width = mask.shape[1]
    return all(
        value.dim() in (1, 2) and value.shape[0] == n and (value.dim() == 1 or value.shape[1] == width)
        for value in features.values()
        if isinstance(value, torch.Tensor)
    )


def slice_features(features: dict[str, Any], rows: npt.NDArray[np.int64], width: int) -> dict[str, Any]:
    """Rows ``rows`` of right-padded ``features``, with the columns cut to ``width`` (the longest of them).

    Gives what the tokenizer returns for those texts alone with ``padding=True``.
    """
    import torch

    index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    out: dict[str, Any] = {}
    for name, value in features.items():
        if isinstance(value, torch.Tensor):
            value = value.index_select(0, index)
            if value.dim() == 2:
                value = value[:, :width].contiguous()
        out[name] = value
    return out
