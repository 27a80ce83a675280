"""Progressive bit-width fine-tuning (QIL, methods.md §2): FP → 5 → 4 → 3 → 2 bits, each stage from the last.

QIL reports that lowering the bit-width in stages matters most at 2 bits (ImageNet ResNet-18 W2A2: 65.7 %
progressive vs 56.0 % direct). The helper owns only the schedule; the caller owns training through one callable::

    train_stage(bits, state_or_None) -> state_dict

The first stage receives ``initial_state`` (None: start from the full-precision model, e.g. a fresh
``prepare_qat`` at that bit-width); every later stage receives the state the previous stage returned.

Example:
    >>> def train_stage(bits, state):
    ...     start = 0 if state is None else state["steps"]
    ...     return {"steps": start + 10, "bits": bits}
    >>> [(b, s["steps"]) for b, s in progressive_bits(train_stage, bits=(5, 4, 3, 2))]
    [(5, 10), (4, 20), (3, 30), (2, 40)]
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = ["progressive_bits", "iter_progressive", "stage_config"]

log = logging.getLogger(__name__)

State = Mapping[str, Any]
TrainStage = Callable[[int, Optional[State]], State]


def _check_bits(bits: Sequence[int]) -> Tuple[int, ...]:
    bits = tuple(bits)
    if not bits:
        raise ValueError("progressive_bits: bits is empty; give the stages in order, e.g. bits=(5, 4, 3, 2).")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 16:
            raise ValueError(f"progressive_bits: stage bit-width {b!r} is not an integer from 1 to 16.")
    return bits


def iter_progressive(
    train_stage: TrainStage, bits: Sequence[int] = (5, 4, 3, 2), initial_state: Optional[State] = None
) -> Iterator[Tuple[int, State]]:
    """Run the stages lazily, yielding ``(bits, state_dict)`` after each one.

    Stopping the iteration early skips the remaining stages (e.g. when a stage's accuracy is already too low).
    """
    state = initial_state
    for b in _check_bits(bits):
        log.info("progressive_bits: stage %d bits (start from %s)", b, "FP" if state is None else "previous stage")
        state = train_stage(b, state)
        if state is None:
            raise ValueError(f"progressive_bits: train_stage({b}, ...) returned None; return the model's state_dict().")
        yield b, state


def progressive_bits(
    train_stage: TrainStage, bits: Sequence[int] = (5, 4, 3, 2), initial_state: Optional[State] = None
) -> List[Tuple[int, State]]:
    """Run every stage and return ``[(bits, state_dict), ...]`` in stage order (the last one is the result)."""
    return list(iter_progressive(train_stage, bits, initial_state))


def stage_config(config, bits: int, weights: bool = True, activations: bool = True):
    """``config`` (a :class:`fxqat.QATConfig`) with ``w_bits`` and/or ``a_bits`` set to ``bits``.

    Example:
        >>> from fxqat.config import QATConfig
        >>> c = stage_config(QATConfig(method="qil"), 3)
        >>> (c.w_bits, c.a_bits)
        (3, 3)
    """
    changes = {}
    if weights:
        changes["w_bits"] = bits
    if activations:
        changes["a_bits"] = bits
    return config.with_(**changes)
