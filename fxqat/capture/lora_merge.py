"""Merge the LoRA adapters of a prepared model into their base layers: the deployable QAT model.

:func:`merge_lora` replaces each prepared LoRA layer by its base layer, which keeps its weight quantizer and now holds
``W + s·B·A`` (computed exactly as during training and as PEFT's ``merge_and_unload`` computes it), and unwraps a
PEFT ``PeftModel`` root. The result is an ordinary prepared fxqat model: ``fxqat.convert`` (which calls this first on
a model with adapters) and the export paths (``fxqat.export.to_torchao``, ExecuTorch, ...) take it.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> class LoRA(nn.Module):
    ...     def __init__(self, base, r=2):
    ...         super().__init__()
    ...         self.base_layer, self.scaling = base, 2.0
    ...         self.lora_A = nn.Linear(base.in_features, r, bias=False)
    ...         self.lora_B = nn.Linear(r, base.out_features, bias=False)
    ...     def forward(self, x):
    ...         return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
    >>> _ = torch.manual_seed(0); net = nn.Sequential(LoRA(nn.Linear(64, 64)), nn.ReLU(), nn.Linear(64, 8))
    >>> x = torch.randn(4, 64)
    >>> qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig.preset("int4_weight_only")).eval()
    >>> merged = merge_lora(qm)
    >>> type(merged[0]).__name__, bool(torch.equal(merged(x), qm(x)))
    ('QuantLinear', True)
"""

from __future__ import annotations

import logging
from dataclasses import replace

from torch import nn

from fxqat.capture.hierarchy import CAPTURE_ATTR, CaptureReport
from fxqat.capture.lora import merged_copy

__all__ = ["merge_lora", "prefixed_report", "peft_inner"]

log = logging.getLogger(__name__)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def _rebased(report: CaptureReport, prefix: str) -> CaptureReport:
    """``report`` for the submodule called ``prefix[:-1]``: regions and layers outside it dropped, names relative."""
    inside = [r for r in report.regions if r.name.startswith(prefix)]
    regions = tuple(replace(r, name=_strip(r.name, prefix), weight_layers=tuple(_strip(n, prefix) for n in r.weight_layers))
                    for r in inside)
    layers = tuple(_strip(n, prefix) for n in report.weight_layers if n.startswith(prefix))
    uncalled = tuple(_strip(n, prefix) for n in report.uncalled if n.startswith(prefix))
    extra = {"unquantized": tuple((_strip(n, prefix), why) for n, why in report.unquantized if n.startswith(prefix))} \
        if hasattr(report, "unquantized") else {}
    return replace(report, regions=regions, weight_layers=layers, uncalled=uncalled, **extra)


def prefixed_report(report: CaptureReport, prefix: str) -> CaptureReport:
    """``report`` of a submodule, as seen from a model that holds it under ``prefix`` (``"base_model.model."``)."""
    regions = tuple(replace(r, name=prefix + r.name if r.name else prefix[:-1],
                            weight_layers=tuple(prefix + n for n in r.weight_layers)) for r in report.regions)
    extra = {"unquantized": tuple((prefix + n, why) for n, why in report.unquantized)} \
        if hasattr(report, "unquantized") else {}
    return replace(report, regions=regions, weight_layers=tuple(prefix + n for n in report.weight_layers),
                   uncalled=tuple(prefix + n for n in report.uncalled), **extra)


def peft_inner(model: nn.Module):
    """``(qualified name, module)`` of the model a PEFT ``PeftModel`` wraps, or None for any other module."""
    get_base = getattr(type(model), "get_base_model", None)
    if not callable(get_base) or not hasattr(model, "peft_config"):
        return None
    inner = model.get_base_model()
    return next((n, m) for n, m in model.named_modules() if m is inner)


def merge_lora(qm: nn.Module) -> nn.Module:
    """A copy of the prepared model ``qm`` with every LoRA adapter merged into its base layer (module docstring).

    With ``QATConfig.lora="merged"`` the merged model computes what ``qm`` computes and its converted weights are
    exactly ``qm``'s fake-quantized effective weights. With ``lora="base"`` the base weight quantizer meets
    ``W + s·B·A`` for the first time here (post-training quantization of the adapter).
    """
    out, names = merged_copy(qm)
    log.info("fxqat: merged %d LoRA adapters", len(names))
    get_base = getattr(out, "get_base_model", None)
    if callable(get_base):  # PEFT's PeftModel: the model it wraps (prepared before or after PEFT was applied)
        inner = get_base()
        if isinstance(getattr(out, CAPTURE_ATTR, None), CaptureReport):
            prefix = next(n for n, m in out.named_modules() if m is inner) + "."
            setattr(inner, CAPTURE_ATTR, _rebased(getattr(out, CAPTURE_ATTR), prefix))
        inner.train(out.training)
        return inner
    return out
