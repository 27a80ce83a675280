"""EWGS's quantizer as one ``torch.autograd.Function`` with its backward written out (used by ``EWGSQuantizer``).

Forward, per element (``l``, width ``w = max(u − l, ε)`` and the output scale ``o`` broadcast against ``x``;
``n = 2^b − 1``)::

    v = (x − l)/w        x_n = clip(v, 0, 1)        x_q = ⌊n·x_n⌉/n
    y = (2·x_q − 1)·o    (``mode="weight"``),    l + w·x_q    (``"denorm"``),    x_q    (``"unit"``)

Backward, with ``a = ∂y/∂x_q`` (``2·o``, ``w`` or 1) and the EWGS scaling of the gradient to ``x_n``::

    g_q = a·g            g_n = g_q·(1 + δ·sign(g_q)·(x_n − x_q)) = g_q + δ·|g_q|·(x_n − x_q)
    ∂L/∂x = g_x := g_n·[0 < v < 1]/w            (0 at the clip's bounds too, as torch.clamp's backward)
    ∂L/∂l = −Σ g_x  (+ Σ g for "denorm")                    ∂L/∂w = −Σ g_x·v  (+ Σ g·x_q for "denorm")
    ∂L/∂o = Σ g·(2·x_q − 1)                                  (``"weight"``)

(``∂/∂l`` holds ``w`` fixed: the caller's ``w = max(u − l, ε)`` takes the rest to ``l`` and ``u`` by autograd.)
Only ``x_n`` is saved (``x_q`` is recomputed, and ``[0 < v < 1] = sign(x_n·(1 − x_n))``). Sums run over the whole
tensor (per channel for per-channel parameters): dot products for activations; for weights (small) per-element
products reduced by ``torch.sum``, whose pairwise summation is more accurate than a float32 dot product. The
forward is bit-identical to the plain-ops version; gradients agree with autograd through it up to float rounding.
Not twice differentiable: :func:`~fxqat.quantizers.ewgs.refresh_ewgs_delta` (a Hessian) uses the plain-ops path.

Example:
    >>> import torch
    >>> y = EWGSFunction.apply(torch.tensor([-1.0, 0.2, 0.5, 2.0]), torch.tensor([0.0]), torch.tensor([1.0]),
    ...                        None, torch.tensor([0.0]), 3, "unit")
    >>> [round(v, 4) for v in y.tolist()]
    [0.0, 0.3333, 0.6667, 1.0]
"""

from __future__ import annotations

from typing import Optional

import torch

from fxqat.quantizers._zoo_utils import dot_to, sum_to

__all__ = ["EWGSFunction", "EWGS_MODES"]

EWGS_MODES = ("weight", "denorm", "unit")


class EWGSFunction(torch.autograd.Function):
    """EWGS forward and analytic backward (see the module docstring).

    ``apply(x, lower, width, scale, delta, n, mode)``: ``lower``, ``width > 0`` and ``scale`` (``mode="weight"``
    only, else None) broadcast against ``x``; ``delta`` (δ, a buffer: no gradient) of one element; ``n = 2^b − 1``;
    ``mode`` one of :data:`EWGS_MODES`.
    """

    @staticmethod
    def forward(ctx, x, lower, width, scale: Optional[torch.Tensor], delta, n: int, mode: str):
        x_n = torch.sub(x, lower).div_(width).clamp_(0, 1)
        y = torch.mul(x_n, n).round_().div_(n)  # x_q
        if mode == "weight":
            y.mul_(2).sub_(1).mul_(scale)
        elif mode == "denorm":
            y.mul_(width).add_(lower)
        ctx.save_for_backward(lower, width, scale, delta, x_n)
        ctx.mode, ctx.n = mode, n
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        lower, width, scale, delta, x_n = ctx.saved_tensors
        mode = ctx.mode
        g = g.contiguous()
        a = 2 * scale if mode == "weight" else width if mode == "denorm" else None
        r = torch.mul(x_n, ctx.n).round_().div_(ctx.n)  # x_q, as in forward
        s_gxq = dot_to(g, r, lower) if mode == "denorm" else None  # Σ g·x_q
        g_scale = None
        if mode == "weight" and ctx.needs_input_grad[3]:  # Σ g·(2·x_q − 1), summed per element (small tensors)
            g_scale = sum_to(torch.mul(r, 2).sub_(1).mul_(g), scale)
        r.sub_(x_n)  # x_q − x_n (exact: within half a step)
        gx = torch.abs(g).mul_(r).mul_(-delta if a is None else -delta * a.abs())  # δ·|g_q|·(x_n − x_q)
        gx = gx.add_(g) if a is None else gx.addcmul_(g, a)  # g_n = g_q + δ·|g_q|·(x_n − x_q)
        r.copy_(x_n).addcmul_(x_n, x_n, value=-1).sign_()  # sign(x_n·(1 − x_n)) = [0 < v < 1]
        gx.mul_(r).div_(width)
        g_lo = -sum_to(gx, lower)
        # Σ g_x·v (v = x_n where g_x ≠ 0): a dot product for activations; weights are small: pairwise torch.sum
        g_w = -(sum_to(gx * x_n, width) if mode == "weight" else dot_to(gx, x_n, width))
        if mode == "denorm":
            g_lo = g_lo + sum_to(g, lower)
            g_w = g_w + s_gxq
        return gx, g_lo, g_w, g_scale, None, None, None
