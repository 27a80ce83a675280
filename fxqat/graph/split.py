"""Prefix and suffix graphs of a block partition: run the model up to a cut, or from a cut to the output.

With blocks ``B_0 .. B_{n-1}`` from :func:`fxqat.graph.partition` and ``h_i`` the activation at the exit of ``B_i``:

* ``prefix_module(gm, blocks, i)(*inputs) == h_i`` (blocks ``0..i``);
* ``suffix_module(gm, blocks, i)(h_i) == gm(*inputs)`` (blocks ``i+1..n-1``, the model's output structure).

So ``suffix_module(gm, blocks, i)(prefix_module(gm, blocks, i)(x))`` reproduces ``gm(x)`` bit for bit: the same
operations run in the same order on the same tensors. Both modules share ``gm``'s submodules and ``Parameter``
objects (``GraphModule(gm, graph)`` copies references, not values), so training either trains ``gm``.

:func:`copy_blocks` is the building block for passes that assemble their own graphs (the hybrid FP/LP graph): it
copies a range of blocks into any ``fx.Graph`` given the value of the range's entry, optionally renaming module and
attribute targets (e.g. to point at an FP partner's copy of the submodules).

Notes:
    * free nodes (``get_attr``, constants) of earlier blocks that a copied node reads are copied on demand, so they
      are *recomputed*: a free factory call with randomness (``torch.randn(3)``) would differ between runs;
    * dead nodes (``torch._assert``...) are copied when their inputs are available and skipped otherwise;
    * when the last block ends at the ``output`` node (several output producers), its "activation" is the whole
      output structure: ``prefix_module(gm, blocks, n - 1)`` returns it and ``suffix_module(gm, blocks, n - 1)`` is
      the identity.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from fxqat.graph import partition
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> blocks = partition(gm)
    >>> pre, suf = prefix_module(gm, blocks, 0), suffix_module(gm, blocks, 0)
    >>> x = torch.randn(3, 4)
    >>> torch.equal(suf(pre(x)), gm(x)), pre(x).shape
    (True, torch.Size([3, 8]))
    >>> suf.get_submodule("2").weight is gm.get_submodule("2").weight
    True
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch.fx as fx

from fxqat.graph.blocks import Block
from fxqat.graph.nxview import dead_nodes, free_nodes, to_networkx

__all__ = ["copy_blocks", "exit_value", "prefix_module", "suffix_module"]

log = logging.getLogger(__name__)


def _check_index(blocks: Sequence[Block], i: int) -> None:
    if not 0 <= i < len(blocks):
        raise IndexError(f"block index {i} is out of range: the partition has {len(blocks)} blocks (0..{len(blocks) - 1}).")


def _copy_node(
    node: fx.Node, graph: fx.Graph, env: Dict[fx.Node, fx.Node], rename_target: Optional[Callable[[str], str]]
) -> None:
    new = graph.node_copy(node, lambda a: env[a])
    if rename_target is not None and node.op in ("call_module", "get_attr"):
        new.target = rename_target(str(node.target))
    env[node] = new


def _copy_free(
    node: fx.Node, graph: fx.Graph, env: Dict[fx.Node, fx.Node], rename_target: Optional[Callable[[str], str]]
) -> None:
    """Copies a free node and, first, the free nodes it reads (they never read a placeholder)."""
    for arg in node.all_input_nodes:
        if arg not in env:
            _copy_free(arg, graph, env, rename_target)
    _copy_node(node, graph, env, rename_target)


def copy_blocks(
    gm: fx.GraphModule,
    blocks: Sequence[Block],
    start: int,
    stop: int,
    graph: fx.Graph,
    env: Dict[fx.Node, fx.Node],
    rename_target: Optional[Callable[[str], str]] = None,
) -> None:
    """Copies the nodes of ``blocks[start:stop]`` into ``graph``, in order.

    Args:
        gm: the partitioned GraphModule.
        blocks: its partition.
        start: first block to copy.
        stop: one past the last block to copy.
        graph: the destination graph (nodes are appended at its current insertion point).
        env: maps ``gm``'s nodes to their values in ``graph``; it must hold the entry of ``blocks[start]`` (the
            previous block's exit node, or every placeholder when ``start == 0``) and is updated with every copy.
        rename_target: applied to the ``target`` of copied ``call_module``/``get_attr`` nodes (default: unchanged).

    Raises:
        RuntimeError: when a copied node reads a tensor that is neither in ``env``, nor in the copied blocks, nor
            free (a partition that does not belong to ``gm``).

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> from fxqat.graph import partition
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)))
        >>> blocks = partition(gm)
        >>> g = fx.Graph()
        >>> x = next(iter(gm.graph.nodes))  # the placeholder: block 0's entry
        >>> env = {x: g.placeholder("x")}
        >>> copy_blocks(gm, blocks, 0, 1, g, env, rename_target=lambda t: "fp." + t)
        >>> [n.target for n in g.nodes if n.op == "call_module"]
        ['fp.0', 'fp.1']
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    view = to_networkx(gm.graph)
    free, dead = free_nodes(view), dead_nodes(view)

    def copy(node: fx.Node) -> None:
        _copy_node(node, graph, env, rename_target)

    for block in blocks[start:stop]:
        for name in block.nodes:
            node = by_name[name]
            if node in env:
                continue
            missing = [a for a in node.all_input_nodes if a not in env]
            if any(a.name not in free for a in missing):
                if name in dead:
                    log.debug("skipping dead node %s: its inputs are outside the copied blocks", name)
                    continue
                raise RuntimeError(
                    f"node {name!r} of block {block.name!r} reads "
                    f"{[a.name for a in missing if a.name not in free]}, which is not available after the cut "
                    f"{blocks[start].entry!r}; was this partition computed on this GraphModule?"
                )
            for arg in missing:
                _copy_free(arg, graph, env, rename_target)
            copy(node)


def exit_value(gm: fx.GraphModule, block: Block, env: Dict[fx.Node, fx.Node]) -> Any:
    """The value of ``block.exit`` in a copied graph: ``env[exit node]``, or the mapped output structure when the
    block ends at the ``output`` node.

    Example:
        >>> from torch import fx, nn
        >>> from fxqat.graph import partition
        >>> gm = fx.symbolic_trace(nn.ReLU())
        >>> out = next(n for n in gm.graph.nodes if n.op == "output")
        >>> exit_value(gm, partition(gm)[0], {out.args[0]: "relu'"})
        "relu'"
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    node = by_name[block.exit]
    if node.op == "output":
        return fx.map_arg(node.args[0], lambda a: env[a])
    return env[node]


def prefix_module(gm: fx.GraphModule, blocks: Sequence[Block], i: int) -> fx.GraphModule:
    """A GraphModule with ``gm``'s inputs that computes blocks ``0..i`` and returns the activation at cut ``i``.

    Args:
        gm: the partitioned GraphModule (its submodules and parameters are shared, not copied).
        blocks: its partition.
        i: index of the last block to run.

    Returns:
        A ``GraphModule`` whose forward takes the same arguments as ``gm`` and returns ``blocks[i].exit``'s value.

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> from fxqat.graph import partition
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        >>> prefix_module(gm, partition(gm), 0)(torch.ones(1, 2)).shape
        torch.Size([1, 3])
    """
    _check_index(blocks, i)
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.node_copy(node)
    copy_blocks(gm, blocks, 0, i + 1, graph, env)
    graph.output(exit_value(gm, blocks[i], env))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Prefix{i}")


def suffix_module(gm: fx.GraphModule, blocks: Sequence[Block], i: int) -> fx.GraphModule:
    """A GraphModule that takes the activation at cut ``i`` and computes blocks ``i+1..n-1`` (the model's output).

    Args:
        gm: the partitioned GraphModule (its submodules and parameters are shared, not copied).
        blocks: its partition.
        i: index of the block whose exit is fed in; ``len(blocks) - 1`` gives an identity-like module.

    Returns:
        A ``GraphModule`` with one input (named after ``blocks[i].exit``) returning what ``gm`` returns.

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> from fxqat.graph import partition
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
        >>> blocks = partition(gm)
        >>> x = torch.ones(1, 2)
        >>> torch.equal(suffix_module(gm, blocks, 0)(prefix_module(gm, blocks, 0)(x)), gm(x))
        True
    """
    _check_index(blocks, i)
    by_name = {n.name: n for n in gm.graph.nodes}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    graph = fx.Graph()
    entry = by_name[blocks[i].exit]
    placeholder = graph.placeholder(blocks[i].exit if entry.op != "output" else "outputs")
    if entry.op == "output":
        graph.output(placeholder)
    else:
        env: Dict[fx.Node, fx.Node] = {entry: placeholder}
        copy_blocks(gm, blocks, i + 1, len(blocks), graph, env)
        free = free_nodes(to_networkx(gm.graph))
        missing: List[fx.Node] = []
        fx.map_arg(output.args[0], lambda a: missing.append(a) if a not in env else None)
        for node in missing:
            if node.name not in free:
                raise RuntimeError(f"the output reads {node.name!r}, which the suffix after cut {i} lacks.")
            if node not in env:
                _copy_free(node, graph, env, None)
        graph.output(fx.map_arg(output.args[0], lambda a: env[a]))
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Suffix{i}")
