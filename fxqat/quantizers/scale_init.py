"""Initial step sizes of scale-based quantizers from the first tensor they see.

* ``"lsq"``: the LSQ paper's heuristic ``2·mean|x| / sqrt(Q_P)`` (Esser et al., 2020).
* ``"absmax"``: round-to-nearest's scale, so training starts at the RTN model: ``max|x| / ((Q_P − Q_N) / 2)`` for
  signed grids (torchao's symmetric mapping), ``max|x| / Q_P`` for unsigned ones.
* ``"mse"``: the absmax scale times the ratio ``i / grid`` (``i = 1 … grid``) that minimises the squared quantization
  error ``Σ (s·clamp(⌊x/s⌉, Q_N, Q_P) − x)²``, chosen per channel / group (per tensor when ``axis`` is None); the
  smallest ratio wins a tie, a row whose every error is non-finite keeps the absmax scale.

The ``"mse"`` search (:func:`mse_scale`) gives the same step sizes, bit for bit, as trying every ratio on every row, at
a fraction of the cost: rows are processed in chunks that stay in cache, ratios from the largest down, and a row
stops as soon as no smaller ratio can win. The stop rule is exact: at step ``s`` the two extreme elements alone are
clipped by at least ``max(0, max(x) − Q_P·s)`` and ``max(0, −min(x) + Q_N·s)``; the sum of these two squared terms is a
lower bound of the row's error at ``s`` and of every smaller ``s`` (it grows as ``s`` shrinks), computed with the same
float operations as the two elements' terms of the error, so once it exceeds the best error found, the row is done.
On int4 per-group-32 weights about 8 of 40 ratios are tried per group, on int2 about 29.

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

from fxqat.quantizers.layout import channel_rows

__all__ = ["INITS", "CHUNK_ELEMENTS", "COMPACT_SHARE", "init_scale", "mse_scale", "lowest_needed_ratio"]

INITS = ("lsq", "absmax", "mse")

#: elements per chunk of the ``"mse"`` search (about 1 MiB of float32: the chunk and its temporary stay in cache)
CHUNK_ELEMENTS = 1 << 18
#: the search goes on with the rows that still need a smaller ratio copied together when they are at most this
#: share of the rows searched so far (copying fewer rows costs more than it saves)
COMPACT_SHARE = 0.5


@torch.no_grad()
def init_scale(x: torch.Tensor, axis: Optional[int], qrange: Tuple[int, int], how: str = "lsq",
               grid: int = 40) -> torch.Tensor:
    """One scale per row of ``x`` along ``axis`` (shape ``[C]``, or ``[1]`` for ``axis=None``), in float32.

    Args:
        x: the tensor (weights, or a calibration activation), of any floating dtype (read as float32).
        axis: the channel axis (per-group quantizers pass the grouped view and its group axis), None per tensor.
        qrange: the integer grid ``(Q_N, Q_P)``, e.g. ``(-8, 7)`` for signed 4 bits.
        how: one of :data:`INITS`.
        grid: candidate clipping ratios of ``"mse"``.
    """
    if how not in INITS:
        raise ValueError(f"init_scale: how={how!r}; choose one of {list(INITS)}")
    qmin, qmax = qrange
    rows = channel_rows(x.float(), axis)
    if how == "lsq":
        return 2 * rows.abs().mean(dim=1) / math.sqrt(max(qmax, 1))
    half = (qmax - qmin) / 2 if qmin < 0 else max(qmax, 1)
    absmax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg()).abs() / half  # max |x|, no |x| copy
    if how == "absmax":
        return absmax
    return mse_scale(rows, absmax, qrange, grid)


@torch.no_grad()
def mse_scale(rows: torch.Tensor, absmax: torch.Tensor, qrange: Tuple[int, int], grid: int = 40) -> torch.Tensor:
    """The ``"mse"`` step size of each row of the 2-D float32 ``rows``: ``absmax · i / grid`` of least squared error.

    Args:
        rows: ``[R, n]`` float32, one row per scale.
        absmax: ``[R]``, the absmax scale of each row (the ratio ``1`` candidate).
        qrange: the integer grid ``(Q_N, Q_P)``.
        grid: number of candidate ratios.

    Example:
        >>> rows = torch.tensor([[0.5, -0.5, 0.4, -0.6, 0.5, 1.5]])  # int2: clipping the 1.5 pays
        >>> mse_scale(rows, rows.abs().amax(1) / 1.5, (-2, 1), grid=4)
        tensor([0.7500])
    """
    if rows.dim() != 2 or absmax.shape != rows.shape[:1]:
        raise ValueError(f"mse_scale: rows must be [R, n] and absmax [R]; got {tuple(rows.shape)} and "
                         f"{tuple(absmax.shape)}.")
    best = absmax.clone()
    if rows.numel() == 0:
        return best
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for r0 in range(0, rows.shape[0], step):
        best[r0:r0 + step] = _search_chunk(rows[r0:r0 + step], absmax[r0:r0 + step], qrange, grid)
    return best


def _search_chunk(x: torch.Tensor, absmax: torch.Tensor, qrange: Tuple[int, int], grid: int) -> torch.Tensor:
    """:func:`mse_scale` on one chunk of rows: ratios from ``grid`` down to 1 on the rows that still need them.

    After each ratio the bound of the module docstring marks the rows that still need a smaller one; when they are
    at most :data:`COMPACT_SHARE` of the rows being searched, those rows are copied together (one ``index_select``)
    and the next ratios run on them alone. Best step sizes and errors stay in the chunk's row order.
    """
    qmin, qmax = qrange
    pm = x.amax(dim=1).clamp_min(0)  # the largest positive element (0 if none) ...
    nm = x.amin(dim=1).neg().clamp_min(0)  # ... and the largest negative one's magnitude
    bst, err_a = absmax.clone(), torch.full_like(absmax, float("inf"))  # best step and error, chunk row order
    live: Optional[torch.Tensor] = None  # the chunk rows searched (None: all) ...
    xa, am, bl, el = x, absmax, bst, err_a  # ... their data, absmax, best step and best error
    buf = torch.empty_like(x)
    for i in range(grid, 0, -1):
        if i < grid:  # rows whose every ratio from i down is ruled out by the bound are done
            keep = (lowest_needed_ratio(pm, nm, am, el, qrange, grid) <= i).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            if keep.numel() <= COMPACT_SHARE * am.numel():
                bst, err_a = _put(bst, live, bl), _put(err_a, live, el)
                live = keep if live is None else live[keep]
                xa, am, pm, nm, bl, el = xa.index_select(0, keep), am[keep], pm[keep], nm[keep], bl[keep], el[keep]
                buf = buf[: keep.numel()]
        s = (am * i / grid).clamp_min(1e-12)[:, None]
        err = torch.div(xa, s, out=buf).round_().clamp_(qmin, qmax).mul_(s).sub_(xa).square_().sum(dim=1)
        better = err <= el  # descending ratios: a tie goes to the smaller one; NaN never wins
        bl, el = torch.where(better, s[:, 0], bl), torch.where(better, err, el)
    bst, err_a = _put(bst, live, bl), _put(err_a, live, el)
    return torch.where(torch.isfinite(err_a), bst, absmax)  # no finite error: keep absmax


def _put(full: torch.Tensor, rows: Optional[torch.Tensor], values: torch.Tensor) -> torch.Tensor:
    """``values`` written into ``full`` at ``rows`` (``values`` itself when ``rows`` is None: all rows)."""
    if rows is None:
        return values
    full[rows] = values
    return full


def lowest_needed_ratio(pmax: torch.Tensor, nmax: torch.Tensor, absmax: torch.Tensor, err: torch.Tensor,
                        qrange: Tuple[int, int], grid: int) -> torch.Tensor:
    """Per row, an index ``i`` (float, in ``[1, grid]``) such that no ratio below ``i / grid`` can reach ``err``.

    Args:
        pmax: the row's largest positive element (0 if none); nmax: its most negative element's magnitude (0 if none).
        absmax: the absmax scale (ratio 1); err: an error reached (the best found so far).
        qrange: the integer grid; grid: number of ratios.

    The clipping of one extreme element alone costs ``(p − Q_P·s)²`` when ``p > Q_P·s``: a ratio whose ``s`` is below
    ``(p − √err) / Q_P`` (or ``(n − √err) / |Q_N|``) has a larger error. The index is one ratio lower than this
    estimate (a margin for its float rounding); 1 when nothing is ruled out (non-finite or zero inputs).

    Example:
        >>> one = torch.ones(1)
        >>> lowest_needed_ratio(one, one, one / 7.5, torch.tensor([0.25]), (-8, 7), 40)  # s >= 0.5/7 = 0.0714
        tensor([20.])
    """
    qmin, qmax = qrange
    root = err.sqrt()
    # clipping bound of each extreme element alone: s >= (p - sqrt(err)) / Q_P and s >= (n - sqrt(err)) / |Q_N|
    s_low = (pmax - root).clamp_min(0) / max(qmax, 1)
    if qmin < 0:
        s_low = torch.maximum(s_low, (nmax - root).clamp_min(0) / -qmin)
    i_low = torch.floor(s_low * grid / absmax) - 1  # one ratio below, for the float rounding of this estimate
    return torch.nan_to_num(i_low, nan=1.0, posinf=1.0, neginf=1.0).clamp(1, grid)
