"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020; methods.md §6).

Forward ``v̂ = s · ⌊clip(v / s, Q_N, Q_P)⌉``; backward STE to ``v`` inside the range, and to the step size
``(⌊v/s⌉ − v/s)`` inside, ``Q_N`` / ``Q_P`` at the clipped ends, times the gradient scale ``g = 1/√(N·Q_P)``.
Initialisation on the first tensor seen: option ``init`` (:mod:`fxqat.quantizers.scale_init`), by default the
paper's ``s = 2·mean|v| / √Q_P``; ``"absmax"`` starts at round-to-nearest's scale, ``"mse"`` at the clipping ratio of
least squared error (the LLM presets' choice).

Three implementations of the same forward. ``impl="function"`` (default) is a ``torch.autograd.Function`` with the
paper's backward written out (``∂/∂v = 1`` inside, ``∂/∂s = Σ g·⌊c⌉ − Σ g_v·v`` with ``c`` the clipped ``v/s``): it
needs two dot products and no ``where``, about 4× faster than autograd through the plain-ops version on CPU.
``impl="ste"`` writes the function with plain tensor ops (autograd derives the same gradient up to the float rounding
of ``s·(1/s)``); ``torch.compile`` fuses either. ``impl="fused"`` calls torch's ``_fake_quantize_learnable_per_{tensor,channel}_affine``
kernels: same forward, but their backward decides "inside the range" on the *rounded* value, so an element with
``v/s`` in ``(Q_P, Q_P + ½)`` (or ``(Q_N − ½, Q_N)``) gets the STE gradient and a step-size gradient of
``⌊v/s⌉ − v/s`` instead of 0 and ``Q_P``. It is faster in eager mode; choose it knowingly.

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = LSQQuantizer(QuantSpec(bits=4, kind="weight"))
    >>> w = torch.randn(16, 8)
    >>> y = q(w)
    >>> bool(torch.allclose(q.scale, 2 * w.abs().mean() / 7 ** 0.5))
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
from fxqat.quantizers.base import Quantizer, compute_dtype, grad_inside, use_function
from fxqat.quantizers.layout import channel_rows, channel_view
from fxqat.quantizers.scale_init import INITS, init_scale
from fxqat.quantizers.ste import round_ste, scale_grad

__all__ = ["LSQQuantizer", "LSQFunction"]


def _sum_except(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    if axis is None:
        return t.sum().reshape(1)
    return channel_rows(t, axis).sum(1)


class LSQFunction(torch.autograd.Function):
    """LSQ fake-quantization with the paper's backward (see the module docstring).

    ``apply(x, s, grad_factor, qmin, qmax, ch_axis)``: ``s`` is positive, shape ``[1]`` or ``[C]`` (``ch_axis`` set).

    Per-tensor, the step-size gradient is two float32 dot products (one pass each), whose difference loses about
    1e-4 of relative precision on a 2M-element activation (pairwise summation of the per-element difference, as
    autograd's plain-ops version does, keeps about 1e-6 but costs two more passes); far below the gradient's noise
    from one mini-batch to the next. Run the quantizer in float64 when the last digits matter.
    """

    @staticmethod
    def forward(ctx, x, s, grad_factor: float, qmin: int, qmax: int, ch_axis: Optional[int]):
        sv = s if ch_axis is None else channel_view(s, x, ch_axis)
        v = x / sv  # a bf16/fp16 x is promoted to s's float32 element by element: x/s and its code in float32
        # a weight (a leaf, or a view of one: the per-group view) is alive anyway: save it and s, and recompute
        # x/s and the codes in backward (the same values, bit for bit), so that a quantized weight holds no extra
        # memory between forward and backward (8 bytes per element otherwise, 8 more than the weight's own 2 for a
        # bf16 weight); activations save x/s and the codes
        ctx.recompute = x.is_leaf or (x._base is not None and x._base.is_leaf)
        ctx.grad_factor, ctx.ch_axis, ctx.qrange = grad_factor, ch_axis, (qmin, qmax)
        if ctx.recompute:  # nothing kept: clamp, round and scale x/s in place (one weight-sized tensor, not three)
            ctx.save_for_backward(x, s)
            return v.clamp_(qmin, qmax).round_().mul_(sv).to(x.dtype)
        q = torch.clamp(v, qmin, qmax).round_()  # one temporary fewer than clamp then round
        ctx.save_for_backward(v, q)
        return (q * sv).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        v, q = ctx.saved_tensors
        dtype = g.dtype
        g = g.to(compute_dtype(dtype))  # a narrow output's gradient: the float32 gradient it was rounded from
        if ctx.recompute:
            x, s = v, q
            dtype = x.dtype
            v = x / (s if ctx.ch_axis is None else channel_view(s, x, ctx.ch_axis))  # float32 (promoted), as forward
            q = torch.clamp(v, *ctx.qrange).round_()
        gx = grad_inside(g, v, *ctx.qrange)  # STE inside (qmin, qmax), 0 where clipped (the paper's ends)
        if ctx.ch_axis is None:
            gs = torch.dot(g.reshape(-1), q.reshape(-1)) - torch.dot(gx.reshape(-1), v.reshape(-1))
            gs = gs.reshape(1)
        else:  # Σ g·q − Σ g_x·v per channel (group): one temporary (the recomputed codes themselves), two passes
            gq = q.mul_(g) if ctx.recompute else torch.mul(g, q)
            gs = _sum_except(gq.addcmul_(gx, v, value=-1), ctx.ch_axis)
        return gx.to(dtype), gs * ctx.grad_factor, None, None, None, None


@register("lsq")
class LSQQuantizer(Quantizer):
    """LSQ fake-quantizer, per-tensor or per-channel.

    Options:
        impl: ``"function"`` (default), ``"ste"`` (plain ops) or ``"fused"`` (torch's kernel; half-step difference
            at the clipping edges; see the module docstring).
        grad_scale: multiply the step-size gradient by ``1/√(N·Q_P)`` (the paper's setting, default True).
    """

    default_options = {"impl": "function", "grad_scale": True, "init": "lsq", "mse_grid": 40}

    def __init__(self, spec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        if self.opts["impl"] not in ("function", "fused", "ste"):
            raise ValueError(f"LSQQuantizer: impl={self.opts['impl']!r}; use 'function', 'ste' or 'fused'.")
        if self.opts["init"] not in INITS:
            raise ValueError(f"{type(self).__name__}: init={self.opts['init']!r}; choose one of {list(INITS)}.")
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("grad_factor", torch.ones(1))
        self._gf = 1.0  # Python mirror of grad_factor: no tensor read in forward (no graph break under compile)

    def takes_narrow(self) -> bool:
        """The hand-written function takes a bf16/fp16 tensor (float32 inside, the weight itself saved)."""
        return type(self).quantize is LSQQuantizer.quantize and self.opts["impl"] == "function" and use_function()

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        qmax = max(self.qrange[1], 1)
        axis = self.ch_axis if self.per_channel else None
        s = init_scale(x.float(), axis, self.qrange, self.opts["init"], int(self.opts["mse_grid"]))
        s = torch.clamp(s, min=1e-8)
        if self.scale.shape != s.shape:
            # a new Parameter of the data's shape, with the module's dtype and device (.double()) and the old one's
            # requires_grad (scales frozen by TALR)
            self.scale = nn.Parameter(s.to(device=self.scale.device, dtype=self.scale.dtype),
                                      requires_grad=self.scale.requires_grad)
            self.zero_point = self.zero_point.new_zeros(s.shape)
        else:
            self.scale.copy_(s)
        n = x.numel() if self.kind == "weight" else x[0].numel() if x.dim() > 1 else x.numel()
        if self.per_channel:
            n = n // x.shape[self.ch_axis]
        self.grad_factor.fill_(1.0 / math.sqrt(n * qmax) if self.opts["grad_scale"] else 1.0)
        self._gf = float(self.grad_factor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scale"
        if key in state_dict and state_dict[key].shape != self.scale.shape:  # per-channel: shape set on init
            self.scale = nn.Parameter(self.scale.new_empty(state_dict[key].shape),
                                      requires_grad=self.scale.requires_grad)
            self.zero_point = self.zero_point.new_zeros(state_dict[key].shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._gf = float(self.grad_factor)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        g = self._gf
        if self.opts["impl"] == "fused" and x.dtype == torch.float32:
            if self.per_channel:
                return torch._fake_quantize_learnable_per_channel_affine(
                    x, self.scale, self.zero_point, self.ch_axis, qmin, qmax, g
                )
            return torch._fake_quantize_learnable_per_tensor_affine(x, self.scale, self.zero_point, qmin, qmax, g)
        if self.opts["impl"] == "function" and use_function():  # plain ops under torch.compile
            return LSQFunction.apply(x, self.scale.abs(), g, qmin, qmax, self.ch_axis if self.per_channel else None)
        s = scale_grad(self.scale, g).abs()
        if self.per_channel:
            s = channel_view(s, x, self.ch_axis)
        return round_ste(torch.clamp(x / s, qmin, qmax)) * s

    def affine_qparams(self) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        qmin, qmax = self.qrange
        return self.scale.detach().abs(), self.zero_point.detach().round().to(torch.int32), qmin, qmax
