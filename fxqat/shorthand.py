"""The short form of :class:`fxqat.QATConfig`: ``QATConfig(w_bits=4, a_bits=4, method="lsq")``.

The per-role form (``weight=QuantSpec(...)``, ``act=``, ``grad=``, ``kv=``) is what a config stores; the keywords
users wrote before it (:data:`SHORTHAND`) stay accepted and *edit* those specs (the ones given, else the defaults):

================  =========================================================================================
``w_bits``        ``weight.bits``
``a_bits``        ``act.bits``; ``None`` = no activation quantizer (``act=None``)
``g_bits``        ``grad=QuantSpec(bits, method="grad")``; ``None`` = ``grad=None``
``method``        the method of ``weight`` and ``act`` (a per-token ``act`` keeps ``"dynamic"``, with a warning)
``w_method``      ``weight.method``; ``a_method``: ``act.method``
``per_channel``   ``weight`` granularity ``per_channel()`` (True) or ``per_tensor()`` (False)
``w_granularity`` ``weight`` granularity (``"per_tensor"``, ``"per_channel"``, ``"per_group"`` + ``group_size``)
``group_size``    the size of ``per_group``
``a_granularity`` ``"per_tensor"`` or ``"per_token"`` (method ``"dynamic"`` unless ``a_method`` names another)
``*_options``     ``weight`` / ``act`` / ``grad`` options
``kv_bits``       ``kv=KVSpec(bits, kv_granularity)``; ``None`` = ``kv=None``
================  =========================================================================================

Reading them back (``cfg.w_bits``) gives the specs' values (:class:`ShorthandViews`).

Example:
    >>> from fxqat.roles import DEFAULT_ACT, DEFAULT_WEIGHT
    >>> roles = {"weight": DEFAULT_WEIGHT, "act": DEFAULT_ACT, "grad": None, "kv": None}
    >>> out = apply_shorthand(roles, {"w_bits": 2, "w_granularity": "per_group", "group_size": 32, "a_bits": None})
    >>> (out["weight"].bits, out["weight"].granularity, out["weight"].group_size, out["act"])
    (2, 'per_group', 32, None)
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Dict, Optional, Tuple

from fxqat.granularity import parse_granularity
from fxqat.quant_spec import QuantSpec, check_bits, check_group_size, check_method, method_supports
from fxqat.roles import KV_GRANULARITIES, ROLES, KVSpec, bind_role
from fxqat.validate import check_bool, check_choice, options_tuple

__all__ = ["SHORTHAND", "check_shorthand", "apply_shorthand", "ShorthandViews"]

SHORTHAND = (
    "w_bits", "a_bits", "g_bits", "method", "w_method", "a_method", "per_channel", "w_options", "a_options",
    "g_options", "w_granularity", "group_size", "a_granularity", "kv_bits", "kv_granularity",
)
_NULLABLE_BITS = ("a_bits", "g_bits", "kv_bits")


def check_shorthand(short: Dict[str, Any]) -> Dict[str, Any]:
    """The short-form keywords checked (errors name ``QATConfig.<keyword>``) and normalised.

    Example:
        >>> check_shorthand({"w_granularity": "per_group(32)", "w_options": {"init": "mse"}})
        {'w_granularity': 'per_group', 'w_options': (('init', 'mse'),), 'group_size': 32}
    """
    out = dict(short)
    for name in ("w_bits",) + _NULLABLE_BITS:
        if name in out:
            check_bits("QATConfig", name, out[name], allow_none=name != "w_bits")
    if "method" in out and out["method"] is None:
        raise TypeError("QATConfig.method=None: give a quantizer method name (e.g. 'lsq').")
    for name in ("method", "w_method", "a_method"):
        if name in out:
            check_method("QATConfig", name, out[name])
    if "per_channel" in out:
        check_bool("QATConfig", "per_channel", out["per_channel"])
    for name in ("w_options", "a_options", "g_options"):
        if name in out:
            out[name] = options_tuple("QATConfig", name, out[name])
    if out.get("w_granularity") is not None:
        name, size, axis = parse_granularity(out["w_granularity"], "QATConfig", "w_granularity")
        if name not in ("per_tensor", "per_channel", "per_group") or axis not in (None, 0):
            raise ValueError(f"QATConfig.w_granularity={out['w_granularity']!r}: use 'per_tensor', 'per_channel' or "
                             "'per_group' (or weight=QuantSpec(granularity=...) for another axis).")
        if size is not None:
            if out.get("group_size") not in (None, size):
                raise ValueError(f"QATConfig(w_granularity={out['w_granularity']!r}, group_size="
                                 f"{out['group_size']!r}): give the group size once.")
            out["group_size"] = size
        out["w_granularity"] = name
    if out.get("group_size") is not None:
        check_group_size("QATConfig", out["group_size"], True)
    if "a_granularity" in out:
        check_choice("QATConfig", "a_granularity", out["a_granularity"], ("per_tensor", "per_token"))
    if "kv_granularity" in out:
        check_choice("QATConfig", "kv_granularity", out["kv_granularity"], KV_GRANULARITIES)
    if out.get("per_channel") and out.get("w_granularity") not in (None, "per_channel"):
        raise ValueError(f"QATConfig(per_channel=True, w_granularity={out['w_granularity']!r}): give one of the two, "
                         "not both.")
    return out


def _with_granularity(spec: QuantSpec, gran: str, group_size: Optional[int]) -> QuantSpec:
    return replace(spec, granularity=gran, per_channel=gran == "per_channel", group_size=group_size)


def _weight(w: QuantSpec, short: Dict[str, Any]) -> QuantSpec:
    if "w_bits" in short:
        w = replace(w, bits=short["w_bits"])
    if any(k in short for k in ("per_channel", "w_granularity", "group_size")):
        gran = short.get("w_granularity")
        if gran is None:
            gran = ("per_channel" if short["per_channel"] else "per_tensor") if "per_channel" in short \
                else w.granularity
        size = short.get("group_size", w.group_size if w.granularity == "per_group" else None)
        check_group_size("QATConfig", size, gran == "per_group")
        w = _with_granularity(w, gran, size if gran == "per_group" else None)
    method = short.get("w_method") or short.get("method")
    changes: Dict[str, Any] = {"method": method} if method else {}
    if "w_options" in short:
        changes["options"] = short["w_options"]
    return replace(w, **changes) if changes else w


def _per_token_method(a: QuantSpec, short: Dict[str, Any]) -> str:
    """The method of a per-token activation spec: ``a_method`` if named, else ``"dynamic"`` (warning when the
    user's ``method`` cannot do per-token)."""
    if short.get("a_method"):
        return short["a_method"]
    method = short.get("method")
    if method and method_supports(method, "per_token", "act"):
        return method
    keep = a.method if a.granularity == "per_token" and a.method else "dynamic"
    if method:
        warnings.warn(f"QATConfig(method={method!r}): method {method!r} cannot quantize activations per token; the "
                      f"per-token activations use method {keep!r} and {method!r} applies to the weights. Write "
                      f"a_method={keep!r} (or act=QuantSpec(..., method={keep!r})) to say so.", stacklevel=5)
    return keep


def _act(a: Optional[QuantSpec], weight_method: str, short: Dict[str, Any]) -> Optional[QuantSpec]:
    if "a_bits" in short and short["a_bits"] is None:
        return None
    fresh = a is None
    if a is None:
        if "a_bits" not in short:
            return None
        a = QuantSpec(bits=short["a_bits"])
    gran = short.get("a_granularity", a.granularity)
    changes: Dict[str, Any] = {"granularity": gran}
    if "a_bits" in short:
        changes["bits"] = short["a_bits"]
    if gran == "per_token":
        changes["method"] = _per_token_method(a, short)
    else:
        method = short.get("a_method") or short.get("method")
        if not method and (fresh or a.granularity != gran) and method_supports(weight_method, gran, "act"):
            method = weight_method  # a new act spec, or leaving per-token: the method of the rest of the config
        if method:
            changes["method"] = method
        elif a.granularity != gran:
            changes["method"] = None
    if "a_options" in short:
        changes["options"] = short["a_options"]
    return replace(a, **changes)


def apply_shorthand(roles: Dict[str, Any], short: Dict[str, Any]) -> Dict[str, Any]:
    """``roles`` (``weight``, ``act``, ``grad``, ``kv``) edited by the short-form keywords ``short`` (the table in
    the module docstring); checks ``short`` first (:func:`check_shorthand`)."""
    short = check_shorthand(short)
    roles = {r: bind_role(s, r) if r in ROLES else s for r, s in roles.items()}
    if roles["kv"] is not None and not isinstance(roles["kv"], KVSpec):
        raise TypeError(f"QATConfig.kv={roles['kv']!r}: give a fxqat.KVSpec(bits=4) or None.")
    out = dict(roles)
    out["weight"] = _weight(roles["weight"], short)
    out["act"] = _act(roles["act"], out["weight"].method or "lsq", short)
    grad = roles["grad"]
    if "g_bits" in short:
        bits = short["g_bits"]
        grad = None if bits is None else replace(grad, bits=bits) if grad is not None else \
            QuantSpec(bits=bits, method="grad")
    if grad is not None and "g_options" in short:
        grad = replace(grad, options=short["g_options"])
    out["grad"] = grad
    kv = roles["kv"]
    if "kv_bits" in short:
        kv = None if short["kv_bits"] is None else KVSpec(short["kv_bits"], kv.granularity if kv else "per_token")
    if kv is not None and "kv_granularity" in short:
        kv = KVSpec(kv.bits, short["kv_granularity"])
    out["kv"] = kv
    return out


class ShorthandViews:
    """Read-only short-form names on a :class:`fxqat.QATConfig`: the values of its role specs."""

    weight: QuantSpec
    act: Optional[QuantSpec]
    grad: Optional[QuantSpec]
    kv: Optional[KVSpec]

    @property
    def w_bits(self) -> int:
        return self.weight.bits

    @property
    def a_bits(self) -> Optional[int]:
        return self.act.bits if self.act is not None else None

    @property
    def g_bits(self) -> Optional[int]:
        return self.grad.bits if self.grad is not None else None

    @property
    def method(self) -> str:
        """The weight method (the activations' may differ: ``act.method``)."""
        return self.weight.method

    @property
    def w_method(self) -> str:
        return self.weight.method

    @property
    def a_method(self) -> Optional[str]:
        return self.act.method if self.act is not None else None

    @property
    def per_channel(self) -> bool:
        return self.weight.per_channel

    @property
    def w_granularity(self) -> str:
        return self.weight.granularity

    @property
    def group_size(self) -> Optional[int]:
        return self.weight.group_size

    @property
    def a_granularity(self) -> str:
        return self.act.granularity if self.act is not None else "per_tensor"

    @property
    def w_options(self) -> Tuple[Tuple[str, Any], ...]:
        return self.weight.options

    @property
    def a_options(self) -> Tuple[Tuple[str, Any], ...]:
        return self.act.options if self.act is not None else ()

    @property
    def g_options(self) -> Tuple[Tuple[str, Any], ...]:
        return self.grad.options if self.grad is not None else ()

    @property
    def kv_bits(self) -> Optional[int]:
        return self.kv.bits if self.kv is not None else None

    @property
    def kv_granularity(self) -> str:
        return self.kv.granularity if self.kv is not None else "per_token"
