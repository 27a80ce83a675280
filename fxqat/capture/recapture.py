"""A graph region captured again for a call of another structure: a new graph over the same modules and quantizers.

A region's graph holds for calls like the example call (:mod:`fxqat.capture.region`). Transformers calls a decoder
layer with ``attention_mask=None`` in eager mode but with a mask tensor under ``torch.compile`` or for a padded batch,
and sdpa's code differs between the two (``is_causal``); a one-token decoding step flips sdpa's
``q_length > 1`` guard. Such a call is captured on its first occurrence (:func:`capture_variant`, called by
:func:`fxqat.capture.dispatch.run_variants`): the region's module is rebuilt around the region's own children
(:func:`~fxqat.capture.region.restore_module`), traced for this call exactly as the first time (same leaves, same
decisions on handed-on arguments), and quantized by the same passes with the same configuration
(:func:`quantize_region`, shared with :mod:`fxqat.capture.hierarchy`). The new graph then gets **no quantizer of its
own**: each quantizer node is matched to the region's quantizer at the same place (:func:`quantizer_anchor`: the
weight it reads, the layer whose input or output it quantizes, the key or value it stores) and calls that one, so
both graphs train, calibrate and convert the same quantizers and parameters, and the model's ``state_dict`` does not
change. A graph that would need a quantizer the region does not have is refused with an error naming it.

Cost: one capture per region and call structure, at the first call (about the prepare time of one region; the second
and later decoder layers reuse the first one's decisions). Under ``torch.compile`` the capture runs outside the
compiled graph (``torch.compiler.disable``).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> from fxqat.capture.region import trace_region
    >>> class Gate(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x, mask=None):
    ...         y = self.fc(x)
    ...         return y if mask is None else y * mask
    >>> gate, x = Gate(), torch.randn(2, 4)
    >>> region = trace_region(gate, (x,), {}, "gate")
    >>> recipe = Recipe(QATConfig(w_bits=4, a_bits=8), "gate", (), frozenset(), frozenset())
    >>> quantize_region(region, recipe)
    >>> region.fxqat_recapture = Recapture(recipe)
    >>> n = len(list(region.modules()))
    >>> mask = torch.ones(2, 4)
    >>> bool(torch.equal(region(x, mask=mask), region(x)))  # a second graph, the same quantizers
    True
    >>> len(region.fxqat_variants), len(list(region.modules())) == n
    (1, True)
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from typing import Any, Dict, FrozenSet, Hashable, Tuple

import torch
import torch.fx as fx
from torch import nn

from fxqat.capture.dispatch import Variant
from fxqat.capture.record import detach_call
from fxqat.capture.region import GraphRegion, restore_module, trace_region
from fxqat.capture.shapes import propagate_shapes
from fxqat.config import QATConfig
from fxqat.graph.modinfo import resolve_attr
from fxqat.passes.annotate import annotate
from fxqat.passes.insert_quant import CONTAINER, QROLE, OpaqueWeightQuant, insert_quant
from fxqat.passes.kv_cache import KV_CONTAINER, quantize_kv
from fxqat.passes.normalize import normalize
from fxqat.quantizers.base import Quantizer

__all__ = ["Recipe", "Recapture", "quantize_region", "capture_variant", "quantizer_anchor"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How :mod:`fxqat.capture.hierarchy` captured a region (what a new graph of it needs the same).

    Attributes:
        config: the model's :class:`~fxqat.config.QATConfig`.
        name: the region's qualified name in the model.
        leaves: the module types and region-relative names traced as leaves.
        first_last: qualified names of the model's first and last weight layer.
        fp_weights: qualified names of the weights kept FP (routers).
        one_layer: the region is one weight layer (an LM head): the layer's qualified name is the region's own
            (``lm_head``, not ``lm_head.<owner>``) for overrides, the first/last policy and quantizer names.
    """

    config: QATConfig
    name: str
    leaves: Tuple[Any, ...]
    first_last: FrozenSet[str]
    fp_weights: FrozenSet[str]
    one_layer: bool = False


def quantize_region(region: GraphRegion, recipe: Recipe, fp_graph_key: str = "") -> None:
    """annotate, insert_quant and (with a ``kv`` role) quantize_kv on a traced region, in place; weight quantizers'
    ``weight_target`` made relative to the model's root. With ``fp_graph_key``, a copy of the annotated graph before
    insert_quant is kept in ``region.meta[fp_graph_key]``."""
    name, config = recipe.name, recipe.config
    prefix = name if recipe.one_layer else name + "."  # a one-layer region's layer has no owner below it
    annotate(region, config, prefix=prefix, first_last_names=set(recipe.first_last), fp_weights=recipe.fp_weights)
    if fp_graph_key:
        region.meta[fp_graph_key] = copy.deepcopy(region.graph)
    insert_quant(region, config, prefix=prefix)
    if config.kv is not None:
        quantize_kv(region, config.kv.bits, config.kv.granularity)
    for q in getattr(region, CONTAINER).modules() if hasattr(region, CONTAINER) else ():
        if isinstance(q, Quantizer) and getattr(q, "weight_target", None):  # region-relative -> from the root
            q.weight_target = f"{name}.{q.weight_target}" if name else q.weight_target


def _is_quantizer_node(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith((CONTAINER + ".", KV_CONTAINER + "."))


def _consumers(graph: fx.Graph) -> Dict[fx.Node, Hashable]:
    """A name for every node that is the same in two graphs of one module: the layer it computes (``fxqat.module``)
    or its op and target with the how-many-th such node it is."""
    seen: Counter = Counter()
    out: Dict[fx.Node, Hashable] = {}
    for node in graph.nodes:
        key = (node.op, node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__",
                                                                                  repr(node.target)))
        out[node] = node.meta.get("fxqat.module") or (key, seen[key])
        seen[key] += 1
    return out


def quantizer_anchor(gm: fx.GraphModule, node: fx.Node, consumers: Dict[fx.Node, Hashable]) -> Hashable:
    """Where the quantizer called by ``node`` sits, independent of node names: the weight it reads, the layer whose
    input (with the argument position) or output it quantizes, the key or value of the cache it stores, the leaf
    module whose weights it substitutes."""
    target = str(node.target)
    if target.startswith(KV_CONTAINER + "."):
        return ("kv", target)
    module = gm.get_submodule(target)
    if isinstance(module, OpaqueWeightQuant):
        return ("opaque", module.module_path)
    role = node.meta.get(QROLE)
    arg = node.args[0] if node.args else None
    if role == "weight":
        return ("weight", arg.target if isinstance(arg, fx.Node) and arg.op == "get_attr" else consumers.get(arg))
    if role == "grad":
        return ("grad", consumers.get(arg))
    users = list(node.users)
    if not users:
        return ("unused", target)
    user = users[0]
    flat = fx.node.map_aggregate((user.args, user.kwargs), lambda a: a)
    pos = [i for i, a in enumerate(_leaves(flat)) if a is node]
    return (role or "act", consumers[user], tuple(pos))


def _leaves(tree: Any) -> list:
    out: list = []
    fx.node.map_aggregate(tree, lambda a: out.append(a))
    return out


def _adopt(region: GraphRegion, temp: GraphRegion) -> fx.Graph:
    """``temp``'s graph made to run on ``region``: its quantizer nodes call ``region``'s quantizers, anything else
    only ``temp`` holds (a stateless module copy, a tensor constant) is given to ``region`` under a new name."""
    base_consumers, temp_consumers = _consumers(region.graph), _consumers(temp.graph)
    have = {quantizer_anchor(region, n, base_consumers): str(n.target)
            for n in region.graph.nodes if _is_quantizer_node(n)}
    targets: Dict[fx.Node, str] = {}
    for node in temp.graph.nodes:
        if not _is_quantizer_node(node):
            continue
        anchor = quantizer_anchor(temp, node, temp_consumers)
        mine = have.get(anchor)
        if mine is None or type(region.get_submodule(mine)) is not type(temp.get_submodule(str(node.target))):
            raise ValueError(f"module {region.fxqat_region!r}: the graph for this call needs a quantizer that the "
                             f"prepared model does not have ({anchor}).")
        targets[node] = mine
    k = len(region.fxqat_variants)
    for node in temp.graph.nodes:
        if node in targets:
            node.target = targets[node]
        elif node.op in ("get_attr", "call_module") and not str(node.target).endswith("training"):
            target = str(node.target)
            obj = resolve_attr(temp, target)
            try:
                same = resolve_attr(region, target) is obj
            except AttributeError:
                same = False
            if same:
                continue
            new = f"fxqat_variant{k}_" + re.sub(r"\W", "_", target)
            if isinstance(obj, nn.Module):
                region.add_module(new, obj)
            elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
                region.register_buffer(new, obj, persistent=False)
            else:
                setattr(region, new, obj)
            node.target = new
    return temp.graph


@torch.compiler.disable
def capture_variant(region: GraphRegion, args: Tuple, kwargs: Dict[str, Any], recipe: Recipe) -> Variant:
    """``region`` captured for the call ``region(*args, **kwargs)`` (module docstring).

    Raises:
        ValueError: the call cannot be captured (its code does not trace, or needs a quantizer the region lacks).
    """
    name = recipe.name
    flags = [(m, m.training) for m in region.modules()]
    args, kwargs = detach_call(args, kwargs)  # the caller's cache is neither changed nor copied with its autograd graph
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            module = restore_module(region)
            temp = normalize(trace_region(module, args, kwargs, name, recipe.leaves))
            propagate_shapes(temp, tuple(temp.fxqat_binding.flatten(args, kwargs, name)), name)
            quantize_region(temp, recipe)
            graph = _adopt(region, temp)
    except Exception as exc:  # noqa: BLE001 - any failure: the call is refused, naming the module
        raise ValueError(f"fxqat: module {name!r} is called differently from the example inputs it was captured "
                         f"for, and capturing it for this call failed ({type(exc).__name__}: {exc})") from exc
    finally:
        for m, flag in flags:
            m.training = flag
    code = type(fx.GraphModule(region, graph)).__dict__["forward"]  # the graph's code, called with the region
    return Variant(temp.fxqat_binding, graph, code)


class Recapture:
    """``region.fxqat_recapture``: :func:`capture_variant` with the region's :class:`Recipe` (copied as itself)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Recapture":
        return self

    def __call__(self, region: GraphRegion, args: Tuple, kwargs: Dict[str, Any]) -> Variant:
        return capture_variant(region, args, kwargs, self.recipe)
