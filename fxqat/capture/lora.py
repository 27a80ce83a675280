"""LoRA-aware QAT: one weight quantizer per adapted layer, on the weight that is deployed after merging.

A LoRA layer computes ``base(x) + s·B(A(x))`` with a frozen base weight ``W [out, in]`` and trained low-rank factors
``A [r, in]``, ``B [out, r]``. Merging the adapter for deployment gives one weight, ``W + s·B·A``; quantizing only
``W`` during training and merging afterwards leaves the deployed weight off the grid the model was trained on. fxqat
recognises LoRA layers during capture (PEFT's ``peft.tuners.lora.Linear``, any module following the protocol below,
and types added with :func:`register_lora_layer`) and, per ``QATConfig.lora``:

* ``"merged"`` (default): the layer computes ``linear(x, Q(W + s·B·A), bias)``; merging (``fxqat.merge_lora``, or
  ``fxqat.convert`` which calls it, or PEFT's ``merge_and_unload``) gives exactly the integer codes training saw.
  The effective weight and its quantization are recomputed in the backward pass
  (:func:`fxqat.capture.lora_linear.recomputed_weight_linear`), so no weight-sized tensor is kept between forward
  and backward.
* ``"base"``: only ``W`` is fake-quantized, the adapter runs in floating point (torchtune's QAT + LoRA recipe);
  merging re-quantizes ``W + s·B·A`` with the learned step sizes.

In both modes the quantizer belongs to the base layer (``<layer>.base_layer.fxqat_wq``), the base weight stays frozen
(no gradient, no optimizer state, no second copy) and the factors are never quantized as layers of their own.

Protocol for a LoRA module of one's own (no registration needed): a child ``base_layer`` (``nn.Linear``), children
``lora_A`` and ``lora_B`` (``nn.Linear`` without bias) and a float attribute ``scaling``, computing
``base_layer(x) + lora_B(lora_A(x)) * scaling``; prepare checks that formula on a random input.

Example:
    >>> import torch, torch.nn as nn
    >>> class LoRA(nn.Module):
    ...     def __init__(self, base, r=2):
    ...         super().__init__()
    ...         self.base_layer, self.scaling = base, 0.5
    ...         self.lora_A = nn.Linear(base.in_features, r, bias=False)
    ...         self.lora_B = nn.Linear(r, base.out_features, bias=False)
    ...     def forward(self, x):
    ...         return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
    >>> layer = LoRA(nn.Linear(8, 4))
    >>> p = lora_parts(layer)
    >>> p.base is layer.base_layer, tuple(p.a.shape), tuple(p.b.shape), p.scale
    (True, (2, 8), (4, 2), 0.5)
    >>> bool(torch.equal(effective_weight(p), layer.base_layer.weight + (layer.lora_B.weight @ layer.lora_A.weight) * 0.5))
    True
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fxqat.capture.layer_quant import ACT_QUANT, WEIGHT_QUANT, is_quantized_layer
from fxqat.capture.lora_linear import recomputed_weight_linear

__all__ = [
    "LoraParts", "LORA_MODES", "register_lora_layer", "lora_parts", "is_lora_layer", "lora_layer_types",
    "named_lora_layers", "effective_weight", "wrap_lora_layer", "merged_copy", "has_lora_layers", "LORA_ATTR",
    "lora_factor_reasons", "pin_deepcopy",
]

LORA_MODES = ("merged", "base")
#: attribute of a prepared LoRA layer: the mode it was prepared with
LORA_ATTR = "fxqat_lora"


@dataclass(frozen=True)
class LoraParts:
    """The pieces of one LoRA layer.

    Attributes:
        base: the base weight layer (``nn.Linear``).
        a: the down-projection factor ``A`` ``[r, in]``.
        b: the up-projection factor ``B`` ``[out, r]``.
        scale: the scaling ``s`` (PEFT: ``lora_alpha / r``).
        dropout: the dropout applied to the adapter's input (None: none).
        factors: the modules holding ``A`` and ``B`` (never quantized).
    """

    base: nn.Module
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: Optional[nn.Module] = None
    factors: Tuple[nn.Module, ...] = ()


_REGISTRY: Dict[type, Callable[[nn.Module], LoraParts]] = {}


def register_lora_layer(cls: type, parts: Callable[[nn.Module], LoraParts]) -> None:
    """Declare ``cls`` a LoRA layer whose pieces ``parts(module)`` returns (its forward must compute
    ``base(x) + s·B·A·x``).

    Example:
        >>> class Mine(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.lin = nn.Linear(4, 4)
        ...         self.down, self.up = nn.Parameter(torch.zeros(1, 4)), nn.Parameter(torch.zeros(4, 1))
        ...     def forward(self, x): return self.lin(x) + x @ self.down.t() @ self.up.t()
        >>> register_lora_layer(Mine, lambda m: LoraParts(m.lin, m.down, m.up, 1.0))
        >>> is_lora_layer(Mine())
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_lora_layer expects an nn.Module subclass, got {cls!r}.")
    _REGISTRY[cls] = parts


def _peft_parts(m: nn.Module) -> LoraParts:
    where = f"{type(m).__name__} (PEFT LoRA layer)"
    if getattr(m, "merged", False):
        raise ValueError(f"{where}: its adapter is merged into the base weight; call unmerge_adapter() first, or "
                         "prepare the merged model without LoRA.")
    active = [a for a in m.active_adapters if a in m.lora_A]
    if len(active) != 1:
        raise ValueError(f"{where}: fxqat quantizes one active adapter per layer, found {active}; set one adapter "
                         "active (model.set_adapter(name)).")
    name = active[0]
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        raise ValueError(f"{where}: adapter {name!r} is a LoRA variant (DoRA, ...); fxqat supports plain LoRA only.")
    if getattr(m, "fan_in_fan_out", False):
        raise ValueError(f"{where}: fan_in_fan_out layers (GPT-2 Conv1D) are not supported; use nn.Linear bases.")
    drop = m.lora_dropout[name]
    return LoraParts(m.get_base_layer(), m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name]),
                     None if isinstance(drop, nn.Identity) else drop, (m.lora_A[name], m.lora_B[name]))


try:  # peft is an optional extra
    from peft.tuners.lora import Linear as _PeftLinear
except Exception:  # noqa: BLE001 - not installed, or broken: no PEFT layers to recognise
    _PeftLinear = None
if _PeftLinear is not None:
    register_lora_layer(_PeftLinear, _peft_parts)


def _protocol_parts(m: nn.Module) -> Optional[LoraParts]:
    base, a, b, s = (getattr(m, k, None) for k in ("base_layer", "lora_A", "lora_B", "scaling"))
    if not (type(base) in (nn.Linear,) or is_quantized_layer(base)) or not isinstance(base, nn.Linear):
        return None
    if not all(isinstance(f, nn.Linear) and f.bias is None for f in (a, b)) or isinstance(s, bool):
        return None
    if not isinstance(s, (int, float)):
        return None
    if a.in_features != base.in_features or b.out_features != base.out_features or a.out_features != b.in_features:
        return None
    return LoraParts(base, a.weight, b.weight, float(s), None, (a, b))


def lora_parts(module: nn.Module) -> Optional[LoraParts]:
    """The :class:`LoraParts` of ``module``, or None when it is not a LoRA layer.

    Raises:
        ValueError: a recognised LoRA layer fxqat cannot quantize (merged, several active adapters, DoRA).
    """
    for base in type(module).__mro__:
        fn = _REGISTRY.get(base)
        if fn is not None:
            return fn(module)
    return _protocol_parts(module)


def is_lora_layer(module: nn.Module) -> bool:
    """True for a registered LoRA type or a module following the protocol of the module docstring."""
    if any(base in _REGISTRY for base in type(module).__mro__):
        return True
    return _protocol_parts(module) is not None


def lora_layer_types() -> Tuple[type, ...]:
    """The registered LoRA layer types (kept as leaves when a graph region is traced)."""
    return tuple(_REGISTRY)


def named_lora_layers(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every LoRA layer in ``model``."""
    for name, m in model.named_modules():
        if is_lora_layer(m):
            yield name, m


def has_lora_layers(model: nn.Module) -> bool:
    """True when ``model`` holds a LoRA layer."""
    return next(named_lora_layers(model), None) is not None


def lora_factor_reasons(model: nn.Module) -> Dict[str, str]:
    """``{parameter name: why it stays FP}`` for the factors of every LoRA layer in ``model`` (for the capture
    report: they are no layers of their own; their product is quantized with the base weight, or kept FP)."""
    out = {}
    for name, m in named_lora_layers(model):
        mode = _lora_mode(m)
        why = {"merged": "quantized inside its layer's effective weight W + s·B·A (QATConfig.lora='merged')",
               "base": "kept FP with QATConfig.lora='base'", None: "its LoRA layer is not quantized"}[mode]
        parts = lora_parts(m)
        ids = {id(parts.a), id(parts.b)}
        for pname, p in m.named_parameters():
            if id(p) in ids:
                out[f"{name}.{pname}" if name else pname] = f"FP by design: a LoRA factor, {why}"
    return out


def effective_weight(parts: LoraParts) -> torch.Tensor:
    """``W + (B @ A) · s``, computed the way PEFT merges (so merging gives these values bit for bit); half-precision
    factors are multiplied in float32 and the product cast back. The scaling and the sum are done in place on the
    product (``delta + W`` is ``W + delta`` bit for bit): two weight-sized allocations fewer per call."""
    a, b = parts.a, parts.b
    w = parts.base.weight
    if b.dtype in (torch.float16, torch.bfloat16):
        delta = (b.float() @ a.float()).mul_(parts.scale).to(b.dtype)
    else:
        delta = (b @ a).mul_(parts.scale)
    return delta.add_(w)


def _merged_linear(x: torch.Tensor, parts: LoraParts) -> torch.Tensor:
    base = parts.base
    return F.linear(x, getattr(base, WEIGHT_QUANT)(effective_weight(parts)), base.bias)


def _weight_params(parts: LoraParts, weight: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """What the fake-quantized weight ``weight()`` reads that may need a gradient; the quantizer is initialised first
    (its first call may replace its step-size Parameter with one of the data's shape)."""
    wq = getattr(parts.base, WEIGHT_QUANT)
    if not wq.is_initialized:
        with torch.no_grad():
            weight()
    return (parts.a, parts.b, parts.base.weight, *wq.parameters())


class _MergedLoraMixin:
    """``forward`` of a LoRA layer prepared with ``lora="merged"``: ``linear(x, Q(W + s·B·A), bias)``."""

    def forward(self, x, *args, **kwargs):  # noqa: D401 - nn.Module.forward
        parts = lora_parts(self)
        base = parts.base
        if getattr(self, "disable_adapters", False):  # PEFT's disable_adapter(): the quantized base layer alone
            return base(x, *args, **kwargs)
        if args or kwargs:
            raise ValueError(
                f"{type(self).__name__} prepared with QATConfig.lora='merged' takes one input tensor, got extra "
                f"arguments {list(kwargs) or len(args)} (PEFT's adapter_names mixed batches are not supported)."
            )
        aq = getattr(base, ACT_QUANT, None)
        if aq is not None and x.is_floating_point():
            x = aq(x)
        if torch.is_grad_enabled() and self.training:  # recompute W + s·B·A and Q(·) in backward: no saved weight
            wq = getattr(base, WEIGHT_QUANT)
            weight = lambda: wq(effective_weight(parts))  # noqa: E731
            return recomputed_weight_linear(x, weight, base.bias, _weight_params(parts, weight))
        return _merged_linear(x, parts)


class _BaseLoraMixin:
    """``forward`` of a LoRA layer prepared with ``lora="base"``: ``linear(x, Q(W), bias) + s·B·A·x``; while
    training, ``Q(W)`` is recomputed in backward instead of kept (no second copy of the base weight)."""

    def forward(self, x, *args, **kwargs):  # noqa: D401 - nn.Module.forward
        orig = type(self)._fxqat_orig_forward
        if args or kwargs or not (torch.is_grad_enabled() and self.training) or getattr(self, "disable_adapters", False):
            return orig(self, x, *args, **kwargs)
        parts = lora_parts(self)
        base = parts.base
        xb = x
        aq = getattr(base, ACT_QUANT, None)
        if aq is not None and x.is_floating_point():
            xb = aq(x)
        wq = getattr(base, WEIGHT_QUANT)
        weight = lambda: wq(base.weight)  # noqa: E731
        out = recomputed_weight_linear(xb, weight, base.bias, _weight_params(parts, weight)[2:])
        xa = parts.dropout(x) if parts.dropout is not None else x
        return out + F.linear(F.linear(xa, parts.a), parts.b) * parts.scale


_SUBCLASSES: Dict[Tuple[type, str], type] = {}
_MIXINS = {"merged": _MergedLoraMixin, "base": _BaseLoraMixin}


def _mode_class(cls: type, mode: str) -> type:
    sub = _SUBCLASSES.get((cls, mode))
    if sub is None:
        sub = type(f"{mode.capitalize()}{cls.__name__}", (_MIXINS[mode], cls),
                   {"_fxqat_orig_forward": cls.forward, "__module__": cls.__module__})
        _SUBCLASSES[(cls, mode)] = sub
    return sub


@torch.no_grad()
def _check_formula(module: nn.Module, parts: LoraParts, name: str) -> None:
    """The module's own forward equals ``linear(x, W + s·B·A, bias)`` on a random input (dropout off)."""
    flags = [(m, m.training) for m in module.modules()]
    quant = [q for q in (getattr(parts.base, WEIGHT_QUANT, None), getattr(parts.base, ACT_QUANT, None)) if q is not None]
    on = [(q, bool(q.fake_quant_enabled[0])) for q in quant]
    module.eval()
    for q in quant:
        q.enable_fake_quant(False)
    try:
        w = parts.base.weight
        x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.dtype)
        got = module(x)
        want = F.linear(x, effective_weight(parts), parts.base.bias)
    finally:
        for m, t in flags:
            m.training = t
        for q, enabled in on:
            q.enable_fake_quant(enabled)
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2  # matmul order differs: x·Wᵀ + s·(x·Aᵀ)·Bᵀ vs x·(W + s·B·A)ᵀ
    if not isinstance(got, torch.Tensor) or not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise ValueError(
            f"LoRA layer {name!r} ({type(module).__name__}) does not compute base_layer(x) + lora_B(lora_A(x)) * "
            "scaling; register its pieces with fxqat.capture.lora.register_lora_layer, or keep it in FP with "
            f"Override({name!r}, skip=True)."
        )


def wrap_lora_layer(module: nn.Module, mode: str, name: str) -> LoraParts:
    """Prepare the LoRA layer ``module`` (called ``name``) whose base layer is already quantized in place.

    Freezes the base weight, initialises the base layer's weight quantizer on the effective weight, and with
    ``mode="merged"`` gives ``module`` a class whose forward fake-quantizes the effective weight.
    """
    if mode not in LORA_MODES:
        raise ValueError(f"QATConfig.lora={mode!r}: use one of {LORA_MODES}.")
    parts = lora_parts(module)
    if not is_quantized_layer(parts.base):
        raise TypeError(f"LoRA layer {name!r}: its base layer is not quantized; fxqat quantizes it during capture.")
    parts.base.weight.requires_grad_(False)
    if parts.base.bias is not None:
        parts.base.bias.requires_grad_(False)
    wq = getattr(parts.base, WEIGHT_QUANT)
    _check_formula(module, parts, name)  # both modes' training forward computes the formula itself
    if mode == "merged":
        if parts.dropout is not None and getattr(parts.dropout, "p", 0.0) > 0:
            warnings.warn(
                f"fxqat: LoRA layer {name!r} has dropout p={parts.dropout.p} on the adapter input; with "
                "QATConfig.lora='merged' the adapter is folded into the quantized weight, so that dropout is not "
                "applied. Set lora_dropout=0, or use QATConfig(lora='base').", stacklevel=3,
            )
        with torch.no_grad():
            if not wq.is_initialized:
                wq(effective_weight(parts))
    module.__class__ = _mode_class(type(module), mode)
    setattr(module, LORA_ATTR, mode)
    for p in wq.parameters():
        p.requires_grad_(True)
    return parts


_PINNED: Dict[type, type] = {}


def pin_deepcopy(model: nn.Module) -> None:
    """Give every module of ``model`` whose class forwards unknown attributes to a child (PEFT's ``PeftModel`` and
    ``LoraModel`` define ``__getattr__``) a subclass that deep-copies as a module.

    ``copy.deepcopy`` looks ``__deepcopy__`` up on the instance; such a wrapper forwards the lookup to the model it
    wraps, and once that model is a graph region (which defines ``__deepcopy__``) the copy of the wrapper would be a
    copy of the region.
    """
    for m in model.modules():
        cls = type(m)
        if cls.__getattr__ is nn.Module.__getattr__ or getattr(cls, "__deepcopy__", None) is not None \
                or cls in _PINNED.values():
            continue
        sub = _PINNED.get(cls)
        if sub is None:
            sub = _PINNED[cls] = type(cls.__name__, (cls,), {"__deepcopy__": None, "__module__": cls.__module__})
        m.__class__ = sub


def _lora_mode(module: nn.Module) -> Optional[str]:
    return getattr(module, LORA_ATTR, None)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def merged_copy(qm: nn.Module) -> Tuple[nn.Module, List[str]]:
    """A deep copy of ``qm`` with each prepared LoRA layer replaced by its base layer holding the merged weight;
    returns the copy and the names of the merged layers."""
    out = copy.deepcopy(qm)
    names = []
    for name, m in list(named_lora_layers(out)):
        if _lora_mode(m) is None:
            continue
        parts = lora_parts(m)
        base_rel = next(n for n, sub in m.named_modules() if sub is parts.base)
        with torch.no_grad():
            merged = effective_weight(parts)
            parts.base.weight.data = merged
        _replace(out, name, parts.base)
        wq = getattr(parts.base, WEIGHT_QUANT)
        for attr in ("weight_target", "weight_layer"):  # the base layer now sits where its LoRA layer was
            value = getattr(wq, attr, None)
            if isinstance(value, str):
                setattr(wq, attr, value.replace(f".{base_rel}", "", 1) if f".{base_rel}" in value else value)
        names.append(name)
    return out, names
