"""Blocks of an eager-root model: a verified chain of layers (a ModuleList of transformer layers) plus prefix and suffix.

A container (``nn.ModuleList`` / ``nn.Sequential``) is a *chain* when, on the example inputs, each of its children was
called exactly once, in order, and each child's first tensor input **is** (same tensor object) the previous child's
first tensor output: the hidden state flows from layer to layer. This is verified from the recorded calls, never
assumed from names. The chain holding the most weight layers gives the blocks: one per layer, plus the modules called
before the first layer (embeddings: the *prefix*) and after the last one (final norm, head: the *suffix*) as blocks
of their own when they hold a quantized layer (otherwise they join the neighbouring block).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.capture.record import record_calls
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]), nn.Linear(4, 2))
    >>> calls, _ = record_calls(net, (torch.randn(2, 4),), {}, lambda m: isinstance(m, nn.Linear))
    >>> find_chain(net, calls, lambda m: isinstance(m, nn.Linear))  # the root Sequential is the longest chain
    ('', ('0', '1', '2'))
    >>> find_chain(net[1], record_calls(net[1], (torch.randn(2, 4),), {}, lambda m: True)[0], lambda m: True)
    ('', ('0', '1', '2'))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxqat.capture.record import Call

__all__ = ["find_chain", "ChainCut", "first_tensor"]


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor in a (nested) structure, or None."""
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "to_tuple") and callable(obj.to_tuple):  # transformers ModelOutput
        obj = obj.to_tuple()
    for leaf in pytree.tree_leaves(obj):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


def _call_input(call: Call) -> Optional[torch.Tensor]:
    return first_tensor((call.args, call.kwargs)) if call.args or call.kwargs else None


def find_chain(
    model: nn.Module, calls: Dict[str, Call], is_layer: Callable[[nn.Module], bool],
) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """The container whose children form the longest verified chain (by weight layers held), or None."""
    best, best_weight = None, 0
    for cname, cont in model.named_modules():
        if not isinstance(cont, (nn.ModuleList, nn.Sequential)) or len(cont) < 2:
            continue
        names = [f"{cname}.{k}" if cname else k for k, _ in cont.named_children()]
        if any(n not in calls or calls[n].n_calls != 1 for n in names):
            continue
        seqs = [calls[n].seq for n in names]
        if seqs != sorted(seqs):
            continue
        linked = all(
            _call_input(calls[b]) is not None and _call_input(calls[b]) is first_tensor(calls[a].output)
            for a, b in zip(names, names[1:])
        )
        weight = sum(1 for m in cont.modules() if is_layer(m))
        if linked and weight > best_weight and all(any(is_layer(m) for m in c.modules()) for c in cont.children()):
            best, best_weight = (cname, tuple(names)), weight
    return best


@dataclass(frozen=True)
class ChainCut:
    """Where block ``index`` ends: the output of chain layer ``layer`` (``kind="out"``), its input (``"in"``), or
    the node ``node`` inside its graph (``"inside"``, :mod:`fxqat.capture.inner_cuts`)."""

    index: int
    layer: str
    kind: str
    node: str = ""
