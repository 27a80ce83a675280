"""How a region is called: a call flattened into tensors (graph inputs), constants it was specialised to and opaque
objects handed on, bound by the forward's signature so keyword and positional calls match.

Example:
    >>> import torch
    >>> b, flat = bind_call((torch.ones(2),), {"scale": 2.0}, "m", ("x", "scale"))
    >>> len(flat), b.constants
    (1, ((0, 2.0),))
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxqat.capture.no_cache import NO_CACHE

__all__ = ["Binding", "Unbindable", "bind_call", "canonical_call", "positional_names", "CONSTANT_TYPES"]

CONSTANT_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, enum.Enum)


class Unbindable(ValueError):
    """The recorded call has an argument that cannot become a graph input or a constant."""


@dataclass(frozen=True)
class Binding:
    """How a call's ``(args, kwargs)`` map onto a graph region's flat inputs.

    Attributes:
        spec: the pytree structure of ``(args, sorted kwargs)``.
        constants: ``(leaf index, value)`` for every non-tensor leaf the graph was specialised to.
        tensors: leaf indices of the tensor inputs, in placeholder order.
        optional: leaf indices recorded as ``None`` that are graph inputs too (after ``tensors``): a call may pass
            ``None`` or a tensor there.
        opaque: ``(leaf index, class)`` of the objects that are neither tensors nor constants (a transformers
            ``DynamicCache``): graph inputs too (after ``optional``) whose methods the graph calls; a call must pass
            an object of exactly that class there.
        flags: the ``optional`` indices recorded as a bool (a flag such as ``use_cache`` handed on to submodules):
            a call may pass either bool there.
        nullable: the opaque leaf indices where a call may also pass ``None`` (:mod:`fxqat.capture.no_cache`).
        positional: the names of the forward's parameters that may be passed by position, in order; calls are
            compared in :func:`canonical_call` form (by keyword), so ``m(x)`` and ``m(input_ids=x)`` bind alike.
    """

    spec: Any
    constants: Tuple[Tuple[int, Any], ...]
    tensors: Tuple[int, ...]
    optional: Tuple[int, ...] = ()
    opaque: Tuple[Tuple[int, type], ...] = ()
    positional: Tuple[str, ...] = ()
    nullable: Tuple[int, ...] = ()
    flags: Tuple[int, ...] = ()

    @property
    def inputs(self) -> Tuple[int, ...]:
        """Leaf indices of the graph inputs, in placeholder order."""
        return self.tensors + self.optional + tuple(i for i, _ in self.opaque)

    def with_optional(self, optional: Tuple[int, ...]) -> "Binding":
        """This binding with the ``None`` (or bool) constants at ``optional`` turned into inputs."""
        keep = tuple((i, v) for i, v in self.constants if i not in optional)
        flags = tuple(i for i, v in self.constants if i in optional and type(v) is bool)
        return Binding(self.spec, keep, self.tensors, tuple(sorted(optional)), self.opaque, self.positional,
                       self.nullable, flags)

    def flatten(self, args: Tuple, kwargs: Dict[str, Any], where: str) -> List[Any]:
        """The flat inputs of one call; ``ValueError`` naming ``where`` when the call does not match."""
        flat, why = self.match(args, kwargs, where)
        if flat is None:
            raise ValueError(why)
        return flat

    def match(self, args: Tuple, kwargs: Dict[str, Any], where: str) -> Tuple[Optional[List[Any]], str]:
        """``(flat inputs, "")`` of one call, or ``(None, why it does not match)`` (:meth:`flatten` without raising:
        a region with several captured call structures tries each)."""
        args, kwargs = canonical_call(self.positional, args, kwargs)
        leaves, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
        if spec != self.spec:
            return None, (
                f"module {where!r} was captured as a graph for calls shaped like the example inputs, but it is now "
                f"called with a different argument structure ({_describe(spec)} instead of {_describe(self.spec)}). "
                "Prepare the model with example inputs called the way you train it (e.g. the same use_cache and "
                "attention_mask arguments), or keep this module eager with QATConfig(leaf_modules=...)."
            )
        for i, value in self.constants:
            if not _same_constant(leaves[i], value):
                return None, (
                    f"module {where!r} was captured with an argument fixed to {value!r}, but it is now called with "
                    f"{_short(leaves[i])} there. Prepare the model with example inputs that use the same setting."
                )
        for i in self.tensors:
            if not isinstance(leaves[i], torch.Tensor):
                return None, (f"module {where!r} was captured with a tensor at an argument, but it is now called "
                              f"with {_short(leaves[i])} there.")
        for i in self.optional:
            if i in self.flags:
                if type(leaves[i]) is not bool:
                    return None, (f"module {where!r} was captured with a bool at an argument it passes on, but it "
                                  f"is now called with {type(leaves[i]).__name__} there.")
            elif leaves[i] is not None and not isinstance(leaves[i], torch.Tensor):
                return None, (
                    f"module {where!r} was captured with None or a tensor at an argument it passes on, but it is now "
                    f"called with {type(leaves[i]).__name__} there. Prepare the model with example inputs that use "
                    "the same setting."
                )
        for i, cls in self.opaque:
            if leaves[i] is None and i in self.nullable:
                leaves[i] = NO_CACHE
            elif type(leaves[i]) is not cls:
                return None, (
                    f"module {where!r} was captured with a {cls.__name__} argument, but it is now called with "
                    f"{type(leaves[i]).__name__} there. Prepare the model with example inputs that use the same "
                    "setting (e.g. the same use_cache)."
                )
        return [leaves[i] for i in self.inputs], ""


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _describe(spec: Any) -> str:
    return str(spec).replace("\n", " ")[:160]


def _same_constant(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def positional_names(module: nn.Module) -> Tuple[str, ...]:
    """The names of ``module.forward``'s parameters that a call may pass by position, in order (``""`` for a
    positional-only one; ``()`` when its signature cannot be read)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append("" if p.kind == p.POSITIONAL_ONLY else p.name)
    return tuple(names)


def canonical_call(positional: Tuple[str, ...], args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, Dict[str, Any]]:
    """``(args, kwargs)`` with the positional arguments that have a parameter name passed by keyword instead:
    ``f(x, labels=y)`` and ``f(input_ids=x, labels=y)`` give the same call when ``input_ids`` is the first parameter
    (keywords, not positions: decorated forwards read their flags from ``kwargs``). ``""`` in ``positional`` marks a
    positional-only parameter, which stays in place.

    Example:
        >>> canonical_call(("input_ids", "attention_mask"), (1,), {"labels": 2})
        ((), {'labels': 2, 'input_ids': 1})
    """
    args, kwargs = tuple(args), dict(kwargs)
    keep = 0
    while keep < min(len(args), len(positional)) and not positional[keep]:
        keep += 1
    moved = {n: a for n, a in zip(positional[keep:], args[keep:]) if n not in kwargs}
    if len(moved) != min(len(args), len(positional)) - keep:
        return args, kwargs  # a clash (the call itself is wrong): left as it is
    kwargs.update(moved)
    return args[:keep] + args[keep + len(moved):], kwargs


def bind_call(args: Tuple, kwargs: Dict[str, Any], where: str,
              positional: Tuple[str, ...] = ()) -> Tuple[Binding, List[torch.Tensor]]:
    """The :class:`Binding` of a recorded call and its tensors; objects that are neither become opaque inputs.

    Raises:
        Unbindable: an argument is a module or a function (code, not data: a graph cannot take it as an input).
    """
    args, kwargs = canonical_call(positional, args, kwargs)
    leaves, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
    consts, tensors, opaque = [], [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors.append(i)
        elif isinstance(leaf, CONSTANT_TYPES):
            consts.append((i, leaf))
        elif isinstance(leaf, nn.Module) or callable(leaf):
            raise Unbindable(f"argument of type {type(leaf).__name__} (a module or function, not data)")
        else:
            opaque.append((i, type(leaf)))
    return Binding(spec, tuple(consts), tuple(tensors), (), tuple(opaque), positional), [leaves[i] for i in tensors]
