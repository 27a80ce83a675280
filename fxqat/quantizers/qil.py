"""QIL: Learning to Quantize Deep Networks by Optimizing Quantization Intervals with Task Loss.

Jung et al., CVPR 2019 (arXiv 1808.05779); methods.md §2. The quantizer is a *transformer* followed by a
*discretizer*. With a learnable centre ``c``, half-width ``d`` and (weights only) exponent ``γ``::

    t(w) = 0                               |w| < c − d      (pruning region)
           1                               |w| > c + d      (clipping region)
           (α|w| + β)^γ, α = 0.5/d, β = 0.5 − 0.5·c/d       otherwise
    weights:      ŵ = sign(w)·t(w),   w̄ = ⌊ŵ·(2^{b−1} − 1)⌉ / (2^{b−1} − 1)     (symmetric, with zero)
    activations:  x̂ = t(x) with γ = 1, x̄ = ⌊x̂·(2^b − 1)⌉ / (2^b − 1)              (unsigned)

Backward: STE through ⌊·⌉ only; ``w``, ``c``, ``d`` and ``γ`` get the analytic derivatives of the transformer.
With ``l = α|x| + β`` (``x`` for unsigned data), ``t = clamp(l, 0, 1)^γ``, ``y = sign(x)·o·⌊t·n⌉/n`` and
``g_l = g·sign(x)·o·γ·t/clamp(l)`` on ``0 < l < 1`` (0 elsewhere)::

    ∂L/∂x = g_l·α·sign(x)     ∂L/∂c = −α·Σ g_l     ∂L/∂d = −Σ g_l·(l − ½)/d
    ∂L/∂γ = Σ g·sign(x)·o·t·ln(clamp(l))  (0 < l < 1)     ∂L/∂o = Σ g·sign(x)·⌊t·n⌉/n

:class:`QILFunction` computes these directly (five passes forward, about six backward for activations); the
plain-ops :func:`qil_transform` is the reference it is tested against (flat regions with exactly zero gradient,
no NaN at the kinks).

fxqat's reconstruction [R] (options, not constants):

* ``init``: the paper gives no initialisation. ``"std"`` (default) sets the clipping threshold
  ``u = min(3·std(w), max|w|)`` for weights and ``u = min(3·std(x)/√(1 − 2/π), max|x|)`` for activations;
  ``"max"`` uses ``u = max|x|``; a spread that is zero relative to max|x| (a constant first batch, whose float32
  std is a few ulps, not 0) falls back to ``u = max|x|``. Then ``c = d = u/2``: an empty pruning band and clipping at ``u``, so the
  initial quantizer is a uniform grid over ``[0, u]`` (``[−u, u]`` for weights).
* ``out_scale``: QIL's outputs live in [−1, 1] / [0, 1]. ``"learnable"`` (default) multiplies by a learnable
  scale initialised to ``c + d``; ``"fixed"`` by a buffer set to ``c + d`` at initialisation; ``"interval"`` by
  the live ``c + d`` (gradient flows to ``c`` and ``d``); ``"none"`` is the paper's raw output.
  With ``c = d`` and a scale of ``2d`` the quantizer is the identity on its own grid (idempotent, affine).
* Signed activations (no ReLU in front) use the symmetric weight transformer with ``γ = 1``.

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = QILQuantizer(QuantSpec(bits=3, method="qil", kind="weight"))
    >>> y = q(torch.randn(64, 9))
    >>> len(torch.unique(y)) <= 7
    True
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._zoo_utils import (
    StateShapeMixin,
    act_clip_std,
    axis_of,
    check_choice,
    dot_to,
    is_degenerate,
    reduce,
    set_tensor,
    sum_to,
)
from fxqat.quantizers.base import NotAffineError, Quantizer, grad_inside, use_function
from fxqat.quantizers.layout import channel_view
from fxqat.quantizers.ste import round_ste

__all__ = ["QILQuantizer", "QILFunction", "qil_transform"]

_EPS = 1e-8


def qil_transform(
    x: torch.Tensor, c: torch.Tensor, d: torch.Tensor, gamma: Optional[torch.Tensor] = None, signed: bool = True
) -> torch.Tensor:
    """QIL's transformer: prune below ``c − d``, clip above ``c + d``, ``(α|x| + β)^γ`` in between.

    ``c``, ``d`` and ``gamma`` broadcast against ``x``. ``signed=False`` (activations) uses ``x`` instead of
    ``|x|`` and returns values in [0, 1]; ``signed=True`` returns ``sign(x)·t`` in [−1, 1].

    Example:
        >>> qil_transform(torch.tensor([0.1, 0.5, 1.0, 2.0, -1.0]), torch.tensor(1.0), torch.tensor(0.5))
        tensor([ 0.0000,  0.0000,  0.5000,  1.0000, -0.5000])
    """
    a = x.abs() if signed else x
    alpha = 0.5 / d
    beta = 0.5 - 0.5 * c / d
    lin = alpha * a + beta
    inside = lin > 0
    # safe base: 1 where pruned (its gradient is masked below), clamp(max=1) gives zero gradient where clipped
    t = torch.where(inside, lin.clamp(max=1.0), torch.ones_like(lin))
    if gamma is not None:
        t = t**gamma
    t = torch.where(inside, t, torch.zeros_like(t))
    return torch.sign(x) * t if signed else t


class QILFunction(torch.autograd.Function):
    """QIL transformer + discretizer with the analytic backward of the module docstring.

    ``apply(x, c, d, gamma, o, n, signed)``: ``c``, ``d``, ``o`` broadcast against ``x`` (``d > 0``), ``gamma``
    is a one-element tensor or None (γ = 1), ``n`` the largest integer code. ``clamp(l)`` uses the smallest
    positive float as its lower end, so ``l = 0`` (a ReLU zero at ``c = d``) counts as pruned, as in
    :func:`qil_transform`, and ``t/clamp(l)`` stays finite.
    """

    @staticmethod
    def forward(ctx, x, c, d, gamma, o, n: int, signed: bool):
        sgn = torch.sign(x) if signed else None
        alpha = 0.5 / d
        lin = torch.addcmul(0.5 - 0.5 * c / d, x.abs() if signed else x, alpha)  # β as the reference: 0 at c = d
        tc = torch.clamp(lin, torch.finfo(x.dtype).tiny, 1.0)
        t = tc.pow(gamma) if gamma is not None else tc
        r = torch.round(t * n)
        y = r * (o / n)
        if signed:
            y.mul_(sgn)
        ctx.save_for_backward(lin, tc, t, r, sgn, c, d, gamma, o)
        ctx.n = n
        return y

    @staticmethod
    def backward(ctx, g):
        lin, tc, t, r, sgn, c, d, gamma, o = ctx.saved_tensors
        need = ctx.needs_input_grad
        if sgn is not None:
            g = g * sgn
        ge = grad_inside(g, lin, 0.0, 1.0)  # 0 < l < 1, as autograd through qil_transform
        glin = ge * o if o.numel() > 1 else ge
        if gamma is not None:
            glin = glin * (t / tc) * gamma
        alpha = 0.5 / d
        scalar = o if o.numel() == 1 else None  # per-tensor o: fold it into the reductions
        gx = gc = gd = gg = go = None
        if need[0]:
            gx = glin * (alpha * scalar if scalar is not None else alpha)
            if sgn is not None:
                gx.mul_(sgn)
        if need[1] or need[2]:
            s1 = sum_to(glin, c if c.numel() >= d.numel() else d)
            if scalar is not None:
                s1 = s1 * scalar
            gc = -alpha * s1 if need[1] else None
            if need[2]:
                s2 = dot_to(glin, lin, d)
                if scalar is not None:
                    s2 = s2 * scalar
                gd = -(s2 - 0.5 * s1) / d
        if gamma is not None and need[3]:
            gg = dot_to(ge * o if o.numel() > 1 else ge, t * torch.log(tc), gamma)
            if scalar is not None:
                gg = gg * scalar
        if need[4]:
            go = dot_to(g, r, o) / ctx.n
        return gx, _fit(gc, c), _fit(gd, d), gg, go, None, None


def _fit(grad: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """Reduce a gradient computed for a broadcast shape down to ``like``'s shape."""
    if grad is None or grad.shape == like.shape:
        return grad
    return grad.sum_to_size(like.shape)


@register("qil")
class QILQuantizer(StateShapeMixin, Quantizer):
    """QIL fake-quantizer (weights: c, d, γ; activations: c, d), per-tensor or per-channel (c, d per channel).

    Options:
        init: ``"std"`` (default) or ``"max"``; see the module docstring [R].
        gamma_init: initial γ for weights (1.0).
        learn_gamma: train γ (True); when False γ stays at ``gamma_init``.
        out_scale: ``"learnable"`` (default), ``"fixed"``, ``"interval"`` or ``"none"`` [R].
    """

    default_options = {"init": "std", "gamma_init": 1.0, "learn_gamma": True, "out_scale": "learnable"}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        name = type(self).__name__
        check_choice(name, "init", self.opts["init"], ("std", "max"))
        check_choice(name, "out_scale", self.opts["out_scale"], ("learnable", "fixed", "interval", "none"))
        if self.kind == "weight" and self.bits < 2:
            raise ValueError(f"{name}: QIL's signed grid ±(2^(b−1) − 1) needs bits >= 2 (got bits={self.bits}).")
        self.c = nn.Parameter(torch.ones(1))
        self.d = nn.Parameter(torch.ones(1))
        g = torch.full((1,), float(self.opts["gamma_init"]))
        if self.kind == "weight" and self.opts["learn_gamma"]:
            self.gamma = nn.Parameter(g)
        else:
            self.register_buffer("gamma", g)
        if self.opts["out_scale"] == "learnable":
            self.out_scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("out_scale", torch.ones(1))

    @property
    def levels(self) -> int:
        """n, the largest integer code: 2^(b−1) − 1 on the signed grid, 2^b − 1 on the unsigned one."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qrange(self) -> Tuple[int, int]:
        n = self.levels
        return (-n, n) if self.signed else (0, n)

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        if self.signed and self.bits < 2:
            raise ValueError(f"{type(self).__name__}: signed data needs bits >= 2 for QIL's symmetric grid.")
        axis = axis_of(self)
        mx = reduce(x.float(), axis, "absmax").clamp(min=_EPS)
        if self.opts["init"] == "max":
            u = mx
        elif self.kind == "weight":
            u = torch.minimum(3.0 * reduce(x.float(), axis, "std"), mx)
        else:
            u = torch.minimum(act_clip_std(x, axis), mx)
        u = torch.where(is_degenerate(u, mx), mx, u)  # constant data: clip at max|x| (relative test, not u > ε)
        set_tensor(self, "c", u / 2)
        set_tensor(self, "d", u / 2)
        scale = u if self.opts["out_scale"] in ("learnable", "fixed") else torch.ones_like(u)
        set_tensor(self, "out_scale", scale)

    def _params(self, x: torch.Tensor):
        c, d, o = self.c, self.d.abs().clamp(min=_EPS), self.out_scale
        if self.opts["out_scale"] == "interval":
            o = c + d
        if self.per_channel:
            c, d = channel_view(c, x, self.ch_axis), channel_view(d, x, self.ch_axis)
            o = channel_view(o, x, self.ch_axis) if o.numel() > 1 else o
        return c, d, o

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if not use_function():  # torch.compile: plain ops, which inductor fuses
            return self.quantize_reference(x)
        c, d, o = self._params(x)
        gamma = self.gamma if self.kind == "weight" else None
        return QILFunction.apply(x, c, d, gamma, o, self.levels, self.signed)

    def quantize_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantizer through autograd of plain ops (:func:`qil_transform`); tests compare against it."""
        c, d, o = self._params(x)
        gamma = self.gamma if self.kind == "weight" else None
        t = qil_transform(x, c, d, gamma, signed=self.signed)
        n = self.levels
        return round_ste(t * n) * (o / n)

    def _out_scale_value(self) -> torch.Tensor:
        o = self.out_scale.detach()
        if self.opts["out_scale"] == "interval":
            o = (self.c + self.d.abs()).detach()
        return o

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` per-tensor or ``[C, L]`` per-channel."""
        lo, hi = self.qrange
        k = torch.arange(lo, hi + 1, dtype=self.c.dtype, device=self.c.device)
        o = self._out_scale_value().reshape(-1, 1)
        g = k * (o / self.levels)
        return g[0] if g.shape[0] == 1 else g

    def affine_qparams(self):
        c, d = self.c.detach(), self.d.detach().abs()
        o = self._out_scale_value()
        if self.kind == "weight" and not torch.allclose(self.gamma.detach(), torch.ones_like(self.gamma), atol=1e-6):
            raise NotAffineError(
                f"QILQuantizer: γ={self.gamma.detach().flatten().tolist()} ≠ 1 makes the transformer non-linear; "
                "train with learn_gamma=False (gamma_init=1.0) to export an affine grid."
            )
        if not torch.allclose(c, d, rtol=1e-5, atol=1e-8) or not torch.allclose(o, 2 * d, rtol=1e-5, atol=1e-8):
            raise NotAffineError(
                "QILQuantizer: the eval-mode grid is affine only when c = d (no pruning band) and the output scale "
                f"is 2d; here c={c.flatten().tolist()}, d={d.flatten().tolist()}, scale={o.flatten().tolist()}."
            )
        lo, hi = self.qrange
        scale = 2 * d / self.levels
        return scale, torch.zeros_like(scale).to(torch.int32), lo, hi
