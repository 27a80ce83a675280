"""convert: the LP inference graph of a prepared graph-root model (no hybrid paths or FP partner, weights
pre-quantized, quantizer state frozen).

``fxqat.convert`` (:mod:`fxqat.api`) calls it after merging LoRA adapters; eager-root models go through
:func:`fxqat.capture.eager_model.convert_eager` instead. Each weight quantizer whose input is a parameter is replaced
by a non-persistent buffer ``fxqat_quant.frozen_<name>`` holding its output, so the converted model's
``state_dict`` has exactly the keys of the prepared model; loading a ``state_dict`` refreshes the buffers.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> from fxqat.passes.annotate import annotate
    >>> from fxqat.passes.insert_quant import insert_quant
    >>> from fxqat.trace import trace
    >>> qm = insert_quant(annotate(trace(nn.Sequential(nn.Linear(3, 3))), QATConfig()), QATConfig())
    >>> _ = qm(torch.randn(2, 3))
    >>> lp = convert_graph(qm)
    >>> sorted(n.target for n in lp.graph.nodes if n.op == "get_attr")
    ['0.bias', 'fxqat_quant.frozen_w_0']
    >>> sorted(lp.state_dict()) == sorted(qm.state_dict())
    True
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from fxqat.passes.insert_quant import QROLE, OpaqueWeightQuant

__all__ = ["convert_graph"]


def _no_extra_freeze(module: nn.Module) -> None:
    """The default ``freeze_module``: nothing beyond the weight quantizers and opaque wrappers."""


def convert_graph(qm: fx.GraphModule, freeze_module: Callable[[nn.Module], None] = _no_extra_freeze) -> fx.GraphModule:
    """The LP inference copy of ``qm`` (``qm`` itself is not modified).

    Args:
        qm: a graph-root model ``prepare_qat`` returned.
        freeze_module: called on every module of the copy after its weights are frozen (and again after each
            ``load_state_dict``): freezes quantizers that live outside the graph (``fxqat.api`` passes
            :func:`fxqat.capture.param_quant.freeze_params`).
    """
    lp_graph = copy.deepcopy(qm.graph)
    lp = fx.GraphModule(qm, lp_graph, type(qm).__name__ + "LP")
    for m in list(lp.modules()):
        if isinstance(m, OpaqueWeightQuant):  # the wrapped leaf stays registered at its own path
            lp.add_submodule(m.module_path, m.module)
    lp = copy.deepcopy(lp)
    lp.eval()
    for p in lp.parameters():
        p.requires_grad_(False)
    frozen = []
    for node in lp.graph.nodes:
        if node.op == "call_module" and node.meta.get(QROLE) == "weight" and node.args[0].op == "get_attr":
            frozen.append(node)
    container = lp.get_submodule("fxqat_quant") if frozen else None
    for node in frozen:
        buf = f"frozen_{node.target.split('.')[-1]}"
        container.register_buffer(buf, torch.empty(0), persistent=False)
        node.meta["fxqat.frozen_from"] = (node.target, node.args[0].target)
        with lp.graph.inserting_before(node):
            ga = lp.graph.get_attr(f"fxqat_quant.{buf}")
        ga.meta["fxqat.frozen_from"] = node.meta["fxqat.frozen_from"]
        node.replace_all_uses_with(ga)
        lp.graph.erase_node(node)
    lp.graph.eliminate_dead_code()
    lp.graph.lint()
    lp.recompile()
    _refresh_frozen(lp, freeze_module)
    lp.register_load_state_dict_post_hook(lambda mod, _keys: _refresh_frozen(mod, freeze_module))
    return lp


@torch.no_grad()
def _refresh_frozen(lp: fx.GraphModule, freeze_module: Callable[[nn.Module], None]) -> None:
    container = lp.get_submodule("fxqat_quant") if hasattr(lp, "fxqat_quant") else None
    for node in lp.graph.nodes:
        src = node.meta.get("fxqat.frozen_from")
        if node.op == "get_attr" and src is not None:
            q_name, w_name = src
            q = lp.get_submodule(q_name)
            w = lp.get_parameter(w_name) if "." in w_name else getattr(lp, w_name)
            q.eval()
            setattr(container, node.target.split(".")[-1], q(w).detach().clone())
    for m in lp.modules():
        if isinstance(m, OpaqueWeightQuant):
            m.freeze()
        freeze_module(m)
