"""Straight-through helpers of the quantizer methods: rounding (:func:`round_ste`), gradient scaling
(:func:`scale_grad`), and clipping whose gradient masks are float arithmetic (:func:`clip_ste`, the plain-ops form
that compiles fast).

Under ``torch.compile`` the quantizers run plain tensor ops (:func:`fxqat.quantizers.base.use_function`). The
gradient of ``torch.clamp``, ``torch.where`` or ``torch.maximum`` is a comparison, and when the tensor being clipped
needs no other saved value for the backward, AOTAutograd's partitioner saves that comparison as a boolean tensor:
the cheapest thing to keep. On CPU, inductor's boolean stores and loads are slow (a micro-benchmark, 2M elements,
one thread: ``clamp(x/s)`` with an STE and a constant ``s`` took 139 ms forward + 54 ms backward compiled, against
42 + 94 ms eager and 3 + 6 ms for the form below). :func:`clip_ste` computes its masks from ``sign`` and ``relu`` of
a float difference, so no boolean tensor exists in the traced graph and the partitioner saves floats (or recomputes
them) instead.

Values are those of ``torch.clamp`` exactly; gradients are 0/1 masks exactly, so gradients equal those of the
comparison-based forms, ties included (``lo_closed`` / ``hi_closed`` say which side a tie takes), except at NaN
inputs, whose gradient is NaN (a NaN value already poisons the step).

Example:
    >>> x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    >>> hi = torch.tensor([1.0], requires_grad=True)
    >>> y = clip_ste(x, 0.0, hi)
    >>> y.tolist()
    [0.0, 0.5, 1.0]
    >>> y.sum().backward()
    >>> x.grad.tolist(), hi.grad.tolist()
    ([0.0, 1.0, 0.0], [1.0])
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["clip_ste", "round_ste", "scale_grad", "Bound"]

Bound = Union[float, torch.Tensor]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (x.round() - x).detach() + x


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor``."""
    y = x * factor
    return x.detach() + (y - y.detach())  # forward: exactly x (y - y == 0); backward: factor


def _grad_part(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero in value (``t - t`` is 0 exactly, ``0 · mask`` too); gradient ``mask`` times the incoming one."""
    return (t - t.detach()) * mask


def clip_ste(v: torch.Tensor, lo: Bound, hi: Bound, lo_closed: bool = True, hi_closed: bool = True) -> torch.Tensor:
    """``clamp(v, lo, hi)``: ``∂/∂v = 1`` inside, ``∂/∂hi = 1`` above, ``∂/∂lo = 1`` below.

    Args:
        v: the tensor to clip.
        lo, hi: numbers or tensors broadcasting against ``v`` (a tensor bound that requires a gradient gets one).
        lo_closed, hi_closed: whether ``v == lo`` (``v == hi``) counts as inside (its gradient goes to ``v``) or as
            clipped (to the bound): match the hand-written backward of the method's eager ``autograd.Function``.

    Returns:
        ``torch.clamp(v, lo, hi)`` bit for bit, with the gradients above (see the module docstring for why).
    """
    vd = v.detach()
    lo_d = lo.detach() if isinstance(lo, torch.Tensor) else lo
    hi_d = hi.detach() if isinstance(hi, torch.Tensor) else hi
    c = torch.clamp(torch.clamp(vd, min=lo_d), max=hi_d)  # torch.clamp takes two numbers or two tensors, not one each
    above = torch.sign(torch.relu(vd - hi_d)) if hi_closed else 1.0 - torch.sign(torch.relu(hi_d - vd))
    below = torch.sign(torch.relu(lo_d - vd)) if lo_closed else 1.0 - torch.sign(torch.relu(vd - lo_d))
    out = c + _grad_part(v, 1.0 - above - below)
    if isinstance(hi, torch.Tensor) and hi.requires_grad:
        out = out + _grad_part(hi, above)
    if isinstance(lo, torch.Tensor) and lo.requires_grad:
        out = out + _grad_part(lo, below)
    return out
