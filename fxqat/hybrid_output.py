"""The train-mode output of a hybrid (block-replacement) model, shared by graph-root and eager-root models.

Example:
    >>> import torch
    >>> out = HybridOutput(lp=torch.zeros(1), paths=[torch.ones(1)], fp=torch.ones(1))
    >>> len(out.paths)
    1
"""

from __future__ import annotations

from typing import Any, List, NamedTuple, Optional, Sequence

from fxqat.config import HybridConfig

__all__ = ["HybridOutput"]


class HybridOutput(NamedTuple):
    """Train-mode output of a hybrid model.

    Attributes:
        lp: the LP backbone's output.
        paths: one output per executed mixed-precision path.
        fp: the FP partner's output (no grad).
        path_ids: which cut (or, in ``single`` mode, which block) each path belongs to.
        config: the model's HybridConfig (loss weights for :func:`fxqat.hybrid_loss`).
    """

    lp: Any
    paths: List[Any]
    fp: Any
    path_ids: Sequence[int] = ()
    config: Optional[HybridConfig] = None
