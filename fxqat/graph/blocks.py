"""Block partition of a traced model: the units that block replacement swaps between the LP and FP networks.

A *cut node* lies on every input -> output path of the graph (:mod:`fxqat.graph.dominance`). Cutting at every cut
node gives the finest partition in which each piece (a *segment*) reads exactly one tensor produced before it: the
previous cut. :func:`partition` then merges consecutive segments (:mod:`fxqat.graph.merge`) so that each block holds
at least one quantized layer and, by default, follows the module hierarchy: a ResNet gives stem, one block per residual
block, head; a MobileNetV2 one block per inverted residual.

Conventions:

* a block holds the path nodes strictly after one cut, up to and including the next cut (its ``exit``); its
  ``entry`` is the previous block's exit, or the first placeholder for block 0 (with several inputs, every
  placeholder is read by block 0 only, as no cut can precede a read of an input);
* the last block's exit is the node feeding ``output``. When the output is a tuple/dict with several producers,
  there is no single exit tensor: the last block then holds everything after the last cut and its ``exit`` is the
  name of the fx ``output`` node itself (its "tensor" is the whole output structure);
* *free* nodes (``get_attr``, constants, factory calls: not reachable from an input) join the block of their first
  user (block 0 when unused); *dead* nodes (no output depends on them, e.g. ``torch._assert``) join the block of the
  next path node in graph order (the last block when none follows). Placeholders and ``output`` belong to no block.

Every node it assigns gets ``node.meta["fxqat.block"] = block.index``.

Limitations (the analysis follows data edges only):

* a tensor read late keeps every path from it open, so no cut can fall in between, even when only its shape is
  read: ``n = x.size(0)`` on the input, used by a ``reshape(n, -1)`` in the head, leaves just two blocks. Read the
  shape of the tensor at hand instead (``y.reshape(y.size(0), -1)``, ``torch.flatten(y, 1)``);
* an in-place method whose result is discarded (``x.add_(y)`` followed by uses of ``x``) is dead to the analysis, so
  a cut may separate the mutation from the reads it affects; trace functional code (``x = x + y``) instead;
* with several producers of the output (tuple/dict outputs from separate heads), the last block holds all heads;
* the structural grouping reads ``node.meta["nn_module_stack"]`` (recorded by ``torch.fx`` tracers); without it,
  classes are guessed from the module structure and a block that is the only one of its kind and has no skip
  (MobileNetV2's ``features.1``) may be split in two.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> class Res(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    ...     def forward(self, x):
    ...         return torch.relu(self.bn(self.conv(x)) + x)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Res(), Res(), nn.Flatten(), nn.LazyLinear(2))
    >>> blocks = partition(fx.symbolic_trace(net))
    >>> [b.name for b in blocks]
    ['stem', '2', '3', 'head']
    >>> blocks[1].entry, blocks[1].exit, blocks[1].modules
    ('_1', 'relu', ('2.conv', '2.bn'))
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
from torch import nn

from fxqat.graph.dominance import cut_nodes
from fxqat.graph.merge import StackEntry, flat_groups, layer_groups, merge_cheapest, split_at, structural_groups
from fxqat.graph.modinfo import block_params, default_is_quantized, input_free_nodes, layer_owners, node_stack
from fxqat.graph.nxview import dead_nodes, free_nodes, path_nodes, to_networkx

__all__ = ["Block", "partition", "summary_table", "META_KEY"]

log = logging.getLogger(__name__)

META_KEY = "fxqat.block"


@dataclass(frozen=True)
class Block:
    """One block of a :func:`partition`.

    Attributes:
        name: readable, unique name: ``"stem"`` for the first and ``"head"`` for the last block (when there are
            several); else the common prefix of its modules, shortened while no other block calls a module under
            it (``"layer1.0"``, ``"features.3"``); else the outermost module holding all its quantized layers and
            called in no other block (``"encoder.layers.encoder_layer_0.mlp"``); else ``"{prefix}#{index}"`` or
            ``"block{index}"``.
        index: position in the partition, from 0.
        nodes: fx node names in topological (graph) order.
        entry: the node whose tensor enters the block: the previous block's exit, or the first placeholder.
        exit: the cut node ending the block (the last block: see the module docstring).
        modules: qualified names of the submodules the block runs, in call order, without repeats: the modules it
            calls, the weight layers inside a called leaf module (one the tracer did not enter), and the module that
            holds the weight of a functional layer (``F.conv2d`` on a ``StdConv2d``'s standardised weight, ``F.linear``
            in a ``Linear`` subclass): see :func:`fxqat.graph.modinfo.layer_owners`. Every weight layer the graph
            runs is thus in the ``modules`` of exactly the block that computes it.
    """

    name: str
    index: int
    nodes: Tuple[str, ...]
    entry: str
    exit: str
    modules: Tuple[str, ...]

    def __repr__(self) -> str:
        mods = _short_list(self.modules)
        return f"Block({self.index} {self.name!r}: {self.entry} -> {self.exit}, {len(self.nodes)} nodes, [{mods}])"


def _short_list(items: Sequence[str], keep: int = 3) -> str:
    if len(items) <= keep:
        return ", ".join(items)
    return f"{items[0]}, ..., {items[-1]} ({len(items)})"


def partition(
    gm: fx.GraphModule,
    is_quantized: Optional[Callable[[fx.Node], bool]] = None,
    max_blocks: Optional[int] = None,
    boundaries: Sequence[str] = (),
    *,
    structural: bool = True,
    cuts: str = "residual",
) -> List[Block]:
    """Splits a traced model into blocks with one entry and one exit tensor each (see the module docstring).

    Args:
        gm: any valid ``GraphModule``; its nodes get ``meta["fxqat.block"]`` (nothing else changes).
        is_quantized: granularity predicate: consecutive segments are merged until each block holds a node for
            which it is true. Default :func:`default_is_quantized`.
        max_blocks: if given, the adjacent pair of blocks with the smallest summed parameter count
            (:func:`block_params`; ties: the earliest pair) is merged until at most this many remain.
        boundaries: qualified module names whose call must end a block; the module's last node must be a cut
            node. They take precedence over the ``is_quantized`` rule.
        structural: follow the module hierarchy when merging (:func:`fxqat.graph.merge.structural_groups`);
            ``False`` uses only the ``is_quantized`` rule (:func:`fxqat.graph.merge.flat_groups`).
        cuts: ``"residual"`` keeps every cut the grouping chose; ``"layers"`` then merges the groups inside each layer
            of a ``ModuleList``/``Sequential`` stack (:func:`fxqat.graph.merge.layer_groups`): one block per
            transformer block instead of one for its attention and one for its MLP.

    Returns:
        The blocks in order; ``[]`` when the graph computes nothing.

    Raises:
        ValueError: when the graph has no input, a boundary is not a module of the graph or does not end at a cut
            (the message lists the valid ones), or ``max_blocks`` is below 1 or below what the boundaries need.

    Example:
        >>> from torch import fx, nn
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [b.modules for b in partition(fx.symbolic_trace(mlp), max_blocks=2)]
        [('0', '1'), ('2', '3', '4')]
        >>> partition(fx.symbolic_trace(mlp), boundaries=["1"])[0].modules
        ('0', '1')
    """
    if cuts not in ("residual", "layers"):
        raise ValueError(f"partition: cuts={cuts!r}; use 'residual' or 'layers'.")
    pred = is_quantized if is_quantized is not None else default_is_quantized
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError(f"{type(gm).__name__} has no input (placeholder) node: partition needs one to cut paths.")
    output = next(n for n in nodes if n.op == "output")
    view = to_networkx(gm.graph)
    on_path, free, dead = path_nodes(view), free_nodes(view), dead_nodes(view)
    cut_set = set(cut_nodes(view)) - {n.name for n in placeholders} - {output.name}
    compute = [n for n in nodes if n.op not in ("placeholder", "output")]
    if not compute:
        return []

    segs: List[List[fx.Node]] = []
    seg_exit: List[str] = []
    current: List[fx.Node] = []
    for n in compute:
        if n.name in on_path:
            current.append(n)
            if n.name in cut_set:
                segs.append(current)
                seg_exit.append(n.name)
                current = []
    if current or not segs:
        segs.append(current)
        seg_exit.append(output.name)
    log.debug("%d cut nodes, %d segments", len(cut_set), len(segs))

    stacks = {n: node_stack(n, gm) for n in compute}
    qflags = [[bool(pred(n)) for n in seg] for seg in segs]
    if structural:
        groups = structural_groups([[stacks[n] for n in seg] for seg in segs], qflags)
    else:
        groups = flat_groups([any(flags) for flags in qflags])
    if cuts == "layers":
        containers = [name for name, m in gm.named_modules() if type(m) in (nn.Sequential, nn.ModuleList)]
        groups = layer_groups(groups, [[stacks[n] for n in seg] for seg in segs], containers)
    forced = _boundary_segments(boundaries, compute, on_path, stacks, seg_exit, output.name)
    groups = split_at(groups, forced)
    if max_blocks is not None:
        costs = [block_params(gm, [n.name for s in g for n in segs[s]]) for g in groups]
        groups = merge_cheapest(groups, costs, max_blocks, forced)

    block_of: Dict[fx.Node, int] = {}
    for b, group in enumerate(groups):
        for s in group:
            block_of.update((n, b) for n in segs[s])
    last = len(groups) - 1
    following = last
    for n in reversed(compute):  # dead nodes: the block of the next path node (the one running at that point)
        if n in block_of:
            following = block_of[n]
        elif n.name in dead:
            block_of[n] = following
    for n in reversed(compute):  # free nodes: the block of their first user
        if n.name in free:
            users = [last if u.op == "output" else block_of[u] for u in n.users if u in block_of or u.op == "output"]
            block_of[n] = min(users, default=0)

    blocks = []
    input_free = input_free_nodes(gm.graph)
    for b, group in enumerate(groups):
        members = [n for n in compute if block_of[n] == b]
        for n in members:
            n.meta[META_KEY] = b
        modules = tuple(dict.fromkeys(
            owner for n in members if n.op == "call_module" or (n.op != "get_attr" and (default_is_quantized(n) or pred(n)))
            for owner in layer_owners(n, gm, input_free)
        ))
        entry = placeholders[0].name if b == 0 else seg_exit[groups[b - 1][-1]]
        blocks.append(Block("", b, tuple(n.name for n in members), entry, seg_exit[group[-1]], modules))
    names = _names(blocks, compute, stacks, block_of, pred)
    blocks = [Block(name, b.index, b.nodes, b.entry, b.exit, b.modules) for name, b in zip(names, blocks)]
    log.info("partitioned %s into %d blocks: %s", type(gm).__name__, len(blocks), [b.name for b in blocks])
    return blocks


def _paths_of(n: fx.Node, stacks: Dict[fx.Node, Tuple[StackEntry, ...]]) -> Set[str]:
    return {e.path for e in stacks[n]}


def _boundary_segments(
    boundaries: Sequence[str],
    compute: Sequence[fx.Node],
    on_path: Set[str],
    stacks: Dict[fx.Node, Tuple[StackEntry, ...]],
    seg_exit: Sequence[str],
    output_name: str,
) -> Set[int]:
    if isinstance(boundaries, str):
        boundaries = [boundaries]
    if not boundaries:
        return set()
    last_node: Dict[str, str] = {}
    for n in compute:
        if n.name in on_path:
            for path in _paths_of(n, stacks):
                last_node[path] = n.name
    exit_index = {name: s for s, name in enumerate(seg_exit) if name != output_name}
    valid = sorted((p for p, n in last_node.items() if n in exit_index), key=lambda p: (exit_index[last_node[p]], p))
    forced = set()
    for name in boundaries:
        if name not in last_node:
            raise ValueError(
                f"boundary {name!r} is not a module called on the model's data path; "
                f"use one of these modules that end at a cut node: {valid}"
            )
        if last_node[name] not in exit_index:
            raise ValueError(
                f"boundary {name!r} does not end at a cut node (its last node {last_node[name]!r} is not on every "
                f"input -> output path); use one of these modules that end at a cut node: {valid}"
            )
        forced.add(exit_index[last_node[name]])
    return forced


def _common_prefix(paths: Sequence[str]) -> str:
    if not paths:
        return ""
    split = [p.split(".") for p in paths]
    common = os.path.commonprefix(split)
    return ".".join(common)


def _names(
    blocks: Sequence[Block],
    compute: Sequence[fx.Node],
    stacks: Dict[fx.Node, Tuple[StackEntry, ...]],
    block_of: Dict[fx.Node, int],
    pred: Callable[[fx.Node], bool],
) -> List[str]:
    where: Dict[str, Set[int]] = {}
    for n in compute:
        for path in _paths_of(n, stacks):
            where.setdefault(path, set()).add(block_of[n])
    names: List[str] = []
    last = len(blocks) - 1
    for b in blocks:
        prefix = _common_prefix(list(b.modules))
        owned = lambda p: where.get(p) == {b.index}  # noqa: E731
        quantized = [n for n in compute if block_of[n] == b.index and pred(n)]
        holders = set.intersection(*[_paths_of(n, stacks) for n in quantized]) if quantized else set()
        holders = sorted((p for p in holders if owned(p)), key=lambda p: (p.count("."), p))
        if last > 0 and b.index == 0:
            name = "stem"
        elif last > 0 and b.index == last:
            name = "head"
        elif prefix and owned(prefix):
            while "." in prefix and owned(prefix.rsplit(".", 1)[0]):
                prefix = prefix.rsplit(".", 1)[0]
            name = prefix
        elif holders:
            name = holders[0]
        elif prefix:
            name = f"{prefix}#{b.index}"
        else:
            name = f"block{b.index}"
        names.append(name if name not in names else f"{name}#{b.index}")
    return names


def summary_table(blocks: Sequence[Block], gm: Optional[fx.GraphModule] = None) -> str:
    """A plain-text table of a partition: index, name, entry, exit, #nodes, modules and (given ``gm``) #params.

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))
        >>> print(summary_table(partition(gm), gm))
        # | name | entry   | exit | nodes | modules | params
        0 | stem | input_1 | _1   |     2 | 0, 1    |      6
        1 | head | _1      | _2   |     1 | 2       |      3
    """
    header = ["#", "name", "entry", "exit", "nodes", "modules"] + (["params"] if gm is not None else [])
    rows = []
    for b in blocks:
        row = [str(b.index), b.name, b.entry, b.exit, str(len(b.nodes)), _short_list(b.modules)]
        if gm is not None:
            row.append(str(block_params(gm, b.nodes)))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = {0, 4, 6}
    lines = []
    for r in [header, *rows]:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(" | ".join(cells).rstrip())
    return "\n".join(lines)
