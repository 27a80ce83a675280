"""Parameter-following quantization for a model whose root forward traced (one graph for the whole model).

The graph quantizes the weights of registered layers it reads; :func:`plan_graph_params` records, on one run of the
model, every other parameter that enters a matmul-like op (:mod:`fxqat.capture.param_quant`), decides routers
(FP by default) before ``annotate`` runs; the modules owning such parameters are traced as leaves
(:func:`traced_owners`), and :func:`finish_graph_params` quantizes the parameters whose owner
module runs its own ``forward`` inside the graph (a leaf: MoE experts with data-dependent routing), then stores
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

from typing import Dict, Tuple

import torch.fx as fx
from torch import nn

from fxqat.capture.param_quant import (
    ParamPlan,
    ParamUse,
    layer_weight_names,
    plan_params,
    quantize_params,
    record_param_uses,
)
from fxqat.capture.param_report import fp_params, quantized_param_ids, warn_unexpected
from fxqat.config import QATConfig

__all__ = ["plan_graph_params", "traced_owners", "finish_graph_params", "UNQUANTIZED_META", "PARAM_WEIGHTS_META"]

UNQUANTIZED_META = "fxqat.unquantized"  # gm.meta: ((parameter, reason), ...) of the >= 2-D parameters left FP
PARAM_WEIGHTS_META = "fxqat.param_weights"  # gm.meta: the parameters quantized where used


def plan_graph_params(model: nn.Module, inputs: Tuple, config: QATConfig) -> Tuple[ParamPlan, Dict[str, ParamUse]]:
    """Record the weight uses of one eager run of ``model`` on ``inputs`` and plan them (:func:`plan_params`)."""
    uses = record_param_uses(model, inputs)
    return plan_params(model, uses, config, layer_weight_names(model)), uses


def traced_owners(gm: fx.GraphModule, plan: ParamPlan) -> Tuple[str, ...]:
    """The planned owners ``gm`` traced through (their parameters are read by ``get_attr`` nodes, so their own
    ``forward`` never runs): trace again with them as leaves."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    return tuple(o for o in plan.owners
                 if o and not any(o == c or o.startswith(c + ".") for c in called))


def finish_graph_params(gm: fx.GraphModule, plan: ParamPlan, uses: Dict[str, ParamUse], config: QATConfig) -> None:
    """Quantize the planned parameters (their owners run their own forward inside ``gm``), store and check the list
    of parameters left FP."""
    for owner, layouts in plan.owners.items():
        module = gm.get_submodule(owner)
        quantize_params(module, layouts, plan.specs[f"{owner}.{next(iter(layouts))}" if owner else next(iter(layouts))],
                        owner, {k: plan.specs[f"{owner}.{k}" if owner else k] for k in layouts})
    reasons = dict(plan.reasons)
    quantized = quantized_param_ids(gm)
    params = dict(gm.named_parameters())
    for pid, name in layer_weight_names(gm).items():
        p = params.get(name)
        if p is not None and id(p) not in quantized and not name.startswith("fxqat_"):
            reasons.setdefault(name, "FP by config: an Override(skip=True) or the first_last=None policy")
    fp = fp_params(gm, uses, reasons, config, layer_weight_names(gm))
    gm.meta[UNQUANTIZED_META] = fp
    gm.meta[PARAM_WEIGHTS_META] = tuple(f"{o}.{k}" if o else k for o, layouts in plan.owners.items() for k in layouts)
    warn_unexpected(fp, gm.__class__.__name__, stacklevel=5)
