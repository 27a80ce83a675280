"""Learnable fake-quantizers (one method a file) and their registry.

``fxqat.quantizers`` is this package. Calling it, ``fxqat.quantizers(qm)``, is the deprecated spelling of
:func:`fxqat.named_quantizers` (kept for one release; it warns once).

Example:
    >>> import warnings, torch.nn as nn, fxqat
    >>> with warnings.catch_warnings(record=True):
    ...     warnings.simplefilter("always")
    ...     fxqat.quantizers(nn.Linear(2, 2))
    {}
"""

import sys
import types
import warnings

from fxqat.method_registry import available_methods, get_method, make_quantizer, register
from fxqat.quantizers.base import NotAffineError, Quantizer, int_range
from fxqat.quantizers.control import named_quantizers

__all__ = [
    "Quantizer", "NotAffineError", "int_range", "available_methods", "get_method", "make_quantizer", "register",
    "named_quantizers",
]


class _CallablePackage(types.ModuleType):
    """This package's module type: calling it lists a model's quantizers (the old ``fxqat.quantizers(qm)``)."""

    _warned = False

    def __call__(self, model):
        if not _CallablePackage._warned:
            _CallablePackage._warned = True
            warnings.warn("fxqat.quantizers(model) is deprecated and will be removed in the next release: use "
                          "fxqat.named_quantizers(model) (fxqat.quantizers is the package of quantizer methods).",
                          DeprecationWarning, stacklevel=2)
        return named_quantizers(model)


sys.modules[__name__].__class__ = _CallablePackage
