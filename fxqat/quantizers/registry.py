"""The quantizer-method registry, at its documented path (it lives in the core module :mod:`fxqat.method_registry`,
so that :mod:`fxqat.config` can validate method names without importing the quantizers), and what the registered
methods support.

Each method class declares what it supports (``granularities``, ``kinds``); :func:`granularity_support` and
:func:`granularity_table` read them (the table in ``docs/quantizers.md`` is this function's output, checked by
``tests/unit/test_docs_quantizers.py``).

Example:
    >>> from fxqat.quantizers.registry import available_methods
    >>> "lsq" in available_methods()
    True
    >>> get_method("lqs")
    Traceback (most recent call last):
    ...
    ValueError: unknown quantizer method 'lqs'; choose one of [...]. Did you mean 'lsq'?
    >>> granularity_support()["dynamic"]
    {'per_token': ('act',)}
"""

from __future__ import annotations

from typing import Dict, Tuple

from fxqat.config import GRANULARITIES
from fxqat.method_registry import available_methods, get_method, make_quantizer, register

__all__ = ["register", "get_method", "available_methods", "make_quantizer", "granularity_support", "granularity_table"]


def granularity_support() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """method -> granularity -> the tensor kinds it is offered for, from each class's ``granularities`` and ``kinds``
    and the kinds a granularity applies to (``fxqat.config.GRANULARITIES``)."""
    out: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    for name in available_methods():
        cls = get_method(name)
        kinds = getattr(cls, "kinds", ("weight", "act"))
        out[name] = {
            g: tuple(k for k in kinds if k in GRANULARITIES[g])
            for g in GRANULARITIES
            if g in cls.granularities and any(k in GRANULARITIES[g] for k in kinds)
        }
    return out


def granularity_table() -> str:
    """The method × granularity support table (Markdown) of ``docs/quantizers.md``.

    Example:
        >>> print(granularity_table().splitlines()[0])
        | method | per_tensor | per_channel | per_group | per_token |
    """
    support = granularity_support()
    lines = ["| method | " + " | ".join(GRANULARITIES) + " |", "|---" * (len(GRANULARITIES) + 1) + "|"]
    for name, row in support.items():
        cells = [", ".join(row[g]) if g in row else "—" for g in GRANULARITIES]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
