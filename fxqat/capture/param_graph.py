"""Parameter-following quantization for a model whose root forward traced (one graph for the whole model).

The graph quantizes the weights of registered layers it reads; :func:`plan_graph_params` records, on one run of the
model, every other parameter that enters a matmul-like op (:mod:`fxqat.capture.param_quant`), decides routers
(FP by default) before ``annotate`` runs, and :func:`finish_graph_params` quantizes the others: where the graph
reads one (a ``get_attr`` node) a weight quantizer in its ``[rows, reduction]`` layout follows that node; where its
owner module runs its own ``forward`` inside the graph (a leaf: MoE experts with data-dependent routing) the owner
quantizes it (:func:`~fxqat.capture.param_quant.quantize_params`); then it stores
the report of what stays FP (``gm.meta["fxqat.unquantized"]``) and warns about weights left FP for no configured
reason.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(2, 4, 4))
    ...     def forward(self, x):
    ...         return x @ self.w[int(x.sum() > 0)].t()  # data-dependent: a leaf of the graph
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4), Experts()), (torch.randn(3, 4),),
    ...                        fxqat.QATConfig(first_last=4))
    >>> sorted(q.weight_target for q in fxqat.named_quantizers(qm).values() if q.kind == "weight")
    ['0.weight', '1.w']
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import torch.fx as fx
from torch import nn

from fxqat.capture.param_quant import (
    ParamPlan,
    ParamUse,
    RowsQuant,
    layer_weight_names,
    plan_params,
    quantize_params,
    record_param_uses,
)
from fxqat.capture.param_report import fp_params, quantized_param_ids, warn_unexpected
from fxqat.config import QATConfig, QuantSpec
from fxqat.method_registry import make_quantizer
from fxqat.passes.insert_quant import CONTAINER, QROLE

__all__ = ["plan_graph_params", "finish_graph_params", "UNQUANTIZED_META", "PARAM_WEIGHTS_META"]

UNQUANTIZED_META = "fxqat.unquantized"  # gm.meta: ((parameter, reason), ...) of the >= 2-D parameters left FP
PARAM_WEIGHTS_META = "fxqat.param_weights"  # gm.meta: the parameters quantized where used


def plan_graph_params(model: nn.Module, inputs: Tuple, config: QATConfig) -> Tuple[ParamPlan, Dict[str, ParamUse]]:
    """Record the weight uses of one eager run of ``model`` on ``inputs`` and plan them (:func:`plan_params`)."""
    uses = record_param_uses(model, inputs)
    return plan_params(model, uses, config, layer_weight_names(model)), uses


def _quantize_in_graph(gm: fx.GraphModule, pname: str, reduced: Tuple[int, ...], spec) -> bool:
    """Insert a weight quantizer after the ``get_attr`` of ``pname`` (all its uses read the quantized value)."""
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) == pname]
    if not reads:
        return False
    q = make_quantizer(QuantSpec(**{**spec.__dict__, "ch_axis": 0}))
    q.weight_target, q.weight_layer = pname, pname.rpartition(".")[0]
    if not hasattr(gm, CONTAINER):
        gm.add_module(CONTAINER, nn.Module())
    container = getattr(gm, CONTAINER)
    base = "p_" + re.sub(r"\W", "_", pname)
    name, k = base, 1
    while hasattr(container, name):
        name, k = f"{base}_{k}", k + 1
    container.add_module(name, RowsQuant(q, reduced))
    for read in reads:
        users = list(read.users)
        with gm.graph.inserting_after(read):
            wq = gm.graph.call_module(f"{CONTAINER}.{name}", (read,))
        wq.meta[QROLE] = "weight"
        for u in users:
            u.replace_input_with(read, wq)
    return True


def finish_graph_params(gm: fx.GraphModule, plan: ParamPlan, uses: Dict[str, ParamUse], config: QATConfig) -> None:
    """Quantize the planned parameters: in the graph where ``gm`` reads them (``get_attr``), otherwise in their owner
    module, which runs its own forward inside ``gm`` (a leaf); then store and check the list of parameters left FP."""
    done = []
    for owner, layouts in plan.owners.items():
        in_module = {}
        for local, reduced in layouts.items():
            pname = f"{owner}.{local}" if owner else local
            if _quantize_in_graph(gm, pname, reduced, plan.specs[pname]):
                done.append(pname)
            else:
                in_module[local] = reduced
        if in_module:
            quantize_params(gm.get_submodule(owner), in_module, plan.specs[f"{owner}.{next(iter(in_module))}" if owner
                                                                         else next(iter(in_module))], owner,
                            {k: plan.specs[f"{owner}.{k}" if owner else k] for k in in_module})
            done += [f"{owner}.{k}" if owner else k for k in in_module]
    gm.graph.lint()
    gm.recompile()
    reasons = dict(plan.reasons)
    quantized = quantized_param_ids(gm)
    params = dict(gm.named_parameters())
    for pid, name in layer_weight_names(gm).items():
        p = params.get(name)
        if p is not None and id(p) not in quantized and not name.startswith("fxqat_"):
            reasons.setdefault(name, "FP by config: an Override(skip=True) or the first_last=None policy")
    fp = fp_params(gm, uses, reasons, config, layer_weight_names(gm))
    gm.meta[UNQUANTIZED_META] = fp
    gm.meta[PARAM_WEIGHTS_META] = tuple(done)
    warn_unexpected(fp, gm.__class__.__name__, stacklevel=5)
