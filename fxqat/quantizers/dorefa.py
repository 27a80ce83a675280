"""DoReFa-Net quantizers (Zhou et al., arXiv 1606.06160, 2016; methods.md §6).

With ``q_k(u) = ⌊(2^k − 1)·u⌉ / (2^k − 1)`` (STE through ⌊·⌉)::

    weights:      w_q = 2·q_k( tanh(w) / (2·max|tanh w|) + ½ ) − 1          (2^k levels in [−1, 1])
    activations:  x_q = q_k(clip(x, 0, 1))

The max is taken over the tensor (per output channel with ``per_channel``); autograd differentiates through it,
so only the arg-max element feels the max's gradient. Gradient quantization is the separate ``"grad"`` method.

fxqat's reconstruction [R] (options):

* ``out_scale`` (weights): ``"fixed"`` (default) multiplies ``w_q`` by a buffer set on the first tensor to
  ``mean|w| / mean|w_q|`` so a network initialised from FP keeps its weight magnitude (layers without a following
  BN, residual sums); ``"learnable"`` makes it a parameter with that init; ``"none"`` is the paper's [−1, 1].
* ``act_clip``: the activation range ``r`` in ``x_q = r·q_k(clip(x/r, 0, 1))``. ``1.0`` (default) is the paper;
  ``"std"`` sets ``r = min(3·std(x)/√(1 − 2/π), max|x|)`` and ``"max"`` sets ``r = max|x|`` on the first batch.
* Signed activations use ``r·⌊clip(x/r, −1, 1)·m⌉/m`` with ``m = 2^{k−1} − 1`` (symmetric, with zero).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = DoReFaQuantizer(QuantSpec(bits=2, method="dorefa", kind="weight", options={"out_scale": "none"}))
    >>> [round(v, 4) for v in torch.unique(q(torch.linspace(-2, 2, 101))).tolist()]
    [-1.0, -0.3333, 0.3333, 1.0]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._zoo_utils import StateShapeMixin, act_clip_std, axis_of, check_choice, reduce, set_tensor
from fxqat.quantizers.base import NotAffineError, Quantizer, grad_inside, use_function
from fxqat.quantizers.layout import channel_rows, channel_view
from fxqat.quantizers.ste import clip_ste, round_ste

__all__ = ["DoReFaQuantizer", "dorefa_weight", "quantize_k", "DoReFaWeightMixin"]

_EPS = 1e-8


class _DoReFaActFunction(torch.autograd.Function):
    """``⌊clip(x/r, lo, 1)·n⌉/n·r`` with the clipped straight-through gradient (``r`` is a fixed range)."""

    @staticmethod
    def forward(ctx, x, r, n: int, lo: float):
        v = x / r
        y = torch.clamp(v, lo, 1.0).mul_(n).round_().div_(n).mul_(r)
        ctx.save_for_backward(v)
        ctx.lo = lo
        return y

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return grad_inside(g, v, ctx.lo, 1.0), None, None, None


def quantize_k(u: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa's ``q_k(u) = ⌊(2^k − 1)·u⌉ / (2^k − 1)`` with a straight-through gradient."""
    n = 2**bits - 1
    return round_ste(u * n) / n


def dorefa_weight(w: torch.Tensor, bits: int, ch_axis: Optional[int] = None) -> torch.Tensor:
    """DoReFa's weight quantizer ``2·q_k(tanh(w)/(2·max|tanh w|) + ½) − 1`` (max per channel when ``ch_axis``)."""
    t = torch.tanh(w)
    if ch_axis is None:
        m = t.abs().max()
    else:
        m = channel_view(channel_rows(t.abs(), ch_axis).amax(dim=1), w, ch_axis)
    return 2 * quantize_k(t / (2 * m.clamp(min=_EPS)) + 0.5, bits) - 1


class DoReFaWeightMixin:
    """DoReFa weights with an optional output scale; shared by DoReFa and PACT (whose weights are DoReFa-style)."""

    def _setup_weight_scale(self) -> None:
        check_choice(type(self).__name__, "out_scale", self.opts["out_scale"], ("fixed", "learnable", "none"))
        if self.opts["out_scale"] == "learnable":
            self.out_scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("out_scale", torch.ones(1))

    @torch.no_grad()
    def _init_weight_scale(self, w: torch.Tensor) -> None:
        axis = axis_of(self)
        if self.opts["out_scale"] == "none":
            o = torch.ones(1 if axis is None else w.shape[axis], device=w.device)
        else:
            wq = dorefa_weight(w.float(), self.bits, axis)
            o = reduce(w.float(), axis, "absmean") / reduce(wq, axis, "absmean").clamp(min=_EPS)
        set_tensor(self, "out_scale", o)

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        o = self.out_scale
        if self.per_channel and o.numel() > 1:
            o = channel_view(o, w, self.ch_axis)
        return dorefa_weight(w, self.bits, axis_of(self)) * o

    @torch.no_grad()
    def _weight_grid(self) -> torch.Tensor:
        n = 2**self.bits - 1
        k = torch.arange(0, n + 1, dtype=self.out_scale.dtype, device=self.out_scale.device)
        g = (2 * (k / n) - 1) * self.out_scale.detach().reshape(-1, 1)
        return g[0] if g.shape[0] == 1 else g


@register("dorefa")
class DoReFaQuantizer(DoReFaWeightMixin, StateShapeMixin, Quantizer):
    """DoReFa fake-quantizer: tanh-normalised weights, clipped activations.

    Options:
        out_scale: weights only, ``"fixed"`` (default), ``"learnable"`` or ``"none"`` (paper) [R].
        act_clip: activation range r: a float (1.0, the paper), ``"std"`` or ``"max"`` [R].
    """

    default_options = {"out_scale": "fixed", "act_clip": 1.0}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        self._setup_weight_scale()
        clip = self.opts["act_clip"]
        if not (clip in ("std", "max") or (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0)):
            raise ValueError(f"DoReFaQuantizer: act_clip={clip!r}; use a positive float (1.0), 'std' or 'max'.")
        self.register_buffer("act_range", torch.full((1,), float(clip) if not isinstance(clip, str) else 1.0))

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            self._init_weight_scale(x)
            return
        if self.signed and self.bits < 2:
            raise ValueError("DoReFaQuantizer: signed activations need bits >= 2 (symmetric grid with zero).")
        clip = self.opts["act_clip"]
        if clip == "max":
            self.act_range.copy_(reduce(x.float(), None, "absmax").clamp(min=_EPS))
        elif clip == "std":
            self.act_range.copy_(torch.minimum(act_clip_std(x), reduce(x.float(), None, "absmax")).clamp(min=_EPS))

    @property
    def _act_levels(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "weight":
            return self._quantize_weight(x)
        r, n, lo = self.act_range, self._act_levels, -1.0 if self.signed else 0.0
        if use_function():
            return _DoReFaActFunction.apply(x, r, n, lo)
        return round_ste(clip_ste(x / r, lo, 1.0, False, False) * n) / n * r  # torch.compile: plain ops, which inductor fuses

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` (or ``[C, L]`` for per-channel weights)."""
        if self.kind == "weight":
            return self._weight_grid()
        n = self._act_levels
        k = torch.arange(-n if self.signed else 0, n + 1, dtype=self.act_range.dtype, device=self.act_range.device)
        return k / n * self.act_range

    def affine_qparams(self):
        if self.kind == "weight":
            raise NotAffineError(
                "DoReFaQuantizer: weights are normalised through tanh and max|tanh w|, so their grid is not an "
                "affine function of w; use method='lsq' (or 'pact' activations with 'lsq' weights) to export integers."
            )
        n = self._act_levels
        scale = (self.act_range / n).detach()
        return scale, torch.zeros(1, dtype=torch.int32, device=scale.device), (-n if self.signed else 0), n
