"""The one optimizer builder of fxqat's training loops: parameter groups that keep quantizer parameters apart (their
own learning rate and weight decay), and the torch optimizer over them.

Quantizer parameters (scales, clip values, offsets) are :func:`fxqat.quantizers.control.quantizer_parameters`;
everything else is a weight. ``decay_vectors=False`` (the language-model recipe) also keeps weight decay off the
weights with fewer than 2 dimensions (norms, biases). :func:`fxqat.training.loop.fit` builds SGD or Adam with its
``TrainConfig``; :func:`fxqat.training.lm.train_lm` builds AdamW with its ``LMRecipe``.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), fxqat.QATConfig(w_bits=4))
    >>> spec = OptimizerSpec("adamw", lr=1e-3, weight_decay=0.1, decay_vectors=False)
    >>> [(g["name"], len(g["params"]), g["weight_decay"]) for g in param_groups(qm, spec)]
    [('weights', 1, 0.1), ('no_decay', 3, 0.0)]
    >>> [(g["name"], len(g["params"])) for g in param_groups(qm, OptimizerSpec("sgd", weight_decay=5e-4))]
    [('weights', 2), ('quantizers', 2)]
    >>> type(build_optimizer(qm, spec)).__name__
    'AdamW'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from fxqat.quantizers.control import quantizer_parameters

__all__ = ["OptimizerSpec", "OPTIMIZERS", "param_groups", "build_optimizer"]

#: the optimizers :func:`build_optimizer` knows
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class OptimizerSpec:
    """What :func:`build_optimizer` builds.

    Attributes:
        kind: ``"sgd"`` (Nesterov momentum when ``momentum > 0``), ``"adam"`` or ``"adamw"``.
        lr: learning rate of the weights; ``quant_lr`` of quantizer parameters (None = ``lr``).
        weight_decay: on weights; ``quant_weight_decay`` on quantizer parameters.
        momentum: SGD's; ``betas``: AdamW's (Adam keeps torch's default).
        decay_vectors: False = no weight decay on weights of fewer than 2 dimensions (their own group, ``no_decay``).
    """

    kind: str = "sgd"
    lr: float = 0.1
    quant_lr: Optional[float] = None
    weight_decay: float = 0.0
    quant_weight_decay: float = 0.0
    momentum: float = 0.9
    betas: Tuple[float, float] = (0.9, 0.999)
    decay_vectors: bool = True

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"OptimizerSpec.kind={self.kind!r}: use one of {OPTIMIZERS}.")


def param_groups(model: Optional[nn.Module], spec: OptimizerSpec, params: Optional[Iterable] = None,
                 quantizer_ids: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
    """The parameter groups of ``params`` (default: every parameter of ``model`` that requires grad).

    ``weights`` (``lr``, ``weight_decay``; always present), ``no_decay`` (weights of fewer than 2 dimensions when
    ``decay_vectors`` is False, and the quantizer parameters too when their settings are the same: ``lr``, no
    decay) and ``quantizers`` (``quant_lr``, ``quant_weight_decay``), each only when it holds a parameter; ``params`` that are already groups (dicts) are returned as they are. The quantizer parameters are
    ``model``'s :func:`~fxqat.quantizers.control.quantizer_parameters`, or the parameters whose ``id`` is in
    ``quantizer_ids`` when it is given.
    """
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    if params and isinstance(params[0], dict):  # already param groups
        return params
    qids = set(quantizer_ids) if quantizer_ids is not None else {id(p) for p in quantizer_parameters(model).values()}
    weights = [p for p in params if id(p) not in qids]
    decayed = weights if spec.decay_vectors else [p for p in weights if p.dim() >= 2]
    groups = [{"params": decayed, "lr": spec.lr, "weight_decay": spec.weight_decay, "name": "weights"}]
    # quantizer parameters with the no-decay group's settings join it (in ``params`` order, as the recipe always had)
    joins = not spec.decay_vectors and spec.quant_lr in (None, spec.lr) and spec.quant_weight_decay == 0.0
    if not spec.decay_vectors:
        done = {id(p) for p in decayed}
        rest = [p for p in params if id(p) not in done and (joins or id(p) not in qids)]
        if rest:
            groups.append({"params": rest, "lr": spec.lr, "weight_decay": 0.0, "name": "no_decay"})
    quant = [p for p in params if id(p) in qids and not joins]
    if quant:
        groups.append({"params": quant, "lr": spec.quant_lr if spec.quant_lr is not None else spec.lr,
                       "weight_decay": spec.quant_weight_decay, "name": "quantizers"})
    return groups


def build_optimizer(model: Optional[nn.Module], spec: OptimizerSpec, params: Optional[Iterable] = None,
                    quantizer_ids: Optional[Iterable[int]] = None) -> torch.optim.Optimizer:
    """The torch optimizer of ``spec`` over :func:`param_groups` (same arguments)."""
    groups = param_groups(model, spec, params, quantizer_ids)
    if spec.kind == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.momentum > 0)
    if spec.kind == "adam":
        return torch.optim.Adam(groups, lr=spec.lr)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
