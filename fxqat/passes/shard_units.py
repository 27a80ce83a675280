"""shard_units: the blocks of a prepared graph as units that FSDP can shard, by inserting identity *gates*.

FSDP2 all-gathers a unit's parameters in a forward pre-hook of a module and frees them in its forward hook. In a
traced model the block ``layer1.0`` is no module that runs: its convolutions read their weights through ``get_attr``
nodes and the quantizers live in the root's ``fxqat_quant``. :func:`insert_gates` therefore puts two parameter-free
identity modules around each block k (``fxqat_fsdp.enter{k}`` on the tensor entering it, ``fxqat_fsdp.exit{k}`` on
its exit) and moves the block's parameter reads (``get_attr`` and weight-quantizer calls, which depend on no input)
to just after its enter gate. ``fully_shard([enter_k, exit_k])`` then unshards the block's parameters before its first
read and frees them after its exit; the backward hooks sit on the exit gate's output (every gradient of the block
flows through it) and on the enter gate's input. Gates hold no state, so ``state_dict`` keys do not change.

The blocks come from ``fxqat.find_blocks`` of the prepared model (the same partition as on the FP model).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 4),))
    >>> x = torch.randn(2, 4); ref = qm(x)
    >>> blocks = fxqat.find_blocks(qm, None)
    >>> units = insert_gates(qm, qm.graph, [b.exit for b in blocks[:-1]], [b.name for b in blocks])
    >>> _ = qm.recompile()
    >>> [(u.name, u.enter, u.exit) for u in units][1]
    ('2', 'fxqat_fsdp.enter1', 'fxqat_fsdp.exit1')
    >>> sorted(units[1].params)  # the layer's weights, its weight quantizer and the input quantizer of block 1
    ['2.bias', '2.weight', 'fxqat_quant.a__1.scale', 'fxqat_quant.w_2.scale']
    >>> bool(torch.equal(qm(x), ref))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
from torch import nn

from fxqat.passes.build_hybrid import CUT

__all__ = ["BlockGate", "GateUnit", "GATES", "insert_gates"]

GATES = "fxqat_fsdp"  # name of the container module holding the gates


class BlockGate(nn.Module):
    """Identity on its argument (a tensor or a structure of tensors): where FSDP hooks a block."""

    def forward(self, x):  # noqa: D401 - nn.Module.forward
        return x


@dataclass(frozen=True)
class GateUnit:
    """One block made shardable: its gates and parameters (qualified names relative to the graph's owner)."""

    name: str
    index: int
    enter: str
    exit: str
    params: Tuple[str, ...]


def _block_of_nodes(graph: fx.Graph, cut_nodes: Sequence[fx.Node]) -> Tuple[Dict[fx.Node, int], Set[fx.Node]]:
    """Block index of every node (path nodes by position between cuts, input-free nodes by their first user) and
    the set of input-free nodes."""
    nodes = list(graph.nodes)
    on_path: Set[fx.Node] = set()
    stack = [n for n in nodes if n.op == "placeholder"]
    while stack:
        n = stack.pop()
        if n not in on_path:
            on_path.add(n)
            stack.extend(n.users)
    cut_index = {c: i for i, c in enumerate(cut_nodes)}
    block: Dict[fx.Node, int] = {}
    k = 0
    for n in nodes:
        if n.op in ("placeholder", "output"):
            continue
        if n in on_path:
            block[n] = k
        if n in cut_index:
            if cut_index[n] != k:
                raise ValueError(f"insert_gates: cut {n.name!r} is out of graph order.")
            k += 1
    last = len(cut_nodes)
    free = {n for n in nodes if n.op not in ("placeholder", "output") and n not in on_path}
    for n in reversed(nodes):
        if n in free:
            users = [last if u.op == "output" else block[u] for u in n.users if u.op == "output" or u in block]
            if users:
                block[n] = min(users)
    return block, free


def _params_of(owner: nn.Module, node: fx.Node) -> Dict[str, nn.Parameter]:
    if node.op == "call_module":
        mod = owner.get_submodule(node.target)
        return {f"{node.target}.{n}": p for n, p in mod.named_parameters()}
    if node.op == "get_attr":
        mod_path, _, leaf = node.target.rpartition(".")
        obj = getattr(owner.get_submodule(mod_path) if mod_path else owner, leaf)
        if isinstance(obj, nn.Parameter):
            return {node.target: obj}
        if isinstance(obj, nn.Module):
            return {f"{node.target}.{n}": p for n, p in obj.named_parameters()}
    return {}


def insert_gates(owner: nn.Module, graph: fx.Graph, cuts: Sequence[str], names: Optional[Sequence[str]] = None,
                 container: str = GATES) -> List[GateUnit]:
    """Insert enter/exit gates around each block of ``graph`` (in place) and return one unit per block.

    Args:
        owner: the module whose submodules ``graph``'s targets name (the GraphModule, or a hybrid model's partner);
            the gates are registered under ``owner.<container>``. The caller recompiles / rebuilds what runs ``graph``.
        graph: the graph to edit.
        cuts: names of the nodes ending blocks 0..n-2, in graph order; a ``fxqat.cut`` mark moves to the exit gate.
        names: readable block names (default ``block{k}``).

    Raises:
        ValueError: a parameter is read in two blocks (FSDP needs each parameter in one unit).
    """
    by_name = {n.name: n for n in graph.nodes}
    cut_nodes = [by_name[c] for c in cuts]
    block, free = _block_of_nodes(graph, cut_nodes)
    n_blocks = len(cut_nodes) + 1
    params: List[Dict[str, nn.Parameter]] = [{} for _ in range(n_blocks)]
    where: Dict[int, Tuple[str, int]] = {}
    for n, b in block.items():
        for pname, p in _params_of(owner, n).items():
            if id(p) in where and where[id(p)][1] != b:
                raise ValueError(
                    f"insert_gates: parameter {pname!r} is read in blocks {where[id(p)][1]} and {b}; FSDP shards each "
                    f"parameter with one block. Merge those blocks (HybridConfig.boundaries) or untie the parameter.")
            where[id(p)] = (pname, b)
            params[b].setdefault(pname, p)
    for n in free:  # a free value that reads parameters must be used in its own block only
        if n in block and _params_of(owner, n):
            other = {block[u] for u in n.users if u in block} - {block[n]}
            if other:
                raise ValueError(f"insert_gates: {n.name!r} (reads parameters) is used in blocks {block[n]} and "
                                 f"{sorted(other)}; FSDP needs it in one block.")
    gates = getattr(owner, container, None)
    if gates is None:
        gates = nn.Module()
        owner.add_module(container, gates)
    for k in range(n_blocks):
        gates.add_module(f"enter{k}", BlockGate())
        gates.add_module(f"exit{k}", BlockGate())
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    entry = next((p for p in placeholders if p.users), placeholders[0])
    enters: List[fx.Node] = []
    with graph.inserting_after(placeholders[-1]):
        e0 = graph.create_node("call_module", f"{container}.enter0", (entry,))
    entry.replace_all_uses_with(e0, delete_user_cb=lambda u: u is not e0)
    enters.append(e0)
    for k, c in enumerate(cut_nodes, start=1):
        with graph.inserting_after(c):
            x = graph.create_node("call_module", f"{container}.exit{k - 1}", (c,))
        with graph.inserting_after(x):
            e = graph.create_node("call_module", f"{container}.enter{k}", (x,))
        c.replace_all_uses_with(e, delete_user_cb=lambda u: u is not x)
        if CUT in c.meta:
            x.meta[CUT] = c.meta.pop(CUT)
        enters.append(e)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    with graph.inserting_before(out):
        x_last = graph.create_node("call_module", f"{container}.exit{n_blocks - 1}", (out.args[0],))
    out.args = (x_last,)
    for k, e in enumerate(enters):  # parameter reads of block k right after its enter gate, in their order
        anchor = e
        for n in nodes:
            if n in free and block.get(n) == k:
                anchor.append(n)
                anchor = n
    owning = graph.owning_module  # a hybrid's FP graph may name a temporary module as its owner: lint against owner
    graph.owning_module = owner
    try:
        graph.lint()
    finally:
        graph.owning_module = owning
    labels = list(names) if names is not None else [f"block{k}" for k in range(n_blocks)]
    return [GateUnit(labels[k], k, f"{container}.enter{k}", f"{container}.exit{k}", tuple(params[k]))
            for k in range(n_blocks)]
