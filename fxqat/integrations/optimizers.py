"""Optimizers in trainers that own the optimizer's life cycle (``transformers.Trainer``, accelerate, LR schedulers).

* :class:`TALROptimizer`: a ``torch.optim.Optimizer`` view of a
  :class:`~fxqat.training.optim.TransitionRateScheduler` (``fxqat.optim.SGDT/AdamT/AdamWT``) whose ``state_dict``
  holds the wrapped optimizer's state *and* the TALR state (per-layer U, K, step), so a trainer that saves and
  loads ``optimizer.state_dict()`` resumes both. The TALR scheduler itself is not an ``Optimizer``: accelerate would
  not wrap it, torch's LR schedulers refuse it, and its own ``state_dict`` holds only the TALR part.
* :func:`rebind_parameters`: point an optimizer at replaced parameters (moving their state). Per-channel and
  per-group quantizers create their scale ``Parameter`` when they initialise (its shape comes from the data), and a
  ``load_state_dict`` of another shape replaces it too; an optimizer built before that holds the old objects.
* :func:`find_talr`: the TALR scheduler inside optimizer wrappers (accelerate's, :class:`TALROptimizer`).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.optim import AdamWT
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(4, 8),))
    >>> opt = TALROptimizer(AdamWT(qm, total_steps=10, lr=1e-3))
    >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # a torch Optimizer: schedulers accept it
    >>> qm(torch.randn(4, 8)).sum().backward()
    >>> opt.step(); sched.step()
    >>> sd = opt.state_dict()
    >>> sd[TALR_KEY]["step"], len(sd["state"]) > 0
    (1, True)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from fxqat.training.optim import TransitionRateScheduler

__all__ = ["TALROptimizer", "rebind_parameters", "find_talr", "TALR_KEY"]

#: key of the TALR state inside :meth:`TALROptimizer.state_dict`
TALR_KEY = "fxqat_talr"


class TALROptimizer(torch.optim.Optimizer):
    """A :class:`~fxqat.training.optim.TransitionRateScheduler` as a ``torch.optim.Optimizer``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's; ``step`` is the TALR step;
    ``state_dict()`` is the wrapped optimizer's state dict plus the TALR state under :data:`TALR_KEY` (tensors,
    numbers and strings only: it loads with ``torch.load(weights_only=True)``).

    Args:
        talr: the scheduler (``fxqat.optim.SGDT(qm, total_steps=...)``, ...), built over the model's parameters.
    """

    def __init__(self, talr: TransitionRateScheduler) -> None:  # noqa: D107 (no Optimizer.__init__: groups exist)
        if not isinstance(talr, TransitionRateScheduler):
            raise TypeError(f"TALROptimizer wraps a fxqat TransitionRateScheduler (fxqat.optim.SGDT/AdamT/AdamWT), "
                            f"got {type(talr).__name__}; pass a torch optimizer to the trainer directly.")
        self.talr = talr
        self.optimizer = talr.optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.talr.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One TALR step (the wrapped optimizer's update with lr = U per quantized layer, then the TR update)."""
        return self.talr.step(closure)

    def state_dict(self) -> Dict[str, Any]:
        return {**self.optimizer.state_dict(), TALR_KEY: self.talr.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = dict(state_dict)
        talr = state_dict.pop(TALR_KEY, None)
        if talr is None:
            raise ValueError(f"TALROptimizer.load_state_dict: the state dict has no {TALR_KEY!r} entry; it was not "
                             "saved from a TALROptimizer (a plain optimizer's state lacks the TALR state U, K, step).")
        self.optimizer.load_state_dict(state_dict)
        self.talr.load_state_dict(talr)

    def __repr__(self) -> str:
        return f"TALROptimizer({self.talr!r})"


def find_talr(optimizer: Any, depth: int = 4) -> Optional[TransitionRateScheduler]:
    """The TransitionRateScheduler inside ``optimizer`` (itself, a :class:`TALROptimizer`, or wrappers of these
    that keep the wrapped object in ``.optimizer``, as accelerate's ``AcceleratedOptimizer`` does), else None."""
    for _ in range(depth):
        if isinstance(optimizer, TransitionRateScheduler):
            return optimizer
        if isinstance(optimizer, TALROptimizer):
            return optimizer.talr
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def rebind_parameters(optimizer: Any, mapping: Mapping[nn.Parameter, nn.Parameter]) -> int:
    """Replace the parameters ``mapping``'s keys by its values in ``optimizer``'s groups, moving their state.

    Args:
        optimizer: anything with ``param_groups`` and ``state`` (a torch optimizer or a wrapper that delegates them).
        mapping: old parameter -> new parameter (e.g. a quantizer scale recreated at initialisation).

    Returns:
        How many group entries were replaced.

    Example:
        >>> old, new = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(3))
        >>> opt = torch.optim.SGD([old], lr=0.1)
        >>> rebind_parameters(opt, {old: new}), opt.param_groups[0]["params"][0] is new
        (1, True)
    """
    if not mapping:
        return 0
    by_id = {id(k): v for k, v in mapping.items()}
    replaced = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            new = by_id.get(id(p))
            if new is not None:
                params[i] = new
                replaced += 1
    state = optimizer.state
    for old, new in mapping.items():
        if old in state:
            state[new] = state.pop(old)
    return replaced
