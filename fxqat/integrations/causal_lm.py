"""The QAT loss of a causal language model in the Hugging Face label convention.

Labels ``(N, T)`` are the inputs themselves (``-100`` = ignored); position ``t`` predicts label ``t + 1``. Every
output is reduced to the ``M`` valid next-token positions, ``(M, C)`` logits and ``(M,)`` targets, and then:

* a :class:`~fxqat.hybrid_output.HybridOutput` (train mode of a block-replacement model):
  :func:`fxqat.training.losses.hybrid_loss` (CE + KD on the backbone and on every path, to the FP partner);
* a plain output with ``teacher_logits``: :func:`fxqat.training.losses.distillation_loss` (CE + KD to the teacher);
* a plain output: cross-entropy (the loss Hugging Face computes from ``labels``).

With ``num_items_in_batch`` (transformers.Trainer: the valid tokens of the whole accumulated batch) the mean over
this batch's ``M`` positions becomes a sum divided by it, ``loss · M / num_items_in_batch``, so gradient
accumulation weights every token equally, as Hugging Face's own loss does.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 4, 3)
    >>> labels = torch.tensor([[0, 1, 2, -100]])
    >>> loss, parts = causal_lm_loss(logits, labels)
    >>> round(float(loss), 4), round(float(parts["ce_lp"]), 4)  # uniform logits: log 3 on the 2 valid positions
    (1.0986, 1.0986)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from fxqat.config import HybridConfig
from fxqat.hybrid_output import HybridOutput
from fxqat.training.losses import distillation_loss, hybrid_loss, logits_of

__all__ = ["causal_lm_loss", "next_token_view", "IGNORE_INDEX"]

#: the label value Hugging Face ignores
IGNORE_INDEX = -100


def next_token_view(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(M, C)`` float logits and ``(M,)`` targets of the valid next-token positions of ``(N, T, C)`` logits."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: expected logits (N, T, C) and labels (N, T), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    return logits[:, :-1][keep].float(), target[keep]


def causal_lm_loss(
    outputs: Any,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    config: Optional[HybridConfig] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``(loss, detached parts)`` of a causal LM's output (see the module docstring).

    Args:
        outputs: the model's output: a ``ModelOutput``/dict/tuple with logits, a logits tensor, or a HybridOutput.
        labels: ``(N, T)`` labels, unshifted.
        teacher_logits: ``(N, T, C)`` logits of a frozen FP teacher for plain outputs (None = no distillation).
        config: loss weights (``kd_weight``, ``temperature``, ``task_weight``, ``path_weights``); default: the
            HybridOutput's config, else ``HybridConfig()``.
        num_items_in_batch: valid tokens of the accumulated batch (None = mean over this batch).
    """
    if isinstance(outputs, HybridOutput):
        lp, target = next_token_view(logits_of(outputs.lp), labels)
        view = outputs._replace(lp=lp, fp=next_token_view(logits_of(outputs.fp), labels)[0],
                                paths=[next_token_view(logits_of(p), labels)[0] for p in outputs.paths])
        total, parts = hybrid_loss(view, target, config)
    elif teacher_logits is not None:
        lp, target = next_token_view(logits_of(outputs), labels)
        teacher, _ = next_token_view(teacher_logits, labels)
        total, parts = distillation_loss(lp, teacher, target, config or HybridConfig())
    else:
        lp, target = next_token_view(logits_of(outputs), labels)
        total = F.cross_entropy(lp, target)
        parts = {"ce_lp": total.detach()}
    if target.numel() == 0:  # nothing to predict: a zero that keeps the graph (no NaN from an empty mean)
        total = lp.sum() * 0.0
    elif num_items_in_batch is not None:
        total = total * (target.numel() / num_items_in_batch)
    return total, parts
