"""PACT: Parameterized Clipping Activation (Choi et al., arXiv 1805.06085, 2018; methods.md §6).

Activations, with a learnable clip ``α`` and ``n = 2^k − 1``::

    y   = clip(x, 0, α)
    y_q = ⌊y·n/α⌉ · α/n
    ∂y_q/∂x = 1 for 0 ≤ x < α, else 0          (STE through ⌊·⌉)
    ∂y_q/∂α = 1 for x ≥ α, else 0              (the paper's gradient: α is not differentiated through the step)

:class:`PACTFunction` computes the masks from the signs of ``x − α`` and ``x + α`` (exact in floating point) with
one-pass ``hardtanh_backward`` calls, and ``∂/∂α`` from two sums.

An L2 penalty ``λ_α·α²`` keeps α small: :meth:`PACTQuantizer.regularization` returns it (option ``alpha_l2``,
default 0 = off); add it to the loss. Weights are DoReFa-style (``fxqat.quantizers.dorefa``), with the same
``out_scale`` option.

fxqat's reconstruction [R]:

* ``init``: ``"std"`` (default) ``α = min(3·std(x)/√(1 − 2/π), max|x|)`` on the first batch; ``"max"``:
  ``α = max|x|``; ``"const"``: ``α = alpha_init`` (10.0, the paper's value [M]).
* Signed activations use ``clip(x, −α, α)`` on a symmetric grid of ``m = 2^{k−1} − 1`` steps a side;
  then ``∂y_q/∂α = −1`` for ``x ≤ −α``.
* α enters as ``|α|`` so a step past zero cannot flip the clip.

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> opts = {"init": "const", "alpha_init": 3.0}
    >>> q = PACTQuantizer(QuantSpec(bits=2, method="pact", kind="act", signed=False, options=opts))
    >>> q(torch.tensor([-1.0, 0.4, 1.6, 2.9, 7.0]))
    tensor([0., 0., 2., 3., 3.], grad_fn=<PACTFunctionBackward>)
"""

from __future__ import annotations

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._zoo_utils import StateShapeMixin, act_clip_std, check_choice, reduce
from fxqat.quantizers.base import NotAffineError, Quantizer, grad_inside, use_function
from fxqat.quantizers.dorefa import DoReFaWeightMixin
from fxqat.quantizers.ste import clip_ste

__all__ = ["PACTQuantizer", "PACTFunction", "pact_clip"]

_EPS = 1e-8
_INF = float("inf")


class PACTFunction(torch.autograd.Function):
    """PACT's activation fake-quantizer ``⌊clip(x)·n/α⌉·α/n`` with the paper's gradients (module docstring).

    ``apply(x, alpha, n, signed)``: ``alpha > 0`` is a one-element tensor.

    Example:
        >>> PACTFunction.apply(torch.tensor([-1.0, 0.4, 1.6, 2.9, 7.0]), torch.tensor([3.0]), 3, False)
        tensor([0., 0., 2., 3., 3.])
    """

    @staticmethod
    def forward(ctx, x, alpha, n: int, signed: bool):
        lo = -alpha if signed else torch.zeros_like(alpha)
        step = alpha / n
        y = torch.clamp(x, lo, alpha).div_(step).round_().mul_(step)
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        return y

    @staticmethod
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        hb = torch.ops.aten.hardtanh_backward
        if ctx.signed:  # inside: −α < x < α; ∂/∂α = Σ g[x ≥ α] − Σ g[x ≤ −α]
            t = hb(g, x + alpha, 0.0, _INF)
        else:  # inside: 0 ≤ x < α; ∂/∂α = Σ g[x ≥ α]
            t = grad_inside(g, x, 0.0, _INF, lo_closed=True)
        gx = hb(t, x - alpha, -_INF, 0.0)
        ga = None
        if ctx.needs_input_grad[1]:
            st, sx = t.sum(), gx.sum()
            ga = (2 * st - sx - g.sum() if ctx.signed else st - sx).reshape(alpha.shape)
        return gx, ga, None, None


def pact_clip(x: torch.Tensor, alpha: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """``clip(x, 0, α)`` or ``clip(x, −α, α)``: ∂/∂α = 1 above α (−1 below −α), ∂/∂x = 1 inside; ties as
    :class:`PACTFunction` (``x = α`` and ``x = −α`` are clipped, ``x = 0`` is inside). Float-mask gradients
    (:func:`fxqat.quantizers.ste.clip_ste`), the form that compiles fast."""
    if signed:
        return clip_ste(x, -alpha, alpha, lo_closed=False, hi_closed=False)
    return clip_ste(x, 0.0, alpha, lo_closed=True, hi_closed=False)


@register("pact")
class PACTQuantizer(DoReFaWeightMixin, StateShapeMixin, Quantizer):
    """PACT fake-quantizer: learnable activation clip α; DoReFa-style weights.

    Options:
        init: ``"std"`` (default), ``"max"`` or ``"const"`` [R].
        alpha_init: α for ``init="const"`` (10.0).
        alpha_l2: λ_α of :meth:`regularization` (0.0 = off).
        out_scale: weights only, as in DoReFa: ``"fixed"`` (default), ``"learnable"`` or ``"none"`` [R].
    """

    default_options = {"init": "std", "alpha_init": 10.0, "alpha_l2": 0.0, "out_scale": "fixed"}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        check_choice(type(self).__name__, "init", self.opts["init"], ("std", "max", "const"))
        self._setup_weight_scale()
        if self.kind == "act":
            self.alpha = nn.Parameter(torch.full((1,), float(self.opts["alpha_init"])))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            self._init_weight_scale(x)
            return
        if self.signed and self.bits < 2:
            raise ValueError("PACTQuantizer: signed activations need bits >= 2 (symmetric grid with zero).")
        mx = reduce(x.float(), None, "absmax").clamp(min=_EPS)
        if self.opts["init"] == "max":
            self.alpha.copy_(mx)
        elif self.opts["init"] == "std":
            self.alpha.copy_(torch.minimum(act_clip_std(x), mx))

    @property
    def _levels(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            return self._quantize_weight(x)
        a = self.alpha.abs().clamp(min=_EPS)
        if use_function():
            return PACTFunction.apply(x, a, self._levels, self.signed)
        y = pact_clip(x, a, self.signed)  # torch.compile: plain ops, which inductor fuses
        step = (a / self._levels).detach()
        return torch.round(y.detach() / step) * step + (y - y.detach())  # value on the grid, gradient of y

    def regularization(self) -> torch.Tensor:
        """``alpha_l2 · Σ α²`` (a zero tensor for weight quantizers or when ``alpha_l2 == 0``)."""
        if self.kind == "weight" or not self.opts["alpha_l2"]:
            return torch.zeros((), device=self.out_scale.device)
        return float(self.opts["alpha_l2"]) * self.alpha.pow(2).sum()

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` (or ``[C, L]`` for per-channel weights)."""
        if self.kind == "weight":
            return self._weight_grid()
        n = self._levels
        step = self.alpha.abs().clamp(min=_EPS) / n
        return torch.arange(-n if self.signed else 0, n + 1, dtype=step.dtype, device=step.device) * step

    def affine_qparams(self):
        if self.kind == "weight":
            raise NotAffineError(
                "PACTQuantizer: weights are DoReFa tanh-normalised, which is not affine in w; "
                "use QATConfig(w_method='lsq', a_method='pact') to export integer weights."
            )
        n = self._levels
        scale = (self.alpha.abs().clamp(min=_EPS) / n).detach()
        return scale, torch.zeros(1, dtype=torch.int32, device=scale.device), (-n if self.signed else 0), n
