"""LoRA added after ``prepare_qat`` (fxqat first, then PEFT): hand the new adapters to the prepared model.

PEFT wraps the prepared model's layers in LoRA layers whose ``base_layer`` is the layer fxqat prepared. Where that
layer was quantized in place (an eager region) the wrapper calls it; where it sits in a graph region the region's
graph reads its weight directly and would never call the adapter. :func:`adopt_lora` makes both cases what
``prepare_qat`` gives for the same model with PEFT applied first: the graph call of such a layer becomes a call of
its LoRA layer, the layer's weight quantizer (same object, trained state kept) moves onto the base layer, and
``QATConfig.lora``'s mode is applied (:func:`fxqat.capture.lora.wrap_lora_layer`). PEFT freezes every parameter
that is not an adapter; the weight quantizers' step sizes are trained again.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.capture.lora import LoraParts, register_lora_layer
    >>> class Adapter(nn.Module):
    ...     def __init__(self, base, r=2):
    ...         super().__init__()
    ...         self.base_layer, self.scaling = base, 1.0
    ...         self.lora_A = nn.Linear(base.in_features, r, bias=False)
    ...         self.lora_B = nn.Linear(r, base.out_features, bias=False)
    ...     def forward(self, x):
    ...         return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 64),), fxqat.QATConfig.preset("int4_weight_only"))
    >>> qm.add_module("0", Adapter(qm.get_submodule("0")))  # what PEFT does to a target layer
    >>> adopt_lora(qm)
    ['0']
    >>> "0" in [n.target for n in qm.graph.nodes if n.op == "call_module"]
    True
"""

from __future__ import annotations

from typing import List

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxqat.capture.layer_quant import is_quantized_layer, quantize_layer
from fxqat.capture.lora import LORA_ATTR, LORA_MODES, lora_parts, named_lora_layers, wrap_lora_layer
from fxqat.passes.insert_quant import QROLE
from fxqat.quantizers.base import Quantizer

__all__ = ["adopt_lora"]

_LINEAR = (F.linear, torch._C._nn.linear)


def _graph_owner(model: nn.Module, name: str):
    """The innermost ``GraphModule`` above the module called ``name`` and the module's path inside it."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(owner, fx.GraphModule):
            return owner, ".".join(parts[i:])
    return None, name


def _reroute(gm: fx.GraphModule, rel: str, where: str) -> Quantizer:
    """Calls of the linear layer at ``rel`` in ``gm``'s graph become calls of the module at ``rel`` (now its LoRA
    layer); returns the weight quantizer the graph applied to it (removed from the graph)."""
    qnodes = [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get(QROLE) == "weight"
              and n.args and getattr(n.args[0], "op", "") == "get_attr" and n.args[0].target == f"{rel}.weight"]
    if len(qnodes) != 1:
        raise ValueError(f"adopt_lora: {where!r} is read by {len(qnodes)} weight quantizers in its graph region, "
                         "expected one; apply LoRA before prepare_qat instead.")
    qnode = qnodes[0]
    users = list(qnode.users)
    if not all(u.op == "call_function" and u.target in _LINEAR and len(u.args) >= 2 and u.args[1] is qnode
               and not u.kwargs for u in users):
        raise ValueError(f"adopt_lora: the weight of {where!r} is used other than by linear(x, weight, bias) in its "
                         "graph region; apply LoRA before prepare_qat instead.")
    quantizer = gm.get_submodule(str(qnode.target))
    for u in users:
        with gm.graph.inserting_before(u):
            call = gm.graph.call_module(rel, (u.args[0],))
        call.meta = dict(u.meta)
        u.replace_all_uses_with(call)
        gm.graph.erase_node(u)
    inputs = [a for a in qnode.all_input_nodes]
    gm.graph.erase_node(qnode)
    for a in inputs + [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == f"{rel}.bias"]:
        if not a.users:
            gm.graph.erase_node(a)
    parent, _, attr = str(qnode.target).rpartition(".")
    delattr(gm.get_submodule(parent), attr)
    gm.graph.lint()
    gm.recompile()
    return quantizer


def adopt_lora(model: nn.Module, lora: str = "merged") -> List[str]:
    """Prepare the LoRA layers added to the prepared ``model`` after ``prepare_qat`` (module docstring), in place.

    Args:
        model: a model from ``prepare_qat`` (or PEFT's wrapper around one) holding new LoRA layers.
        lora: ``"merged"`` or ``"base"`` (``QATConfig.lora``).

    Returns:
        The qualified names of the LoRA layers adopted.

    Raises:
        ValueError: a LoRA layer's base layer was not quantized by fxqat (skipped by the config: keep it FP by
            removing the adapter, or prepare with PEFT applied first).
    """
    if lora not in LORA_MODES:
        raise ValueError(f"adopt_lora: lora={lora!r}; use one of {LORA_MODES}.")
    done = []
    for name, m in list(named_lora_layers(model)):
        if getattr(m, LORA_ATTR, None) is not None:
            continue
        parts = lora_parts(m)
        base_rel = next(n for n, sub in m.named_modules() if sub is parts.base)
        base_name = f"{name}.{base_rel}"
        if not is_quantized_layer(parts.base):
            gm, rel = _graph_owner(model, name)
            if gm is None:
                raise ValueError(f"adopt_lora: the base layer of {name!r} has no fxqat weight quantizer (kept FP by the "
                                 "config?); remove its adapter or apply LoRA before prepare_qat.")
            q = _reroute(gm, rel, name)
            quantize_layer(parts.base, q.spec, None, base_name, weight_quantizer=q)
            q.weight_target, q.weight_layer = f"{base_name}.weight", base_name
        wrap_lora_layer(m, lora, name)
        done.append(name)
    for q in model.modules():  # PEFT froze every non-adapter parameter: the step sizes train again
        if isinstance(q, Quantizer):
            for p in q.parameters():
                p.requires_grad_(True)
    return done
