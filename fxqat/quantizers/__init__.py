"""Learnable fake-quantizers (one method a file) and their registry."""

from fxqat.quantizers.base import NotAffineError, Quantizer, int_range
from fxqat.quantizers.registry import available_methods, get_method, make_quantizer, register

__all__ = ["Quantizer", "NotAffineError", "int_range", "available_methods", "get_method", "make_quantizer", "register"]
