"""Registry of quantizer methods: name -> Quantizer subclass (a core module: it imports nothing from fxqat at load
time, so :mod:`fxqat.config` validates method names with it; the method modules register themselves).

New methods join with the :func:`register` decorator; ``QATConfig(method=name)`` then finds them.

Example:
    >>> from fxqat.method_registry import available_methods
    >>> "lsq" in available_methods()
    True
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
    "fxqat.quantizers.gguf",
)
_loaded = False
_loading = False


def _load_builtins() -> None:
    """Import every built-in method module once; a module that fails to import is an ImportError naming it.

    A method module that is missing or broken must not silently disappear from ``available_methods()`` (a config
    naming it would then fail with a misleading "unknown method"), so nothing is skipped. The registry counts as
    loaded only once every module imported, so the error repeats on the next call instead of leaving a partial
    registry behind.
    """
    global _loaded, _loading
    if _loaded or _loading:  # _loading: a method module reading the registry while it is imported
        return
    _loading = True
    try:
        for mod in _BUILTIN_MODULES:
            try:
                importlib.import_module(mod)
            except Exception as e:  # SyntaxError, a failing dependency, a missing file: all loud
                raise ImportError(
                    f"fxqat: the quantizer method module {mod!r} failed to import ({type(e).__name__}: {e}); "
                    "fix the module (or its dependency), or remove it from fxqat.method_registry._BUILTIN_MODULES."
                ) from e
        _loaded = True
    finally:
        _loading = False


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
