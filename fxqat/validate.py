"""Argument checks of fxqat's configuration dataclasses, and "did you mean" suggestions for mistyped names.

Every check raises a ``TypeError`` (wrong type) or ``ValueError`` (right type, wrong value) whose message starts with
``Owner.field=value`` and says what to write instead, so a bad configuration fails on construction, naming the
field, before any model is touched. A check returns the value normalised (e.g. a bare string becomes a 1-tuple).

Example:
    >>> check_int("HybridConfig", "max_blocks", 4, lo=2)
    4
    >>> check_number("HybridConfig", "temperature", float("nan"), lo=0.0, lo_open=True)
    Traceback (most recent call last):
    ...
    ValueError: HybridConfig.temperature=nan: use a finite number > 0.0.
    >>> did_you_mean("lqs", ["lsq", "lsq_plus", "qil"])
    " Did you mean 'lsq'?"
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Iterable, Mapping, Optional, Sequence, Tuple

__all__ = [
    "did_you_mean", "check_bool", "check_int", "check_number", "check_choice", "name_tuple", "options_tuple",
]


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``" Did you mean 'x'?"`` for the choices closest to a mistyped ``value`` (``difflib``), or ``""``."""
    if not isinstance(value, str) or not value:
        return ""
    names = [c for c in choices if isinstance(c, str)]
    close = [c for c in names if c.lower() == value.lower()]
    close += [c for c in difflib.get_close_matches(value, names, n=3, cutoff=0.6) if c not in close]
    return f" Did you mean {' or '.join(repr(c) for c in close[:3])}?" if close else ""


def check_bool(owner: str, name: str, value: Any, allow_none: bool = False) -> Optional[bool]:
    """``value`` if it is a bool (or None when allowed)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name}={value!r}: use True or False{' or None' if allow_none else ''}.")
    return value


def _range_text(lo: Optional[float], hi: Optional[float], lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"from {lo} to {hi}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"<= {hi}"
    return ""


def check_int(owner: str, name: str, value: Any, lo: Optional[int] = None, hi: Optional[int] = None,
              allow_none: bool = False) -> Optional[int]:
    """``value`` as an int in ``[lo, hi]`` (bools are refused: ``True`` is not a count)."""
    if value is None and allow_none:
        return None
    what = f"an integer {_range_text(lo, hi)}".rstrip() + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}.{name}={value!r}: use {what}.")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{owner}.{name}={value!r} is out of range: use {what}.")
    return int(value)


def check_number(owner: str, name: str, value: Any, lo: Optional[float] = None, hi: Optional[float] = None,
                 lo_open: bool = False, allow_none: bool = False) -> Optional[float]:
    """``value`` as a finite float with ``value >= lo`` (``> lo`` when ``lo_open``) and ``value <= hi``."""
    if value is None and allow_none:
        return None
    what = f"a finite number {_range_text(lo, hi, lo_open)}".rstrip() + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.{name}={value!r}: use {what}.")
    v = float(value)
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        raise ValueError(f"{owner}.{name}={value!r}: use {what}.")
    return v


def check_choice(owner: str, name: str, value: Any, choices: Sequence[str], allow_none: bool = False) -> Any:
    """``value`` if it is one of the strings ``choices`` (or None when allowed); suggests the nearest otherwise."""
    if value is None and allow_none:
        return None
    options = " or ".join(repr(c) for c in choices) + (" or None" if allow_none else "")
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{name}={value!r}: use {options}.")
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r}: use {options}.{did_you_mean(value, choices)}")
    return value


def name_tuple(owner: str, name: str, value: Any, types: Optional[type] = None) -> Tuple[Any, ...]:
    """A tuple of non-empty names (and subclasses of ``types`` when given); a bare name is a 1-tuple, None is ()."""
    if value is None:
        return ()
    if isinstance(value, str) or isinstance(value, type):
        value = (value,)
    what = "names (str)" + (f" or {types.__name__} subclasses" if types is not None else "")
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.{name}={value!r}: use a tuple of {what}.")
    out = tuple(value)
    for v in out:
        if isinstance(v, str):
            if not v:
                raise ValueError(f"{owner}.{name}={value!r} holds an empty name; give qualified module names.")
        elif not (types is not None and isinstance(v, type) and issubclass(v, types)):
            raise TypeError(f"{owner}.{name}={value!r} holds {v!r}: use a tuple of {what}.")
    return out


def options_tuple(owner: str, name: str, value: Any) -> Tuple[Tuple[str, Any], ...]:
    """Method options as sorted ``(name, value)`` pairs, from a mapping, pairs, or None (no options)."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{owner}.{name}={value!r}: use a dict of method options, e.g. {{'init': 'mse'}}, or None.")
    else:
        pairs = list(value)
        if not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
            raise TypeError(f"{owner}.{name}={value!r}: use a dict of method options or (name, value) pairs.")
    for k, _ in pairs:
        if not isinstance(k, str) or not k:
            raise TypeError(f"{owner}.{name}={value!r}: option names must be non-empty strings, got {k!r}.")
    if len({k for k, _ in pairs}) != len(pairs):
        raise ValueError(f"{owner}.{name}={value!r} names an option twice.")
    return tuple(sorted(pairs, key=lambda kv: kv[0]))
