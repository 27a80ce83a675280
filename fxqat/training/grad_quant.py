"""Read and drive the LBT gradient quantizers of a prepared model (methods.md §3; :mod:`fxqat.quantizers.grad`).

With ``QATConfig(g_bits=b)`` every quantized layer's output carries a :class:`~fxqat.quantizers.grad.GradQuantizer`.
By default (``g_options={"update": "backward"}``) each one updates its clipping factor γ inside the backward pass, so a
training loop needs nothing from this module except for logging. With ``g_options={"update": "manual"}`` call
:func:`update_intervals` once per optimizer step (after ``backward``): it applies one γ update per layer from the mean
clip fraction of the backward passes since the previous call.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 8),), fxqat.QATConfig(g_bits=4))
    >>> _ = torch.manual_seed(0)
    >>> qm(torch.randn(32, 8)).square().sum().backward()
    >>> sorted(gammas(qm))
    ['fxqat_quant.g_0', 'fxqat_quant.g_2']
    >>> all(0.0 <= r <= 1.0 for r in clip_fractions(qm).values())
    True
"""

from __future__ import annotations

from typing import Dict

from torch import nn

from fxqat.quantizers.grad import GradQuantizer

__all__ = ["grad_quantizers", "clip_fractions", "gammas", "update_intervals"]


def grad_quantizers(qm: nn.Module) -> Dict[str, GradQuantizer]:
    """Every gradient quantizer of ``qm``, by qualified module name (in module order)."""
    return {name: m for name, m in qm.named_modules() if isinstance(m, GradQuantizer)}


def clip_fractions(qm: nn.Module) -> Dict[str, float]:
    """Per layer, the fraction R of output-gradient elements clipped (``|G| > γ·max|G|``) in the last backward pass,
    measured on the full-precision G."""
    return {name: float(q.clip_fraction) for name, q in grad_quantizers(qm).items()}


def gammas(qm: nn.Module) -> Dict[str, float]:
    """Per layer, the current clipping factor γ."""
    return {name: float(q.gamma) for name, q in grad_quantizers(qm).items()}


def update_intervals(qm: nn.Module) -> nn.Module:
    """Apply one interval update to every gradient quantizer with ``update="manual"`` (a no-op for the others).

    Under ``torch.distributed`` the accumulated clip fractions are averaged across ranks first (a collective: call it
    on every rank). Returns ``qm``.
    """
    for q in grad_quantizers(qm).values():
        q.update_interval()
    return qm
