"""What one tensor's quantizer is: :class:`QuantSpec` (bits, method, granularity, options) and the field checks that
:mod:`fxqat.config` shares with it. Re-exported by :mod:`fxqat.config`.

Example:
    >>> QuantSpec(bits=4, method="lsq", kind="weight", granularity="per_group(32)").group_size
    32
    >>> check_bits("QATConfig", "w_bits", 0)
    Traceback (most recent call last):
    ...
    ValueError: QATConfig.w_bits=0 is out of range: use an integer from 1 to 16 (e.g. w_bits=4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Tuple

from fxqat.granularity import parse_granularity
from fxqat.method_registry import available_methods, get_method, make_quantizer
from fxqat.validate import check_bool, check_choice, check_int, did_you_mean, options_tuple

__all__ = [
    "QuantSpec", "Kind", "GRANULARITIES", "check_bits", "check_method", "check_options", "check_buildable",
    "check_group_size", "check_granularity_support", "method_supports", "granularity_support", "granularity_table",
]

Kind = Literal["weight", "act", "grad"]
_KINDS = ("weight", "act", "grad")
#: granularity -> the tensor kinds it applies to
GRANULARITIES = {
    "per_tensor": _KINDS,
    "per_channel": ("weight",),
    "per_group": ("weight",),
    "per_token": ("act",),
}


def check_bits(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        hint = " or None" if allow_none else ""
        raise ValueError(
            f"{owner}.{name}={value!r} is out of range: use an integer from 1 to 16{hint} (e.g. {name}=4)."
        )


def check_method(owner: str, name: str, value: Optional[str]) -> None:
    if value is None:
        return
    known = available_methods()
    if not isinstance(value, str):
        raise TypeError(f"{owner}.{name}={value!r}: give a quantizer method name, one of {sorted(known)}.")
    if value not in known:
        raise ValueError(f"{owner}.{name}={value!r} is not a known quantizer method; choose one of {sorted(known)}."
                         f"{did_you_mean(value, known)}")


def check_options(owner: str, name: str, method: str, options: Tuple[Tuple[str, Any], ...]) -> None:
    known = getattr(get_method(method), "default_options", {})
    unknown = [k for k, _ in options if k not in known]
    if unknown:
        hint = "".join(did_you_mean(k, known) for k in unknown)
        raise ValueError(f"{owner}.{name}: method {method!r} has no option(s) {unknown}; its options are "
                         f"{sorted(known)}.{hint}")


def check_buildable(owner: str, name: str, spec: "QuantSpec") -> None:
    """Build the quantizer once, so option values the method refuses fail here, naming the field."""
    try:
        make_quantizer(spec)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{owner}.{name}={dict(spec.options)!r}: the {spec.kind} quantizer (method {spec.method!r}) "
                      f"cannot be built with these options: {e}") from None


def check_group_size(owner: str, group_size: Any, required: bool) -> None:
    if group_size is None:
        if required:
            raise ValueError(f"{owner}: granularity='per_group' needs group_size (e.g. group_size=32).")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{owner}.group_size={group_size!r}: use a positive integer (e.g. group_size=32).")
    if not required:
        raise ValueError(f"{owner}.group_size={group_size!r} is only used with granularity='per_group'.")


def check_granularity_support(method: str, granularity: str, kind: Optional[str]) -> None:
    supported = getattr(get_method(method), "granularities", ("per_tensor", "per_channel"))
    if granularity not in supported:
        hint = " (per-token activations are dynamic: use method='dynamic')" if granularity == "per_token" else ""
        raise ValueError(
            f"QuantSpec: method {method!r} does not support granularity={granularity!r} for kind={kind!r}; "
            f"it supports {list(supported)}{hint}."
        )


def method_supports(method: str, granularity: str, kind: str) -> bool:
    """Whether quantizer method ``method`` offers ``granularity`` for tensors of ``kind``.

    Example:
        >>> method_supports("dynamic", "per_token", "act"), method_supports("lsq", "per_token", "act")
        (True, False)
    """
    return kind in granularity_support().get(method, {}).get(granularity, ())


def granularity_support() -> Dict[str, Dict[str, Tuple[str, ...]]]:
    """method -> granularity -> the tensor kinds it is offered for, from each method class's ``granularities`` and
    ``kinds`` and the kinds a granularity applies to (:data:`GRANULARITIES`).

    Example:
        >>> granularity_support()["dynamic"]
        {'per_token': ('act',)}
    """
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
    """The method × granularity support table (Markdown) of ``docs/quantizers.md``, checked by
    ``tests/unit/test_docs_quantizers.py``.

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


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    In a :class:`fxqat.QATConfig` a spec fills one role (``weight=``, ``act=``, ``grad=``) and leaves ``kind`` out:
    the role sets it (and ``signed=True`` for weights and gradients, and the method a role defaults to).

    Attributes:
        bits: bit-width, 1..16.
        method: registered quantizer name (``fxqat.available_methods()``); None = the kind's default (``"lsq"``,
            ``"grad"`` for gradients); a per-token activation spec names its method (``"dynamic"``).
        kind: ``"weight"``, ``"act"`` or ``"grad"``; None until the spec fills a role of a ``QATConfig``.
        signed: signed grid (``True``), unsigned (``False``) or decided from the data on the first batch (``None``).
        per_channel: True when ``granularity`` is ``"per_channel"`` (set from it; giving ``per_channel=True``
            instead of a granularity is kept for compatibility).
        ch_axis: the output-channel axis (``per_channel`` and ``per_group``; ``per_channel(axis)`` sets it).
        options: method-specific keyword arguments, e.g. ``{"grad_scale": False}``; stored as sorted pairs.
        granularity: one value of :mod:`fxqat.granularity`, stored as its name: ``per_tensor()``,
            ``per_channel(axis=0)`` (weights), ``per_group(32)`` (weights: one scale per ``group_size`` consecutive
            input elements of each output channel; the non-channel dims of a conv weight are flattened first) or
            ``per_token()`` (activations: dynamic, asymmetric, scale and zero point computed per row of the last dim
            on every call; method ``"dynamic"``); or the same as a string (``"per_group(32)"``). None: per tensor.
        group_size: elements per group (``per_group`` only; set by ``per_group(size)``).

    Example:
        >>> from fxqat.granularity import per_group
        >>> s = QuantSpec(bits=4, granularity=per_group(32), kind="weight")
        >>> (s.granularity, s.group_size, s.method)
        ('per_group', 32, 'lsq')
        >>> QuantSpec(bits=4, kind="weight", granularity="per_channel").per_channel
        True
    """

    bits: int = 4
    method: Optional[str] = None
    kind: Optional[Kind] = None
    signed: Optional[bool] = None
    per_channel: bool = False
    ch_axis: int = 0
    options: Tuple[Tuple[str, Any], ...] = ()
    granularity: Any = None
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        check_bits("QuantSpec", "bits", self.bits)
        check_choice("QuantSpec", "kind", self.kind, _KINDS, allow_none=True)
        check_bool("QuantSpec", "signed", self.signed, allow_none=True)
        check_bool("QuantSpec", "per_channel", self.per_channel)
        check_int("QuantSpec", "ch_axis", self.ch_axis)
        if self.per_channel and self.kind not in (None, "weight"):
            raise ValueError(
                f"QuantSpec(kind={self.kind!r}, per_channel=True): per-channel scales are for weights only; "
                "set per_channel=False for activations and gradients."
            )
        if self.granularity is None:
            gran, size, axis = ("per_channel" if self.per_channel else "per_tensor"), None, None
        else:
            gran, size, axis = parse_granularity(self.granularity, "QuantSpec", "granularity")
        if gran not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity={gran!r}: use one of {sorted(GRANULARITIES)} (per_head: the KV "
                             "cache only, fxqat.roles.KVSpec).")
        if self.per_channel and gran != "per_channel":
            raise ValueError(f"QuantSpec(per_channel=True, granularity={gran!r}): give one of the two, not both.")
        if self.kind is not None and self.kind not in GRANULARITIES[gran]:
            raise ValueError(
                f"QuantSpec.granularity={gran!r} is for {GRANULARITIES[gran]} tensors, not kind={self.kind!r}."
            )
        if size is not None and self.group_size not in (None, size):
            raise ValueError(f"QuantSpec(granularity={self.granularity!r}, group_size={self.group_size!r}): give the "
                             "group size once, in per_group(size).")
        if axis is not None and self.ch_axis not in (0, axis):
            raise ValueError(f"QuantSpec(granularity={self.granularity!r}, ch_axis={self.ch_axis!r}): give the axis "
                             "once, in per_channel(axis).")
        object.__setattr__(self, "granularity", gran)
        object.__setattr__(self, "per_channel", gran == "per_channel")
        object.__setattr__(self, "group_size", self.group_size if size is None else size)
        object.__setattr__(self, "ch_axis", self.ch_axis if axis is None else axis)
        check_group_size("QuantSpec", self.group_size, gran == "per_group")
        object.__setattr__(self, "options", options_tuple("QuantSpec", "options", self.options))
        if self.method is None and self.kind is not None:
            if gran == "per_token":
                raise ValueError("QuantSpec(kind='act', granularity='per_token'): a per-token activation spec names "
                                 "its method; write method='dynamic' (the dynamic per-token grid).")
            object.__setattr__(self, "method", "grad" if self.kind == "grad" else "lsq")
        if self.method is not None:
            check_method("QuantSpec", "method", self.method)
            check_granularity_support(self.method, gran, self.kind)
            check_options("QuantSpec", "options", self.method, self.options)

    def options_dict(self) -> dict:
        """The method-specific options as a plain dict."""
        return dict(self.options)
