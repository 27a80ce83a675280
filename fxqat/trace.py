"""Symbolic tracing with automatic leaf fallback and mode-independent graphs.

:func:`trace` runs ``torch.fx`` symbolic tracing with three additions:

1. **Leaf fallback.** When tracing fails inside a submodule (data-dependent control flow, unsupported Python), that
   submodule becomes a leaf (called as a black box) and tracing starts again, until it succeeds. Every module left
   opaque is logged as a warning and listed in ``gm.meta["fxqat.opaque"]``. A failure in the root module's own code
   raises :class:`TraceFailure` naming the line of user code.
2. **Train/eval independence.** While a module is traced, its ``training`` attribute is a graph value read at run
   time (a ``get_attr`` of ``<module>.training``), so ``F.dropout(x, p, self.training)`` or torchvision's
   ``stochastic_depth`` follow ``.train()``/``.eval()`` of the traced model instead of freezing the mode seen
   during tracing. A Python ``if self.training:`` cannot be traced that way; such modules become leaves through (1).
3. **User leaves**, by type or qualified name.

Example:
    >>> import torch, torch.nn as nn, torch.nn.functional as F
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return F.dropout(self.fc(x), 0.5, self.training)
    >>> gm = trace(Net())
    >>> y = gm.eval()(torch.ones(2, 4)); bool(torch.equal(y, gm.fc(torch.ones(2, 4))))
    True
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from fxqat.layer_registry import holds_weight_layer

__all__ = ["trace", "FxqatTracer", "TraceFailure", "adopt_hierarchy"]

log = logging.getLogger(__name__)


class TraceFailure(RuntimeError):
    """The model could not be traced even with every failing submodule as a leaf."""


class FxqatTracer(fx.Tracer):
    """A ``torch.fx.Tracer`` with user leaves, a failure stack, and run-time ``training`` flags.

    Args:
        leaf_types: module types never entered.
        leaf_names: qualified module names never entered.
        dynamic_training: make each traced module's ``training`` a run-time graph value.
    """

    def __init__(
        self,
        leaf_types: Tuple[type, ...] = (),
        leaf_names: Iterable[str] = (),
        dynamic_training: bool = True,
        dynamic_root: bool = True,
    ) -> None:
        super().__init__()
        self.dynamic_root = dynamic_training and dynamic_root
        self._root_flag: Optional[bool] = None
        self.leaf_types = tuple(leaf_types)
        self.leaf_names: Set[str] = set(leaf_names)
        self.dynamic_training = dynamic_training
        self.module_path: List[str] = []
        self.fail_stack: Optional[List[str]] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:  # a stateless module held outside the hierarchy (a function wrapped as a module): inline
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self.module_path.append(name)
        restore = self._proxy_training(m, name)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.fail_stack is None:
                self.fail_stack = list(self.module_path)
            raise
        finally:
            if restore is not None:
                object.__setattr__(m, "training", restore)
            self.module_path.pop()

    def _proxy_training(self, m: nn.Module, name: str) -> Optional[bool]:
        if not self.dynamic_training:
            return None
        flag = m.training
        target = f"{name}.training" if name else "training"
        object.__setattr__(m, "training", self.create_proxy("get_attr", target, (), {}))
        return flag

    def create_args_for_root(self, root_fn: Any, is_module: bool, concrete_args: Any = None) -> Any:
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module and self.dynamic_root:
            self._root_flag = self._proxy_training(self.root, "")
        return out

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> fx.Graph:
        self.fail_stack = None
        self._root_flag = None
        try:
            return super().trace(root, concrete_args)
        finally:
            if self._root_flag is not None:
                object.__setattr__(root, "training", self._root_flag)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and fxqat, as 'file:line: code'."""
    here = os.path.dirname(os.path.abspath(__file__))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    best = None
    for fr in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(fr.filename)
        if path.startswith(here) or path.startswith(torch_dir):
            continue
        best = fr
    if best is None:
        return "<unknown location>"
    return f"{best.filename}:{best.lineno}: {best.line}"


def _leaf_spec(leaves: Sequence[Union[str, type]]) -> Tuple[Tuple[type, ...], Set[str]]:
    types = tuple(x for x in leaves if isinstance(x, type))
    names = {x for x in leaves if isinstance(x, str)}
    bad = [x for x in leaves if not isinstance(x, (str, type))]
    if bad:
        raise ValueError(f"leaf_modules must hold module types or qualified names, got {bad!r}.")
    return types, names


def _same_code(model: nn.Module, failing: str, done: Set[str]) -> List[str]:
    """``failing`` and, when it holds no weight layer, every other module of its class (they run the same code and
    fail the same way: timm's BatchNormAct2d branches on the training flag in each of mobileone_s0's 113 blocks).
    Modules holding weight layers stay one at a time, so a class that fails only in some configurations keeps its
    other instances traced."""
    mod = model.get_submodule(failing)
    if holds_weight_layer(mod):
        return [failing]
    same = [n for n, m in model.named_modules() if n and n != failing and type(m) is type(mod) and n not in done]
    return [failing] + same


def adopt_hierarchy(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` the root's own children, parameters and buffers (same objects).

    ``fx.GraphModule`` copies only the attributes the graph touches, wrapping them in plain ``nn.Module``
    containers; keeping the real hierarchy preserves module types (a ``Linear`` read through ``F.linear(x,
    self.fc.weight)`` is still a ``Linear``) and makes the ``state_dict`` keys those of the user's model.
    """
    for name, child in root.named_children():
        gm.add_module(name, child)
    for name, p in root.named_parameters(recurse=False):
        gm.register_parameter(name, p)
    for name, b in root.named_buffers(recurse=False):
        gm.register_buffer(name, b, persistent=name not in root._non_persistent_buffers_set)




def trace(
    model: nn.Module,
    concrete_args: Optional[Dict[str, Any]] = None,
    leaf_modules: Sequence[Union[str, type]] = (),
    dynamic_training: bool = True,
    tracer_cls: type = FxqatTracer,
    warn: bool = True,
) -> fx.GraphModule:
    """Symbolically trace ``model``, turning untraceable submodules into leaves.

    Args:
        model: the module to trace (not modified).
        concrete_args: forwarded to ``torch.fx.Tracer.trace`` (specialise non-tensor arguments).
        leaf_modules: module types or qualified names to keep opaque from the start.
        dynamic_training: read each traced module's ``training`` flag at run time (see the module docstring).
        tracer_cls: the :class:`FxqatTracer` subclass to use.
        warn: log each module made a leaf as a warning (else at debug level, for callers that report them).

    Returns:
        A ``GraphModule``; ``gm.meta["fxqat.opaque"]`` lists the modules made leaves automatically.

    Raises:
        TraceFailure: when the root module's own code cannot be traced; the message names the line.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxqat.trace expects an nn.Module, got {type(model).__name__}.")
    leaf_types, leaf_names = _leaf_spec(leaf_modules)
    auto: List[str] = []
    reasons: Dict[str, str] = {}
    root_specialised = False
    # every retry makes one more module a leaf: at most one pass per module, so no arbitrary cap is needed
    max_tries = sum(1 for _ in model.modules()) + 2
    for _ in range(max_tries):
        tracer = tracer_cls(leaf_types, leaf_names | set(auto), dynamic_training, not root_specialised)
        try:
            graph = tracer.trace(model, concrete_args)
            break
        except Exception as exc:  # noqa: BLE001 - any tracing error triggers the fallback
            stack = tracer.fail_stack or []
            if stack and stack[-1]:
                failing = stack[-1]
                log.debug("tracing %s failed (%s: %s); retrying it as a leaf", failing, type(exc).__name__, exc)
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                for name in _same_code(model, failing, set(auto)):
                    auto.append(name)
                    reasons[name] = reason if name == failing else f"{reason} (as {failing}, same class)"
                continue
            if dynamic_training and not root_specialised:  # maybe `if self.training:` in the root: retry static
                root_specialised = True
                continue
            raise TraceFailure(
                f"fxqat could not trace {type(model).__name__} (the root module): {type(exc).__name__}: {exc}\n"
                f"  at {_user_frame(exc)}\n"
                "Make this code traceable (no Python control flow on tensor values at the top level), move it into a "
                "submodule (which fxqat then keeps as a leaf), or pass concrete_args for non-tensor arguments."
            ) from exc
    else:  # pragma: no cover - guard against pathological models
        raise TraceFailure(f"fxqat gave up tracing {type(model).__name__} after {max_tries} leaf retries: {auto}")
    if root_specialised:
        log.warning(
            "%s.forward branches on self.training at the top level: the traced graph follows the mode it was traced "
            "in (%s). Move that branch into a submodule to keep train and eval behaviour.",
            type(model).__name__,
            "train" if model.training else "eval",
        )
    for node in list(graph.nodes):  # run-time training flags nobody read
        if node.op == "get_attr" and str(node.target).endswith("training") and not node.users:
            graph.erase_node(node)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    adopt_hierarchy(gm, tracer.root)
    alike = {m: sum(r.endswith(f"(as {m}, same class)") for r in reasons.values()) for m in auto}
    for mod in auto:
        if reasons[mod].endswith(", same class)"):  # reported with the module it was made a leaf with
            continue
        more = f" (and {alike[mod]} more of its class)" if alike[mod] else ""
        log.log(logging.WARNING if warn else logging.DEBUG,
            "fxqat: module %r%s (%s) could not be traced (%s); it is kept as a leaf: its conv/linear weights are "
            "still quantized, activations inside it are not.", mod, more, type(model.get_submodule(mod)).__name__,
            reasons[mod]
        )
    gm.meta["fxqat.opaque"] = tuple(auto)
    gm.meta["fxqat.opaque_reasons"] = {m: reasons[m] for m in auto}
    return gm
