"""DSQ's soft quantizer as one ``torch.autograd.Function`` with its analytic backward (used by ``DSQQuantizer``).

Notation (per element; ``l < u`` broadcast against ``x``, ``n = 2^b − 1``, ``α`` the characteristic variable)::

    Δ = (u − l)/n            z = clip((x − l)/Δ, 0, n)          i = ⌊z⌋          f = z − i − ½ ∈ [−½, ½)
    K = 2·atanh(1 − α)       A = 1/(1 − α)                        T = tanh(K·f) = 2·S − 1,   S = σ(2K·f)
    P = i + ½ + ½·A·T        y = l + Δ·P                          (``hard``: y = l + Δ·⌊z⌉)

(:func:`~fxqat.quantizers.dsq.dsq_soft` takes ``i = n − 1`` at ``z = n``; ``i = n`` gives the same value and
derivatives up to rounding: ``Q_S`` and its derivatives are continuous across cell edges.) With
``D = ½·A·K·(1 − T²) = 2·A·K·S·(1 − S)``, the derivative of ``Q_S`` in its clipped argument, and the clip's
derivative ``w = (1 − sign((x − l)·(x − u)))/2`` (1 inside, 0 clipped, ½ at a tie ``x = l`` or ``x = u``: autograd
splits ``torch.maximum``/``torch.minimum`` evenly at ties in ``dsq_soft``)::

    ∂y/∂x = D_x := D·w
    ∂y/∂u = (P − D_x·z)/n                      (1 above u, 0 below l: there P = n or 0 and D_x = 0)
    ∂y/∂l = 1 − D_x − ∂y/∂u                    (y(x + t; l + t, u + t) = y + t)
    ∂y/∂α = ½·Δ·(A²·T + A·(1 − T²)·f·dK/dα),   dK/dα = −2/(α·(2 − α))   (0 where clipped: y = l or u there)

The backward sums these against the incoming gradient ``g`` over the whole tensor (per channel for per-channel
bounds): ``Σ g·P − Σ g_x·z = (Σ Δ·(g·z − g_x·z))/Δ − Σ g·f + ½A·Σ g·T``, ``Σ g·T = 2·Σ g·S − Σ g`` and
``Σ g·(1 − T²)·f = 4·Σ g·S·(1 − S)·f``. The two sums whose parts cancel (``g·z − g_x·z``; ``g·S(1 − S)·f`` in ∂/∂α) are
formed per element and reduced by ``torch.sum`` (pairwise summation: float32 errors like autograd's); ``Σ g·f``
is a dot product. It saves only ``x − l`` and ``S``, and recomputes ``z`` and ``f`` (three full-size allocations
in the forward, two in the backward).

Edges: ``(x − l) − (u − l)`` stands for ``x − u``, so an ``x`` whose ``x − l`` rounds to ``u − l`` (within an ulp of
``u``) counts as a tie at ``u``, as does an ``x`` so close to a bound that ``(x − l)·(x − u)`` underflows to 0
(closer than about 1e-38/(u − l) in float32); ``x = l`` and ``x = u`` themselves are exact ties. Float rounding
differs from ``dsq_soft`` (another order of operations, and ``tanh`` computed as ``2σ(2·) − 1``: torch's CPU
``tanh`` is about 10x slower than ``sigmoid``), so the soft forward agrees to a few ulps; the hard forward is
bit-identical to ``l + Δ·⌊(clip(x, l, u) − l)/Δ⌉``.

Under ``torch.compile`` :class:`DSQFusedFunction` takes its place: the same derivatives written for inductor, which
fuses its forward into one loop and its backward (every sum included) into another. It saves only ``x`` and
recomputes the rest (a pass over memory costs more there than the arithmetic), multiplies by ``1/Δ`` instead of
dividing by ``Δ`` in the soft forward (a vector division costs about as much as the rest of the loop on this CPU;
values differ from the division by an ulp of ``z``), and computes its per-tensor (or per-channel) constants ``Δ``,
``1/Δ``, ``K``, ``A`` once into one stacked buffer: left inline, inductor would recompute ``atanh`` and the
divisions for every vector of the loop. Its hard forward divides, as :func:`dsq_hard` does.

Example:
    >>> import torch
    >>> lo, up, a = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.2])
    >>> y = DSQFunction.apply(torch.tensor([0.0, 0.5, 1.0, 2.0]), lo, up, a, 1, False)
    >>> [round(v, 6) for v in y.tolist()]
    [0.0, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

import torch

from fxqat.quantizers._zoo_utils import dot_to, sum_to

__all__ = ["DSQFunction", "DSQFusedFunction", "dsq_hard"]


def dsq_hard(x: torch.Tensor, lo: torch.Tensor, up: torch.Tensor, n: int) -> torch.Tensor:
    """Hard DSQ forward ``l + Δ·⌊clip((x − l)/Δ, 0, n)⌉`` (``lo``, ``up`` broadcast against ``x``).

    Bit-identical to ``l + Δ·⌊(clip(x, l, u) − l)/Δ⌉``: inside ``[l, u]`` the same operations; outside, the
    clipped value is 0 or within an ulp of ``n``, which rounds to ``n``.
    """
    delta = (up - lo) / n
    return torch.sub(x, lo).div_(delta).clamp_(0, n).round_().mul_(delta).add_(lo)


class DSQFunction(torch.autograd.Function):
    """DSQ forward (soft ``Q_S`` or hard) with the analytic gradient of ``Q_S`` (see the module docstring).

    ``apply(x, lower, upper, alpha, n, hard)``: ``lower < upper`` broadcast against ``x`` (shape ``[1]`` or a
    ``channel_view``), ``alpha`` of one element, already clamped to its range; ``n = 2^b − 1``; ``hard``: forward
    value hard-rounded (the gradient stays that of ``Q_S``). Not twice differentiable: a Hessian needs
    :func:`~fxqat.quantizers.dsq.dsq_soft`.
    """

    @staticmethod
    def forward(ctx, x, lower, upper, alpha, n: int, hard: bool):
        delta = (upper - lower) / n
        d = torch.sub(x, lower)  # saved: z and the clip/tie state follow from it
        y = torch.div(d, delta).clamp_(0, n)  # z
        fr = torch.frac(y)  # z − i (z ≥ 0)
        if hard:
            y.round_().mul_(delta).add_(lower)
        else:
            y.sub_(fr)  # i
        k = 2 * torch.atanh(1 - alpha)
        s = fr.mul_(2 * k).sub_(k).sigmoid_()  # S = σ(2K·f), f = z − i − ½; T = tanh(K·f) = 2S − 1
        if not hard:
            ad = delta / (1 - alpha)  # A·Δ
            y.mul_(delta).add_(lower + 0.5 * (delta - ad)).addcmul_(s, ad)  # l + Δ·(i + ½ − ½A + A·S)
        ctx.save_for_backward(lower, upper, alpha, d, s)
        ctx.n = n
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        lower, upper, alpha, d, s = ctx.saved_tensors
        n = ctx.n
        g = g.contiguous()
        delta = (upper - lower) / n
        a = 1 / (1 - alpha)
        gx = torch.mul(g, s)  # g·S
        s_g, s_gs = sum_to(g, lower), sum_to(gx, lower)
        gx.addcmul_(gx, s, value=-1)  # g·S(1 − S) = g·(1 − T²)/4
        r = torch.div(d, delta).clamp_(0, n).frac_().sub_(0.5)  # f, as in forward
        s_gf = dot_to(g, r, lower)
        s_gdf = sum_to(r.mul_(gx), lower)  # Σ g·S(1 − S)·f; products summed by torch.sum (pairwise: accurate)
        width = upper.to(d.dtype) - lower.to(d.dtype)  # as d = x − l is computed: d = width exactly where x = u
        r.copy_(d).sub_(width).mul_(d).sign_()  # sign((x − l)(x − u)): −1 inside, 0 at a tie, 1 clipped
        gx.mul_(2 * a * torch.atanh(1 - alpha)).addcmul_(gx, r, value=-1)  # g·D·w = g·2AK·S(1 − S)·(1 − sign)/2
        r.copy_(d).div_(delta).clamp_(0, n).mul_(g).mul_(delta).addcmul_(gx, d, value=-1)  # Δ·(g·z − g_x·z)
        s_gt = 2 * s_gs - s_g  # Σ g·T
        g_up = (sum_to(r, lower) / delta - s_gf + 0.5 * a * s_gt) / n  # (Σ g·P − Σ g_x·z)/n
        g_lo = s_g - sum_to(gx, lower) - g_up
        g_alpha = (delta * a * (0.5 * a * s_gt - 4 * s_gdf / (alpha * (2 - alpha)))).sum().reshape(alpha.shape)
        return gx, g_lo, g_up.to(upper.dtype), g_alpha.to(alpha.dtype), None, None


def _constants(lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, n: int):
    """``(Δ, 1/Δ, K, A)`` broadcast to the bounds' shape, stacked: a compiled kernel then loads them (``torch.stack``
    is realized into a buffer) instead of recomputing ``atanh`` and three divisions per vector."""
    width = upper - lower
    parts = torch.broadcast_tensors(width / n, n / width, 2 * torch.atanh(1 - alpha), 1 / (1 - alpha))
    return torch.stack(parts).unbind(0)


class DSQFusedFunction(torch.autograd.Function):
    """:class:`DSQFunction`'s maths for ``torch.compile`` (see the module docstring): saves ``x`` only, recomputes
    ``z``, ``f``, ``S`` and the clip weight ``w`` in the backward; same ``apply`` arguments.

    Example:
        >>> import torch
        >>> lo, up, a = torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.2])
        >>> x = torch.tensor([0.0, 0.3, 0.5, 2.0], requires_grad=True)
        >>> y = DSQFusedFunction.apply(x, lo, up, a, 1, False)
        >>> bool(torch.allclose(y, DSQFunction.apply(x, lo, up, a, 1, False), rtol=1e-6, atol=1e-7))
        True
    """

    @staticmethod
    def forward(ctx, x, lower, upper, alpha, n: int, hard: bool):
        ctx.save_for_backward(lower, upper, alpha, x)
        ctx.n = n
        if hard:
            return dsq_hard(x, lower, upper, n)
        delta, inv, k, a = _constants(lower, upper, alpha, n)
        z = ((x - lower) * inv).clamp(0, n)
        fr = z - torch.floor(z)  # z − i
        ad = a * delta
        # l + Δ·(i + ½ − ½A + A·S), S = σ(2K·(fr − ½))
        return (z - fr) * delta + (lower + 0.5 * (delta - ad)) + torch.sigmoid(fr * (2 * k) - k) * ad

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        lower, upper, alpha, x = ctx.saved_tensors
        n = ctx.n
        delta, inv, k, a = _constants(lower, upper, alpha, n)
        d = x - lower
        z = (d * inv).clamp(0, n)
        f = z - torch.floor(z) - 0.5
        s = torch.sigmoid(2 * k * f)
        gss = g * (s * (1 - s))  # g·S(1 − S)
        w = (1 - torch.sign(d * (d - (upper - lower)))) * 0.5  # 1 inside, ½ at a tie, 0 clipped
        gx = gss * (2 * a * k) * w  # g·D·w
        s_g = sum_to(g, lower)
        s_gt = 2 * sum_to(g * s, lower) - s_g  # Σ g·T
        g_up = (sum_to((g - gx) * z, lower) - sum_to(g * f, lower) + 0.5 * a * s_gt) / n  # (Σ g·P − Σ g_x·z)/n
        g_lo = s_g - sum_to(gx, lower) - g_up
        s_gdf = sum_to(gss * f, lower)
        g_alpha = (delta * a * (0.5 * a * s_gt - 4 * s_gdf / (alpha * (2 - alpha)))).sum().reshape(alpha.shape)
        return gx, g_lo, g_up.to(upper.dtype), g_alpha.to(alpha.dtype), None, None
