"""Small helpers shared by the quantizer zoo (QIL, LSQ+, PACT, DoReFa, EWGS, DSQ, noise tempering).

Per-channel parameters get their shape from the first tensor seen, so a fresh quantizer holds shape-[1]
placeholders; :class:`StateShapeMixin` resizes them when a ``state_dict`` with other shapes is loaded.

A data spread counts as zero when it is at most :data:`REL_SPREAD` of the data's magnitude (not an absolute
epsilon): the float32 standard deviation of a constant tensor is a few ulps of its value, not 0.

Example:
    >>> import torch
    >>> act_clip_std(torch.ones(4, 4))  # zero spread: falls back to max|x|
    tensor([1.])
    >>> act_clip_std(torch.full((8, 512), 0.3))  # float32 std ≈ 3e-8, not 0: still the max, 0.3
    tensor([0.3000])
    >>> widen_degenerate(torch.tensor([0.3]), torch.tensor([0.3]))  # a constant: the range [0, 0.3]
    (tensor([0.]), tensor([0.3000]))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fxqat.quantizers.layout import channel_rows
from fxqat.quantizers.ste import scale_grad

__all__ = [
    "grad_scaled", "StateShapeMixin", "set_tensor", "numel_per_scale", "act_clip_std", "axis_of", "check_choice",
    "reduce", "sum_to", "dot_to", "REL_SPREAD", "is_degenerate", "widen_degenerate",
]

#: a spread (std, max − min) of at most this fraction of the data's magnitude is treated as zero. The float32 std
#: of a constant tensor is at most 3.5e-7 of its value (measured for 16 to 4M elements), so 1e-5 leaves a margin of
#: about 30 while no real data (relative spread 1e-1 or more) comes near it.
REL_SPREAD = 1e-5


def reduce(x: torch.Tensor, axis: Optional[int], fn: str) -> torch.Tensor:
    """Reduce ``x`` with ``fn`` (mean, std, min, max, absmean, absmax) over all axes but ``axis``.

    Returns shape ``[1]`` when ``axis`` is None, else ``[x.shape[axis]]``.
    """
    flat = channel_rows(x, axis)
    if fn.startswith("abs"):
        flat, fn = flat.abs(), fn[3:]
    if fn == "min":
        return flat.amin(dim=1)
    if fn == "max":
        return flat.amax(dim=1)
    if fn == "std":
        return flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0])
    return flat.mean(dim=1)


grad_scaled = scale_grad  # one definition (fxqat.quantizers.ste): forward exactly x, gradient times factor


class StateShapeMixin:
    """Resize parameters and buffers to the shapes found in a loaded ``state_dict`` (per-channel quantizers)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        for store in (self._parameters, self._buffers):
            for name, t in list(store.items()):
                key = prefix + name
                if t is None or key not in state_dict or state_dict[key].shape == t.shape:
                    continue
                new = torch.empty(state_dict[key].shape, dtype=t.dtype, device=t.device)
                store[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if "grad_factor" in self._buffers:  # Python mirror: no tensor read in forward (no torch.compile graph break)
            self._gf = float(self._buffers["grad_factor"])


@torch.no_grad()
def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write ``value`` into the parameter or buffer ``name`` of ``module``, replacing it when the shape changes."""
    cur = getattr(module, name)
    value = value.detach().to(device=cur.device, dtype=cur.dtype)
    if cur.shape == value.shape:
        cur.copy_(value)
    elif isinstance(cur, nn.Parameter):
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=cur.requires_grad))
    else:
        module._buffers[name] = value.clone()


def axis_of(q) -> Optional[int]:
    """The reduction axis of a quantizer: its channel axis when per-channel, else None (whole tensor)."""
    return q.ch_axis if q.per_channel else None


def numel_per_scale(q, x: torch.Tensor) -> int:
    """N of the LSQ gradient scale 1/√(N·Q_P): weights per scale, or features of one sample for activations."""
    n = x.numel() if q.kind == "weight" or x.dim() <= 1 else x[0].numel()
    if q.per_channel:
        n = n // x.shape[q.ch_axis]
    return max(int(n), 1)


def is_degenerate(spread: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Where ``spread`` is zero relative to ``magnitude`` (``spread <= REL_SPREAD·magnitude``; all-zero data too)."""
    return spread <= REL_SPREAD * magnitude


def widen_degenerate(lo: torch.Tensor, hi: torch.Tensor):
    """``(lo, hi)``, widened to include 0 where the range is degenerate (a constant tensor: ``[0, c]`` or ``[c, 0]``).

    Where the data are all zero the range stays ``[0, 0]``; callers keep their own absolute fallback for that case.
    """
    deg = is_degenerate((hi - lo).abs(), torch.maximum(lo.abs(), hi.abs()))
    zero = torch.zeros_like(lo)
    return torch.where(deg, torch.minimum(lo, zero), lo), torch.where(deg, torch.maximum(hi, zero), hi)


def act_clip_std(x: torch.Tensor, axis: Optional[int] = None) -> torch.Tensor:
    """Upper clip ``3·std(x)/√(1 − 2/π)`` (EWGS / LBT activation init), falling back to max|x| when the spread is
    zero relative to max|x| (:func:`is_degenerate`)."""
    std = reduce(x.float(), axis, "std")
    u = 3.0 * std / math.sqrt(1.0 - 2.0 / math.pi)
    mx = reduce(x.float(), axis, "absmax")
    return torch.where(is_degenerate(std, mx), mx, u).clamp(min=1e-8)


def check_choice(owner: str, name: str, value, choices) -> None:
    """Raise a ValueError naming the option and the allowed values."""
    if value not in choices:
        raise ValueError(f"{owner}: option {name}={value!r} is not valid; use one of {list(choices)}.")


def sum_to(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` summed down to the (broadcast) shape of ``like``, in ``like``'s dtype: the gradient of a parameter
    broadcast against ``t``."""
    s = t.sum().reshape(like.shape) if like.numel() == 1 else t.sum_to_size(like.shape)
    return s.to(like.dtype)


def dot_to(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``Σ a·b`` (same shape) reduced to the shape of ``like``: one ``torch.dot`` pass when ``like`` has one element.

    A float32 dot product accumulates in float32; where the terms cancel (a difference of two sums), form the
    difference per element and use :func:`sum_to` (pairwise summation) instead.
    """
    if like.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(like.shape).to(like.dtype)
    return sum_to(a * b, like)
