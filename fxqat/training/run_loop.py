"""The thin loop every fxqat training run goes through: epochs of batches, one :class:`~fxqat.training.step.TrainStep`
per batch, and the hooks of the run (what a batch's loss is, what to record after a step, what to do at an epoch's
end).

The loop owns only the position (step, epoch, batch); the batches come from anything with ``__len__`` (batches per
epoch), ``set_epoch(epoch, start_batch)`` and ``__iter__`` (a :class:`fxqat.data.BatchLoader`; a language-model run
reads its seeded batch stream as one epoch). A resumed run starts from a saved :class:`Position`.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.training.step import TrainStep
    >>> class Batches:
    ...     def __len__(self): return 3
    ...     def set_epoch(self, epoch, start=0): self.start = start
    ...     def __iter__(self): return iter(torch.ones(3 - self.start, 2, 2))
    >>> class Hooks(RunHooks):
    ...     def forward(self, batch): return m(batch).square().mean(), None
    >>> m = nn.Linear(2, 1)
    >>> opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> pos = run_loop(TrainStep(opt), Batches(), Position(), stop_at=5, hooks=Hooks())
    >>> (pos.step, pos.epoch, pos.batch)
    (5, 1, 2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import torch

from fxqat.training.step import StepOutcome, TrainStep

__all__ = ["Position", "RunHooks", "run_loop", "record_nonfinite"]


@dataclass
class Position:
    """Where a run is: optimizer steps done, the current epoch and the batches of it already consumed."""

    step: int = 0
    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> Dict[str, int]:
        """The position as plain numbers (what a checkpoint stores)."""
        return asdict(self)


class RunHooks:
    """What a run does around the steps; subclasses override :meth:`forward` and any of the others."""

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Any]:
        """``(loss, aux)`` of ``batch``: the forward function of the step."""
        raise NotImplementedError

    def after_step(self, batch: Any, outcome: StepOutcome, pos: Position) -> bool:
        """Record a step (``pos`` already counts it); False ends the run at once (no epoch end)."""
        return True

    def end_epoch(self, partial: bool, pos: Position) -> None:
        """An epoch ended (``partial``: the run stopped inside it); ``pos`` is still the epoch's last position."""

    def after_epoch(self, pos: Position) -> bool:
        """After :meth:`end_epoch` and the position's move to the next epoch (a checkpoint goes here); False ends
        the run."""
        return True


def record_nonfinite(hist: Dict[str, Any], outcome: StepOutcome, pos: Position, why: str) -> bool:
    """Note a step the non-finite guard skipped or stopped in ``hist``; False when the run must end.

    Args:
        hist: the run's history (``nonfinite_steps`` gets the step; ``status``/``error`` are set on a stop).
        outcome: the step's outcome (its ``verdict`` is ``"ok"``, ``"skip"`` or ``"stop"``).
        pos: the position, already counting the step.
        why: the error text recorded when the run stops.

    Example:
        >>> from types import SimpleNamespace
        >>> hist = {"nonfinite_steps": []}
        >>> record_nonfinite(hist, SimpleNamespace(verdict="stop"), SimpleNamespace(step=3), "loss is nan")
        False
        >>> hist
        {'nonfinite_steps': [3], 'status': 'diverged', 'error': 'loss is nan'}
    """
    if outcome.verdict == "ok":
        return True
    hist["nonfinite_steps"].append(pos.step)
    if outcome.verdict == "stop":
        hist["status"], hist["error"] = "diverged", why
        return False
    return True


def run_loop(step: TrainStep, batches, pos: Position, stop_at: int, hooks: RunHooks) -> Position:
    """Run steps from ``pos`` until ``stop_at`` steps are done or a hook ends the run; returns the position.

    Args:
        step: the optimisation step.
        batches: ``len(batches)`` batches per epoch; ``set_epoch(epoch, start_batch)`` positions it.
        pos: where to start (updated in place).
        stop_at: the step count at which to stop.
        hooks: the run's hooks.
    """
    per_epoch = len(batches)
    running = True
    while pos.step < stop_at and running:
        batches.set_epoch(pos.epoch, pos.batch)
        for batch in batches:
            outcome = step(pos.step + 1, lambda batch=batch: hooks.forward(batch))
            pos.step, pos.batch = pos.step + 1, pos.batch + 1
            running = hooks.after_step(batch, outcome, pos)
            if not running or pos.step >= stop_at:
                break
        if not running:
            break
        finished = pos.batch >= per_epoch
        hooks.end_epoch(not finished, pos)
        if finished:
            pos.epoch, pos.batch = pos.epoch + 1, 0
        running = hooks.after_epoch(pos)
    return pos
