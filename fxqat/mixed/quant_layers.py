"""The quantized layers of a prepared model, grouped by block: what a bit-width allocation decides about.

A *layer* here is a module whose weight fxqat quantizes, named as the user's model names it (the name an
:class:`~fxqat.config.Override` matches). Each layer owns its weight quantizer(s) and the quantizer(s) of the
activation it reads, whatever the capture did: a graph root or graph region (``fxqat_quant.*`` quantizers, found from
the layer nodes of the graph) or a weight layer quantized in place in an eager region (``fxqat_wq`` / ``fxqat_aq``).
Layers whose bits come from the ``first_last`` policy are marked ``fixed``.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 4),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    >>> [(l.name, l.weight_count, l.fixed, l.acts) for l in quant_layers(qm).values()][1]
    ('2', 64, False, ('fxqat_quant.a__1',))
    >>> [[(l.name, l.fixed) for l in ls] for ls in block_layers(qm, fxqat.find_blocks(qm, None)).values()]
    [[('0', True)], [('2', False)], [('4', True)]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.fx as fx
from torch import nn

from fxqat.capture.layer_quant import ACT_QUANT, FIRST_LAST, WEIGHT_QUANT, is_quantized_layer
from fxqat.graph.blocks import META_KEY, Block
from fxqat.passes.annotate import QMETA
from fxqat.passes.insert_quant import CONTAINER, QROLE, OpaqueWeightQuant
from fxqat.quantizers.base import Quantizer

__all__ = ["QuantLayer", "quant_layers", "block_layers", "split_fixed", "PARTNER"]

PARTNER = "fxqat_partner"  # the frozen FP partner of a hybrid model: never part of the LP network


@dataclass(frozen=True)
class QuantLayer:
    """One quantized layer of a prepared model.

    Attributes:
        name: qualified name of the layer's module in the user's model (what overrides match).
        weights: qualified names of its weight quantizers.
        acts: qualified names of the quantizers of its input activation (shared ones included).
        params: qualified name of the weight each of ``weights`` quantizes (``""`` where unknown).
        weight_count: elements of those weights.
        fixed: its bits come from ``QATConfig.first_last`` (the first or last layer).
        block: index of its block in the model's own partition (graph roots), or None when unknown.
    """

    name: str
    weights: Tuple[str, ...]
    acts: Tuple[str, ...]
    params: Tuple[str, ...]
    weight_count: int
    fixed: bool
    block: Optional[int] = None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _graph_layers(root: nn.Module, prefix: str, gm: fx.GraphModule) -> List[QuantLayer]:
    """The quantized layers of one graph (the root or a graph region called ``prefix``)."""
    out: List[QuantLayer] = []
    for node in gm.graph.nodes:
        lq = node.meta.get(QMETA)
        if lq is None or node.op not in ("call_function", "call_module"):
            continue
        weights, acts = [], []
        for a in node.all_input_nodes:
            role = a.meta.get(QROLE)
            if a.op == "call_module" and role in ("weight", "act"):
                (weights if role == "weight" else acts).append(_join(prefix, str(a.target)))
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), OpaqueWeightQuant):
            wrapper = _join(prefix, str(node.target))
            weights += [_join(wrapper, n) for n, m in gm.get_submodule(node.target).named_modules()
                        if isinstance(m, Quantizer)]
        if not weights:
            continue
        weights = list(dict.fromkeys(weights))
        targets = [getattr(root.get_submodule(qn), "weight_target", None) for qn in weights]
        params = [t or "" for t in targets]  # weight_target is qualified from the root (capture/hierarchy.py)
        block = node.meta.get(META_KEY) if not prefix else None
        out.append(QuantLayer(_join(prefix, lq.owner), tuple(weights), tuple(dict.fromkeys(acts)), tuple(params), 0,
                              bool(lq.first_last), block))
    return out


def quant_layers(qm: nn.Module) -> Dict[str, QuantLayer]:
    """Every quantized layer of the prepared model ``qm``, by module name, in module order.

    A weight shared by several layers (tied weights) is counted once, for the first layer that uses it.
    """
    found: List[QuantLayer] = []
    for name, m in qm.named_modules():
        if name.split(".")[0] == PARTNER:
            continue
        if isinstance(m, fx.GraphModule) and hasattr(m, CONTAINER):
            found += _graph_layers(qm, name, m)
        elif is_quantized_layer(m):
            wq = getattr(m, WEIGHT_QUANT)
            aq = getattr(m, ACT_QUANT, None)
            target = getattr(wq, "weight_target", None)
            found.append(QuantLayer(name, (_join(name, WEIGHT_QUANT),), (_join(name, ACT_QUANT),) if aq else (),
                                    (target or "",), 0, bool(getattr(m, FIRST_LAST, False))))
    seen: set = set()
    layers: Dict[str, QuantLayer] = {}
    for layer in found:
        count = 0
        for p in layer.params:
            if not p:
                continue
            t = qm.get_parameter(p)
            if id(t) not in seen:
                seen.add(id(t))
                count += t.numel()
        prev = layers.get(layer.name)
        if prev is not None:  # one module called as several layer nodes: merge
            pairs = dict(zip(prev.weights, prev.params))
            pairs.update((w, p) for w, p in zip(layer.weights, layer.params) if w not in pairs)
            layer = QuantLayer(layer.name, tuple(pairs), tuple(dict.fromkeys(prev.acts + layer.acts)),
                               tuple(pairs.values()), prev.weight_count, prev.fixed or layer.fixed, prev.block)
        layers[layer.name] = QuantLayer(layer.name, layer.weights, layer.acts, layer.params,
                                        layer.weight_count + count, layer.fixed, layer.block)
    return layers


def _block_of(name: str, blocks: Sequence[Block]) -> Optional[int]:
    """The block whose modules hold ``name`` (the longest matching module name wins)."""
    best, best_len = None, -1
    for k, b in enumerate(blocks):
        for m in b.modules:
            if (name == m or name.startswith(m + ".")) and len(m) > best_len:
                best, best_len = k, len(m)
    return best


def block_layers(qm: nn.Module, blocks: Sequence[Block]) -> Dict[int, List[QuantLayer]]:
    """The quantized layers of each block (block position -> layers, in model order).

    Raises:
        ValueError: a quantized layer belongs to none of ``blocks`` (the blocks are not this model's).
    """
    own = list((getattr(qm, "meta", None) or {}).get("fxqat.blocks", ()))
    use_meta = own and [b.name for b in own] == [b.name for b in blocks]
    out: Dict[int, List[QuantLayer]] = {k: [] for k in range(len(blocks))}
    for layer in quant_layers(qm).values():
        k = layer.block if use_meta and layer.block is not None else _block_of(layer.name, blocks)
        if k is None:
            raise ValueError(
                f"quantized layer {layer.name!r} is in none of the given blocks ({[b.name for b in blocks]}); pass "
                "the blocks of this model (fxqat.find_blocks on the FP model with the same config)."
            )
        out[k].append(layer)
    return out


def split_fixed(qm: nn.Module, blocks: Sequence[Block],
                include_first_last: bool = False) -> List[Tuple[List[QuantLayer], List[QuantLayer]]]:
    """Per block: ``(allocatable layers, fixed layers)``; with ``include_first_last`` nothing is fixed."""
    out = []
    for layers in block_layers(qm, blocks).values():
        fixed = [] if include_first_last else [la for la in layers if la.fixed]
        out.append(([la for la in layers if la not in fixed], fixed))
    return out
