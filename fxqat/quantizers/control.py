"""Model-level control of a prepared model's quantizers: list them, switch them on or off, calibrate them, and the
parameters an optimiser should train. ``fxqat.api`` re-exports these; training code imports them from here.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), fxqat.QATConfig(w_bits=4, a_bits=4))
    >>> _ = calibrate(qm, [torch.randn(2, 4)])
    >>> all(q.is_initialized for q in named_quantizers(qm).values())
    True
    >>> _ = set_quantization(qm, False)
    >>> any(q.fake_quant_enabled[0] for q in named_quantizers(qm).values())
    False
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, Mapping

import torch
from torch import nn

from fxqat.quantizers.base import Quantizer

__all__ = ["named_quantizers", "quantizer_parameters", "set_quantization", "calibrate", "trainable_parameters"]


def named_quantizers(model: nn.Module) -> Dict[str, "Quantizer"]:
    """Every fxqat quantizer inside ``model``, by qualified module name (``fxqat.named_quantizers``).

    Example:
        >>> import torch.nn as nn
        >>> named_quantizers(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def quantizer_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters of every fxqat quantizer inside ``model`` (scales, clip values, offsets), by qualified name:
    what optimizers put in their own group (learning rate, no weight decay).

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> sorted(quantizer_parameters(qm))
        ['fxqat_quant.a_input_1.scale', 'fxqat_quant.w_0.scale']
    """
    return {f"{mn}.{pn}" if mn else pn: p for mn, m in named_quantizers(model).items() for pn, p in m.named_parameters()}


def set_quantization(qm: nn.Module, enabled: bool = True, kinds: Iterable[str] = ("weight", "act", "grad")) -> nn.Module:
    """Enable or disable quantizers of the given kinds (disabled = identity). Returns ``qm``."""
    kinds = set(kinds)
    for q in named_quantizers(qm).values():
        if q.kind in kinds:
            q.enable_fake_quant(enabled)
    return qm


@torch.no_grad()
def calibrate(qm: nn.Module, batches: Iterable[Any], reset: bool = False) -> nn.Module:
    """Initialise data-dependent quantizer parameters from ``batches`` (eval mode; BN statistics untouched).

    Each batch is a tensor, a tuple/list of positional inputs, or a dict of keyword inputs (a Hugging Face batch such
    as ``{"input_ids": ids, "attention_mask": mask}``). Quantizers initialise from the first batch that reaches them;
    already initialised ones are kept unless ``reset=True``.
    """
    qs = named_quantizers(qm)
    if reset:
        for q in qs.values():
            q.reset()
    was_training = qm.training
    qm.eval()
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                qm(**batch)
            else:
                qm(*(batch if isinstance(batch, (tuple, list)) else (batch,)))
            if all(q.is_initialized for q in qs.values() if q.kind != "grad"):
                break
    finally:
        qm.train(was_training)
    return qm


def trainable_parameters(qm: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters an optimizer should update: everything that requires grad (the frozen partner does not)."""
    seen = set()
    for p in qm.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p
