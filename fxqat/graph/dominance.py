"""Dominators and cut nodes of a single-source, single-sink DAG.

A node ``d`` *dominates* ``n`` (from ``start``) when every path ``start -> n`` passes through ``d``; it
*post-dominates* ``n`` (towards ``end``) when every path ``n -> end`` does, i.e. when it dominates ``n`` in the
reversed graph started from ``end``. The nodes that lie on *every* ``source -> sink`` path (the *cut nodes*) are the
dominators of the sink, which are also the post-dominators of the source; :func:`cut_nodes` returns the intersection
of the two chains, so a node is reported only when both analyses agree.

networkx's :func:`~networkx.immediate_dominators` changed its contract across releases: up to 3.4 the returned
mapping contains ``start: start``, from 3.5 on it leaves ``start`` out. :func:`immediate_dominators` normalises this
in one place (``start`` is never a key) and every other function goes through it.

The underlying algorithm is the iterative one of Cooper, Harvey and Kennedy, which networkx implements.

References:
    Keith D. Cooper, Timothy J. Harvey, Ken Kennedy. "A Simple, Fast Dominance Algorithm".
    Software Practice & Experience 4:1-10, 2001. https://hdl.handle.net/1911/96345

Example:
    >>> import networkx as nx
    >>> g = nx.DiGraph([("s", "a"), ("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "t")])
    >>> cut_nodes(g, "s", "t")
    ['a', 'd']
"""

from __future__ import annotations

import logging
from typing import Dict, Hashable, List

import networkx as nx

from fxqat.graph.nxview import SINK, SOURCE

__all__ = ["immediate_dominators", "dominator_chain", "sink_dominators", "source_postdominators", "cut_nodes"]

log = logging.getLogger(__name__)


def immediate_dominators(graph: nx.DiGraph, start: Hashable) -> Dict[Hashable, Hashable]:
    """Immediate dominator of every node reachable from ``start``; ``start`` itself is never a key.

    Args:
        graph: a directed graph.
        start: the entry node.

    Returns:
        ``{node: idom(node)}`` for every node reachable from ``start`` except ``start``.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph([(1, 2), (1, 3), (2, 5), (3, 4), (4, 5)])
        >>> sorted(immediate_dominators(g, 1).items())
        [(2, 1), (3, 1), (4, 3), (5, 1)]
    """
    idom = dict(nx.immediate_dominators(graph, start))
    idom.pop(start, None)  # networkx <= 3.4 maps start to itself, >= 3.5 omits it
    return idom


def dominator_chain(graph: nx.DiGraph, start: Hashable, node: Hashable) -> List[Hashable]:
    """All dominators of ``node`` from ``start``, ordered ``[start, ..., node]``.

    Returns ``[]`` when ``node`` is not reachable from ``start``.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph([(1, 2), (1, 3), (2, 5), (3, 4), (4, 5), (5, 6)])
        >>> dominator_chain(g, 1, 6)
        [1, 5, 6]
    """
    if node == start:
        return [start]
    idom = immediate_dominators(graph, start)
    if node not in idom:
        return []
    chain = [node]
    while chain[-1] != start:
        chain.append(idom[chain[-1]])
    chain.reverse()
    return chain


def sink_dominators(graph: nx.DiGraph, source: Hashable = SOURCE, sink: Hashable = SINK) -> List[Hashable]:
    """The dominator chain of ``sink``, ordered ``[source, ..., sink]``.

    Example:
        >>> import networkx as nx
        >>> sink_dominators(nx.DiGraph([("s", "a"), ("s", "b"), ("a", "c"), ("b", "c"), ("c", "t")]), "s", "t")
        ['s', 'c', 't']
    """
    return dominator_chain(graph, source, sink)


def source_postdominators(graph: nx.DiGraph, source: Hashable = SOURCE, sink: Hashable = SINK) -> List[Hashable]:
    """The post-dominator chain of ``source`` (dominators in the reversed graph), ordered ``[source, ..., sink]``.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph([("s", "a"), ("a", "b"), ("a", "c"), ("b", "t"), ("c", "t")])
        >>> source_postdominators(g, "s", "t")
        ['s', 'a', 't']
    """
    chain = dominator_chain(graph.reverse(copy=False), sink, source)
    chain.reverse()
    return chain


def cut_nodes(graph: nx.DiGraph, source: Hashable = SOURCE, sink: Hashable = SINK) -> List[Hashable]:
    """Nodes on every ``source -> sink`` path, in path order, ``source`` and ``sink`` excluded.

    The result is the intersection of :func:`sink_dominators` and :func:`source_postdominators`; it is ``[]`` when
    ``sink`` is not reachable from ``source``.

    Example:
        >>> import networkx as nx
        >>> g = nx.DiGraph([("s", "a"), ("a", "b"), ("b", "t"), ("a", "t")])
        >>> cut_nodes(g, "s", "t")
        ['a']
    """
    dom = sink_dominators(graph, source, sink)
    post = set(source_postdominators(graph, source, sink))
    cuts = [n for n in dom if n in post and n not in (source, sink)]
    if len(cuts) != len(dom) - 2 and dom:
        log.debug("dominator and post-dominator chains differ: %s vs %s", dom, sorted(post, key=str))
    return cuts
