"""llama.cpp's Q4_0 and Q8_0 weight grids as a learned fake-quantizer (method ``"gguf"``), so that QAT trains on
exactly what a GGUF file stores and :func:`fxqat.export.to_gguf` adds no error.

Both formats cut each row of a weight (its reduction dimension) into blocks of 32 and store one fp16 step per
block. fxqat learns the step ``d`` per block (a float32 parameter, LSQ's gradient) and computes as llama.cpp's
quantizer does: the codes from the float32 step (``v = x · (1/d)`` in float32), the values from the step the file
stores, ``d16 = fp16(d)``:

* 4 bits, **Q4_0**: ``q = clamp(trunc(v + 8.5), 0, 15)``, value ``d16 · (q − 8)``. ``d`` is *signed*: llama.cpp
  takes ``d = m / −8`` with ``m`` the block's element of largest magnitude, so the extra level −8 lands on ``m``'s
  side; a negative ``d`` gives the levels ``−7|d| … 8|d|``, a positive one ``−8|d| … 7|d|``.
* 8 bits, **Q8_0**: ``q = clamp(roundf(v), −127, 127)`` (``roundf``: half away from zero), value ``d16 · q``;
  llama.cpp's own choice is ``d = max|x| / 127``. Code −128 is never used: ggml's int8 dot products take
  ``|q|`` of a Q8_0 block, which overflows for −128.

The step starts at llama.cpp's own choice (option ``init="runtime"``), so before training the fake-quantized
weight is bit for bit what llama.cpp's quantizer writes; after training the codes and steps are fxqat's and the
file's dequantized weight is still exactly the fake-quantized one. ``init="mse"``/``"absmax"``/``"lsq"`` use
:mod:`fxqat.quantizers.scale_init` (positive steps) instead. Weights only, per group of 32 (the presets
``QATConfig.preset("gguf_q4_0")`` and ``"gguf_q8_0"``).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = GGUFQuantizer(QuantSpec(bits=4, method="gguf", kind="weight", granularity="per_group", group_size=32))
    >>> w = torch.randn(4, 64)
    >>> y = q(w)
    >>> d = gguf_step(q.scale.detach()).repeat_interleave(32).reshape(4, 64)
    >>> bool(((y / d) == (y / d).round()).all()), int((y / d).min()) >= -8, int((y / d).max()) <= 8
    (True, True, True)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from fxqat.method_registry import register
from fxqat.quantizers.base import Quantizer
from fxqat.quantizers.scale_init import INITS, init_scale

__all__ = ["GGUFQuantizer", "GGUFGridFunction", "gguf_step", "gguf_codes", "BLOCK", "FORMATS",
           "is_gguf_quantizer"]

#: elements per block in Q4_0 and Q8_0
BLOCK = 32
#: bits -> GGUF format name
FORMATS = {4: "Q4_0", 8: "Q8_0"}
_FP16_MAX = 65504.0


def gguf_step(d: torch.Tensor) -> torch.Tensor:
    """The step a GGUF block stores: ``d`` rounded to fp16 (to nearest, ties to even, as ggml and numpy do), as
    float32; magnitudes beyond fp16's range are clamped to its largest value.

    Example:
        >>> gguf_step(torch.tensor([0.1, -1e6]))
        tensor([ 9.9976e-02, -6.5504e+04])
    """
    return d.float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()


def gguf_codes(x: torch.Tensor, d: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's codes of the blocks ``x`` ``[R, 32]`` for the float32 steps ``d`` ``[R]``.

    Returns:
        ``(k, v)``: the signed level index ``k`` (``q − 8`` for Q4_0, ``q`` for Q8_0; value = ``fp16(d) · k``) and
        the scaled input ``v = x · (1/d)``; float32, shape of ``x``. A zero step gives ``1/d = 0`` (llama.cpp's rule).

    Example:
        >>> gguf_codes(torch.tensor([[0.5, -0.5, 1.49, -1.5]]), torch.tensor([1.0]), 8)[0]
        tensor([[ 1., -1.,  1., -2.]])
    """
    d = d.float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    v = x.float() * inv[:, None]
    if bits == 4:
        return torch.clamp(torch.trunc(v + 8.5), 0, 15) - 8, v
    a = v.abs()  # roundf without the float error of a + 0.5: floor(a) + floor(2·frac(a))
    fl = a.floor()
    return torch.clamp(torch.sign(v) * (fl + (2 * (a - fl)).floor()), -127, 127), v


class GGUFGridFunction(torch.autograd.Function):
    """Fake-quantization on the Q4_0/Q8_0 grid with LSQ's backward.

    ``apply(x, d, grad_factor, bits)``: ``x`` is ``[R, 32]`` (one block a row), ``d`` ``[R]`` the learned signed step.
    Forward: ``d16 · k`` (:func:`gguf_codes`) in ``x``'s dtype. Backward: ``x`` gets the straight-through gradient
    where the code is not clipped, ``d`` gets ``Σ g·(k − v)`` over unclipped and ``Σ g·k`` over clipped elements (the
    fp16 rounding of ``d`` passes the gradient straight through), times ``grad_factor``.
    """

    @staticmethod
    def forward(ctx, x, d, grad_factor: float, bits: int):
        d16 = gguf_step(d)
        k, v = gguf_codes(x, d, bits)
        lo, hi = (-8, 7) if bits == 4 else (-127, 127)
        inside = (v > lo - 0.5) & (v < hi + 0.5)  # the code is not clipped
        ctx.save_for_backward(k, v, inside)
        ctx.grad_factor = grad_factor
        ctx.dtypes = (x.dtype, d.dtype)
        return (k * d16[:, None]).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        k, v, inside = ctx.saved_tensors
        g = g.float()
        gx = torch.where(inside, g, torch.zeros_like(g))
        gd = (g * k - gx * v).sum(dim=1) * ctx.grad_factor
        return gx.to(ctx.dtypes[0]), gd.to(ctx.dtypes[1]), None, None


@register("gguf")
class GGUFQuantizer(Quantizer):
    """llama.cpp's Q4_0 (``bits=4``) or Q8_0 (``bits=8``) grid with a learned fp16 step per block of 32.

    Options:
        init: ``"runtime"`` (default: llama.cpp's own step per block) or one of
            :data:`fxqat.quantizers.scale_init.INITS`.
        grad_scale: multiply the step gradient by ``1/√(32·Q_P)`` (LSQ's setting, default True).
        mse_grid: candidate clipping ratios of ``init="mse"``.
    """

    default_options = {"init": "runtime", "grad_scale": True, "mse_grid": 40}
    granularities = ("per_group",)
    kinds = ("weight",)

    def __init__(self, spec, **kwargs) -> None:
        if spec.bits not in FORMATS or spec.group_size != BLOCK:
            raise ValueError(
                f"GGUFQuantizer: bits={spec.bits}, group_size={spec.group_size}; GGUF's Q4_0/Q8_0 grids are bits=4 "
                f"or 8 in groups of {BLOCK}: use QATConfig.preset('gguf_q4_0') or preset('gguf_q8_0')."
            )
        super().__init__(spec, **kwargs)
        if self.opts["init"] not in ("runtime",) + INITS:
            raise ValueError(f"GGUFQuantizer: init={self.opts['init']!r}; choose 'runtime' or one of {list(INITS)}.")
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("grad_factor", torch.ones(1))
        self._gf = 1.0

    @property
    def qrange(self) -> Tuple[int, int]:
        """``(-8, 7)`` for Q4_0 (levels relative to a signed step), ``(-127, 127)`` for Q8_0."""
        return (-8, 7) if self.bits == 4 else (-127, 127)

    @property
    def format(self) -> str:
        """``"Q4_0"`` or ``"Q8_0"``."""
        return FORMATS[self.bits]

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        rows = x.float()
        if self.opts["init"] == "runtime" and self.bits == 4:
            m = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))[:, 0]
            d = m / -8
        elif self.opts["init"] == "runtime":
            d = rows.abs().amax(dim=1) / 127
        else:
            d = init_scale(rows, 0, self.qrange, self.opts["init"], int(self.opts["mse_grid"]))
        self.scale = nn.Parameter(d.to(device=self.scale.device, dtype=self.scale.dtype),
                                  requires_grad=self.scale.requires_grad)
        self.grad_factor.fill_(1.0 / math.sqrt(BLOCK * self.qrange[1]) if self.opts["grad_scale"] else 1.0)
        self._gf = float(self.grad_factor)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "scale"
        if key in state_dict and state_dict[key].shape != self.scale.shape:  # one step per block: shape set on init
            self.scale = nn.Parameter(self.scale.new_empty(state_dict[key].shape),
                                      requires_grad=self.scale.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._gf = float(self.grad_factor)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return GGUFGridFunction.apply(x, self.scale, self._gf, self.bits)

    @torch.no_grad()
    def block_codes(self, w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(k, d16)``: the level index of every element of the weight ``w`` (``[out, in]``, as int8, shape
        ``[out·in/32, 32]``) and the fp16 step of every block (``[out·in/32]``, float16); value = ``d16 · k``."""
        rows = w.detach().reshape(-1, BLOCK)
        d = self.scale.detach()
        return gguf_codes(rows, d, self.bits)[0].to(torch.int8), gguf_step(d).to(torch.float16)

    def affine_qparams(self) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """Per block: ``scale = |d16|``, zero point 0 (Q8_0, or Q4_0 with ``d > 0``) or −1 (Q4_0 with ``d < 0``:
        levels −7…8 steps). Rounding differs from the affine form only at exact ties (llama.cpp rounds half up)."""
        d16 = gguf_step(self.scale.detach())
        zp = -(d16 < 0).to(torch.int32) if self.bits == 4 else torch.zeros_like(d16, dtype=torch.int32)
        qmin, qmax = self.qrange
        return d16.abs(), zp, qmin, qmax

    def extra_repr(self) -> str:
        return super().extra_repr() + f", format={self.format}"


def is_gguf_quantizer(q: Optional[Quantizer]) -> bool:
    """Whether ``q`` trains a GGUF grid (its eval-mode output is a GGUF block's dequantized value)."""
    return isinstance(q, GGUFQuantizer)

