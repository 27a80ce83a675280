"""Granularity values: how many scales one tensor gets, written like torchao's (``PerGroup(32)``, ``PerToken()``).

A :class:`~fxqat.quant_spec.QuantSpec` takes one granularity value: an object built by :func:`per_tensor`,
:func:`per_channel`, :func:`per_group` or :func:`per_token` (:func:`per_head`: the KV cache only), or the same as a
string (``"per_tensor"``, ``"per_channel"``, ``"per_channel(1)"``, ``"per_group(32)"``, ``"per_token"``).
:func:`parse_granularity` turns either into the ``(name, group_size, axis)`` a spec stores.

Example:
    >>> per_group(32)
    PerGroup(group_size=32)
    >>> str(per_channel(axis=1))
    'per_channel(axis=1)'
    >>> parse_granularity("per_group(32)", "QuantSpec", "granularity")
    ('per_group', 32, None)
    >>> parse_granularity(per_token(), "QuantSpec", "granularity")
    ('per_token', None, None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Tuple

from fxqat.validate import check_int, did_you_mean

__all__ = [
    "Granularity", "PerTensor", "PerChannel", "PerGroup", "PerToken", "PerHead", "GRANULARITY_NAMES",
    "per_tensor", "per_channel", "per_group", "per_token", "per_head", "parse_granularity",
]


@dataclass(frozen=True)
class Granularity:
    """Base class of the granularity values; ``name`` is the string a :class:`QuantSpec` stores."""

    name: ClassVar[str] = ""

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale for the whole tensor."""

    name: ClassVar[str] = "per_tensor"


@dataclass(frozen=True)
class PerChannel(Granularity):
    """One scale per output channel (weights): per slice along ``axis`` (torchao's ``PerAxis(axis)``)."""

    name: ClassVar[str] = "per_channel"
    axis: int = 0

    def __post_init__(self) -> None:
        check_int("per_channel", "axis", self.axis)

    def __str__(self) -> str:
        return f"per_channel(axis={self.axis})"


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale per ``group_size`` consecutive input elements of each output channel (weights)."""

    name: ClassVar[str] = "per_group"
    group_size: int = 32

    def __post_init__(self) -> None:
        check_int("per_group", "group_size", self.group_size, lo=1)

    def __str__(self) -> str:
        return f"per_group({self.group_size})"


@dataclass(frozen=True)
class PerToken(Granularity):
    """One scale and zero point per row of the last dim, computed on every call (activations, method ``dynamic``)."""

    name: ClassVar[str] = "per_token"


@dataclass(frozen=True)
class PerHead(Granularity):
    """One scale per attention head of one sequence (the KV cache only, :class:`fxqat.roles.KVSpec`)."""

    name: ClassVar[str] = "per_head"


def per_tensor() -> PerTensor:
    """One scale per tensor. Example: ``QuantSpec(bits=8, granularity=per_tensor())``."""
    return PerTensor()


def per_channel(axis: int = 0) -> PerChannel:
    """One scale per output channel along ``axis``. Example: ``QuantSpec(bits=4, granularity=per_channel())``."""
    return PerChannel(axis)


def per_group(group_size: int) -> PerGroup:
    """One scale per ``group_size`` input elements of each output channel.

    Example:
        >>> per_group(64).group_size
        64
    """
    return PerGroup(group_size)


def per_token() -> PerToken:
    """Dynamic per-token scales. Example: ``QuantSpec(bits=8, method="dynamic", granularity=per_token())``."""
    return PerToken()


def per_head() -> PerHead:
    """One scale per attention head (KV cache). Example: ``KVSpec(bits=4, granularity=per_head())``."""
    return PerHead()


_CLASSES = {c.name: c for c in (PerTensor, PerChannel, PerGroup, PerToken, PerHead)}
#: every granularity name a string may give
GRANULARITY_NAMES = tuple(_CLASSES)
_CALL = re.compile(r"^(\w+)\((?:(\w+)\s*=\s*)?(-?\d+)\)$")


def parse_granularity(value: Any, owner: str, field: str) -> Tuple[str, Optional[int], Optional[int]]:
    """``(name, group_size, axis)`` of a granularity object or string (None where the value does not say).

    Strings: a name (``"per_group"`` leaves the group size to the spec's ``group_size``) or a call,
    ``"per_group(32)"``, ``"per_group(group_size=32)"``, ``"per_channel(1)"``, ``"per_channel(axis=1)"``.
    A ``ValueError``/``TypeError`` names ``owner.field`` and the nearest valid name.
    """
    if isinstance(value, Granularity):
        return value.name, getattr(value, "group_size", None), getattr(value, "axis", None)
    hint = ("use per_tensor(), per_channel(axis), per_group(size), per_token() (fxqat.granularity) or one of "
            f"{list(GRANULARITY_NAMES)} / 'per_group(32)'")
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{field}={value!r}: {hint}.")
    text = value.strip()
    if text in _CLASSES:
        return text, None, None
    call = _CALL.match(text)
    if call is not None and call.group(1) in ("per_group", "per_channel"):
        name, keyword, number = call.group(1), call.group(2), int(call.group(3))
        expected = "group_size" if name == "per_group" else "axis"
        if keyword in (None, expected):
            g = per_group(number) if name == "per_group" else per_channel(number)
            return parse_granularity(g, owner, field)
    raise ValueError(f"{owner}.{field}={value!r}: {hint}.{did_you_mean(text.split('(')[0], GRANULARITY_NAMES)}")
