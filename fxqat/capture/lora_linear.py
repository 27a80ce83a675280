"""A linear layer whose (fake-quantized) weight is recomputed in the backward pass instead of kept from the forward.

QAT + LoRA with ``QATConfig.lora="merged"`` computes ``linear(x, Q(W + s·B·A), bias)``. Autograd would keep the
weight-sized ``Q(W + s·B·A)`` (and the quantizer's intermediates) of every layer from forward to backward: a second
full copy of the model's weights. :func:`recomputed_weight_linear` keeps only what a plain linear layer keeps (its
input) and rebuilds the weight in backward from the parameters it depends on; unlike
``torch.utils.checkpoint`` around the whole layer it does not recompute the layer's output ``x·Wᵀ`` (one weight-by-
activation product per layer and step fewer). The backward computes the input gradient ``dY·W``, the weight gradient
``dYᵀ·X`` and back-propagates the latter through the weight's own graph (the quantizer's step sizes, the factors).

Example:
    >>> import torch
    >>> w0, a = torch.randn(4, 8), torch.randn(2, 8, requires_grad=True)
    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> x = torch.randn(3, 8, requires_grad=True)
    >>> y = recomputed_weight_linear(x, lambda: w0 * s + a.sum(0), None, (s, a))
    >>> y.sum().backward()
    >>> ref_x, ref_s, ref_a = x.grad.clone(), s.grad.clone(), a.grad.clone()
    >>> for t in (x, s, a): t.grad = None
    >>> torch.nn.functional.linear(x, w0 * s + a.sum(0)).sum().backward()
    >>> all(torch.allclose(g, t.grad) for g, t in ((ref_x, x), (ref_s, s), (ref_a, a)))
    True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["recomputed_weight_linear"]


class _RecomputedWeightLinear(torch.autograd.Function):
    """``linear(x, weight_fn(), bias)``; saves ``x`` only, calls ``weight_fn`` again in backward."""

    @staticmethod
    def forward(ctx, x, bias, weight_fn, n_params, *params):  # noqa: D401 - autograd.Function.forward
        with torch.no_grad():
            w = weight_fn()
        ctx.weight_fn, ctx.has_bias = weight_fn, bias is not None
        ctx.save_for_backward(x, *params)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):  # noqa: D401 - autograd.Function.backward
        x, *params = ctx.saved_tensors
        want = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            w = ctx.weight_fn()
        gx = gy @ w.detach() if ctx.needs_input_grad[0] else None
        gy2 = gy.reshape(-1, gy.shape[-1])
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        got = iter(())
        if want and w.requires_grad:
            gw = gy2.t() @ x.reshape(-1, x.shape[-1])
            got = iter(torch.autograd.grad(w, want, gw, allow_unused=True))
        gparams = [next(got, None) if p.requires_grad else None for p in params]
        return (gx, gb, None, None, *gparams)


def recomputed_weight_linear(x: torch.Tensor, weight_fn: Callable[[], torch.Tensor], bias: Optional[torch.Tensor],
                             params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight_fn(), bias)`` whose weight is rebuilt in backward instead of saved.

    Args:
        x: the layer's input ``[..., in]``.
        weight_fn: builds the ``[out, in]`` weight from ``params`` (and tensors that need no gradient); it is called
            once in forward (without autograd) and once in backward, and must return the same values both times.
        bias: the bias, or None; it gets no gradient (a frozen base layer's).
        params: every tensor ``weight_fn`` reads that may need a gradient (the factors, the step sizes).

    Returns:
        The layer's output ``[..., out]``.

    Example:
        >>> w = torch.randn(4, 8)
        >>> tuple(recomputed_weight_linear(torch.randn(3, 8), lambda: w, None, ()).shape)
        (3, 4)
    """
    return _RecomputedWeightLinear.apply(x, bias, weight_fn, len(params), *params)
