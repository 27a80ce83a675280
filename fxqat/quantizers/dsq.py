"""DSQ: Differentiable Soft Quantization (Gong et al., ICCV 2019; methods.md §6).

Learnable clip bounds ``l < u`` split into ``2^b − 1`` cells of width ``Δ = (u − l)/(2^b − 1)``. In cell ``i``
(centre ``m_i = l + (i + ½)Δ``), with the characteristic variable ``α ∈ (0, 1)``::

    k = 2·atanh(1 − α)/Δ                       (so that α = 1 − tanh(kΔ/2))
    ς = 1/tanh(kΔ/2) = 1/(1 − α)
    φ(x) = ς·tanh(k·(x − m_i))                 ∈ [−1, 1] across the cell
    Q_S(x) = l + Δ·(i + (φ(x) + 1)/2)          soft value; x is clipped to [l, u] first

``Q_S`` is continuous with a continuous derivative at cell edges and tends to hard rounding as α → 0.
In evaluation (``self.training`` False) the forward is hard: ``l + Δ·⌊(clip(x, l, u) − l)/Δ⌉``.
``α`` is learnable and clamped to ``alpha_range``; ``l``, ``u`` and ``α`` get the analytic gradients of ``Q_S``.

Gradients (``z = (clip(x, l, u) − l)/Δ``, ``i = ⌊z⌋``, ``f = z − i − ½``, ``K = kΔ = 2·atanh(1 − α)``,
``A = ς = 1/(1 − α)``, ``T = tanh(K·f)``, ``P = (Q_S − l)/Δ = i + ½ + ½·A·T``, ``D = ½·A·K·(1 − T²)``)::

    ∂Q_S/∂x = D·w          w = 1 inside (l, u), 0 outside, ½ at x = l or x = u (the tie split of max/min)
    ∂Q_S/∂u = (P − D·w·z)/n          ∂Q_S/∂l = 1 − D·w − ∂Q_S/∂u
    ∂Q_S/∂α = ½·Δ·(A²·T + A·(1 − T²)·f·dK/dα),    dK/dα = −2/(α·(2 − α))

``impl="function"`` (default) computes these in one ``torch.autograd.Function``
(:class:`~fxqat.quantizers._dsq_function.DSQFunction`: a few elementwise passes and dot products; on CPU about a
quarter of the step-time overhead of autograd through :func:`dsq_soft`; under ``torch.compile``
:class:`~fxqat.quantizers._dsq_function.DSQFusedFunction`, the same derivatives written for inductor's fusion);
``impl="autograd"`` differentiates
:func:`dsq_soft`'s plain tensor ops (twice differentiable). The two agree up to float rounding, except that
the function counts an ``x`` whose ``x − l`` rounds to ``u − l`` (within an ulp of ``u``), or whose
``(x − l)·(x − u)`` underflows to 0, as a tie (``w = ½``). Hard forwards (``train_forward="hard"``, evaluation)
are bit-identical.

fxqat's reconstruction [R] (options):

* ``train_forward``: ``"soft"`` (default, methods.md's reading: forward ``Q_S`` while training) or ``"hard"``
  (forward value hard-rounded, gradient of ``Q_S``: the ``sign(φ)`` form of public re-implementations [M]).
* ``alpha_init`` 0.2 [M], ``alpha_range`` (1e-3, 0.5).
* ``init``: ``"std"`` (default: weights ``l, u = ∓3·std(w)``; activations ``l = min(x)``,
  ``u = 3·std(x)/√(1 − 2/π)``, the skeleton EWGS and LBT reuse) or ``"minmax"``. A constant first batch (spread
  zero relative to its magnitude) gives weights ``±max|w|`` and activations ``[0, c]`` (``[c, 0]`` for c < 0).
* ``impl``: ``"function"`` (default) or ``"autograd"`` (see above).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = DSQQuantizer(QuantSpec(bits=2, method="dsq", kind="act", options={"init": "minmax"}))
    >>> _ = q(torch.tensor([0.0, 3.0]))
    >>> _ = q.eval()
    >>> q(torch.tensor([0.2, 0.9, 1.6, 2.4, 3.0]))
    tensor([0., 1., 2., 2., 3.], grad_fn=<DSQFunctionBackward>)
"""

from __future__ import annotations

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._dsq_function import DSQFunction, DSQFusedFunction, dsq_hard
from fxqat.quantizers._zoo_utils import (
    StateShapeMixin,
    act_clip_std,
    axis_of,
    check_choice,
    is_degenerate,
    reduce,
    set_tensor,
    widen_degenerate,
)
from fxqat.quantizers.base import NotAffineError, Quantizer, use_function
from fxqat.quantizers.layout import channel_view

__all__ = ["DSQQuantizer", "dsq_soft"]

_EPS = 1e-8


def dsq_soft(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """DSQ's soft quantizer ``Q_S`` (see the module docstring); differentiable in x, lower, upper and alpha.

    Example:
        >>> q = dsq_soft(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.2), 1)
        >>> [round(v, 6) for v in q.tolist()]
        [0.0, 0.5, 1.0]
    """
    n = 2**bits - 1
    delta = (upper - lower) / n
    xc = torch.minimum(torch.maximum(x, lower), upper)
    i = torch.clamp(torch.floor((xc - lower) / delta).detach(), 0, n - 1)
    m = lower + (i + 0.5) * delta
    tanh_half = 1 - alpha  # tanh(kΔ/2)
    k = 2 * torch.atanh(tanh_half) / delta
    phi = torch.tanh(k * (xc - m)) / tanh_half
    return lower + delta * (i + (phi + 1) / 2)


@register("dsq")
class DSQQuantizer(StateShapeMixin, Quantizer):
    """DSQ fake-quantizer: learnable clip bounds and α (per-channel bounds for weights when asked).

    Options:
        train_forward: ``"soft"`` (default) or ``"hard"`` [R].
        alpha_init: initial α (0.2) [M].
        alpha_range: (min, max) clamp of α ((1e-3, 0.5)) [R].
        init: ``"std"`` (default) or ``"minmax"`` [R].
        impl: ``"function"`` (default, fast) or ``"autograd"`` (plain ops, twice differentiable).
    """

    default_options = {
        "train_forward": "soft", "alpha_init": 0.2, "alpha_range": (1e-3, 0.5), "init": "std", "impl": "function",
    }

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        name = type(self).__name__
        check_choice(name, "train_forward", self.opts["train_forward"], ("soft", "hard"))
        check_choice(name, "init", self.opts["init"], ("std", "minmax"))
        check_choice(name, "impl", self.opts["impl"], ("function", "autograd"))
        lo, hi = self.opts["alpha_range"]
        if not 0 < lo <= hi < 1:
            raise ValueError(f"{name}: alpha_range={self.opts['alpha_range']!r}; need 0 < min <= max < 1.")
        self.lower = nn.Parameter(torch.zeros(1))
        self.upper = nn.Parameter(torch.ones(1))
        self.alpha = nn.Parameter(torch.full((1,), float(self.opts["alpha_init"])))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        axis = axis_of(self)
        xf = x.float()
        if self.opts["init"] == "minmax":
            lo, up = reduce(xf, axis, "min"), reduce(xf, axis, "max")
            if self.kind == "weight":
                mx = torch.maximum(lo.abs(), up.abs())
                lo, up = -mx, mx
        elif self.kind == "weight":
            sd, mx = reduce(xf, axis, "std"), reduce(xf, axis, "absmax")
            sd = torch.where(is_degenerate(sd, mx), mx / 3, sd)  # constant weights: ±max|w| (relative test)
            lo, up = -3 * sd, 3 * sd
        else:
            lo, up = reduce(xf, None, "min"), act_clip_std(x)
        lo, up = widen_degenerate(lo, up)  # a constant c: [0, c] (or [c, 0]) instead of a width of ~0
        up = torch.where(up - lo > _EPS, up, lo + 1e-3)  # all zero
        set_tensor(self, "lower", lo)
        set_tensor(self, "upper", up)

    def _params(self, x: torch.Tensor):
        """``(l, u, α)``: ``u ≥ l + ε``, bounds viewed to broadcast against ``x``, ``α`` clamped to its range."""
        lo, up = self.lower, self.upper
        up = torch.maximum(up, lo + _EPS)
        if self.per_channel and lo.numel() > 1:
            lo, up = channel_view(lo, x, self.ch_axis), channel_view(up, x, self.ch_axis)
        a_lo, a_hi = self.opts["alpha_range"]
        return lo, up, torch.clamp(self.alpha, a_lo, a_hi)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        lo, up, alpha = self._params(x)
        n = 2**self.bits - 1
        hard = not (self.training and self.opts["train_forward"] == "soft")
        if hard and not torch.is_grad_enabled():
            return dsq_hard(x, lo, up, n)
        # unlike the other methods, DSQ keeps a Function under torch.compile too: dynamo traces it whole, and its
        # written-out backward compiles into one fused loop, faster than inductor's backward of the plain ops
        if self.opts["impl"] == "function":
            return (DSQFunction if use_function() else DSQFusedFunction).apply(x, lo, up, alpha, n, hard)
        soft = dsq_soft(x, lo, up, alpha, self.bits)
        if not hard:
            return soft
        return dsq_hard(x.detach(), lo.detach(), up.detach(), n) + (soft - soft.detach())  # value hard, grad of Q_S

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` per-tensor or ``[C, L]`` per-channel."""
        n = 2**self.bits - 1
        lo = self.lower.reshape(-1, 1)
        up = torch.maximum(self.upper.reshape(-1, 1), lo + _EPS)
        g = lo + (up - lo) / n * torch.arange(0, n + 1, dtype=lo.dtype, device=lo.device)
        return g[0] if g.shape[0] == 1 else g

    def affine_qparams(self):
        if self.training and self.opts["train_forward"] == "soft":
            raise NotAffineError("DSQQuantizer: in soft (training) mode the forward is tanh-shaped; call .eval().")
        n = 2**self.bits - 1
        lo = self.lower.detach()
        scale = (torch.maximum(self.upper.detach(), lo + _EPS) - lo) / n
        z = -lo / scale
        if not torch.allclose(z, torch.round(z), atol=1e-4, rtol=0):
            raise NotAffineError(
                f"DSQQuantizer: lower bound l={lo.flatten().tolist()} is not a multiple of the step "
                f"Δ={scale.flatten().tolist()} (e.g. a symmetric weight range with 2^b levels has no zero), "
                "so there is no integer zero point."
            )
        return scale, torch.round(z).to(torch.int32), 0, n
