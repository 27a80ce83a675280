"""A cache argument that may also be ``None``: one graph region for ``use_cache=True`` and ``use_cache=False``.

A decoder layer captured from a call with a ``DynamicCache`` takes the cache as an opaque input and its graph calls
``cache.update(key, value, layer_idx)``. Called with ``None`` there (a ``Trainer`` trains with ``use_cache=False``),
the layer's own code skips the update. The region runs that call too, with :data:`NO_CACHE` in place of ``None`` (an
object whose ``update`` hands the keys and values back), where that is provably the same code, decided exactly like
the passed-on ``None`` mask of :func:`fxqat.capture.region.trace_region`: the module traced with ``None`` fixed there
and traced with :data:`NO_CACHE` fixed there must be the same program, op for op (:func:`nullable_slots`). Code that
asks the cache anything else (``cache.get_seq_length()``) fails to trace with :data:`NO_CACHE`, and the region then
refuses ``None`` there with a clear error.

Example:
    >>> import torch
    >>> k, v = torch.ones(1), torch.zeros(1)
    >>> NO_CACHE.update(k, v, 0)[0] is k
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Tuple

import torch

from fxqat.capture.modes import same_program
from fxqat.trace import TraceFailure

__all__ = ["NoCache", "NO_CACHE", "nullable_slots"]


class NoCache:
    """Stands in for ``None`` at a cache argument: ``update`` returns the keys and values it is given."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        return key_states, value_states

    def __repr__(self) -> str:
        return "NO_CACHE"


NO_CACHE = NoCache()


def nullable_slots(binding: Any, trace_with: Callable[[Any], Any]) -> Tuple[int, ...]:
    """The opaque leaves of ``binding`` (a :class:`~fxqat.capture.region.Binding`) where ``None`` and
    :data:`NO_CACHE` trace to the same program; ``trace_with(binding)`` traces the module for a binding."""
    out: List[int] = []
    for i, _ in binding.opaque:
        rest = tuple(x for x in binding.opaque if x[0] != i)
        as_none = dataclasses.replace(binding, constants=binding.constants + ((i, None),), opaque=rest)
        as_null = dataclasses.replace(binding, constants=binding.constants + ((i, NO_CACHE),), opaque=rest)
        try:
            a, b = trace_with(as_none), trace_with(as_null)
        except TraceFailure:
            continue
        if same_program(a.graph, b.graph, len(as_none.inputs)):
            out.append(i)
    return tuple(out)
