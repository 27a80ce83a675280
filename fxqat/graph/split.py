"""Prefix and suffix graphs of a block partition: run the model up to a cut, or from a cut to the output.

With blocks ``B_0 .. B_{n-1}`` from :func:`fxqat.graph.partition` and ``h_i`` the activation at the exit of ``B_i``:

* ``prefix_module(gm, blocks, i)(*inputs) == h_i`` (blocks ``0..i``);
* ``suffix_module(gm, blocks, i)(h_i) == gm(*inputs)`` (blocks ``i+1..n-1``, the model's output structure).

So ``suffix_module(gm, blocks, i)(prefix_module(gm, blocks, i)(x))`` reproduces ``gm(x)`` bit for bit: the same
operations run in the same order on the same tensors. Both modules share ``gm``'s submodules and ``Parameter``
objects (``GraphModule(gm, graph)`` copies references, not values), so training either trains ``gm``.

Both are built by :func:`fxqat.graph.subgraph.extract` (the sub-graph that computes some outputs from some inputs)
and :func:`fxqat.graph.subgraph.view` (a GraphModule on ``gm``'s own submodules), the same mechanism the hybrid
FP/LP graph uses for its paths.

Notes:
    * free nodes (``get_attr``, constants) of earlier blocks that a copied node reads are copied on demand, so they
      are *recomputed*: a free factory call with randomness (``torch.randn(3)``) would differ between runs;
    * nodes that do not contribute to the returned value (e.g. ``torch._assert``) are not copied;
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

from typing import Sequence

import torch.fx as fx

from fxqat.graph.blocks import Block
from fxqat.graph.subgraph import OUTPUT, extract, view

__all__ = ["prefix_module", "suffix_module"]


def _check_index(blocks: Sequence[Block], i: int) -> None:
    if not 0 <= i < len(blocks):
        raise IndexError(f"block index {i} out of range for {len(blocks)} blocks")


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
    exit_ = blocks[i].exit
    return view(gm, extract(gm.graph, None, [OUTPUT if exit_ == "output" else exit_]), f"{type(gm).__name__}Prefix{i}")


def suffix_module(gm: fx.GraphModule, blocks: Sequence[Block], i: int) -> fx.GraphModule:
    """A GraphModule that takes the activation at cut ``i`` and computes blocks ``i+1..n-1`` (the model's output).

    Args:
        gm: the partitioned GraphModule (its submodules and parameters are shared, not copied).
        blocks: its partition.
        i: index of the block whose exit is fed in; when that exit is the ``output`` node, the identity.

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
    name = f"{type(gm).__name__}Suffix{i}"
    if blocks[i].exit == "output":
        graph = fx.Graph()
        graph.output(graph.placeholder("outputs"))
        return view(gm, graph, name)
    return view(gm, extract(gm.graph, [blocks[i].exit], [OUTPUT]), name)
