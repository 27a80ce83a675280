"""Cuts inside the chain layers of an eager-root model (``HybridConfig(cuts="residual")``).

An eager-root model's blocks come from its verified layer chain, one block per layer (:mod:`fxqat.capture.chain`).
A chain layer that is a graph region (a traced ``LlamaDecoderLayer``) has a graph, so the residual structure inside it
is visible: :func:`_inner` partitions that graph like a whole traced model (:func:`fxqat.graph.partition`),
which cuts a decoder layer after its attention residual add and after its MLP residual add. :func:`refine` splits
the layer blocks accordingly; a layer that runs eagerly has no graph and stays one block (a warning names it).

Block replacement at such a cut needs two things, both set up by :func:`insert_tap` and :func:`suffix_runner`:

* the LP activation at the cut, recorded while the LP model runs: an identity :class:`RecordTap` call is inserted
  after the cut node of the LP layer's graph (nothing is recomputed; :func:`remove_taps` takes them out again);
* the FP rest of the layer from that activation: the layer's annotated FP graph (kept by the capture as
  ``region.meta["fxqat.fp_graph"]``, the graph before quantizers were inserted) from the cut to the output, run on
  the partner's own layer (same submodule names, the partner's weights).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> class Layer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn, self.mlp = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    ...     def forward(self, x):
    ...         x = x + self.attn(x)
    ...         return x + self.mlp(x)
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList([Layer() for _ in range(2)])
    ...     def forward(self, x):
    ...         for layer in self.layers:
    ...             x = layer(x) if x.sum() > -1e9 else x  # data-dependent: eager root
    ...         return x
    >>> qm = fxqat.prepare_qat(Net(), (torch.randn(2, 8),), fxqat.QATConfig())
    >>> [b.name for b in fxqat.find_blocks(qm, (torch.randn(2, 8),))]
    ['layers.0', 'layers.1']
    >>> cfg = fxqat.QATConfig(hybrid=fxqat.HybridConfig(cuts="residual"))
    >>> [b.name for b in fxqat.find_blocks(qm, (torch.randn(2, 8),), cfg)]
    ['layers.0.attn', 'layers.0.mlp', 'layers.1.attn', 'layers.1.mlp']
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any, List, Sequence, Set, Tuple

import torch.fx as fx
from torch import nn

from fxqat.capture.chain import ChainCut
from fxqat.capture.dispatch import disable_variants
from fxqat.capture.region import GraphRegion
from fxqat.graph.blocks import Block, partition
from fxqat.graph.modinfo import layer_owners, node_stack
from fxqat.graph.subgraph import OUTPUT, extract, view
from fxqat.passes.annotate import is_weight_layer_node
from fxqat.quantizers.base import Quantizer

__all__ = ["FP_GRAPH", "RecordTap", "SuffixRunner", "refine", "insert_tap", "remove_taps",
           "suffix_runner"]

log = logging.getLogger(__name__)
FP_GRAPH = "fxqat.fp_graph"  # GraphRegion.meta key: the annotated graph before insert_quant (chain layers only)
TAP = "fxqat_tap"
RECORDER = "_fxqat_recorder"


def _holds_quantizer(m: nn.Module) -> bool:
    return any(isinstance(s, Quantizer) for s in m.modules())


def _fp_view(region: GraphRegion) -> fx.GraphModule:
    return view(region, copy.deepcopy(region.meta[FP_GRAPH]), f"{type(region).__name__}FP")


def _inner(region: nn.Module) -> Tuple[List[Block], List[Set[str]]]:
    """The blocks of a chain layer's own graph (module names relative to the layer; ``[]`` when it has none) and,
    per block, the (relative) module paths its nodes run in (their module stacks).

    A node counts as a quantized layer when ``annotate`` marked it or when it calls a module that holds quantizers
    (an eager attention inside the layer, whose projections are quantized in place).
    """
    if not isinstance(region, GraphRegion) or FP_GRAPH not in region.meta:
        return [], []
    gm = _fp_view(region)

    def quantized(n: fx.Node) -> bool:
        return is_weight_layer_node(n) or (n.op == "call_module" and _holds_quantizer(gm.get_submodule(str(n.target))))

    blocks = partition(gm, quantized)
    by_name = {n.name: n for n in gm.graph.nodes}
    paths = [{e.path for name in b.nodes for e in node_stack(by_name[name], gm)} | set(b.modules) for b in blocks]
    holders = [tuple(layer_owners(by_name[name], gm)[:1] for name in b.nodes if quantized(by_name[name]))
               for b in blocks]
    named = [Block(_holder_name([o for t in h for o in t]), b.index, b.nodes, b.entry, b.exit, b.modules)
             for b, h in zip(blocks, holders)]
    return named, paths


def _holder_name(owners: Sequence[str]) -> str:
    """The innermost module holding every quantized layer of an inner block (``""`` when they share none)."""
    return ".".join(os.path.commonprefix([o.split(".") for o in owners])) if owners else ""


def refine(
    model: nn.Module, blocks: Sequence[Block], cuts: Sequence[ChainCut], layers: Sequence[str],
) -> Tuple[List[Block], List[ChainCut]]:
    """Split every chain-layer block whose layer is a graph region at the cuts of :func:`_inner`.

    Args:
        model: the captured eager-root model.
        blocks, cuts: its layer-chain partition (one block per layer, plus prefix and suffix blocks).
        layers: the chain layers.

    Returns:
        The refined blocks (re-indexed) and cuts; a cut inside layer ``L`` at node ``c`` is
        ``ChainCut(i, L, "inside", c)``.
    """
    out_blocks: List[Tuple[str, Tuple[str, ...], str]] = []  # (name, modules, exit)
    out_cuts: List[Tuple[str, str, str]] = []
    exits = [f"{c.layer}:{c.kind}" for c in cuts] + ["output"]
    for b, exit_ in zip(blocks, exits):
        layer = model.get_submodule(b.name) if b.name in layers else None
        inner, paths = _inner(layer) if layer is not None else ([], [])
        if layer is not None and not isinstance(layer, GraphRegion):
            warnings.warn(f"fxqat: HybridConfig(cuts='residual'): chain layer {b.name} runs eagerly (no graph), so "
                          "there is no cut inside it; it stays one block. fxqat.capture_report(model) says why it is "
                          "eager.", UserWarning, stacklevel=2)
        if len(inner) < 2:
            if isinstance(layer, GraphRegion):
                warnings.warn(f"fxqat: HybridConfig(cuts='residual'): chain layer {b.name} has a graph but no cut "
                              "inside it (no node that every path through the layer crosses, e.g. a parallel "
                              "residual or a second output); it stays one block.", UserWarning, stacklevel=2)
            out_blocks.append((b.name, b.modules, exit_))
            if exit_ != "output":
                out_cuts.append(_cut_of(exit_))
            continue
        lp_names = {n.name for n in layer.graph.nodes}
        inner, paths = _mergeable(inner, paths, lp_names)
        if len(inner) < 2:
            out_blocks.append((b.name, b.modules, exit_))
            if exit_ != "output":
                out_cuts.append(_cut_of(exit_))
            continue
        owned = _assign(b, paths)
        for k, ib in enumerate(inner):
            last = k == len(inner) - 1
            name = f"{b.name}.{ib.name}" if ib.name else f"{b.name}#{k}"
            if any(name == other[0] for other in out_blocks):
                name = f"{name}#{k}"
            out_blocks.append((name, owned[k], exit_ if last else f"{b.name}:{ib.exit}"))
            if not last:
                out_cuts.append((b.name, "inside", ib.exit))
            elif exit_ != "output":
                out_cuts.append(_cut_of(exit_))
    new_cuts = [ChainCut(i, layer, kind, node) for i, (layer, kind, node) in enumerate(out_cuts)]
    new_blocks = []
    for i, (name, mods, exit_) in enumerate(out_blocks):
        entry = "input" if i == 0 else out_blocks[i - 1][2]
        new_blocks.append(Block(name=name, index=i, nodes=(), entry=entry, exit=exit_, modules=tuple(mods)))
    return new_blocks, new_cuts


def _mergeable(
    inner: Sequence[Block], paths: Sequence[Set[str]], lp_names: Set[str],
) -> Tuple[List[Block], List[Set[str]]]:
    """Inner blocks whose exit node also exists in the LP graph (a cut right at a layer call, which insert_quant
    replaced by its functional form, is dropped: that block joins the next one)."""
    out: List[Block] = []
    out_paths: List[Set[str]] = []
    carry: Tuple[str, ...] = ()
    carry_paths: Set[str] = set()
    for k, (ib, p) in enumerate(zip(inner, paths)):
        mods, p = tuple(dict.fromkeys(carry + ib.modules)), carry_paths | p
        if k < len(inner) - 1 and ib.exit not in lp_names:
            carry, carry_paths = mods, p
            continue
        out.append(Block(ib.name, len(out), ib.nodes, ib.entry, ib.exit, mods))
        out_paths.append(p)
        carry, carry_paths = (), set()
    return out, out_paths


def _cut_of(exit_: str) -> Tuple[str, str, str]:
    layer, _, kind = exit_.rpartition(":")
    return layer, kind, ""


def _assign(block: Block, paths: Sequence[Set[str]]) -> List[Tuple[str, ...]]:
    """The block's modules (recorded calls) distributed over the inner blocks: each goes to the first inner block
    whose nodes run in it, or in its closest ancestor; the rest (the layer itself) to the first."""
    prefix = block.name + "."
    owned: List[List[str]] = [[] for _ in paths]
    for m in block.modules:
        rel = m[len(prefix):] if m.startswith(prefix) else ""
        parts, k = rel.split("."), 0
        for i in range(len(parts), 0, -1):
            hits = [j for j, p in enumerate(paths) if ".".join(parts[:i]) in p]
            if hits:
                k = hits[0]
                break
        owned[k].append(m)
    return [tuple(o) for o in owned]


class RecordTap(nn.Module):
    """Identity inserted after a cut node of an LP chain layer; stores its input while the hybrid model records."""

    def forward(self, x: Any) -> Any:
        ctrl, key = self.__dict__.get(RECORDER, (None, None))
        if ctrl is not None and ctrl.record is not None:
            ctrl.record[key] = x
        return x


def insert_tap(region: GraphRegion, node_name: str, ctrl: Any, key: str) -> None:
    """Insert a :class:`RecordTap` after ``node_name`` in ``region``'s (LP) graph, recording into ``ctrl.record[key]``."""
    node = next((n for n in region.graph.nodes if n.name == node_name), None)
    if node is None:
        raise ValueError(f"fxqat: the cut node {node_name!r} of {region.fxqat_region!r} is not in its quantized graph.")
    k = sum(1 for name in region._modules if name.startswith(TAP))
    tap = RecordTap()
    tap.__dict__[RECORDER] = (ctrl, key)
    region.add_module(f"{TAP}{k}", tap)
    with region.graph.inserting_after(node):
        call = region.graph.call_module(f"{TAP}{k}", (node,))
    node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
    region.graph.lint()
    region.recompile()
    disable_variants(region)  # another graph of the region would not record at the cut


def remove_taps(model: nn.Module) -> None:
    """Take every :class:`RecordTap` out of the graph regions of ``model`` (in place)."""
    for region in [m for m in model.modules() if isinstance(m, GraphRegion)]:
        taps = [n for n in region.graph.nodes if n.op == "call_module" and str(n.target).startswith(TAP)]
        for n in taps:
            n.replace_all_uses_with(n.args[0])
            region.graph.erase_node(n)
            delattr(region, str(n.target))
        if taps:
            region.graph.lint()
            region.recompile()


class SuffixRunner:
    """``runner(h)``: the rest of a chain layer after one cut, on activation ``h``, with the partner layer's modules.

    A plain object (no closure), so a deep copy of the hybrid model gets a runner over its own partner's modules.
    """

    def __init__(self, partner_layer: nn.Module, region: GraphRegion, node_name: str) -> None:
        graph = extract(region.meta[FP_GRAPH], [node_name], [OUTPUT])
        for n in graph.nodes:
            if n.op == "call_module" and not _has(partner_layer, str(n.target)):
                flat = str(n.target).replace(".", "_")
                partner_layer.add_module(flat, copy.deepcopy(region.get_submodule(n.target)))
                n.target = flat
        self.layer = partner_layer
        self.graph_module = view(partner_layer, graph, f"{type(region).__name__}Suffix")
        self.output_type = region.fxqat_output_type

    def __call__(self, h: Any) -> Any:
        self.graph_module.train(self.layer.training)  # the graph reads the layer's own training flag at run time
        out = self.graph_module(h)
        return self.output_type(**out) if self.output_type is not None and type(out) is dict else out


def suffix_runner(partner_layer: nn.Module, region: GraphRegion, node_name: str) -> SuffixRunner:
    """The :class:`SuffixRunner` of cut ``node_name`` in the LP layer ``region``, on ``partner_layer``.

    ``region``'s FP graph gives the computation; modules of that graph the partner layer lacks (stateless copies
    that ``normalize`` made per call site) are copied into it.
    """
    return SuffixRunner(partner_layer, region, node_name)


def _has(module: nn.Module, target: str) -> bool:
    try:
        module.get_submodule(target)
        return True
    except AttributeError:
        return False

