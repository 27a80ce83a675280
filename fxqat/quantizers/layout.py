"""Tensor layouts quantizers compute in: per-group views along a channel axis, per-channel broadcasting and the
one-row-per-channel layout of every "reduce over all axes but one".

Example:
    >>> import torch
    >>> x = torch.arange(8.0).reshape(2, 4)
    >>> torch.equal(from_groups(to_groups(x, 1, 1), x.shape, 1), x)
    True
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["to_groups", "from_groups", "channel_view", "channel_rows"]


def to_groups(x: torch.Tensor, axis: int, group_size: int) -> torch.Tensor:
    """``x`` as ``[C·G, group_size]``: channel ``axis`` first, the other dims flattened, cut into groups of
    ``group_size`` consecutive elements (row-major (channel, group) order).

    Example:
        >>> to_groups(torch.arange(8.0).reshape(2, 4), 0, 2)
        tensor([[0., 1.],
                [2., 3.],
                [4., 5.],
                [6., 7.]])
    """
    if x.dim() < 2:
        raise ValueError(f"per-group quantization needs a weight with >= 2 dims, got shape {tuple(x.shape)}.")
    moved = x.movedim(axis, 0) if axis != 0 else x
    n_in = moved[0].numel()
    if n_in % group_size:
        raise ValueError(
            f"per-group quantization: weight of shape {tuple(x.shape)} has {n_in} input elements per channel, not "
            f"divisible by group_size={group_size}; choose a divisor (or an Override for this layer)."
        )
    return moved.reshape(-1, group_size)


def from_groups(y: torch.Tensor, shape: torch.Size, axis: int) -> torch.Tensor:
    """Inverse of :func:`to_groups` for a tensor of the original ``shape``."""
    if axis == 0:
        return y.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return y.reshape(moved).movedim(0, axis)


def channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector ``t`` so it broadcasts against ``x`` along ``axis``."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


def channel_rows(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """``x`` as ``(x.shape[axis], rest)``: one row per channel of ``axis`` (one row when ``axis`` is None), the layout
    of every "reduce over all axes but one" (per-channel scales, their initialisation and gradients).

    Example:
        >>> channel_rows(torch.arange(6.0).reshape(2, 3), 1).sum(1).tolist()
        [3.0, 5.0, 7.0]
    """
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis).reshape(x.shape[axis], -1)
