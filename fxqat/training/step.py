"""One optimisation step, shared by every fxqat training loop: forward and loss, backward, the non-finite guard,
gradient clipping, the optimizer step and the scheduler step.

The caller hands the forward pass in as a function returning ``(loss, aux)`` (``aux``: whatever the loop wants to
log: logits, loss parts); :class:`TrainStep` owns the order of everything else, so :func:`fxqat.training.loop.fit`
and :func:`fxqat.training.lm.train_lm` update a model with the same arithmetic. A step the guard rejects
(non-finite loss or gradient) leaves parameters, buffers and optimizer state as they were; the scheduler still
advances, so the schedule stays a function of the step number.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.training.health import NonFiniteGuard
    >>> m = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> run = TrainStep(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), guard=NonFiniteGuard(m))
    >>> x = torch.ones(4, 2)
    >>> run(1, lambda: (m(x).square().mean(), None)).verdict
    'ok'
    >>> w = m.weight.detach().clone()
    >>> out = run(2, lambda: (m(x).sum() * float("nan"), None))
    >>> out.verdict, bool(torch.equal(m.weight, w))
    ('skip', True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import nn

from fxqat.training.health import NonFiniteGuard

__all__ = ["StepOutcome", "TrainStep", "Forward"]

#: the forward pass of one step: ``() -> (scalar loss, aux)``
Forward = Callable[[], Tuple[torch.Tensor, Any]]


@dataclass(frozen=True)
class StepOutcome:
    """What one :class:`TrainStep` call did.

    Attributes:
        loss: the loss as a Python float (non-finite on a rejected step).
        verdict: the guard's: ``"ok"`` (updated), ``"skip"`` (no update) or ``"stop"`` (no update; end the run).
        aux: the second value the forward function returned.
        time_s: wall time of the step, forward to scheduler step.
    """

    loss: float
    verdict: str
    aux: Any
    time_s: float


class TrainStep:
    """Forward, loss, backward, non-finite guard, clipping, optimizer and scheduler step, in that order.

    Args:
        optimizer: any torch optimizer (or one that looks like it: ``param_groups``, ``zero_grad``, ``step``).
        scheduler: stepped after every step, rejected ones included (None: no scheduler).
        clip: max gradient norm over the optimizer's parameters (None: no clipping).
        guard: a :class:`~fxqat.training.health.NonFiniteGuard` (None: every step updates, whatever its loss).
    """

    def __init__(self, optimizer, scheduler=None, *, clip: Optional[float] = None,
                 guard: Optional[NonFiniteGuard] = None) -> None:
        self.optimizer, self.scheduler, self.clip, self.guard = optimizer, scheduler, clip, guard
        self.params: List[torch.Tensor] = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, step: int, forward: Forward) -> StepOutcome:
        """Run step number ``step`` (1-based, for messages) with the loss of ``forward()``."""
        t0 = time.perf_counter()
        if self.guard is not None:
            self.guard.before_step()
        loss, aux = forward()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        verdict = self.guard.check(step, value, self.params) if self.guard is not None else "ok"
        if verdict == "ok":
            if self.clip is not None:
                nn.utils.clip_grad_norm_(self.params, self.clip)
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return StepOutcome(value, verdict, aux, time.perf_counter() - t0)
