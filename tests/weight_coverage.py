"""Shared check: every weight parameter of a prepared model has exactly one weight quantizer, or a stated reason.

Used by the HF zoo tests, the MoE tests and the capture properties.
"""

from typing import Dict, List

from torch import nn

import fxqat
from fxqat.layer_registry import is_weight_layer, weight_layer_entry

__all__ = ["weight_targets", "check_one_quantizer_per_weight"]


def weight_targets(qm: nn.Module) -> List[str]:
    """The ``weight_target`` (qualified parameter name) of every weight quantizer of ``qm``, one entry per quantizer."""
    return [q.weight_target for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]


def check_one_quantizer_per_weight(model: nn.Module, qm: nn.Module) -> Dict[str, str]:
    """Assert that each parameter a weight quantizer reads has one quantizer, and that the quantized parameters are
    the registered layers' weights plus the parameters quantized where used, minus those the capture report lists
    as FP (each with a reason). Returns the report's ``{parameter: reason}``."""
    targets = weight_targets(qm)
    assert len(targets) == len(set(targets)), sorted(t for t in targets if targets.count(t) > 1)
    report = fxqat.capture_report(qm)
    fp = dict(report.unquantized)
    assert all(fp.values()), fp
    layers = {f"{n}.{weight_layer_entry(m).weight}" if n else weight_layer_entry(m).weight
              for n, m in model.named_modules() if is_weight_layer(m)}
    expected = (layers | set(report.param_weights)) - set(fp)
    assert set(targets) == expected, (sorted(set(targets) ^ expected))
    params = dict(model.named_parameters())
    listed = set(fp) | {t for t in targets if t in params}
    shared = {t for t in targets if t not in params}  # a tied weight quantized under its second name
    two_d = {n for n, p in params.items() if p.dim() >= 2}
    assert two_d <= listed | {n for n in two_d if any(params[n] is model.get_parameter(s) for s in shared)}, (
        sorted(two_d - listed))
    return fp
