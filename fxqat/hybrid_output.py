"""What graph-root and eager-root hybrid (block-replacement) models share: their train-mode output and the choice
of the paths run at each step.

Example:
    >>> import torch
    >>> out = HybridOutput(lp=torch.zeros(1), paths=[torch.ones(1)], fp=torch.ones(1))
    >>> len(out.paths)
    1
    >>> select_paths(HybridConfig(paths=2, seed=0), 5, step=7) == select_paths(HybridConfig(paths=2, seed=0), 5, 7)
    True
"""

from __future__ import annotations

import random
from typing import Any, List, NamedTuple, Optional, Sequence

from fxqat.config import HybridConfig

__all__ = ["HybridOutput", "select_paths"]


class HybridOutput(NamedTuple):
    """Train-mode output of a hybrid model.

    Attributes:
        lp: the LP backbone's output.
        paths: one output per executed mixed-precision path.
        fp: the FP partner's output (no grad).
        path_ids: which cut (or, in ``single`` mode, which block) each path belongs to.
        config: the model's HybridConfig (loss weights for :func:`fxqat.hybrid_loss`).
        stats: the model's :class:`~fxqat.path_losses.PathLossAverages`, which :func:`fxqat.hybrid_loss` updates
            with each step's path losses (None: not tracked).
    """

    lp: Any
    paths: List[Any]
    fp: Any
    path_ids: Sequence[int] = ()
    config: Optional[HybridConfig] = None
    stats: Optional[Any] = None


def select_paths(hybrid: HybridConfig, n_paths: int, step: int) -> List[int]:
    """The path ids run at ``step``: all, or ``hybrid.paths`` of them sampled by a generator seeded with
    ``(hybrid.seed, step)`` (identical on every rank and after a resume)."""
    k = hybrid.paths
    if k == "all" or k >= n_paths:
        return list(range(n_paths))
    rng = random.Random(hybrid.seed * 1_000_003 + int(step))
    return sorted(rng.sample(range(n_paths), k))
