"""A region's guards checked as early as their conditions allow, before the graph changes anything outside it.

A region's graph may change an object handed to it: ``cache.update(key, value, layer_idx)`` appends to a
transformers ``DynamicCache``. Transformers' sdpa attention computes ``is_causal = q_length > 1 and ...`` *after*
that update, so the guard the tracer records there (:func:`~fxqat.capture.example_tracer.shape_guard`) would refuse
a one-token decoding step only once the cache has grown, and the call could not be run again with another graph of
the region (:mod:`fxqat.capture.variants`). :func:`hoist_guards` moves each guard, with the size arithmetic its
condition is computed from (``x.shape``, ``size[2]``, ``> 1``: pure Python operators), to right after the last
tensor it reads (the query after its rotary embedding, before the cache update). A guard that still runs after a call
on an opaque input is marked non-retryable (``GuardFailure.retryable`` is False): its failure is final.

Example:
    >>> import torch, torch.fx as fx
    >>> from fxqat.capture.example_tracer import shape_guard
    >>> g = fx.Graph(); x = g.placeholder("x"); cache = g.placeholder("cache")
    >>> _ = g.call_method("update", (cache, x))
    >>> size = g.call_function(getattr, (x, "shape")); n = g.call_function(__import__("operator").getitem, (size, 1))
    >>> gt = g.call_function(__import__("operator").gt, (n, 1)); _ = g.call_function(shape_guard, (gt, True, "q"))
    >>> _ = g.output(x)
    >>> hoist_guards(g, 1)
    >>> [node.name for node in g.nodes][:6]
    ['x', 'cache', 'getattr_1', 'getitem', 'gt', 'shape_guard']
"""

from __future__ import annotations

import builtins
import operator
from typing import Dict, List, Set

import torch.fx as fx

from fxqat.capture.example_tracer import is_guard

__all__ = ["hoist_guards"]

_SIZE_METHODS = ("size", "dim")
_PURE_FUNCTIONS = (builtins.getattr, builtins.len, operator.getitem, operator.gt, operator.ge, operator.lt,
                   operator.le, operator.eq, operator.ne, operator.not_, operator.truth, operator.and_, operator.or_,
                   operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg)


def _cheap(node: fx.Node) -> bool:
    """A node computing a Python value from sizes: comparisons and arithmetic, ``getattr`` (``x.shape``),
    ``size[i]``, ``x.size()``, ``x.dim()`` (side-effect free, so moving them earlier changes nothing)."""
    if node.op == "call_function":
        return node.target in _PURE_FUNCTIONS
    return node.op == "call_method" and node.target in _SIZE_METHODS


def _move_early(graph: fx.Graph, guard: fx.Node) -> None:
    order: Dict[fx.Node, int] = {n: i for i, n in enumerate(graph.nodes)}
    chain: Set[fx.Node] = set()
    boundary: List[fx.Node] = []
    stack = list(guard.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in chain:
            continue
        if _cheap(node):
            chain.add(node)
            stack.extend(node.all_input_nodes)
        else:
            boundary.append(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = max(boundary, key=order.__getitem__) if boundary else None
    if anchor is None or anchor.op == "placeholder":  # placeholders stay together, first
        anchor = placeholders[-1] if placeholders else None
    if anchor is None:
        return
    cur = anchor
    for node in sorted(chain, key=order.__getitem__) + [guard]:
        if order[node] > order[anchor]:  # nodes already before the anchor stay where they are
            cur.append(node)
            cur = node


def hoist_guards(graph: fx.Graph, n_opaque: int) -> None:
    """Move every guard of ``graph`` early (module docstring) and mark those still after a call on one of its last
    ``n_opaque`` placeholders (the opaque inputs) non-retryable. In place."""
    for guard in [n for n in graph.nodes if is_guard(n)]:
        _move_early(graph, guard)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    opaque = set(placeholders[len(placeholders) - n_opaque:]) if n_opaque else set()
    changed = False
    for node in graph.nodes:
        if is_guard(node):
            if changed:
                node.args = (*node.args[:3], False)
        elif node.op != "placeholder" and opaque.intersection(node.all_input_nodes):
            changed = True
