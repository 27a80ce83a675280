"""What a "quantizable weight layer" is: one registry, used by annotation, eager quantization, blocks and reports.

A *weight layer* is a module whose computation is "an input tensor times a weight": ``nn.Linear``,
``nn.Conv1d/2d/3d`` (and subclasses), ``nn.ConvTranspose1d/2d/3d`` and, when transformers is installed, its GPT-2
style ``Conv1D`` (weight stored ``[in, out]``). :func:`register_weight_layer` adds a type with one call.

Example:
    >>> import torch.nn as nn
    >>> is_weight_layer(nn.Conv2d(3, 8, 3)), is_weight_layer(nn.LayerNorm(4))
    (True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightLayer", "register_weight_layer", "weight_layer_entry", "is_weight_layer", "holds_weight_layer",
           "base_forward", "registered_types"]


@dataclass(frozen=True)
class WeightLayer:
    """How to compute one registered layer type on a substituted weight.

    Attributes:
        cls: the module type (subclasses match too).
        weight: the name of its weight parameter.
        compute: ``compute(module, x, weight)`` -> output; None runs the module's own ``forward`` with the weight
            substituted (for subclasses with custom code).
        to_out_in: maps the stored weight to the ``[out, in, ...]`` layout quantizers expect (and back: it must be
            its own inverse), or None when the weight already has that layout.
    """

    cls: type
    weight: str = "weight"
    compute: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    to_out_in: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _linear(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, m.bias)


def _conv(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return m._conv_forward(x, w, m.bias)


def _conv_transpose(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(m.kernel_size)]
    return fn(x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)


def _gpt2_conv1d(m: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out_shape = x.shape[:-1] + (w.shape[1],)
    return torch.addmm(m.bias, x.reshape(-1, x.shape[-1]), w).view(out_shape)


_REGISTRY: Dict[type, WeightLayer] = {}
_BASE_FORWARD: Dict[type, Callable] = {}


def base_forward(cls: type) -> Optional[Callable]:
    """The ``forward`` a registered type had when it was registered."""
    return _BASE_FORWARD.get(cls)


def registered_types() -> tuple:
    """Every registered weight-layer type."""
    return tuple(_REGISTRY)


def register_weight_layer(
    cls: type,
    compute: Optional[Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    weight: str = "weight",
    to_out_in: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> WeightLayer:
    """Declare ``cls`` a weight layer (quantized in eager regions, counted by reports and blocks).

    Example:
        >>> class Scale(nn.Module):  # y = x * w, elementwise
        ...     def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(4, 1))
        ...     def forward(self, x): return x * self.weight.t()
        >>> entry = register_weight_layer(Scale, compute=lambda m, x, w: x * w.t())
        >>> is_weight_layer(Scale())
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_weight_layer expects an nn.Module subclass, got {cls!r}.")
    entry = WeightLayer(cls, weight, compute, to_out_in)
    _REGISTRY[cls] = entry
    _BASE_FORWARD[cls] = cls.forward
    return entry


for _c in (nn.Linear,):
    register_weight_layer(_c, _linear)
for _c in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_weight_layer(_c, _conv)
for _c in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_weight_layer(_c, _conv_transpose, to_out_in=lambda w: w.transpose(0, 1))
try:  # transformers is an optional extra
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # noqa: BLE001 - not installed, or broken: no Conv1D layers to register
    _HFConv1D = None
if _HFConv1D is not None:
    register_weight_layer(_HFConv1D, _gpt2_conv1d, to_out_in=lambda w: w.t())


def weight_layer_entry(module: nn.Module) -> Optional[WeightLayer]:
    """The registry entry for ``module`` (most specific registered base class), or None."""
    for base in type(module).__mro__:
        entry = _REGISTRY.get(base)
        if entry is not None:
            w = getattr(module, entry.weight, None)
            return entry if isinstance(w, nn.Parameter) else None
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """True when ``module`` is a registered weight layer holding its weight as a Parameter."""
    return weight_layer_entry(module) is not None


def holds_weight_layer(module: nn.Module) -> bool:
    """True when ``module`` or one of its descendants is a weight layer."""
    return any(is_weight_layer(m) for m in module.modules())
