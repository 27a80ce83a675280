"""The learned affine parameters of one quantizer, as every export path reads them.

For each quantizer, export reads the eval-mode affine equivalent ``(scale, zero_point, qmin, qmax)``
(:meth:`fxqat.Quantizer.affine_qparams`), or for weights whose eval-mode output lies on a uniform grid with a zero
level (QIL) and activations whose grid has a fractional lowest level (LSQ+, DSQ, EWGS), an equivalent read from the
grid (:func:`affine_params`). Bit-widths below 8 live on an 8-bit *carrier* (``int8`` when the codes need a sign,
else ``uint8``); the real range ``[qmin, qmax]`` is kept in :class:`AffineParams` so each path can clip to it.

Per-group weights (``granularity="per_group"``: one scale per ``group_size`` consecutive input elements of each
output channel) have :attr:`AffineParams.group_size` set and are *not* per-channel (``per_channel`` is False, there is
no torch ``qscheme``). The Q/DQ paths (torch.ao, PT2E, ONNX) carry per-tensor and per-channel scales only and refuse
them, as they refuse dynamic per-token activation quantizers (no fixed parameters at all);
:func:`fxqat.export.to_torchao` (and ExecuTorch through it) carries both.

Example:
    >>> import torch
    >>> from fxqat.config import QATConfig
    >>> from fxqat.quantizers import make_quantizer
    >>> _ = torch.manual_seed(0)
    >>> q = make_quantizer(QATConfig.preset("int4_weight_only").spec_for("weight")); w = torch.randn(4, 64)
    >>> _ = q(w)  # initialises the scales
    >>> p = affine_params("w", q, "fc")
    >>> (p.granularity, p.group_size, tuple(p.scale.shape), p.qmin, p.qmax, p.per_channel)
    ('per_group', 32, (8,), -8, 7, False)

    torch's kernel multiplies by ``1/scale`` where the quantizer divides by the scale, so an element that lies on a
    rounding tie (about 1 in 10^4 here) may land one step away; everything else is bit-identical:

    >>> diff = (p.fake_quant(w) - q(w)).abs()
    >>> bool((diff <= p.scale.max() * (1 + 1e-6)).all()), int((diff > 0).sum()) <= 1
    (True, True)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from fxqat.quantizers.base import NotAffineError, Quantizer
from fxqat.quantizers.layout import from_groups, to_groups

__all__ = ["ExportError", "AffineParams", "affine_params"]


class ExportError(ValueError):
    """A model (or one of its quantizers) that an export path cannot represent; the message names it."""



@dataclass(frozen=True)
class AffineParams:
    """Eval-mode affine quantization of one tensor::

        code = clamp(round((x - offset) / scale) + zp, qmin, qmax);   value = (code - zp) * scale + offset

    Attributes:
        scale: float32, shape ``[1]`` (per tensor), ``[C]`` (per channel) or ``[C·G]`` (per group: ``G`` groups per
            channel, in (channel, group) order, the rows of :func:`fxqat.quantizers.base.to_groups`).
        zero_point: int32, same shape, already shifted onto the carrier (see ``signed``).
        qmin, qmax: integer range of the real bit-width, on the carrier.
        ch_axis: channel axis for per-channel and per-group parameters, None per tensor.
        signed: carrier is int8 (True, codes -128..127) or uint8 (False, 0..255).
        offset: a float shift of the whole grid (0.0 almost always): activation grids whose lowest level is not a
            multiple of the step (a learned lower bound: LSQ+ without ``offset_on_grid``, DSQ, EWGS) have no integer
            zero point; they are exported as ``x - offset -> Q/DQ -> + offset``.
        group_size: elements per group for per-group weights, None otherwise.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    ch_axis: Optional[int]
    signed: bool
    offset: float = 0.0
    group_size: Optional[int] = None

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (False for per-group parameters, which have several per channel)."""
        return self.ch_axis is not None and self.group_size is None

    @property
    def per_group(self) -> bool:
        return self.group_size is not None

    @property
    def granularity(self) -> str:
        """``"per_tensor"``, ``"per_channel"`` or ``"per_group"``."""
        return "per_group" if self.per_group else "per_channel" if self.per_channel else "per_tensor"

    @property
    def carrier_range(self) -> Tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)

    @property
    def narrow(self) -> bool:
        """Whether the real range is narrower than the carrier's (a clip is needed where the runtime saturates)."""
        return (self.qmin, self.qmax) != self.carrier_range

    @property
    def torch_qdtype(self) -> torch.dtype:
        return torch.qint8 if self.signed else torch.quint8

    @property
    def int_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @property
    def qscheme(self) -> torch.qscheme:
        """torch's qscheme (there is none for per-group parameters: ExportError)."""
        if self.per_group:
            raise ExportError(f"per-group parameters (group_size={self.group_size}) have no torch qscheme.")
        return torch.per_channel_affine if self.per_channel else torch.per_tensor_affine

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float bounds ``((qmin - zp)·s, (qmax - zp)·s)`` of ``x - offset``: clipping to them then quantizing on the
        full carrier range gives the same codes as quantizing on ``[qmin, qmax]``."""
        z = self.zero_point.float()
        return (self.qmin - z) * self.scale, (self.qmax - z) * self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fake-quant kernel with these parameters (the real range)."""
        if self.offset:
            return self._fq(x - self.offset) + self.offset
        return self._fq(x)

    def _fq(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_group:
            xg = to_groups(x, self.ch_axis, self.group_size)
            y = torch.fake_quantize_per_channel_affine(xg, self.scale, self.zero_point, 0, self.qmin, self.qmax)
            return from_groups(y, x.shape, self.ch_axis)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.qmin, self.qmax
            )
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), self.qmin, self.qmax
        )



def _carrier(qmin: int, qmax: int, zp: torch.Tensor, where: str) -> Tuple[int, int, torch.Tensor, bool]:
    """Place the codes ``[qmin, qmax]`` and the zero points on an int8/uint8 carrier (shifting them if needed)."""
    lo, hi = min(qmin, int(zp.min())), max(qmax, int(zp.max()))
    if qmax - qmin > 255:
        raise ExportError(
            f"{where}: {qmax - qmin + 1} levels do not fit an 8-bit carrier; integer export supports <= 8 bits "
            "(use an Override with w_bits/a_bits <= 8 for this layer)."
        )
    if lo >= 0 and hi <= 255:
        return qmin, qmax, zp, False
    if lo >= -128 and hi <= 127:
        return qmin, qmax, zp, True
    if hi - lo <= 255:  # shift codes and zero point together: (k + c - (z + c))·s is unchanged
        return qmin - lo, qmax - lo, zp - lo, False
    raise ExportError(
        f"{where}: zero point(s) {zp.flatten().tolist()[:4]} lie too far from the code range [{qmin}, {qmax}] "
        "for an 8-bit carrier."
    )


def affine_params(name: str, q: Quantizer, layer: str) -> AffineParams:
    """The eval-mode :class:`AffineParams` of quantizer ``q`` (called ``name``, of layer ``layer``).

    Raises:
        ExportError: naming the quantizer, for a dynamic (per-token) quantizer, a non-affine eval function, a
            non-positive scale or codes that do not fit an 8-bit carrier.
    """
    where = f"quantizer {name!r} ({type(q).__name__}, {q.bits}-bit {q.kind}) of layer {layer!r}"
    if q.is_dynamic:
        raise ExportError(
            f"{where} is dynamic ({q.granularity}: scale and zero point computed from each input at run time); it "
            "has no fixed parameters. Static Q/DQ export (to_torch_ao, to_pt2e, to_onnx) cannot carry it: use "
            "fxqat.export.to_torchao(qm) (8-bit per-token) and torch.export / fxqat.export.to_executorch."
        )
    ev = copy.deepcopy(q).eval()
    offset = 0.0
    try:
        scale, zp, qmin, qmax = ev.affine_qparams()
    except NotAffineError as exc:
        from_grid = _grid_affine(ev) if q.kind == "weight" else _probed_act_grid(ev)
        if from_grid is None:
            raise ExportError(f"{where} has no integer (affine-uniform) eval-mode equivalent: {exc}") from exc
        scale, zp, qmin, qmax, offset = from_grid
    scale = scale.detach().float().reshape(-1).clone()
    zp = zp.detach().round().to(torch.int32).reshape(-1).clone()
    if scale.numel() > 1 and zp.numel() == 1:
        zp = zp.expand(scale.numel()).clone()
    if not bool(torch.all(scale > 0)):
        raise ExportError(f"{where}: scale {scale.tolist()[:4]} is not positive.")
    qmin, qmax, zp, signed = _carrier(int(qmin), int(qmax), zp, where)
    if q.granularity == "per_group":  # the quantizer's channel axis is 0 of its grouped view, not of the weight
        return AffineParams(scale.cpu(), zp.cpu(), qmin, qmax, q.spec.ch_axis, signed, offset, q.group_size)
    axis = q.ch_axis if scale.numel() > 1 else None
    return AffineParams(scale.cpu(), zp.cpu(), qmin, qmax, axis, signed, offset)


@torch.no_grad()
def _grid_affine(q: Quantizer) -> Optional[Tuple[torch.Tensor, torch.Tensor, int, int, float]]:
    """Affine parameters of a weight quantizer's eval-mode *output grid*, when that grid is uniform with a level at
    zero (``None`` otherwise).

    Weights are constants: export stores ``q(w)`` (computed by fxqat), so only the levels must be an integer grid,
    not the map from ``w`` to them. This covers e.g. QIL weights with γ ≠ 1 or a pruning band (levels
    ``k·o/n``), but not DoReFa/EWGS/DSQ weights (``2^b`` levels symmetric about 0, no zero level).
    """
    try:
        g = q.grid().detach().double()
    except Exception:  # noqa: BLE001 - no grid, no fallback
        return None
    g = g.reshape(-1, g.shape[-1])
    if g.shape[1] < 2:
        return None
    d = g[:, 1:] - g[:, :-1]
    step = d.mean(dim=1)
    if not bool(torch.all(step > 0)) or not torch.allclose(d, step[:, None].expand_as(d), rtol=1e-4, atol=0):
        return None
    z = -g[:, 0] / step
    if not torch.allclose(z, z.round(), atol=1e-3, rtol=0) or not bool(torch.all(z.round() == z.round()[0])):
        return None
    zc, levels = int(z[0].round()), g.shape[1]
    return step.float(), torch.zeros(step.shape, dtype=torch.int32), -zc, levels - 1 - zc, 0.0


@torch.no_grad()
def _probed_act_grid(q: Quantizer, per_step: int = 8):
    """Parameters ``(scale, 0, 0, L-1, offset)`` of a per-tensor activation quantizer whose eval-mode function is
    nearest-level rounding onto a uniform grid ``offset + k·scale`` (k = 0..L-1) with clipping, but whose lowest
    level is not a multiple of the step; ``None`` unless a probe of the quantizer confirms exactly that function.

    The probe runs the quantizer (eval mode) on points spread over the grid and three steps beyond each end, at
    odd multiples of ``step / (2·per_step)`` (never on a rounding tie).
    """
    try:
        g = q.grid().detach().double()
    except Exception:  # noqa: BLE001
        return None
    if g.dim() != 1 or g.numel() < 2:
        return None
    d = g[1:] - g[:-1]
    step = d.mean()
    if step <= 0 or not torch.allclose(d, step.expand_as(d), rtol=1e-4, atol=0):
        return None
    levels, g0 = g.numel(), g[0]
    k = torch.arange(-3 * per_step, (levels + 2) * per_step, dtype=torch.float64)
    probe = g0 + step * (k + 0.5) / per_step
    expected = g0 + step * torch.clamp(torch.round((probe - g0) / step), 0, levels - 1)
    try:
        got = q(probe.float()).double()
    except Exception:  # noqa: BLE001
        return None
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(g.abs().max())):
        return None
    return step.float().reshape(1), torch.zeros(1, dtype=torch.int32), 0, levels - 1, float(g0)
