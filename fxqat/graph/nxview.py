"""A networkx view of a ``torch.fx.Graph`` for path analysis.

The view is a :class:`networkx.DiGraph` whose nodes are the fx node *names* and whose edges are the data
dependencies (``node.all_input_nodes``). Two virtual nodes make the graph single-entry, single-exit:

* :data:`SOURCE` (``"__source__"``) has an edge to every ``placeholder``;
* :data:`SINK` (``"__sink__"``) is fed by the ``output`` node.

Nodes are classified by reachability:

* **path** nodes lie on some ``SOURCE -> SINK`` path: they carry the model's data flow and are what the dominator
  analysis (:mod:`fxqat.graph.dominance`) cuts;
* **free** nodes are not reachable from any placeholder (``get_attr``, constants, factory calls such as
  ``torch.zeros``): they can be recomputed anywhere and take no part in the path analysis;
* **dead** nodes are reachable from a placeholder but no output depends on them (``torch._assert`` calls, unused
  ``x.size()``).

*Constant inputs* (:func:`is_constant_input`: a placeholder with a non-tensor default, such as ``attn_mask=None`` or
``is_causal=False``, that shape propagation did not see as a tensor) get no edge from :data:`SOURCE`: they are
configuration, not data, so their readers (every attention block of a timm ViT) are free to be cut between.

Each view node carries the attributes ``op`` (fx opcode, or ``"source"``/``"sink"``), ``target`` (``str`` of the fx
target) and ``order`` (position in ``graph.nodes``; -1 for the source, ``len(graph.nodes)`` for the sink).

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    >>> g = to_networkx(gm)
    >>> list(g.successors(SOURCE)), list(g.predecessors(SINK))
    (['input_1'], ['output'])
    >>> sorted(path_nodes(g))
    ['_0', '_1', 'input_1', 'output']
"""

from __future__ import annotations

import logging
from typing import Set, Union

import networkx as nx
import torch.fx as fx

__all__ = ["SOURCE", "SINK", "to_networkx", "path_nodes", "free_nodes", "dead_nodes", "is_constant_input"]

log = logging.getLogger(__name__)

SOURCE = "__source__"
SINK = "__sink__"


def is_constant_input(node: fx.Node) -> bool:
    """Whether ``node`` is a placeholder that carries configuration rather than data.

    True for a placeholder whose default value (``node.args[0]``) is ``None``, a ``bool``, a number or a string and
    that holds no ``tensor_meta`` (shape propagation records it only for inputs that were tensors). timm's
    ``VisionTransformer.forward(x, attn_mask=None, is_causal=False)`` traces to two such placeholders, both read by
    every block. Callers of sub-graphs that read one (:func:`fxqat.graph.subgraph.extract`) get it as a keyword
    input with the same default.

    Example:
        >>> from torch import fx
        >>> def f(x, mask=None, causal=False):
        ...     return x + 1
        >>> [is_constant_input(n) for n in fx.symbolic_trace(f).graph.nodes if n.op == "placeholder"]
        [False, True, True]
    """
    if node.op != "placeholder" or not node.args or "tensor_meta" in node.meta:
        return False
    return node.args[0] is None or isinstance(node.args[0], (bool, int, float, str))


def to_networkx(graph: Union[fx.Graph, fx.GraphModule]) -> nx.DiGraph:
    """Builds the networkx view of ``graph`` (a ``torch.fx.Graph`` or a ``GraphModule``).

    Args:
        graph: the fx graph; a ``GraphModule`` is read through its ``.graph``.

    Returns:
        A new ``DiGraph`` over node names plus :data:`SOURCE` and :data:`SINK` (see the module docstring).

    Raises:
        ValueError: when an fx node is named like one of the virtual nodes.

    Example:
        >>> import torch
        >>> from torch import fx
        >>> def f(x, y):
        ...     return torch.relu(x) + y
        >>> g = to_networkx(fx.symbolic_trace(f))
        >>> sorted(g.edges)[:3]
        [('__source__', 'x'), ('__source__', 'y'), ('add', 'output')]
    """
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    view = nx.DiGraph()
    view.add_node(SOURCE, op="source", target="", order=-1)
    count = 0
    for count, node in enumerate(graph.nodes):
        if node.name in (SOURCE, SINK):
            raise ValueError(f"fx node {node.name!r} clashes with fxqat's virtual node names; rename it.")
        view.add_node(node.name, op=node.op, target=str(node.target), order=count)
        for arg in node.all_input_nodes:
            view.add_edge(arg.name, node.name)
        if node.op == "placeholder" and not is_constant_input(node):
            view.add_edge(SOURCE, node.name)
        elif node.op == "output":
            view.add_edge(node.name, SINK)
    view.add_node(SINK, op="sink", target="", order=count + 1)
    return view


def _real(nodes: Set[str]) -> Set[str]:
    return {n for n in nodes if n not in (SOURCE, SINK)}


def path_nodes(view: nx.DiGraph) -> Set[str]:
    """Names of the fx nodes on at least one ``SOURCE -> SINK`` path.

    Example:
        >>> from torch import fx
        >>> def f(x):
        ...     x.size()            # dead
        ...     return x + 1
        >>> sorted(path_nodes(to_networkx(fx.symbolic_trace(f))))
        ['add', 'output', 'x']
    """
    forward = nx.descendants(view, SOURCE)
    backward = nx.ancestors(view, SINK)
    return _real(forward & backward)


def free_nodes(view: nx.DiGraph) -> Set[str]:
    """Names of the fx nodes not reachable from any placeholder (``get_attr``, constants, factory calls).

    Example:
        >>> import torch
        >>> from torch import fx
        >>> def f(x):
        ...     return x + torch.ones(1)
        >>> sorted(free_nodes(to_networkx(fx.symbolic_trace(f))))
        ['_tensor_constant0']
    """
    return _real(set(view.nodes) - nx.descendants(view, SOURCE))


def dead_nodes(view: nx.DiGraph) -> Set[str]:
    """Names of the fx nodes reachable from a placeholder that no output depends on.

    Example:
        >>> from torch import fx
        >>> def f(x):
        ...     x.size()
        ...     return x + 1
        >>> sorted(dead_nodes(to_networkx(fx.symbolic_trace(f))))
        ['size']
    """
    return _real(nx.descendants(view, SOURCE) - nx.ancestors(view, SINK))
