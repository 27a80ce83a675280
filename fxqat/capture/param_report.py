"""Every parameter of two or more dims that is left in floating point, and why (part of ``fxqat.capture_report``).

Reasons fall in two groups. *Expected*: ``"FP by config: ..."`` (a router with ``quantize_router=False``, an
embedding table with ``quantize_embeddings=False``, an ``Override(skip=True)``, the ``first_last=None`` policy),
``"not used by a matmul-like op ..."`` (position embeddings that are added, 2-D biases, class tokens), ``"not called
on the example inputs"``. *Unexpected*: a parameter that does enter a matmul-like op but got no quantizer (read in
a way fxqat does not follow); :func:`warn_unexpected` reports those through ``warnings.warn``.

Example:
    >>> import torch, torch.nn as nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.pos = nn.Linear(4, 4), nn.Parameter(torch.zeros(3, 4))
    ...     def forward(self, x):
    ...         return self.fc(x + self.pos)
    >>> unquantized_params(Net(), set(), {})
    (('pos', 'not used by a matmul-like op on the example inputs'), ('fc.weight', 'not used by a matmul-like op on the example inputs'))
"""

from __future__ import annotations

import warnings
from typing import Any, Collection, Dict, Iterable, Optional, Tuple

from torch import nn

from fxqat.capture.lora import lora_factor_reasons
from fxqat.config import QATConfig
from fxqat.layer_registry import weight_layer_entry
from fxqat.quantizers.base import Quantizer

__all__ = ["unquantized_params", "quantized_param_ids", "warn_unexpected", "is_expected", "UnquantizedWeightWarning",
           "NOT_USED", "UNEXPECTED", "fp_params"]

NOT_USED = "not used by a matmul-like op on the example inputs"
UNEXPECTED = "enters"  # reasons of weights fxqat saw in a matmul-like op but did not quantize start with this


class UnquantizedWeightWarning(UserWarning):
    """A parameter enters a matmul-like op but was left in floating point for no configured reason."""


def quantized_param_ids(model: nn.Module) -> set:
    """``id`` of every parameter a weight quantizer of ``model`` reads (its ``weight_target``)."""
    found = set()
    for q in model.modules():
        target = getattr(q, "weight_target", None) if isinstance(q, Quantizer) and q.kind == "weight" else None
        if not target:
            continue
        try:
            found.add(id(model.get_parameter(target)))
        except AttributeError:
            continue
    return found


def is_expected(reason: str) -> bool:
    """Whether ``reason`` is a configured or benign one (see the module docstring)."""
    return not reason.startswith(UNEXPECTED)


def unquantized_params(
    model: nn.Module, quantized: Collection[int], reasons: Dict[str, str],
    skip_prefixes: Iterable[str] = ("fxqat_",),
) -> Tuple[Tuple[str, str], ...]:
    """``(name, reason)`` for every parameter of ``model`` with >= 2 dims whose ``id`` is not in ``quantized``.

    ``reasons`` maps qualified parameter names to why they were left FP; a name it lacks gets :data:`NOT_USED`.
    fxqat's own parameters (``fxqat_*`` paths: quantizer scales, the block-replacement partner) are not listed.
    """
    skip = tuple(skip_prefixes)
    out = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or id(p) in quantized or any(part.startswith(skip) for part in name.split(".")):
            continue
        out.append((name, reasons.get(name, NOT_USED)))
    return tuple(out)


def warn_unexpected(fp: Iterable[Tuple[str, str]], model_name: str, stacklevel: int = 3) -> Optional[str]:
    """``warnings.warn`` (:class:`UnquantizedWeightWarning`) naming the weights left FP for no configured reason;
    returns the message (None when there are none)."""
    bad = [(n, r) for n, r in fp if not is_expected(r)]
    if not bad:
        return None
    listed = "; ".join(f"{n} ({r})" for n, r in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    msg = (f"fxqat: {len(bad)} weight parameter(s) of {model_name} enter matmul-like ops but stay in floating point: "
           f"{listed}. See fxqat.capture_report(model).unquantized; keep them FP on purpose with "
           "fxqat.Override(<module>, skip=True), or report the model.")
    warnings.warn(msg, UnquantizedWeightWarning, stacklevel=stacklevel)
    return msg


def fp_params(
    model: nn.Module, uses: Dict[str, Any], reasons: Dict[str, str], config: QATConfig,
    layer_weights: Dict[int, str], ends: Collection[str] = (), uncalled: Collection[str] = (),
) -> Tuple[Tuple[str, str], ...]:
    """Every >= 2-D parameter of the prepared ``model`` left FP, with its reason.

    Args:
        model: the prepared model (its weight quantizers tell what is quantized).
        uses: the recorded weight uses (:func:`fxqat.capture.param_quant.record_param_uses`).
        reasons: reasons already decided (:class:`fxqat.capture.param_quant.ParamPlan`).
        config: for overrides and the ``first_last`` policy.
        layer_weights: ``id(parameter)`` -> qualified name of the registered layers' weights.
        ends: names of the first and last weight layer (the ``first_last`` policy).
        uncalled: weight layers the example call did not reach.
    """
    reasons = {**reasons, **lora_factor_reasons(model)}  # LoRA factors: FP by design
    for name in uncalled:
        entry = weight_layer_entry(model.get_submodule(name))
        reasons.setdefault(f"{name}.{entry.weight}" if entry else name, "not called on the example inputs")
    params = dict(model.named_parameters())
    for pname, use in uses.items():
        owner = pname.rpartition(".")[0]
        p = params.get(pname)
        if p is not None and id(p) in layer_weights:
            owner = layer_weights[id(p)].rpartition(".")[0]
        try:
            ov = config.override_for(owner, model.get_submodule(owner))
        except AttributeError:
            ov = None
        if ov is not None and ov.skip:
            reasons.setdefault(pname, "FP by config: Override(skip=True)")
        elif owner in ends and config.first_last is None and not (ov and (ov.w_bits or ov.a_bits)):
            reasons.setdefault(pname, "FP by config: first/last layer with QATConfig.first_last=None")
        reasons.setdefault(pname, f"{UNEXPECTED} {', '.join(use.ops)} in {use.users[0] or '<root>'}; no quantizer "
                           "reads it")
    return unquantized_params(model, quantized_param_ids(model), reasons)
