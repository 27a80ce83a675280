"""subgraph: sub-graphs between cut nodes, as views that share the root's modules.

A *cut* is a node every input→output path passes through (see :mod:`fxqat.graph`), so everything after a cut
depends on the inputs only through it. That makes three sub-graphs well defined, all built by :func:`extract`:

* the whole graph returning extra outputs (``outputs=["out", cut_1, ...]``),
* a suffix ``cut_i → output`` (``inputs=[cut_i]``),
* one block ``cut_{i-1} → cut_i``.

:func:`view` turns a sub-graph into a ``GraphModule`` whose submodules *are* the root's (same objects, same
``Parameter``\\ s, same run-time ``training`` flags), so nothing is copied or computed twice.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.trace import trace
    >>> gm = trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    >>> tail = view(gm, extract(gm.graph, inputs=["_1"]))
    >>> x = torch.randn(4, 2)
    >>> bool(torch.equal(tail(torch.relu(gm.get_submodule("0")(x))), gm(x)))
    True
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch.fx as fx
from torch import nn

from fxqat.graph.nxview import is_constant_input
from fxqat.trace import adopt_hierarchy

__all__ = ["extract", "view", "OUTPUT"]

OUTPUT = "output"  # name standing for the graph's own output value in ``outputs``


def extract(graph: fx.Graph, inputs: Optional[Sequence[str]] = None, outputs: Sequence[str] = (OUTPUT,)) -> fx.Graph:
    """Copy the part of ``graph`` that computes ``outputs`` from ``inputs``.

    Args:
        graph: the source graph (not modified).
        inputs: node names that become the new placeholders (None: the graph's own placeholders).
        outputs: node names to return; ``"output"`` stands for the graph's output value. One name returns the value
            itself, several return a tuple.

    Constant inputs (:func:`fxqat.graph.nxview.is_constant_input`, e.g. ``attn_mask=None``) that the outputs read
    stay inputs of the sub-graph, after ``inputs`` and with their defaults: ``sub(h)`` runs them with the default,
    ``sub(h, attn_mask=m)`` passes a value.

    Raises:
        ValueError: when an output needs a value that is neither derivable from ``inputs`` nor free of inputs
            (``inputs`` is then not a cut).

    Example:
        >>> import torch
        >>> from torch import fx
        >>> def f(x, scale=None):
        ...     h = torch.relu(x)
        ...     return h * 2 if scale is None else h * scale
        >>> gm = fx.symbolic_trace(f)
        >>> sub = extract(gm.graph, ["relu"])
        >>> [(n.name, n.args) for n in sub.nodes if n.op == "placeholder"]
        [('relu', ()), ('scale', (None,))]
    """
    by_name = {n.name: n for n in graph.nodes}
    missing = [n for n in list(inputs or ()) + [o for o in outputs if o != OUTPUT] if n not in by_name]
    if missing:
        raise ValueError(f"extract: no node named {missing} in the graph.")
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    stops = {by_name[n] for n in inputs} if inputs is not None else set()
    targets = [by_name[o] for o in outputs if o != OUTPUT]
    if OUTPUT in outputs:
        targets += _flat_nodes(out_node.args[0])
    # everything the outputs need, walking back until an input
    needed, stack = set(), list(targets)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node not in stops:
            stack.extend(node.all_input_nodes)
    if inputs is not None:
        leaked = [n.name for n in needed if n.op == "placeholder" and n not in stops and not is_constant_input(n)]
        if leaked:
            raise ValueError(
                f"extract: the outputs depend on {leaked} other than through {list(inputs)}: those inputs are not a cut."
            )
    new = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    if inputs is not None:
        for name in inputs:
            env[by_name[name]] = new.placeholder(name)
        for node in graph.nodes:
            if node in needed and node not in env and is_constant_input(node):
                env[node] = new.node_copy(node)
    for node in graph.nodes:
        if node in needed and node not in env:
            env[node] = new.node_copy(node, lambda a: env[a])
        elif node.op == "placeholder" and inputs is None:
            env[node] = new.node_copy(node)  # keep the signature even for unused inputs
    results = []
    for name in outputs:
        results.append(fx.node.map_arg(out_node.args[0], lambda a: env[a]) if name == OUTPUT else env[by_name[name]])
    new.output(results[0] if len(results) == 1 else tuple(results))
    new.lint()
    return new


def _flat_nodes(val) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg(val, lambda a: found.append(a) or a)
    return found


def view(root: nn.Module, graph: fx.Graph, name: str = "View") -> fx.GraphModule:
    """A GraphModule running ``graph`` on ``root``'s own submodules (nothing copied)."""
    gm = fx.GraphModule(root, graph, name)
    adopt_hierarchy(gm, root)
    gm.train(root.training)
    return gm
