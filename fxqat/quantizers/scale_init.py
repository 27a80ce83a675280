"""Initial step sizes of scale-based quantizers from the first tensor they see.

* ``"lsq"``: the LSQ paper's heuristic ``2·mean|x| / sqrt(Q_P)`` (Esser et al., 2020).
* ``"absmax"``: round-to-nearest's scale, so training starts at the RTN model: ``max|x| / ((Q_P − Q_N) / 2)`` for
  signed grids (torchao's symmetric mapping), ``max|x| / Q_P`` for unsigned ones.
* ``"mse"``: the absmax scale times the ratio in ``(0, 1]`` (a grid of ``grid`` values) that minimises the
  squared quantization error, chosen per channel / group (per tensor when ``axis`` is None).

Example:
    >>> x = torch.tensor([[1.0, -0.5, 0.25, 0.1]])
    >>> init_scale(x, 0, (-8, 7), "absmax")
    tensor([0.1333])
    >>> bool(init_scale(x, 0, (-2, 1), "mse") <= init_scale(x, 0, (-2, 1), "absmax"))
    True
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["INITS", "init_scale"]

INITS = ("lsq", "absmax", "mse")


def _rows(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """``x`` as (channels, rest), one row per scale (a single row when ``axis`` is None)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


@torch.no_grad()
def init_scale(x: torch.Tensor, axis: Optional[int], qrange: Tuple[int, int], how: str = "lsq",
               grid: int = 40) -> torch.Tensor:
    """One scale per row of ``x`` along ``axis`` (shape ``[C]``, or ``[1]`` for ``axis=None``).

    Args:
        x: the tensor (weights, or a calibration activation).
        axis: the channel axis (per-group quantizers pass the grouped view and its group axis), None per tensor.
        qrange: the integer grid ``(Q_N, Q_P)``, e.g. ``(-8, 7)`` for signed 4 bits.
        how: one of :data:`INITS`.
        grid: candidate clipping ratios of ``"mse"``.
    """
    qmin, qmax = qrange
    rows = _rows(x.float(), axis)
    if how == "lsq":
        return 2 * rows.abs().mean(dim=1) / math.sqrt(max(qmax, 1))
    half = (qmax - qmin) / 2 if qmin < 0 else max(qmax, 1)
    absmax = rows.abs().amax(dim=1) / half
    if how == "absmax":
        return absmax
    if how != "mse":
        raise ValueError(f"init_scale: how={how!r}; choose one of {list(INITS)}")
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for i in range(1, grid + 1):
        s = (absmax * i / grid).clamp_min(1e-12)[:, None]
        err = ((torch.clamp(torch.round(rows / s), qmin, qmax) * s - rows) ** 2).sum(dim=1)
        better = err < best_err
        best = torch.where(better, s[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best
