"""LSQ+: LSQ with a learnable offset for activations (Bhalgat et al., CVPRW 2020; methods.md §6).

Activations (asymmetric, unsigned codes ``0 … 2^b − 1``)::

    x̂ = s·⌊clip((x − β)/s, 0, 2^b − 1)⌉ + β

Weights are symmetric LSQ (no offset, codes ``−2^{b−1} … 2^{b−1} − 1``). Backward as LSQ: STE to ``x`` inside
the range; ``∂x̂/∂s = ⌊z⌉ − z`` inside, ``Q_N`` / ``Q_P`` at the clipped ends (``z = (x − β)/s``);
``∂x̂/∂β = 0`` inside and 1 outside. Both ``s`` and ``β`` gradients are multiplied by ``g = 1/√(N·Q_P)``.
:class:`LSQPlusFunction` writes this backward out (``Σ g·⌊z⌉ − Σ g_x·z`` for ``s``, ``Σ g − Σ g_x`` for ``β``).

Initialisation (option ``init``): ``"auto"`` (default) uses the paper's rules, ``"std"`` for weights
(``s = max(|μ − 3σ|, |μ + 3σ|)/2^{b−1}``) and ``"mse"`` for activations; ``"minmax"`` sets ``β = min(x)``,
``s = (max − min)/(2^b − 1)`` (weights: ``s = max|w|/Q_P``); ``"mse"`` picks, among 40 shrinkings ``p·[min, max]``
with ``p ∈ [0.2, 1]``, the range with the lowest quantization MSE on the first tensor [R: the grid of
candidates]; a constant first batch gets the range ``[0, c]`` (``[c, 0]``), not a width of ~0. Option
``offset_on_grid`` [R] snaps β to a multiple of s (with STE) so the quantizer is exactly affine with an integer zero
point, which integer export needs.

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = LSQPlusQuantizer(QuantSpec(bits=4, method="lsq_plus", kind="act", options={"init": "minmax"}))
    >>> x = torch.randn(8, 16) - 0.2
    >>> y = q(x)
    >>> bool(torch.allclose(q.offset, x.min().reshape(1)))
    True
    >>> len(torch.unique(y)) <= 16
    True
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers._zoo_utils import (
    StateShapeMixin,
    axis_of,
    check_choice,
    dot_to,
    grad_scaled,
    numel_per_scale,
    reduce,
    set_tensor,
    sum_to,
    widen_degenerate,
)
from fxqat.quantizers.base import (
    NotAffineError,
    Quantizer,
    grad_inside,
    int_range,
    use_function,
)
from fxqat.quantizers.layout import channel_rows, channel_view
from fxqat.quantizers.ste import round_ste

__all__ = ["LSQPlusQuantizer", "LSQPlusFunction", "mse_range_search"]

_EPS = 1e-8
_MAX_SAMPLES = 1 << 18


class LSQPlusFunction(torch.autograd.Function):
    """``s·⌊clip((x − β)/s, Q_N, Q_P)⌉ + β`` with LSQ+'s backward; ``s > 0`` and ``β`` broadcast against ``x``.

    Example:
        >>> LSQPlusFunction.apply(torch.tensor([-1.0, 0.26, 9.0]), torch.tensor([0.5]), torch.tensor([-0.5]), 0, 3)
        tensor([-0.5000,  0.5000,  1.0000])
    """

    @staticmethod
    def forward(ctx, x, s, b, qmin: int, qmax: int):
        v = (x - b) / s
        q = torch.round(torch.clamp(v, qmin, qmax))
        ctx.save_for_backward(v, q, s, b)
        ctx.qrange = (qmin, qmax)
        return torch.mul(q, s).add_(b)  # as two roundings, like grid(): outputs lie exactly on it

    @staticmethod
    def backward(ctx, g):
        v, q, s, b = ctx.saved_tensors
        gx = grad_inside(g, v, *ctx.qrange)
        gs = dot_to(g, q, s) - dot_to(gx, v, s) if ctx.needs_input_grad[1] else None
        gb = sum_to(g, b) - sum_to(gx, b) if ctx.needs_input_grad[2] else None
        return gx, gs, gb, None, None


def _fq(x, s, b, qmin, qmax):
    return torch.round(torch.clamp((x - b) / s, qmin, qmax)) * s + b


@torch.no_grad()
def mse_range_search(
    x: torch.Tensor, qmin: int, qmax: int, axis: Optional[int], symmetric: bool, n_grid: int = 40
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` minimising ``‖fq(x) − x‖²`` over shrunk ranges ``p·[min, max]``, ``p ∈ [0.2, 1]``.

    ``symmetric=True`` searches ``s = p·max|x|/qmax`` with offset 0, per channel when ``axis`` is given. A range
    that is zero relative to the data's magnitude (a constant tensor) is widened to include 0 first
    (:func:`~fxqat.quantizers._zoo_utils.widen_degenerate`).

    The search runs in float64 on each row divided by its largest magnitude, so the squared errors neither overflow
    (``|x| ~ 1e30`` squares to ``1e60``, past float32's range, which left every candidate's error at inf and the
    result at ``s = 1, β = 0``) nor underflow, and the result scales with the data. Returned in float32.

    Example:
        >>> s, b = mse_range_search(torch.tensor([0.0, 1e30, 2e30, 3e30]), 0, 3, None, symmetric=False)
        >>> round(float(s) / 1e30, 6), float(b)  # the data are on the grid k·1e30: s = 1e30, β = 0
        (1.0, 0.0)
    """
    flat = x.detach().double()
    flat = channel_rows(flat, axis)
    if flat.shape[1] > _MAX_SAMPLES:
        flat = flat[:, :: math.ceil(flat.shape[1] / _MAX_SAMPLES)]
    mag = flat.abs().amax(dim=1).clamp(min=torch.finfo(torch.float64).tiny)
    flat = flat / mag[:, None]  # every row in [-1, 1]
    if symmetric:
        hi, lo = flat.abs().amax(dim=1), torch.zeros(flat.shape[0], dtype=flat.dtype, device=flat.device)
    else:
        lo, hi = widen_degenerate(flat.amin(dim=1), flat.amax(dim=1))
    best_err = torch.full((flat.shape[0],), float("inf"), dtype=flat.dtype, device=flat.device)
    best_s, best_b = torch.ones_like(best_err), torch.zeros_like(best_err)
    for p in torch.linspace(0.2, 1.0, n_grid).tolist():
        if symmetric:
            s, b = (p * hi / max(qmax, 1)).clamp(min=_EPS), torch.zeros_like(hi)
        else:
            s, b = (p * (hi - lo) / max(qmax - qmin, 1)).clamp(min=_EPS), p * lo
        err = (_fq(flat, s[:, None], b[:, None], qmin, qmax) - flat).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_b = torch.where(better, s, best_s), torch.where(better, b, best_b)
    return (best_s * mag).float(), (best_b * mag).float()


@register("lsq_plus")
class LSQPlusQuantizer(StateShapeMixin, Quantizer):
    """LSQ+ fake-quantizer: learnable scale, learnable offset for activations; per-channel scales for weights.

    Options:
        init: ``"auto"`` (default: weights ``"std"``, activations ``"mse"``), ``"minmax"``, ``"mse"`` or ``"std"``.
        learn_offset: train β (True).
        grad_scale: multiply the s and β gradients by ``1/√(N·Q_P)`` (True).
        offset_on_grid: round β to a multiple of s in the forward pass (False) [R].
    """

    default_options = {"init": "auto", "learn_offset": True, "grad_scale": True, "offset_on_grid": False}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        check_choice(type(self).__name__, "init", self.opts["init"], ("auto", "minmax", "mse", "std"))
        self.scale = nn.Parameter(torch.ones(1))
        if self.kind == "act" and self.opts["learn_offset"]:
            self.offset = nn.Parameter(torch.zeros(1))
        else:
            self.register_buffer("offset", torch.zeros(1))
        self.register_buffer("grad_factor", torch.ones(1))
        self._gf = 1.0  # Python mirror of grad_factor
        self._sync_flags()

    def _sync_flags(self) -> None:
        super()._sync_flags()
        if getattr(self, "kind", None) == "act":
            self.dtype = torch.quint8  # activation codes are unsigned whatever the data's sign

    @property
    def qrange(self) -> Tuple[int, int]:
        """Activations always use unsigned codes (the offset absorbs negative values); weights are signed."""
        return int_range(self.bits, self.kind == "weight")

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        qmin, qmax = self.qrange
        axis = axis_of(self)
        init = self.opts["init"]
        if init == "auto":
            init = "std" if self.kind == "weight" else "mse"
        if self.kind == "weight":
            if init == "std":
                mu, sd = reduce(x, axis, "mean"), reduce(x, axis, "std")
                s = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (self.bits - 1)
            elif init == "minmax":
                s = reduce(x, axis, "absmax") / max(qmax, 1)
            else:
                s, _ = mse_range_search(x, qmin, qmax, axis, symmetric=True)
            b = torch.zeros_like(s)
        else:
            if init == "mse":
                s, b = mse_range_search(x, qmin, qmax, None, symmetric=False)
            elif init == "std":
                mu, sd = reduce(x, None, "mean"), reduce(x, None, "std")
                lo, hi = widen_degenerate(torch.maximum(mu - 3 * sd, reduce(x, None, "min")), mu + 3 * sd)
                s, b = (hi - lo) / (qmax - qmin), lo
            else:
                lo, hi = widen_degenerate(reduce(x, None, "min"), reduce(x, None, "max"))
                s, b = (hi - lo) / (qmax - qmin), lo
        set_tensor(self, "scale", s.clamp(min=_EPS))
        set_tensor(self, "offset", b)
        g = 1.0 / math.sqrt(numel_per_scale(self, x) * max(qmax, 1)) if self.opts["grad_scale"] else 1.0
        self.grad_factor.fill_(g)
        self._gf = float(self.grad_factor)

    def _sb(self, x: Optional[torch.Tensor] = None, detach: bool = False):
        g = self._gf
        s = (self.scale.detach() if detach else grad_scaled(self.scale, g)).abs().clamp(min=_EPS)
        b = self.offset.detach() if detach else grad_scaled(self.offset, g)
        if self.opts["offset_on_grid"]:
            b = s * (torch.round(b / s) if detach else round_ste(b / s))
        if x is not None and self.per_channel:
            s, b = channel_view(s, x, self.ch_axis), channel_view(b, x, self.ch_axis)
        return s, b

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        s, b = self._sb(x)
        if not use_function():  # torch.compile: plain ops, which inductor fuses
            return round_ste(torch.clamp((x - b) / s, qmin, qmax)) * s + b
        return LSQPlusFunction.apply(x, s, b, qmin, qmax)

    @torch.no_grad()
    def grid(self) -> torch.Tensor:
        """Eval-mode output levels: shape ``[L]`` per-tensor or ``[C, L]`` per-channel."""
        qmin, qmax = self.qrange
        s, b = self._sb(detach=True)
        k = torch.arange(qmin, qmax + 1, dtype=s.dtype, device=s.device)
        g = k * s[:, None] + b[:, None]
        return g[0] if g.shape[0] == 1 else g

    def affine_qparams(self):
        qmin, qmax = self.qrange
        s, b = self._sb(detach=True)
        z = -b / s
        if not torch.allclose(z, torch.round(z), atol=1e-4, rtol=0):
            raise NotAffineError(
                f"LSQPlusQuantizer: offset β={b.flatten().tolist()} is not a multiple of the step "
                f"s={s.flatten().tolist()}, so there is no integer zero point; set option offset_on_grid=True."
            )
        return s, torch.round(z).to(torch.int32), qmin, qmax
