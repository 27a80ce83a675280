"""Graph regions: a submodule traced with its signature bound to the call it received on the example inputs.

A transformer layer is called as ``layer(hidden, attention_mask=None, position_embeddings=(cos, sin),
use_cache=False)``: keyword arguments, ``None``/bool flags, tuples of tensors, often through a decorated ``forward``.
:func:`trace_region` flattens that recorded call: every tensor becomes a graph input, every other value (``None``,
bools, numbers, strings, dtypes) a constant the graph is specialised to. A ``None`` that the module only hands on to
other modules (the attention mask a decoder layer passes to its attention) stays an input instead: the graph traced
with it as an input must be the graph traced with it fixed to ``None``, op for op, so either value runs the same
code. Transformers passes ``None`` there in eager mode but a mask tensor under ``torch.compile``; both calls work. The result is a :class:`GraphRegion`, a
``GraphModule`` over the module's own children (same names, same parameters) that is called exactly like the
original module and checks, on each call, that the constants still hold (a clear error otherwise).

Example:
    >>> import torch, torch.nn as nn
    >>> class Layer(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x, scale=None, pair=None, **kwargs):
    ...         a, b = pair
    ...         return self.fc(x) * a + b if scale is None else x
    >>> layer, x, pair = Layer(), torch.randn(2, 4), (torch.ones(1), torch.zeros(1))
    >>> region = trace_region(layer, (x,), {"pair": pair}, "layer")
    >>> bool(torch.equal(region(x, pair=pair), layer(x, pair=pair)))
    True
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from fxqat.capture.binding import Binding, Unbindable, bind_call, canonical_call, positional_names
from fxqat.capture.dispatch import Variant, run_variants
from fxqat.capture.example_tracer import GUARD, TRAINING_GUARD, ExampleTracer, is_guard
from fxqat.capture.guards import hoist_guards
from fxqat.capture.modes import drop_training_guards, merge_modes, program_key, same_program, training_flags
from fxqat.capture.no_cache import nullable_slots
from fxqat.trace import TraceFailure, adopt_hierarchy, trace

__all__ = ["GraphRegion", "Origin", "trace_region", "restore_module", "check_calls"]

_INNER = "fxqat_inner"


@dataclasses.dataclass(frozen=True)
class Origin:
    """What a graph region keeps of the module it was traced from, to rebuild it (:func:`restore_module`).

    Attributes:
        cls: the module's class.
        attrs: its plain (public, non-module) attributes, copied onto the region (``config``, ``layer_idx``, ...).
        children, params, buffers: the names of its own children, parameters (also those registered as ``None``)
            and buffers (adopted by the region).
    """

    cls: type
    attrs: Tuple[str, ...]
    children: Tuple[str, ...]
    params: Tuple[str, ...]
    buffers: Tuple[str, ...]


def _names(entries: Dict[str, Any]) -> Tuple[str, ...]:
    return tuple(k for k, v in entries.items() if v is not None)


class _Shim(nn.Module):
    """Root traced for a region: rebuilds the call from flat tensors and runs the module's own ``forward``."""

    def __init__(self, inner: nn.Module, binding: Binding, n_leaves: int) -> None:
        super().__init__()
        self.add_module(_INNER, inner)
        self.binding, self.n_leaves = binding, n_leaves

    def forward(self, *flat):
        leaves: List[Any] = [None] * self.n_leaves
        for i, v in self.binding.constants:
            leaves[i] = v
        for i, t in zip(self.binding.inputs, flat):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.binding.spec)
        inner = getattr(self, _INNER)
        return type(inner).forward(inner, *args, **kwargs)


class _RegionTracer(ExampleTracer):
    """Also makes the inner module's own ``training`` flag a run-time value (its forward is entered directly)."""

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        inner = getattr(self.root, _INNER)
        self._inner_flag = self._proxy_training(inner, _INNER)
        return out

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._inner_flag = None
        try:
            return super().trace(root, concrete_args)
        finally:
            if self._inner_flag is not None:
                object.__setattr__(getattr(root, _INNER), "training", self._inner_flag)


class GraphRegion(fx.GraphModule):
    """A traced submodule called like the original (see the module docstring).

    ``graph`` takes the flat tensors of the call; ``forward(*args, **kwargs)`` binds a call to them. A region made
    by :mod:`fxqat.capture.hierarchy` also holds ``fxqat_recapture``: a call that matches none of its graphs (another
    argument structure, or a guard that goes the other way) is captured again as a :class:`Variant` over the same
    modules and quantizers (:mod:`fxqat.capture.recapture`).
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, binding: Binding, name: str, class_name: str) -> None:
        super().__init__(root, graph, class_name)
        adopt_hierarchy(self, root)
        self.fxqat_binding = binding
        self.fxqat_region = name
        self.fxqat_output_type: Optional[type] = None
        self.fxqat_recapture: Optional[Callable[..., Variant]] = None
        self.fxqat_variants: List[Variant] = []
        self.fxqat_last = -1  # the graph that ran the last call (-1: the region's own)

    def recompile(self):
        out = super().recompile()
        cls = type(self)
        if "forward" in cls.__dict__:  # the generated code takes the flat tensors; forward binds a call to them
            cls.flat_forward = cls.__dict__["forward"]
            delattr(cls, "forward")
        return out

    def __deepcopy__(self, memo: Dict[int, Any]) -> "GraphRegion":
        res = super().__deepcopy__(memo)
        res.fxqat_binding, res.fxqat_region = self.fxqat_binding, self.fxqat_region
        res.fxqat_output_type = self.fxqat_output_type
        res.fxqat_recapture = self.__dict__.get("fxqat_recapture")
        res.fxqat_variants = list(self.__dict__.get("fxqat_variants", ()))
        res.fxqat_last = self.__dict__.get("fxqat_last", -1)
        origin = self.__dict__.get("fxqat_origin")
        if origin is not None:  # the module's plain attributes, which GraphModule's own copy drops
            res.fxqat_origin = origin
            for key in origin.attrs:
                if key in self.__dict__:
                    res.__dict__[key] = copy.deepcopy(self.__dict__[key], memo)
        for name, child in self._modules.items():  # children the graph does not reference (kept, like the original)
            if name not in res._modules:
                res.add_module(name, copy.deepcopy(child, memo))
        for name, p in self._parameters.items():
            if name not in res._parameters:
                res.register_parameter(name, copy.deepcopy(p, memo))
        for name, b in self._buffers.items():
            if name not in res._buffers:
                res.register_buffer(name, copy.deepcopy(b, memo), persistent=name not in self._non_persistent_buffers_set)
        res.train(self.training)
        return res

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("fxqat_recapture") is None and not self.__dict__.get("fxqat_variants"):
            out = self.flat_forward(*self.fxqat_binding.flatten(args, kwargs, self.fxqat_region))
        else:
            out = run_variants(self, args, kwargs)
        if self.fxqat_output_type is not None and type(out) is dict:  # torch.fx returns dict subclasses as dicts
            return self.fxqat_output_type(**out)
        return out


class _InitStop(nn.Module):
    """Ends ``__init__`` chains at ``nn.Module`` so that a region class can also subclass the user's module class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)


_REGION_CLASSES: Dict[type, type] = {}


def _region_class(cls: type) -> type:
    """``GraphRegion`` that is also an instance of ``cls`` (``isinstance`` checks and wrap policies keep working)."""
    if not isinstance(cls, type) or issubclass(cls, fx.GraphModule):
        return GraphRegion
    sub = _REGION_CLASSES.get(cls)
    if sub is None:
        try:
            sub = type(cls.__name__, (GraphRegion, _InitStop, cls), {"__module__": cls.__module__})
        except TypeError:  # an incompatible layout or metaclass: fall back to a plain region
            sub = GraphRegion
        _REGION_CLASSES[cls] = sub
    return sub


def _strip_inner(graph: fx.Graph) -> None:
    prefix = _INNER + "."
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and isinstance(node.target, str):
            if node.target == _INNER:
                raise Unbindable("the module calls itself")
            if node.target.startswith(prefix):
                node.target = node.target[len(prefix):]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (v[0][len(prefix):] if v[0].startswith(prefix) else v[0], v[1]) for k, v in stack.items()
            }


def _trace_shim(module: nn.Module, binding: Binding, examples: Sequence[Any], inner_leaves: Tuple, name: str,
                specialise_training: bool) -> fx.GraphModule:
    shim = _Shim(module, binding, len(binding.constants) + len(binding.inputs))
    tracer = functools.partial(_RegionTracer, examples=examples, specialise_training=specialise_training)
    try:
        return trace(shim, tuple(fx.PH for _ in binding.inputs), inner_leaves, tracer_cls=tracer, warn=False)
    except TraceFailure as exc:
        raise TraceFailure(str(exc).replace(f"{_Shim.__name__} (the root module)", f"{name} ({type(module).__name__})")
                           .replace(_INNER + ".", "")) from exc.__cause__


def _trace_both_modes(module: nn.Module, binding: Binding, examples: Sequence[Any], inner_leaves: Tuple,
                      name: str) -> fx.GraphModule:
    """Trace with branches on ``training`` flags following the module's mode; when there are such branches, trace
    the other mode too and keep one graph for both (:func:`fxqat.capture.modes.merge_modes`), else trace with such
    branches failing (the module whose code branches becomes a leaf, as for any untraceable code)."""
    gm = _trace_shim(module, binding, examples, inner_leaves, name, True)
    if not any(n.meta.get(TRAINING_GUARD) for n in gm.graph.nodes):
        return gm
    flags = [(m, m.training) for m in module.modules()]
    mode = module.training
    try:
        if any(flag != mode for _, flag in flags):  # trace both modes with uniform flags
            module.train(mode)
            gm = _trace_shim(module, binding, examples, inner_leaves, name, True)
        module.train(not mode)
        other: Optional[fx.GraphModule] = _trace_shim(module, binding, examples, inner_leaves, name, True)
    except TraceFailure:
        other = None
    finally:
        for m, flag in flags:
            m.training = flag
    if other is not None:
        read = training_flags(gm.graph)
        merged = merge_modes(drop_training_guards(gm.graph), drop_training_guards(other.graph), mode,
                             f"{_INNER}.training", read)
        if merged is not None:
            gm.recompile()
            return gm
    return _trace_shim(module, binding, examples, inner_leaves, name, False)


def _examples(binding: Binding, args: Tuple, kwargs: Dict[str, Any]) -> List[Any]:
    """The values of ``binding``'s graph inputs in the call ``(args, kwargs)`` (``None`` at optional inputs)."""
    args, kwargs = canonical_call(binding.positional, args, kwargs)
    leaves = pytree.tree_leaves((tuple(args), dict(sorted(kwargs.items()))))
    return [leaves[i] for i in binding.inputs]


#: (class, binding, traced program) -> (inputs made of handed-on constants, nullable cache inputs): the decoder
#: layers of a model are one class called alike, and the second one's decisions are the first one's
_DECISIONS: Dict[Tuple[Any, str, str], Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}


def _decide_inputs(module: nn.Module, binding: Binding, gm: fx.GraphModule, args: Tuple, kwargs: Dict[str, Any],
                   inner_leaves: Tuple, name: str) -> Tuple[fx.GraphModule, Binding]:
    """Which ``None``/bool constants become inputs and which cache inputs may be ``None`` (module docstring)."""
    nones = tuple(i for i, v in binding.constants if v is None)
    flags = tuple(i for i, v in binding.constants if type(v) is bool)
    recorded = dict(binding.constants)
    opaque_marks = [("opaque", j) for j in range(len(binding.opaque))]
    for handed_on in dict.fromkeys(x for x in (nones + flags, flags, nones) if x):
        # Nones (and flags) the module only passes on become inputs, if that traces to the same graph
        passing = binding.with_optional(handed_on)
        try:
            gm_opt = _trace_both_modes(module, passing, _examples(passing, args, kwargs), inner_leaves, name)
        except TraceFailure:
            gm_opt = None
        if gm_opt is not None and same_program(gm.graph, gm_opt.graph, len(binding.tensors), opaque_marks,
                                               [recorded[i] for i in passing.optional] + opaque_marks):
            gm, binding = gm_opt, passing
            break
    if binding.opaque:  # a cache argument that may also be None (use_cache=False)
        binding = dataclasses.replace(binding, nullable=nullable_slots(
            binding, lambda b: _trace_both_modes(module, b, _examples(b, args, kwargs), inner_leaves, name)))
    return gm, binding


def trace_region(
    module: nn.Module, args: Tuple, kwargs: Dict[str, Any], name: str, leaf_modules: Sequence = (),
    example_output: Any = None,
) -> GraphRegion:
    """Trace ``module`` for calls shaped like ``module(*args, **kwargs)``.

    ``example_output`` (the output of that call) restores a dict subclass (a transformers ``ModelOutput``) that
    torch.fx would return as a plain dict.

    Raises:
        Unbindable: an argument is neither a tensor nor a constant.
        TraceFailure: the module's own code cannot be traced.
    """
    binding, _ = bind_call(args, kwargs, name, positional_names(module))
    inner_leaves = tuple(f"{_INNER}.{x}" if isinstance(x, str) else x for x in leaf_modules)
    gm = _trace_both_modes(module, binding, _examples(binding, args, kwargs), inner_leaves, name)
    key = (type(module), repr(binding), program_key(gm.graph))
    decided = _DECISIONS.get(key)
    if decided is not None:  # a module of the same class whose call traced to the same program: same decisions
        if decided[0]:
            binding = binding.with_optional(decided[0])
            gm = _trace_both_modes(module, binding, _examples(binding, args, kwargs), inner_leaves, name)
        binding = dataclasses.replace(binding, nullable=decided[1])
    else:
        gm, binding = _decide_inputs(module, binding, gm, args, kwargs, inner_leaves, name)
        if len(_DECISIONS) > 256:
            _DECISIONS.clear()
        _DECISIONS[key] = (binding.optional, binding.nullable)
    graph = gm.graph
    _strip_inner(graph)
    for node in graph.nodes:  # guards name the region they belong to
        if is_guard(node):
            node.args = (*node.args[:2], f"{node.meta[GUARD]} in module {name!r}", *node.args[3:])
    hoist_guards(graph, len(binding.opaque))
    region = _region_class(type(module))(module, graph, binding, name, type(module).__name__)
    attrs = []
    for key, value in module.__dict__.items():  # plain attributes (config, layer_idx, ...) for the class's methods
        if not key.startswith("_") and key not in region.__dict__ and key != "training":
            region.__dict__[key] = value
            attrs.append(key)
    region.fxqat_origin = Origin(type(module), tuple(attrs), _names(module._modules), tuple(module._parameters),
                                 _names(module._buffers))
    region.meta["fxqat.opaque"] = tuple(x[len(_INNER) + 1:] for x in gm.meta.get("fxqat.opaque", ()))
    if isinstance(example_output, dict) and type(example_output) is not dict:
        region.fxqat_output_type = type(example_output)
    region.train(module.training)
    return region


def check_calls(region: GraphRegion, args: Tuple, kwargs: Dict[str, Any]) -> None:
    """Run ``region`` once on its example call (no grad, RNG and buffers restored), so that a graph region inside it
    that refuses the call its graph makes (traced code may build an argument another way than the eager code did,
    e.g. a mask tensor where the eager call passed ``None``) fails here, at capture, and not at the first forward.

    The regions inside do not capture other graphs meanwhile (:mod:`fxqat.capture.dispatch`): a parent whose traced
    code calls them otherwise than its eager code stays eager, so that they keep receiving the calls they were
    captured for (``None`` masks and sdpa's ``is_causal``, not masks built by traced code), at no capture cost.

    Raises:
        ValueError: a region inside ``region`` refuses its call.
    """
    saved = {k: b.clone() for k, b in region.named_buffers()}
    inner = [(m, m.__dict__.get("fxqat_recapture")) for m in region.modules()
             if isinstance(m, GraphRegion) and m is not region]
    try:
        for m, _ in inner:
            m.fxqat_recapture = None
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            region(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    finally:
        for m, recapture in inner:
            m.fxqat_recapture = recapture
        for k, b in region.named_buffers():
            b.copy_(saved[k])


def restore_module(region: GraphRegion) -> nn.Module:
    """The module ``region`` was traced from, rebuilt: an instance of its own class holding the region's children,
    parameters, buffers and plain attributes (the same objects), whose ``forward`` is the class's code again.

    Whatever the region's graph adds to that code (fxqat's quantizer nodes) is not part of the result: call it once
    those are removed or handed off (:func:`fxqat.export.to_torchao`). Hooks registered on the region are not kept.

    Raises:
        ValueError: ``region`` has no :class:`Origin` (it was not made by :func:`trace_region`).

    Example:
        >>> layer = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> region = trace_region(layer, (torch.randn(2, 4),), {}, "layer")
        >>> back = restore_module(region)
        >>> type(back).__name__, back[0] is region[0]
        ('Sequential', True)
    """
    origin = region.__dict__.get("fxqat_origin")
    if origin is None:
        raise ValueError(f"{type(region).__name__} holds no record of the module it was traced from.")
    module = origin.cls.__new__(origin.cls)
    nn.Module.__init__(module)
    for key in origin.attrs:
        if key in region.__dict__:
            module.__dict__[key] = region.__dict__[key]
    for name in origin.children:
        module._modules[name] = region._modules[name]
    for name in origin.params:  # a parameter registered as None (nn.Linear(bias=False)) stays None
        module._parameters[name] = region._parameters.get(name)
    for name in origin.buffers:
        module.register_buffer(name, region._buffers[name], persistent=name not in region._non_persistent_buffers_set)
    return module.train(region.training)
