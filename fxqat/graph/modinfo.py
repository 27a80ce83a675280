"""What the partition needs to know about modules: which nodes are quantized, which modules a layer node belongs
to, module stacks, parameter counts.

*Ownership.* A block owns the modules its nodes run (:func:`layer_owners`): a ``call_module`` node runs its module
and, when the module is a leaf the tracer did not enter (``nn.MultiheadAttention``, a module that failed to trace),
the weight layers inside it; a functional layer (``F.conv2d(x, w)`` where ``w`` is a module's parameter, possibly
transformed first, as in weight standardisation) belongs to the module that holds that parameter.

Example:
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    >>> [default_is_quantized(n) for n in gm.graph.nodes], block_params(gm, ["_0"])
    ([False, True, False, False], 9)
"""

from __future__ import annotations

import logging
import weakref
from typing import Collection, Dict, Iterable, List, Optional, Set, Tuple

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fxqat.graph.merge import StackEntry
from fxqat.layer_registry import is_weight_layer

__all__ = ["default_is_quantized", "node_stack", "module_class", "block_params", "parameter_sources", "layer_owners",
           "input_free_nodes", "resolve_attr"]

log = logging.getLogger(__name__)

_QUANT_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_QUANT_FUNCTIONS = frozenset(
    {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
)


def default_is_quantized(node: fx.Node) -> bool:
    """Default granularity predicate: does ``node`` run a layer that fxqat quantizes?

    True for ``call_module`` of ``Conv*``/``ConvTranspose*``/``Linear`` (subclasses included) or of any module with
    such a descendant (e.g. a leaf ``nn.MultiheadAttention``), and for ``call_function`` of ``F.linear``,
    ``F.conv{1,2,3}d`` and ``F.conv_transpose{1,2,3}d``.

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
        >>> [default_is_quantized(n) for n in gm.graph.nodes]
        [False, True, False, False]
    """
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return any(isinstance(m, _QUANT_MODULES) for m in module.modules())
    if node.op == "call_function":
        return node.target in _QUANT_FUNCTIONS
    return False


def _cls_name(cls: object) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)


def node_stack(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> Tuple[StackEntry, ...]:
    """The module stack of ``node``, outermost first, from ``node.meta["nn_module_stack"]``.

    Without that metadata, a ``call_module`` node's stack is rebuilt from its qualified target; other nodes then
    get ``()``. The containers of a traced ``GraphModule`` are then plain ``nn.Module`` objects, so their class is
    approximated by their structure (the names and classes of their leaf submodules, see :func:`module_class`).

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Sequential(nn.ReLU())))
        >>> [e.path for e in node_stack(list(gm.graph.nodes)[1])]
        ['0', '0.0']
    """
    gm = gm if gm is not None else node.graph.owning_module
    entries: List[StackEntry] = []
    for key, value in (node.meta.get("nn_module_stack") or {}).items():
        path, cls = value if isinstance(value, tuple) and len(value) == 2 else (key, value)
        entries.append(StackEntry(str(key), str(path), _cls_name(cls)))
    if node.op == "call_module" and (not entries or entries[-1].path != node.target):
        parts = str(node.target).split(".")
        known = {e.path for e in entries}
        for i in range(1, len(parts) + 1):
            path = ".".join(parts[:i])
            if path not in known:
                entries.append(StackEntry(path, path, module_class(gm.get_submodule(path))))
    return tuple(entries)


_STRUCTURE: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def module_class(module: nn.Module) -> str:
    """``"package.Class"`` of ``module``; for a plain ``nn.Module`` container (what ``GraphModule`` builds for the
    intermediate levels of a qualified target), a description of its structure instead, so that two copies of the
    same block compare equal.

    Example:
        >>> from torch import nn
        >>> module_class(nn.ReLU())
        'torch.nn.modules.activation.ReLU'
        >>> box = nn.Module(); box.conv = nn.Conv2d(1, 1, 1)
        >>> module_class(box)
        'structure(conv:Conv2d)'
    """
    if type(module) is not nn.Module:
        return _cls_name(type(module))
    if module not in _STRUCTURE:
        leaves = [f"{name}:{type(m).__name__}" for name, m in module.named_modules() if name and not list(m.children())]
        _STRUCTURE[module] = f"structure({','.join(leaves)})"
    return _STRUCTURE[module]


def block_params(gm: fx.GraphModule, node_names: Iterable[str]) -> int:
    """Parameter count of a set of nodes: unique parameters of the called submodules and of ``get_attr`` reads.

    This is the cost that ``partition(max_blocks=...)`` minimises when it merges neighbours.

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        >>> block_params(gm, ["_0", "_1"])
        9
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    seen: Dict[int, int] = {}
    for name in node_names:
        node = by_name[name]
        for n in [node, *node.all_input_nodes]:
            if n.op == "call_module":
                params = list(gm.get_submodule(n.target).parameters())
            elif n.op == "get_attr":
                obj = resolve_attr(gm, str(n.target), strict=False)
                params = [obj] if isinstance(obj, nn.Parameter) else []
            else:
                params = []
            seen.update((id(p), p.numel()) for p in params)
    return sum(seen.values())


def input_free_nodes(graph: fx.Graph) -> Set[fx.Node]:
    """The nodes whose value does not depend on any graph input (``get_attr``, constants, and what is computed from
    them only), in one forward pass over the graph.

    Example:
        >>> import torch
        >>> from torch import fx, nn
        >>> class Std(nn.Conv2d):  # weight standardisation: the weight is transformed before the convolution
        ...     def forward(self, x):
        ...         w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        ...         return torch.nn.functional.conv2d(x, w)
        >>> gm = fx.symbolic_trace(nn.Sequential(Std(1, 1, 1)))
        >>> sorted(n.name for n in input_free_nodes(gm.graph))
        ['_0_weight', 'add', 'mean', 'std', 'sub', 'truediv']
    """
    free: Set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if all(a in free for a in node.all_input_nodes):
            free.add(node)
    return free


def parameter_sources(
    node: fx.Node, gm: Optional[nn.Module] = None, free: Optional[Collection[fx.Node]] = None,
) -> Tuple[str, ...]:
    """Qualified names of the parameters ``node``'s value is computed from without any graph input in between.

    ``node`` itself may be a ``get_attr`` of a parameter (its own name is returned) or, e.g., the standardised weight
    of a ``StdConv2d``. ``free`` is :func:`input_free_nodes` of the graph (computed when omitted).

    Example:
        >>> from torch import fx, nn
        >>> gm = fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))
        >>> parameter_sources(list(gm.graph.nodes)[1])  # the Linear call reads its parameters inside the module
        ()
        >>> import torch.nn.functional as F
        >>> class Lin(nn.Linear):
        ...     def forward(self, x):
        ...         return F.linear(x, self.weight * 2, self.bias)
        >>> gm = fx.symbolic_trace(nn.Sequential(Lin(2, 2)))
        >>> lin = next(n for n in gm.graph.nodes if n.target is F.linear)
        >>> parameter_sources(lin.args[1]), parameter_sources(lin)
        (('0.weight',), ('0.weight', '0.bias'))
    """
    gm = gm if gm is not None else node.graph.owning_module
    free = free if free is not None else input_free_nodes(node.graph)
    found: Dict[str, None] = {}
    seen: Set[fx.Node] = set()
    stack = [node] if node.op == "get_attr" else [a for a in node.all_input_nodes if a in free]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            if isinstance(resolve_attr(gm, str(n.target), strict=False), nn.Parameter):
                found[str(n.target)] = None
        elif n.op != "call_module":  # a module's own parameters are its own, not a source of this value
            stack.extend(a for a in reversed(n.all_input_nodes) if a in free)
    return tuple(sorted(found, key=_source_order(node)))


def _source_order(node: fx.Node):
    order = {str(n.target): i for i, n in enumerate(node.graph.nodes) if n.op == "get_attr"}
    return lambda target: order.get(target, len(order))


def layer_owners(
    node: fx.Node, gm: Optional[nn.Module] = None, free: Optional[Collection[fx.Node]] = None,
) -> Tuple[str, ...]:
    """The modules whose computation ``node`` runs (see *Ownership* in the module docstring).

    * ``call_module``: the module, then the weight layers (:func:`fxqat.layer_registry.is_weight_layer`) inside it
      when it has children (a leaf the tracer did not enter runs them);
    * ``call_function`` / ``call_method``: the modules holding the parameters it reads, directly or through
      input-independent computations (:func:`parameter_sources`), in graph order; root-level parameters have no
      owning submodule and are left out.

    Example:
        >>> import torch.nn.functional as F
        >>> from torch import fx, nn
        >>> class Lin(nn.Linear):  # timm's Linear: a subclass whose forward calls F.linear
        ...     def forward(self, x):
        ...         return F.linear(x, self.weight, self.bias)
        >>> gm = fx.symbolic_trace(nn.Sequential(Lin(2, 2), nn.ReLU()))
        >>> [(n.name, layer_owners(n)) for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        [('linear', ('0',)), ('_1', ('1',))]
    """
    gm = gm if gm is not None else node.graph.owning_module
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        inner = [f"{node.target}.{name}" for name, m in module.named_modules() if name and is_weight_layer(m)]
        return (str(node.target), *inner)
    if node.op not in ("call_function", "call_method"):
        return ()
    owners = (p.rpartition(".")[0] for p in parameter_sources(node, gm, free))
    return tuple(dict.fromkeys(o for o in owners if o))


def resolve_attr(root: nn.Module, target: str, strict: bool = True) -> object:
    """The object at the dotted path ``target`` below ``root`` (a ``get_attr`` node's target).

    Args:
        root: the module the path starts from.
        target: a dotted attribute path such as ``"layers.0.weight"``.
        strict: raise ``AttributeError`` on a missing part; otherwise return ``None``.

    Example:
        >>> import torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(2, 3))
        >>> tuple(resolve_attr(m, "0.weight").shape), resolve_attr(m, "0.nope", strict=False)
        ((3, 2), None)
    """
    obj: object = root
    for part in target.split("."):
        obj = getattr(obj, part) if strict else getattr(obj, part, None)
    return obj
