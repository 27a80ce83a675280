"""In-place quantization of weight layers (:mod:`fxqat.layer_registry`) in eager regions.

In an eager region (code torch.fx cannot trace) such a layer is quantized **in place**: the module object stays where
it is (same name, same ``Parameter``), gets two child quantizers ``fxqat_wq`` (weight) and ``fxqat_aq`` (its input,
optional) and its class becomes a subclass of its own class whose ``forward`` computes the layer on the quantized
weight. ``isinstance`` checks, hooks and ``state_dict`` keys of the original weights keep working.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> lin = nn.Linear(8, 4)
    >>> cfg = QATConfig(w_bits=2)
    >>> wq = quantize_layer(lin, cfg.spec_for("weight"), None, "fc")
    >>> isinstance(lin, nn.Linear), type(lin).__name__
    (True, 'QuantLinear')
    >>> lin.eval()(torch.randn(3, 8)).shape
    torch.Size([3, 4])
"""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from fxqat.config import QuantSpec
from fxqat.layer_registry import WeightLayer, base_forward, weight_layer_entry
from fxqat.method_registry import make_quantizer
from fxqat.quantizers.base import Quantizer

__all__ = ["quantize_layer", "unquantize_layer", "is_quantized_layer", "WEIGHT_QUANT", "ACT_QUANT", "FIRST_LAST"]

WEIGHT_QUANT = "fxqat_wq"
ACT_QUANT = "fxqat_aq"
#: attribute of an in-place quantized layer: True when its bits come from the ``first_last`` policy
FIRST_LAST = "fxqat_first_last"


def is_quantized_layer(module: nn.Module) -> bool:
    """True when :func:`quantize_layer` has been applied to ``module``."""
    return isinstance(getattr(module, WEIGHT_QUANT, None), Quantizer)


_inside = threading.local()
_SUBCLASSES: Dict[type, type] = {}


class _EagerQuantMixin:
    """``forward`` of an in-place quantized weight layer (see the module docstring)."""

    def forward(self, x, *args, **kwargs):  # noqa: D401 - nn.Module.forward
        entry: WeightLayer = type(self)._fxqat_entry
        orig_forward = type(self)._fxqat_orig_forward
        if getattr(_inside, "active", None) is self:
            return orig_forward(self, x, *args, **kwargs)
        aq = getattr(self, ACT_QUANT, None)
        if aq is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
            x = aq(x)
        w = getattr(self, entry.weight)
        if entry.to_out_in is not None:
            w = entry.to_out_in(getattr(self, WEIGHT_QUANT)(entry.to_out_in(w)))
        else:
            w = getattr(self, WEIGHT_QUANT)(w)
        if entry.compute is not None and orig_forward is base_forward(entry.cls) and not args and not kwargs:
            return entry.compute(self, x, w)
        prev, _inside.active = getattr(_inside, "active", None), self
        try:  # custom forward of a subclass: run it with the quantized weight substituted
            return torch.func.functional_call(self, {entry.weight: w}, (x, *args), kwargs)
        finally:
            _inside.active = prev


def _quant_class(cls: type, entry: WeightLayer) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Quant{cls.__name__}", (_EagerQuantMixin, cls),
                   {"_fxqat_entry": entry, "_fxqat_orig_forward": cls.forward, "__module__": cls.__module__})
        _SUBCLASSES[cls] = sub
    return sub


def quantize_layer(
    module: nn.Module, wspec: QuantSpec, aspec: Optional[QuantSpec], name: str,
    weight_quantizer: Optional[Quantizer] = None, first_last: bool = False,
) -> Quantizer:
    """Quantize the weight layer ``module`` (called ``name``) in place: weight with ``wspec``, input with ``aspec``.

    ``weight_quantizer`` reuses an existing quantizer (a Parameter shared by several layers has one quantizer).
    ``first_last`` records (as ``module.fxqat_first_last``) that the bits come from the first/last-layer policy.
    Returns the weight quantizer.

    Raises:
        TypeError: ``module`` is not a registered weight layer, or already quantized.
    """
    entry = weight_layer_entry(module)
    if entry is None:
        raise TypeError(f"module {name!r} ({type(module).__name__}) is not a registered weight layer; register it "
                        "with fxqat.capture.register_weight_layer.")
    if is_quantized_layer(module):
        raise TypeError(f"module {name!r} ({type(module).__name__}) is already quantized.")
    wq = weight_quantizer
    if wq is None:
        wq = make_quantizer(wspec)
        wq.weight_target = f"{name}.{entry.weight}" if name else entry.weight
        wq.weight_layer = name
    module.add_module(WEIGHT_QUANT, wq)
    module.add_module(ACT_QUANT, make_quantizer(aspec) if aspec is not None else None)
    setattr(module, FIRST_LAST, bool(first_last))
    module.__class__ = _quant_class(type(module), entry)
    return wq


def layer_spec_axes(module: nn.Module) -> Tuple[int, ...]:
    """Shape of the weight in ``[out, in, ...]`` layout (what the weight quantizer sees)."""
    entry = weight_layer_entry(module)
    w = getattr(module, entry.weight)
    return tuple((entry.to_out_in(w) if entry.to_out_in else w).shape)


def unquantize_layer(module: nn.Module) -> Tuple[Quantizer, Optional[Quantizer]]:
    """Undo :func:`quantize_layer` in place: ``module`` gets its own class back and loses its two quantizers, which
    are returned ``(weight quantizer, input quantizer or None)``. Its weight is left as it is.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> _ = quantize_layer(lin, QuantSpec(bits=4, kind="weight"), None, "fc")
        >>> wq, aq = unquantize_layer(lin)
        >>> type(lin).__name__, type(wq).__name__, aq, hasattr(lin, WEIGHT_QUANT)
        ('Linear', 'LSQQuantizer', None, False)
    """
    if not is_quantized_layer(module):
        raise TypeError(f"{type(module).__name__} is not a layer quantized in place by fxqat.")
    wq, aq = getattr(module, WEIGHT_QUANT), getattr(module, ACT_QUANT, None)
    del module._modules[WEIGHT_QUANT]
    module._modules.pop(ACT_QUANT, None)
    module.__class__ = type(module).__bases__[1]  # _quant_class: (_EagerQuantMixin, original class)
    return wq, aq
