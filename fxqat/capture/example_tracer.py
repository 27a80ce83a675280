"""Tracing a graph region with the example call beside it: shapes stay symbolic, branches on them become guards.

``torch.fx`` symbolic tracing knows no values, so attention code such as ``(*x.shape[:-1], -1, head_dim)`` (a shape
unpacked into a ``view``) or ``is_causal = q_len > 1 and ...`` fails: a proxy cannot be iterated or turned into a
``bool``. :class:`ExampleTracer` runs every traced operation a second time on *fake* tensors of the example call
(``FakeTensorMode``: shapes, dtypes and devices, no arithmetic and no data) and keeps the result beside each proxy.
With that value at hand:

* **iteration and ``len``** of a proxy whose value is a tuple (``x.shape``, ``x.shape[:-1]``, a leaf's tuple output)
  yield one proxy per element: ``view(*input_shape, -1, 8)`` is recorded as ``view(x, getitem(size, 0),
  getitem(size, 1), -1, 8)``, so the graph reads the sizes at run time and runs on any batch size or sequence length;
  only the rank is fixed (a call with another rank has another argument structure and is refused anyway);
* **a branch** (``bool``) on a value computed from shapes, dtypes or other non-tensor values follows the example and
  inserts a guard node (:func:`shape_guard`) that re-evaluates the condition on every call and raises
  :class:`GuardFailure` (naming the line of model code) when a new input flips it; sizes used as indices
  (``__index__``) are specialised the same way;
* **a branch on tensor data** (``if x.sum() > 0``) has no fake value and fails as before (the module becomes a leaf);
* **a branch on a module's ``training`` flag** (a run-time graph value, :mod:`fxqat.trace`) follows the traced mode
  when ``specialise_training`` is set; those guards carry ``node.meta[TRAINING_GUARD]`` so that the caller can check
  that the other mode traces to the same program and drop them (:func:`fxqat.capture.region.trace_region`).

Non-tensor objects handed to the region as inputs (a transformers ``DynamicCache``) are *opaque* placeholders: method
calls on them are recorded (``cache.update(k, v, 0)``), and ``isinstance`` sees their recorded class (the region
refuses a call with another class there).

Example:
    >>> import torch, torch.nn as nn
    >>> class Heads(nn.Module):
    ...     def forward(self, x):
    ...         shape = (*x.shape[:-1], 2, -1)
    ...         return x.view(shape).sum(-1) if x.shape[-1] > 2 else x
    >>> tracer = ExampleTracer(examples=(torch.randn(3, 5, 8),))
    >>> gm = torch.fx.GraphModule(tracer.root_for(Heads()), tracer.trace(Heads()))
    >>> gm(torch.randn(4, 7, 8)).shape  # another batch and length: the sizes are read at run time
    torch.Size([4, 7, 2])
    >>> gm(torch.randn(4, 7, 2))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    fxqat.capture.example_tracer.GuardFailure: fxqat captured this code for inputs where the condition in `return ...` ...
"""

from __future__ import annotations

import copy
import linecache
import os
import traceback
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.fx.proxy import Attribute

from fxqat.graph.modinfo import resolve_attr
from fxqat.trace import FxqatTracer

__all__ = ["ExampleTracer", "GuardFailure", "shape_guard", "GUARD", "TRAINING_GUARD", "is_guard"]

GUARD = "fxqat.guard"  # node.meta key of a guard node: the condition's source line
TRAINING_GUARD = "fxqat.training_guard"  # node.meta key: the guard's condition depends on a training flag


class GuardFailure(ValueError):
    """A captured graph region is called with inputs for which a branch of its code goes the other way.

    ``retryable`` is False when the guard runs after the region's graph has changed an object handed to it (a cache
    ``update``): the call cannot be run again with another captured graph (:mod:`fxqat.capture.guards`).
    """

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class _Unknown:
    def __repr__(self) -> str:
        return "<unknown>"


_UNKNOWN = _Unknown()


@fx.node.has_side_effect
def shape_guard(value: Any, expected: bool, where: str, retryable: bool = True) -> None:
    """Raise :class:`GuardFailure` unless ``bool(value) == expected`` (a guard node of a captured region)."""
    if bool(value) != expected:
        raise GuardFailure(
            f"fxqat captured this code for inputs where the condition in {where} was {expected}, but this call makes it "
            f"{not expected}, so the captured graph does not hold for it. Prepare the model with example inputs "
            "shaped like this call (e.g. the same sequence length regime), or keep the module eager with "
            "QATConfig(leaf_modules=[...]).", retryable)


def is_guard(node: fx.Node) -> bool:
    """True for a :func:`shape_guard` node."""
    return node.op == "call_function" and node.target is shape_guard


def _source_line() -> str:
    """`code` (file:line) of the innermost frame outside torch and fxqat: the model line that branched."""
    fxqat_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    for fr in reversed(traceback.extract_stack()):
        path = os.path.abspath(fr.filename)
        if path.startswith(fxqat_dir) or path.startswith(torch_dir):
            continue
        line = (fr.line or linecache.getline(fr.filename, fr.lineno)).strip()
        return f"`{line}` ({os.path.basename(fr.filename)}:{fr.lineno})"
    return "a condition"


class _ExampleProxy(fx.Proxy):
    """A proxy whose ``len``, attributes and ``__index__`` consult the tracer's example values."""

    def __len__(self) -> int:
        return self.tracer.length(self)

    def __index__(self) -> int:
        return self.tracer.specialise_int(self)

    def __getattr__(self, k: str) -> Any:
        return _ExampleAttribute(self, k)


class _ExampleAttribute(Attribute):
    def __len__(self) -> int:
        return self.tracer.length(self)

    def __index__(self) -> int:
        return self.tracer.specialise_int(self)


class _OpaqueProxy(_ExampleProxy):
    """An opaque input (a cache object): ``isinstance`` sees the class it was recorded with."""

    @property
    def __class__(self) -> type:  # type: ignore[override]
        return self.tracer.opaque_types[self.node]


class ExampleTracer(FxqatTracer):
    """An :class:`~fxqat.trace.FxqatTracer` that keeps the fake value of every proxy (see the module docstring).

    Args:
        examples: the values of the root's placeholders, in order (tensors, None, or opaque objects; deep-copied
            before use, so methods the traced code calls on them do not touch the caller's objects).
        specialise_training: follow branches on ``training`` flags (guarded) instead of failing on them.
        *args, **kwargs: :class:`~fxqat.trace.FxqatTracer`'s.
    """

    def __init__(self, *args: Any, examples: Sequence[Any] = (), specialise_training: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.examples = tuple(examples)
        self.specialise_training = specialise_training
        self.values: Dict[fx.Node, Any] = {}
        self.from_training: Set[fx.Node] = set()
        self.opaque_types: Dict[fx.Node, type] = {}
        self.mode: Optional[FakeTensorMode] = None
        self._placeholders = 0
        self._pending_opaque: Optional[type] = None
        self._evaluating = False

    def root_for(self, module: nn.Module) -> nn.Module:
        """The module the graph was traced from (for building a ``GraphModule`` after :meth:`trace`)."""
        return module

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self.values, self.from_training, self.opaque_types, self._placeholders = {}, set(), {}, 0
        self._pending: Dict[fx.Node, Tuple[str, Any, Any, Any]] = {}
        self._order: Dict[fx.Node, int] = {}
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self._fake_examples: List[Any] = [self._fake(x) for x in self.examples]
        try:
            return super().trace(root, concrete_args)
        finally:
            self.values, self._fake_examples, self.mode, self._pending, self._order = {}, [], None, {}, {}

    # ---------------------------------------------------------------- example values
    def _fake(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.mode.from_tensor(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        try:  # an opaque object: its methods run on a copy (results are fake tensors)
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - an object that cannot be copied has no example value
            return _UNKNOWN

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if self._pending_opaque is not None:
            self.opaque_types[node], self._pending_opaque = self._pending_opaque, None
            return _OpaqueProxy(node, self)
        return _ExampleProxy(node, self)

    def value_of(self, obj: Any) -> Any:
        """The example value of a proxy (``_UNKNOWN`` when it has none); other objects are their own value.

        Values are computed on demand (most nodes never need one), for the node and the ancestors not yet computed,
        in the order the nodes were recorded.
        """
        if not isinstance(obj, fx.Proxy):
            return obj
        node = obj.node
        if node not in self.values:
            todo, seen, stack = [], set(), [node]
            while stack:
                n = stack.pop()
                if n in self.values or n not in self._pending or n in seen:
                    continue
                todo.append(n)
                seen.add(n)
                stack.extend(n.all_input_nodes)
            for n in sorted(todo, key=self._order.__getitem__):
                self.values[n] = self._evaluate(*self._pending.pop(n))
        return self.values.get(node, _UNKNOWN)

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None, type_expr: Any = None,
                     proxy_factory_fn: Any = None) -> fx.Proxy:
        eager = kind in ("placeholder", "get_attr")
        value = self._evaluate(kind, target, args, kwargs) if eager else _UNKNOWN
        if kind == "placeholder" and value is not _UNKNOWN and not _is_plain(value):
            self._pending_opaque = type(self.examples[self._placeholders - 1])
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._order[proxy.node] = len(self._order)
        if eager:
            self.values[proxy.node] = value
        else:
            self._pending[proxy.node] = (kind, target, args, kwargs)
        if (kind == "get_attr" and str(target).endswith("training")) or any(
                isinstance(a, fx.Proxy) and a.node in self.from_training for a in _proxies((args, kwargs))):
            self.from_training.add(proxy.node)
        return proxy

    def _evaluate(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            k, self._placeholders = self._placeholders, self._placeholders + 1
            return self._fake_examples[k] if k < len(self._fake_examples) else _UNKNOWN
        if kind == "get_attr":
            self._evaluating = True
            try:
                return self._fake(resolve_attr(self.root, str(target)))
            except AttributeError:
                return _UNKNOWN
            finally:
                self._evaluating = False
        a, k = fx.node.map_aggregate((args, kwargs), self.value_of)
        if _has_unknown((a, k)):
            return _UNKNOWN
        self._evaluating = True
        try:
            with self.mode:
                if kind == "call_function":
                    return target(*a, **k)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **k)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*a, **k)
        except Exception:  # noqa: BLE001 - no example value (data-dependent, or not runnable on fake tensors)
            return _UNKNOWN
        finally:
            self._evaluating = False
        return _UNKNOWN

    def call_module(self, m: nn.Module, forward: Any, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        if self._evaluating:  # running a leaf on example values: plain Python, nothing recorded
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: Dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # ---------------------------------------------------------------- what symbolic tracing cannot do alone
    def _guard(self, obj: fx.Proxy, expected: bool) -> None:
        node = self.create_proxy("call_function", shape_guard, (obj, expected, _source_line()), {}).node
        node.meta[GUARD] = node.args[2]
        if node in self.from_training:
            node.meta[TRAINING_GUARD] = True

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value_of(obj)
        if value is _UNKNOWN or isinstance(value, torch.Tensor):
            return super().to_bool(obj)
        if obj.node in self.from_training and not self.specialise_training:
            return super().to_bool(obj)
        result = bool(value)
        self._guard(obj, result)
        return result

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.value_of(obj)
        if isinstance(value, (tuple, list)):
            return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def length(self, obj: fx.Proxy) -> int:
        """``len`` of a proxy whose example value is a tuple or list (its length is part of the call's structure)."""
        value = self.value_of(obj)
        if isinstance(value, (tuple, list)):
            return len(value)
        raise RuntimeError("'len' is not supported in symbolic tracing for a value fxqat does not know the length of")

    def specialise_int(self, obj: fx.Proxy) -> int:
        """An int-valued proxy used where Python needs an int (``range(n)``): its example value, guarded."""
        value = self.value_of(obj)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError("fxqat cannot use a traced value as a Python int here (its value is not a known int)")
        eq = self.create_proxy("call_function", _equals, (obj, value), {})
        self._guard(eq, True)
        return value


def _equals(a: Any, b: Any) -> bool:
    return a == b


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


def _has_unknown(tree: Any) -> bool:
    found = []
    fx.node.map_aggregate(tree, lambda v: found.append(v) if v is _UNKNOWN else None)
    return bool(found)


def _proxies(tree: Any) -> List[fx.Proxy]:
    found: List[fx.Proxy] = []
    fx.node.map_aggregate(tree, lambda v: found.append(v) if isinstance(v, fx.Proxy) else None)
    return found


