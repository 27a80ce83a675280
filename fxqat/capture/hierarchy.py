"""Hierarchical capture of a model whose root forward torch.fx cannot trace.

The root stays an **eager region**: its Python runs as written. Each child that holds weight layers is then captured
on its own, from the call it received on the example inputs (recorded with forward pre-hooks):

1. it becomes a **graph region** (:class:`~fxqat.capture.region.GraphRegion`) when its forward traces with that call
   bound to its signature; the region goes through the usual passes (normalize, annotate, insert_quant), so its
   activations, functional layers and residual structure are seen;
2. otherwise it stays eager and its own children are captured the same way, recursively;
3. a weight layer reached in an eager region is quantized in place (:func:`fxqat.capture.layer_quant.quantize_layer`),
   except a torch.nn layer the root calls itself (an LM's ``lm_head``): a one-layer graph region.

The first and last weight layer (in call order) follow ``QATConfig.first_last`` and overrides match qualified names
in the user's model, exactly as in a whole-model graph. What was captured how is returned as a
:class:`CaptureReport` (also stored as ``model.fxqat_capture``).

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QATConfig
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    ...         self.head = nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         if x.sum() > 0:  # data-dependent: the root cannot be traced
    ...             x = -x
    ...         return self.head(self.body(x))
    >>> net = Net()
    >>> report = capture_eager(net, (torch.randn(2, 4),), {}, QATConfig(), "data-dependent control flow")
    >>> [(r.name, r.kind) for r in report.regions]
    [('', 'eager'), ('body', 'graph'), ('head', 'graph')]
    >>> report.regions[0].weight_layers, report.graph_share
    ((), 1.0)
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

from torch import nn

from fxqat.capture.inner_cuts import FP_GRAPH
from fxqat.capture.layer_quant import WEIGHT_QUANT, quantize_layer
from fxqat.capture.lora import is_lora_layer, lora_parts, pin_deepcopy, wrap_lora_layer
from fxqat.capture.param_quant import ParamPlan, quantize_params
from fxqat.capture.recapture import Recapture, Recipe, quantize_region
from fxqat.capture.record import Call, record_calls
from fxqat.capture.region import GraphRegion, check_calls, trace_region
from fxqat.capture.shapes import propagate_shapes
from fxqat.config import QATConfig
from fxqat.layer_registry import holds_weight_layer, is_weight_layer, registered_types, weight_layer_entry
from fxqat.passes.normalize import normalize
from fxqat.quantizers.base import Quantizer

__all__ = ["Region", "CaptureReport", "capture_eager", "CAPTURE_ATTR"]

log = logging.getLogger(__name__)
CAPTURE_ATTR = "fxqat_capture"


@dataclass(frozen=True)
class Region:
    """One captured region.

    Attributes:
        name: qualified module name (``""`` = the root).
        kind: ``"graph"`` (traced) or ``"eager"`` (runs as written).
        reason: why an eager region could not be traced (first line of the error), or ``""``.
        weight_layers: qualified names of the weight layers directly owned by this region (eager: its own weight
            layer children; graph: every weight layer inside it).
    """

    name: str
    kind: str
    reason: str
    weight_layers: Tuple[str, ...]


@dataclass(frozen=True)
class CaptureReport:
    """What :func:`capture_eager` did: the regions in module order and the weight layers it found."""

    regions: Tuple[Region, ...]
    weight_layers: Tuple[str, ...]
    uncalled: Tuple[str, ...] = ()
    #: ``(name, reason)`` of every parameter with >= 2 dims left in floating point (:mod:`fxqat.capture.param_report`)
    unquantized: Tuple[Tuple[str, str], ...] = ()
    #: qualified names of the parameters quantized by :mod:`fxqat.capture.param_quant` (MoE experts, bare weights)
    param_weights: Tuple[str, ...] = ()

    @property
    def graph_share(self) -> float:
        """The share of weight layers that sit in graph regions."""
        n = len(self.weight_layers)
        in_graph = sum(len(r.weight_layers) for r in self.regions if r.kind == "graph")
        return in_graph / n if n else 1.0

    def to_markdown(self) -> str:
        """A table of regions, kinds, weight layers and reasons."""
        lines = ["| region | kind | weight layers | why eager |", "|---|---|---:|---|"]
        for r in self.regions:
            reason = r.reason.replace("|", "/")
            lines.append(f"| `{r.name or '<root>'}` | {r.kind} | {len(r.weight_layers)} | {reason} |")
        lines.append(f"\n{len(self.weight_layers)} weight layers, {self.graph_share:.0%} in graph regions.")
        if self.uncalled:
            lines.append(f"Not called on the example inputs (left in FP): {', '.join(self.uncalled)}.")
        if self.param_weights:
            lines.append(f"Parameters quantized where they are used (not layer modules): {len(self.param_weights)}.")
        if self.unquantized:
            lines += ["", "| parameter (>= 2 dims) left in FP | why |", "|---|---|"]
            lines += [f"| `{n}` | {r.replace('|', '/')} |" for n, r in self.unquantized]
        return "\n".join(lines)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _first_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class _Capturer:
    def __init__(self, config: QATConfig, calls: Dict[str, Call], order: List[str]) -> None:
        self.config = config
        self.calls = calls
        self.order = order
        ends = ((0, "first"), (-1, "last"))
        self.first_last = {order[i] for i, end in ends if end in config.first_last_layers} if order else set()
        self.regions: List[Region] = []
        self.uncalled: List[str] = []
        self.param_quant: Dict[int, Quantizer] = {}  # id(weight Parameter) -> its one weight quantizer
        self.force_leaves: Tuple[str, ...] = ()
        self.plan = ParamPlan({}, {}, frozenset(), {})  # parameters quantized where used (MoE experts, ...)
        self.param_weights: List[str] = []
        self.shared: Set[int] = set()  # ids of weights that more than one quantized layer or parameter owner reads

    def holds_params(self, name: str) -> bool:
        """Whether the module ``name`` or a descendant owns parameters of the plan."""
        return any(o == name or o.startswith(name + ".") or not name for o in self.plan.owners)

    def quantize_own_params(self, module: nn.Module, name: str) -> None:
        layouts = self.plan.owners.get(name)
        if not layouts:
            return
        full = {k: _join(name, k) for k in layouts}
        quantize_params(module, layouts, self.plan.specs[next(iter(full.values()))], name,
                        {k: self.plan.specs[v] for k, v in full.items()})
        self.param_weights += list(full.values())

    # ---------------------------------------------------------------- eager weight layers
    def quantize_eager_layer(self, module: nn.Module, name: str, policy_name: Optional[str] = None) -> bool:
        cfg = self.config
        ov = cfg.override_for(name, module)
        if ov is not None and ov.skip:
            return False
        w_bits = ov.w_bits if ov and ov.w_bits else None
        a_bits = ov.a_bits if ov and ov.a_bits else None
        by_policy = (policy_name or name) in self.first_last and not (ov and (ov.w_bits or ov.a_bits))
        if by_policy:
            if cfg.first_last is None:
                return False
            w_bits = a_bits = cfg.first_last
        method = ov.method if ov else None
        if _join(name, weight_layer_entry(module).weight) in self.plan.fp_layer_weights:
            return False  # a router: FP by default (QATConfig.quantize_router)
        wspec = cfg.spec_for("weight", bits=w_bits, method=method)
        aspec = None
        if cfg.a_bits is not None or a_bits is not None:
            if ov is not None and ov.act_signed is not None:
                signed: Optional[bool] = ov.act_signed
            else:
                signed = None if cfg.act_signed == "auto" else bool(cfg.act_signed)
            aspec = cfg.spec_for("act", bits=a_bits, method=method, signed=signed)
        weight = getattr(module, weight_layer_entry(module).weight)
        shared = self.param_quant.get(id(weight))
        self.param_quant[id(weight)] = quantize_layer(module, wspec, aspec, name, shared, first_last=by_policy)
        return True

    def quantize_lora_layer(self, module: nn.Module, name: str) -> Tuple[str, ...]:
        """A LoRA layer (:mod:`fxqat.capture.lora`): its base layer quantized in place (overrides match the LoRA
        layer's name), its factors never; ``QATConfig.lora`` decides what the weight quantizer sees."""
        if name not in self.calls:
            self.uncalled.append(name)
            return ()
        parts = lora_parts(module)
        base_name = _join(name, next(n for n, m in module.named_modules() if m is parts.base))
        if not self.quantize_eager_layer(parts.base, name, policy_name=base_name):
            return ()
        wq = getattr(parts.base, WEIGHT_QUANT)
        wq.weight_target, wq.weight_layer = f"{base_name}.weight", base_name
        wrap_lora_layer(module, self.config.lora, name)
        return (base_name,)

    # ---------------------------------------------------------------- graph regions
    def head_region(self, parent: nn.Module, cname: str, child: nn.Module, name: str) -> bool:
        """A torch.nn weight layer called by the eager root (an LM's ``lm_head``) captured as a one-layer graph region
        (its input quantizer and weight in a graph, like every other layer); False where it stays a layer quantized in
        place: called by a nested eager module, a foreign or LoRA layer, a chain layer, a router, a weight it shares
        with another quantized layer, or a call that does not trace."""
        weight = weight_layer_entry(child).weight
        if ("." in name or isinstance(child, _foreign_layer_types()) or not type(child).__module__.startswith("torch.nn")
                or name in self.force_leaves or self.calls[name].unbindable_reason
                or _join(name, weight) in self.plan.fp_layer_weights or id(getattr(child, weight)) in self.shared):
            return False
        index = len(self.regions)
        try:
            region, _ = self.try_region(child, name, one_layer=True)
        except Exception as exc:  # noqa: BLE001 - any failure: quantized in place
            log.debug("fxqat: %s stays a layer quantized in place (%s)", name, _first_reason(exc), exc_info=True)
            del self.regions[index:]
            return False
        setattr(parent, cname, region)
        self.regions.insert(index, Region(name, "graph", "", (name,)))
        return True

    def try_region(self, child: nn.Module, name: str, one_layer: bool = False) -> Tuple[GraphRegion, Tuple[str, ...]]:
        """``child`` traced as a graph region, and the names of its leaves captured on their own."""
        call = self.calls[name]
        leaves = tuple(x for x in self.config.leaf_modules if isinstance(x, type)) + _foreign_layer_types()
        leaves += tuple(x[len(name) + 1:] for x in (*self.config.leaf_modules, *self.force_leaves, *self.plan.owners)
                        if isinstance(x, str) and x.startswith(name + "."))
        leaves += tuple(n for n, m in child.named_modules() if n and is_lora_layer(m))  # captured on their own
        region = trace_region(child, call.args, call.kwargs, name, leaves, call.output)
        region = normalize(region)
        propagate_shapes(region, tuple(region.fxqat_binding.flatten(call.args, call.kwargs, name)), name)
        called = {str(n.target) for n in region.graph.nodes if n.op == "call_module"}
        inner = []
        for leaf_name in sorted(called):  # leaves the tracer did not enter: captured on their own
            leaf = region.get_submodule(leaf_name)
            full = _join(name, leaf_name)
            foreign = is_weight_layer(leaf) and isinstance(leaf, _foreign_layer_types())
            holds = holds_weight_layer(leaf) or self.holds_params(full)
            if foreign or (not is_weight_layer(leaf) and holds and full in self.calls):
                parent_name, _, cname = leaf_name.rpartition(".")
                self.capture_module(region.get_submodule(parent_name), cname, leaf, full)
                if not foreign:  # a foreign weight layer is quantized in place but belongs to this graph region
                    inner.append(full)
        if any(isinstance(region.get_submodule(n[len(name) + 1:]), GraphRegion) for n in inner):
            check_calls(region, call.args, call.kwargs)  # its graph calls those regions the way they were captured
        recipe = Recipe(self.config, name, leaves, frozenset(self.first_last), frozenset(self.plan.fp_layer_weights),
                        one_layer)
        # a chain layer: its FP graph gives cuts inside it (HybridConfig.cuts)
        quantize_region(region, recipe, FP_GRAPH if name in self.force_leaves else "")
        region.fxqat_recapture = Recapture(recipe)  # a call of another structure: another graph, same quantizers
        region.train(child.training)
        return region, tuple(inner)

    # ---------------------------------------------------------------- recursion
    def capture_children(self, parent: nn.Module, prefix: str) -> Tuple[str, ...]:
        """Capture every child of the eager module ``parent``; returns the weight layers quantized in place."""
        own: List[str] = []
        for cname, child in list(parent.named_children()):
            own += self.capture_module(parent, cname, child, _join(prefix, cname))
        return tuple(own)

    def capture_module(self, parent: nn.Module, cname: str, child: nn.Module, name: str) -> Tuple[str, ...]:
        """Capture one module (replacing it in ``parent`` when it becomes a graph region); returns the weight layers
        quantized in place directly under the calling eager region."""
        if not (holds_weight_layer(child) or self.holds_params(name)) or _holds_quantizer(child):
            return ()
        if is_lora_layer(child):
            return self.quantize_lora_layer(child, name)
        if is_weight_layer(child):
            if name not in self.calls:
                self.uncalled.append(name)
                return ()
            if self.head_region(parent, cname, child, name):
                return ()
            return (name,) if self.quantize_eager_layer(child, name) else ()
        if name not in self.calls:  # a container (ModuleList, ModuleDict) whose children are called directly
            return self.capture_children(child, name)
        reason = self.calls[name].unbindable_reason
        if name in self.plan.owners:  # its own parameters are quantized where its forward uses them
            reason = reason or "owns weights that are no layer modules (quantized in place where its forward uses them)"
        kept: List[Region] = []
        if not reason:
            index = len(self.regions)
            try:
                region, inner = self.try_region(child, name)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the module eager
                reason = _first_reason(exc)
                kept = self.regions[index:]  # regions captured inside it before the failure stay installed
                del self.regions[index:]
                log.debug("fxqat: %s stays eager (%s)", name, reason, exc_info=True)
            else:
                setattr(parent, cname, region)
                skip = tuple(x + "." for x in inner)
                layers = tuple(q for q in (_join(name, n) for n, m in child.named_modules() if is_weight_layer(m))
                               if q not in inner and not q.startswith(skip))
                self.regions.insert(index, Region(name, "graph", "", layers))
                return ()
        index = len(self.regions)
        self.regions.append(Region(name, "eager", reason, ()))
        self.regions += kept
        own = self.capture_children(child, name)
        self.quantize_own_params(child, name)
        self.regions[index] = Region(name, "eager", reason, own)
        return ()


def _holds_quantizer(m: nn.Module) -> bool:
    return any(isinstance(s, Quantizer) for s in m.modules())


def _shared_weights(model: nn.Module, plan: ParamPlan) -> Set[int]:
    """Ids of the weights read by more than one weight layer, or by a weight layer and a parameter owner of ``plan``
    (a tied embedding quantized where it is used)."""
    seen = Counter(id(getattr(m, weight_layer_entry(m).weight)) for m in model.modules() if is_weight_layer(m))
    for owner, layouts in plan.owners.items():
        module = model.get_submodule(owner) if owner else model
        seen.update(id(getattr(module, k)) for k in layouts if isinstance(getattr(module, k, None), nn.Parameter))
    return {k for k, n in seen.items() if n > 1}


def _foreign_layer_types() -> Tuple[type, ...]:
    """Registered weight layers outside torch.nn (transformers' Conv1D): the tracer keeps them as leaves so that they
    are quantized in place, in their own weight layout."""
    return tuple(t for t in registered_types() if not t.__module__.startswith("torch.nn"))


def capture_eager(
    model: nn.Module, args: Tuple, kwargs: Dict[str, Any], config: QATConfig, root_reason: str,
    calls: Optional[Tuple[Dict[str, Call], List[str]]] = None,
    force_leaves: Tuple[str, ...] = (),
    plan: Optional[ParamPlan] = None,
) -> CaptureReport:
    """Capture ``model`` (in place) with an eager root; returns the :class:`CaptureReport`.

    Args:
        model: the module to capture (already a copy of the user's model).
        args, kwargs: one example call, e.g. ``(input_ids,), {}``.
        config: what to quantize.
        root_reason: why the root could not be traced (for the report).
        calls: the output of :func:`~fxqat.capture.record.record_calls` on ``model`` if already recorded.
        force_leaves: qualified names of modules that must stay modules of their own (e.g. the layers of a block
            chain, so that block replacement can record and replay them) even inside a traceable parent.
        plan: parameters to quantize where they are used (:func:`fxqat.capture.param_quant.plan_params`); their
            owners stay eager modules.
    """
    calls, order = calls if calls is not None else record_calls(model, args, kwargs, is_weight_layer)
    cap = _Capturer(config, calls, order)
    cap.force_leaves = tuple(force_leaves)
    if plan is not None:
        cap.plan = plan
    cap.shared = _shared_weights(model, cap.plan)
    cap.regions.append(Region("", "eager", root_reason, ()))
    own = cap.capture_children(model, "")
    cap.quantize_own_params(model, "")
    cap.regions[0] = Region("", "eager", root_reason, own)
    report = CaptureReport(tuple(cap.regions), tuple(order), tuple(cap.uncalled), param_weights=tuple(cap.param_weights))
    for r in report.regions:
        if r.kind == "eager" and r.name:
            log.info("fxqat: %s runs eagerly (%s); its weight layers are quantized in place", r.name, r.reason)
    setattr(model, CAPTURE_ATTR, report)
    pin_deepcopy(model)  # wrappers that forward attribute lookups (PEFT) copy as themselves
    return report
