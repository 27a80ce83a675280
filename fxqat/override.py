"""A per-module exception to a :class:`fxqat.QATConfig`'s settings: :class:`Override` (first match wins).

Example:
    >>> Override("layer1.*", w_bits=2).matches("layer1.0.conv1", None)
    True
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch.nn as nn

from fxqat.quant_spec import check_bits, check_method
from fxqat.validate import check_bool

__all__ = ["Override"]


@dataclass(frozen=True)
class Override:
    """A per-module exception to the global settings.

    Attributes:
        match: a glob on the module's qualified name (``"layer1.*"``, ``"fc"``), a regular expression on it (a
            string starting ``"re:"``, e.g. ``"re:layers\\.[0-3]\\..*_proj"``, or a compiled ``re.Pattern``; it must
            match the whole name, ``re.fullmatch``) or a module type (``nn.Linear``).
        w_bits: weight bits for matching modules (None = keep the global value).
        a_bits: activation bits for the matching modules' inputs (None = keep the global value).
        method: quantizer method (None = keep the global value).
        skip: keep matching modules in full precision.
        act_signed: force a signed (True) or unsigned (False) grid on the matching modules' inputs.

    Example:
        >>> Override("fc", skip=True).matches("fc", nn.Linear(2, 2))
        True
        >>> Override(r"re:layers\\.[0-9]+\\.mlp").matches("layers.12.mlp", None)
        True
    """

    match: Union[str, type, "re.Pattern[str]"]
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    method: Optional[str] = None
    skip: bool = False
    act_signed: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, (str, type, re.Pattern)):
            raise ValueError(
                f"Override.match={self.match!r}: give a module-name glob (str), a regex ('re:...' or re.compile(...)) "
                "or a module type."
            )
        if isinstance(self.match, type) and not issubclass(self.match, nn.Module):
            raise TypeError(f"Override.match={self.match!r}: a type must be an nn.Module subclass (e.g. nn.Linear).")
        if isinstance(self.match, str) and not self.match.strip():
            raise ValueError(f"Override.match={self.match!r}: an empty pattern matches no layer; give a module name "
                             "glob such as 'fc' or 'layer1.*'.")
        if isinstance(self.match, str) and self.match.startswith("re:"):
            try:
                re.compile(self.match[3:])
            except re.error as e:
                raise ValueError(f"Override.match={self.match!r}: not a valid regular expression ({e}).") from None
        check_bits("Override", "w_bits", self.w_bits, allow_none=True)
        check_bits("Override", "a_bits", self.a_bits, allow_none=True)
        check_method("Override", "method", self.method)
        check_bool("Override", "skip", self.skip)
        check_bool("Override", "act_signed", self.act_signed, allow_none=True)

    def matches(self, name: str, module: Optional[nn.Module]) -> bool:
        """Whether this override applies to the module called ``name``."""
        if isinstance(self.match, re.Pattern):
            return self.match.fullmatch(name) is not None
        if isinstance(self.match, str) and self.match.startswith("re:"):
            return re.fullmatch(self.match[3:], name) is not None
        if isinstance(self.match, str):
            return fnmatch.fnmatchcase(name, self.match)
        return module is not None and isinstance(module, self.match)
