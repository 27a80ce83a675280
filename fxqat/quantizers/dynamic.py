"""Dynamic per-token activation fake-quantization (torchao's 8da4w activation side).

No learned or calibrated range: on every call, each token (a row of the last dim) gets its own asymmetric
``bits``-bit grid ``qmin … qmax = −2^{b−1} … 2^{b−1} − 1`` from its min and max (both widened to include 0)::

    s  = max((max⁺ − min⁻) / (qmax − qmin), eps)       eps = smallest normal of the dtype
    z  = clamp(qmin − ⌊min⁻ / s⌉, qmin, qmax)
    x̂  = (clamp(⌊x · (1/s)⌉ + z, qmin, qmax) − z) · s

which is ``torchao.quantization.choose_qparams_affine(..., MappingType.ASYMMETRIC)`` followed by
``torchao.quantization.qat.utils._fake_quantize_per_token`` operation by operation (so the values are bit-identical;
tests/integration/test_torchao_8da4w.py checks it). The scale and zero point are not differentiated (detached, as usual
for dynamic quantization); ``x`` gets the straight-through gradient, exactly 1 everywhere (the range covers every
element, so nothing is clipped).

Example:
    >>> import torch
    >>> from fxqat.config import QuantSpec
    >>> q = DynamicQuantizer(QuantSpec(bits=8, method="dynamic", kind="act", granularity="per_token"))
    >>> x = torch.randn(3, 5, 16)
    >>> y = q(x)
    >>> y.shape, bool(((y - x).abs() <= (x.amax(-1, keepdim=True).clamp(min=0)
    ...                  - x.amin(-1, keepdim=True).clamp(max=0)) / 255 / 2 + 1e-6).all())
    (torch.Size([3, 5, 16]), True)
"""

from __future__ import annotations

from typing import Tuple

import torch

from fxqat.method_registry import register
from fxqat.quantizers.base import Quantizer, int_range

__all__ = ["DynamicQuantizer", "per_token_qparams", "fake_quantize_per_token"]


@torch.no_grad()
def per_token_qparams(x: torch.Tensor, qmin: int, qmax: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric ``(scale, zero_point)`` per row of the last dim, shape ``x.shape[:-1] + (1,)``."""
    lo = torch.amin(x, dim=-1, keepdim=True)
    hi = torch.amax(x, dim=-1, keepdim=True)
    lo, hi = torch.min(lo, torch.zeros_like(lo)), torch.max(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=torch.finfo(x.dtype).smallest_normal)
    zp = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zp


def fake_quantize_per_token(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int):
    """``(clamp(⌊x·(1/s)⌉ + z, qmin, qmax) − z)·s`` with an identity gradient to ``x`` (forward value exact)."""
    with torch.no_grad():
        q = torch.clamp(torch.round(x * (1.0 / scale)) + zp, qmin, qmax)
        y = (q - zp) * scale
    return y + (x - x.detach())  # forward: exactly y (x − x = 0); backward: identity to x


@register("dynamic")
class DynamicQuantizer(Quantizer):
    """Dynamic per-token asymmetric activation fake-quantizer (granularity ``"per_token"``, activations only).

    Nothing is learned or stored; ``signed`` is ignored (the zero point makes the grid asymmetric).
    """

    granularities = ("per_token",)
    kinds = ("act",)
    is_dynamic = True

    def __init__(self, spec, **kwargs) -> None:
        if spec.kind != "act":
            raise ValueError(f"DynamicQuantizer: kind={spec.kind!r}; per-token dynamic quantization is for 'act'.")
        super().__init__(spec, **kwargs)
        self.initialized.fill_(1)  # no data-dependent initialisation
        self._sync_flags()

    @property
    def qrange(self) -> Tuple[int, int]:
        """torchao's signed int range, e.g. (−128, 127) for 8 bits."""
        return int_range(self.bits, True) if self.bits > 1 else (0, 1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.qrange
        scale, zp = per_token_qparams(x.detach(), qmin, qmax)
        return fake_quantize_per_token(x, scale, zp, qmin, qmax)
