"""Which ``Override`` rules of a config decided some layer during ``prepare_qat``, and a warning for those that did not.

Example:
    >>> with track_overrides() as use:
    ...     current_override_use() is use
    True
    >>> current_override_use() is None
    True
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Set

from fxqat.validate import did_you_mean

__all__ = ["UnmatchedOverrideWarning", "OverrideUse", "track_overrides", "current_override_use",
           "warn_unmatched_overrides"]


class UnmatchedOverrideWarning(UserWarning):
    """An ``Override`` of the config applied to no layer of the prepared model (see :func:`warn_unmatched_overrides`)."""


@dataclass
class OverrideUse:
    """What :meth:`QATConfig.override_for` saw inside :func:`track_overrides`: the layer names asked about and the
    indices of the overrides that won for at least one of them."""

    names: List[str] = field(default_factory=list)
    used: Set[int] = field(default_factory=set)


_OVERRIDE_USE: ContextVar[Optional[OverrideUse]] = ContextVar("fxqat_override_use", default=None)


def current_override_use() -> Optional[OverrideUse]:
    """The record of the innermost :func:`track_overrides` block, or None outside one."""
    return _OVERRIDE_USE.get()


@contextmanager
def track_overrides() -> Iterator[OverrideUse]:
    """Record which overrides decide some layer while the block runs (``prepare_qat`` wraps its passes in it)."""
    use = OverrideUse()
    token = _OVERRIDE_USE.set(use)
    try:
        yield use
    finally:
        _OVERRIDE_USE.reset(token)


def warn_unmatched_overrides(config: Any, use: OverrideUse, model_name: str) -> List[Any]:
    """Warn (:class:`UnmatchedOverrideWarning`) about each override that decided no layer, naming its pattern and the
    closest layer names; returns those overrides. An override can miss because its pattern matches no quantizable
    layer, or because an earlier override (first match wins) already takes every layer it matches.

    Example:
        >>> from fxqat.config import Override, QATConfig
        >>> cfg = QATConfig(overrides=(Override("fc2", skip=True),))
        >>> use = OverrideUse(names=["features.0", "fc"])
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     _ = warn_unmatched_overrides(cfg, use, "Net")
        >>> print(w[0].message)
        Override(match='fc2') applies to no quantizable layer of Net (first match wins: an earlier override may take its layers). Did you mean 'fc'? Quantizable layers: 'features.0', 'fc'.
    """
    missed = [o for i, o in enumerate(config.overrides) if i not in use.used]
    names = list(dict.fromkeys(use.names))
    shown = ", ".join(repr(n) for n in names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    for o in missed:
        match = o.match.pattern if isinstance(o.match, re.Pattern) else getattr(o.match, "__name__", o.match)
        hint = did_you_mean(match, names) if isinstance(match, str) and not match.startswith("re:") else ""
        msg = (f"Override(match={match!r}) applies to no quantizable layer of {model_name} (first match wins: an "
               f"earlier override may take its layers).{hint} Quantizable layers: {shown or 'none'}.")
        warnings.warn(msg, UnmatchedOverrideWarning, stacklevel=3)
    return missed
