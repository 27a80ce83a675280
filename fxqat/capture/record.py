"""Record how every submodule is called on the example inputs (arguments, call order), with forward pre-hooks.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> calls, order = record_calls(net, (torch.randn(3, 4),), {}, lambda m: isinstance(m, nn.Linear))
    >>> order, calls["2"].args[0].shape, calls["2"].n_calls
    (['0', '2'], torch.Size([3, 4]), 1)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxqat.capture.binding import CONSTANT_TYPES, Binding, Unbindable, bind_call, positional_names

__all__ = ["Call", "record_calls", "snapshot_objects", "detach_call"]


@dataclass
class Call:
    """The first call a module received, and whether all its calls bind to one graph signature.

    Attributes:
        args, kwargs: the first call's arguments (tensors are the example's own).
        tensors: the flat tensor inputs of that call.
        binding: its :class:`~fxqat.capture.region.Binding` (None when unbindable).
        unbindable_reason: why no single graph signature fits every call ("" when one does).
        n_calls: how many times the module was called.
        seq: the position of the first call among all module calls.
        output: the first call's output.
    """

    args: Tuple
    kwargs: Dict[str, Any]
    tensors: List[torch.Tensor] = field(default_factory=list)
    binding: Any = None
    unbindable_reason: str = ""
    n_calls: int = 0
    seq: int = -1
    output: Any = None


def snapshot_objects(args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
    """``(args, kwargs)`` with every object that is neither a tensor nor a constant (a transformers ``DynamicCache``)
    replaced by a deep copy: its state at the time of the call, which later calls in the same forward change (a
    cache gains every layer's keys and values). Tensors stay the example's own; an object that cannot be copied
    stays itself."""

    def copy_object(leaf: Any) -> Any:
        if isinstance(leaf, (torch.Tensor, nn.Module)) or isinstance(leaf, CONSTANT_TYPES) or callable(leaf):
            return leaf
        try:
            return copy.deepcopy(leaf)
        except Exception:  # noqa: BLE001 - not copyable: keep the object itself
            return leaf

    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    new_args, new_kwargs = pytree.tree_unflatten([copy_object(x) for x in leaves], spec)
    return tuple(new_args), dict(new_kwargs)


def _tensors_in(obj: Any, memo: Dict[int, Any], depth: int = 6) -> None:
    """Map every tensor reachable from ``obj`` (attributes, lists, tuples, dicts) to a detached alias in ``memo``."""
    if isinstance(obj, torch.Tensor):
        memo.setdefault(id(obj), obj.detach())
        return
    if depth == 0 or isinstance(obj, CONSTANT_TYPES) or isinstance(obj, nn.Module) or id(obj) in memo:
        return
    items = (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple))
             else vars(obj).values() if hasattr(obj, "__dict__") else ())
    for item in list(items):
        _tensors_in(item, memo, depth - 1)


def detach_call(args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
    """``(args, kwargs)`` with tensors detached and every other object (a cache holding tensors of an autograd graph,
    which ``copy.deepcopy`` refuses) replaced by a copy holding detached tensors: a call to trace, not to run.

    Example:
        >>> a, k = detach_call((torch.ones(1, requires_grad=True) * 2,), {"n": 3})
        >>> a[0].requires_grad, k
        (False, {'n': 3})
    """
    memo: Dict[int, Any] = {}

    def copy_leaf(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.detach()
        if isinstance(leaf, nn.Module) or isinstance(leaf, CONSTANT_TYPES) or callable(leaf):
            return leaf
        _tensors_in(leaf, memo)
        try:
            return copy.deepcopy(leaf, dict(memo))
        except Exception:  # noqa: BLE001 - not copyable: keep the object itself
            return leaf

    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    new_args, new_kwargs = pytree.tree_unflatten([copy_leaf(x) for x in leaves], spec)
    return tuple(new_args), dict(new_kwargs)


def record_calls(
    model: nn.Module, args: Tuple, kwargs: Dict[str, Any], is_layer: Callable[[nn.Module], bool],
) -> Tuple[Dict[str, Call], List[str]]:
    """Run ``model(*args, **kwargs)`` once (no grad, RNG state restored) and record every submodule's calls.

    Returns:
        ``{qualified name: Call}`` and the qualified names of the modules satisfying ``is_layer`` in the order of
        their first call.
    """
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    calls: Dict[str, Call] = {}
    order: List[str] = []

    def pre_hook(mod: nn.Module, a: Tuple, k: Dict[str, Any]) -> None:
        name = names.get(id(mod))
        if name is None or name == "":
            return
        call = calls.get(name)
        if call is None:
            a, k = snapshot_objects(a, k)
            call = calls[name] = Call(tuple(a), dict(k), seq=len(calls))
            try:
                call.binding, call.tensors = bind_call(a, k, name, positional_names(mod))
            except Unbindable as exc:
                call.unbindable_reason = str(exc)
            if call.binding is not None and not call.tensors:
                call.unbindable_reason = "called without tensor arguments"
            if is_layer(mod):
                order.append(name)
        elif call.binding is not None and not call.unbindable_reason:
            try:
                again: Binding = bind_call(a, k, name, positional_names(mod))[0]
            except Unbindable as exc:
                call.unbindable_reason = str(exc)
            else:
                if (again.spec, again.constants, again.opaque) != (call.binding.spec, call.binding.constants,
                                                                   call.binding.opaque):
                    call.unbindable_reason = "called with differently shaped or specialised arguments"
        call.n_calls += 1

    def hook(mod: nn.Module, a: Tuple, out: Any) -> None:
        call = calls.get(names.get(id(mod), ""))
        if call is not None and call.n_calls == 1 and call.output is None:
            call.output = out

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in model.modules()]
    handles += [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls, order
