"""Registry of quantizer methods: name -> Quantizer subclass.

New methods join with the :func:`register` decorator; ``QATConfig(method=name)`` then finds them.

Example:
    >>> from fxqat.quantizers.registry import available_methods
    >>> "lsq" in available_methods()
    True
    >>> get_method("lqs")
    Traceback (most recent call last):
    ...
    ValueError: unknown quantizer method 'lqs'; choose one of [...]. Did you mean 'lsq'?
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Type

from fxqat.validate import did_you_mean

__all__ = ["register", "get_method", "available_methods", "make_quantizer"]

_REGISTRY: Dict[str, type] = {}
# modules imported lazily the first time the registry is read, so `import fxqat.config` stays cheap and acyclic
_BUILTIN_MODULES = (
    "fxqat.quantizers.lsq",
    "fxqat.quantizers.lsq_plus",
    "fxqat.quantizers.qil",
    "fxqat.quantizers.pact",
    "fxqat.quantizers.dorefa",
    "fxqat.quantizers.ewgs",
    "fxqat.quantizers.dsq",
    "fxqat.quantizers.noise_temper",
    "fxqat.quantizers.grad",
    "fxqat.quantizers.dynamic",
)
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method file not written yet is simply not offered
            if e.name != mod:
                raise


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a Quantizer subclass selectable as ``method=name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"quantizer method {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> List[str]:
    """Names of every registered method."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method(name: str) -> Type:
    """The Quantizer subclass registered as ``name``."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown quantizer method {name!r}; choose one of {sorted(_REGISTRY)}."
                         f"{did_you_mean(name, _REGISTRY)}") from None


def make_quantizer(spec):
    """Build the quantizer module for a :class:`~fxqat.config.QuantSpec`."""
    return get_method(spec.method).from_spec(spec)
