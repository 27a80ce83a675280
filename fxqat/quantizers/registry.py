"""The quantizer-method registry, at its documented path (it lives in the core module :mod:`fxqat.method_registry`,
so that :mod:`fxqat.config` can validate method names without importing the quantizers).

Example:
    >>> from fxqat.quantizers.registry import available_methods
    >>> "lsq" in available_methods()
    True
    >>> get_method("lqs")
    Traceback (most recent call last):
    ...
    ValueError: unknown quantizer method 'lqs'; choose one of [...]. Did you mean 'lsq'?
"""

from fxqat.method_registry import available_methods, get_method, make_quantizer, register

__all__ = ["register", "get_method", "available_methods", "make_quantizer"]
