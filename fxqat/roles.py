"""The roles of a :class:`fxqat.QATConfig`: one spec per role (``weight``, ``act``, ``grad``, ``kv``).

A :class:`~fxqat.quant_spec.QuantSpec` written for a role leaves ``kind`` out; :func:`bind_role` sets it, with the
role's defaults (signed grids for weights and gradients, method ``"grad"`` for gradients), and checks that the spec
can fill the role. The KV cache has its own small spec, :class:`KVSpec` (always the dynamic asymmetric grid).

Example:
    >>> from fxqat.granularity import per_group
    >>> w = bind_role(QuantSpec(bits=4, granularity=per_group(32)), "weight")
    >>> (w.kind, w.signed, w.method, w.group_size)
    ('weight', True, 'lsq', 32)
    >>> KVSpec(bits=4, granularity="per_head").granularity
    'per_head'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from fxqat.granularity import parse_granularity
from fxqat.quant_spec import QuantSpec, check_bits, check_buildable

__all__ = ["KVSpec", "ROLES", "KV_GRANULARITIES", "bind_role", "DEFAULT_WEIGHT", "DEFAULT_ACT"]

#: role name -> the tensor kind its spec quantizes (the KV cache: :class:`KVSpec`)
ROLES = {"weight": "weight", "act": "act", "grad": "grad"}
KV_GRANULARITIES = ("per_token", "per_head")


@dataclass(frozen=True)
class KVSpec:
    """How attention's keys and values (the KV cache) are fake-quantized: dynamic and asymmetric, ``bits`` bits.

    Attributes:
        bits: bits of the grid (LLM-QAT's W4A8-KV4: 4).
        granularity: ``per_token()`` (one scale per token and head) or ``per_head()`` (one per head), or the names.

    Example:
        >>> from fxqat.granularity import per_token
        >>> KVSpec(bits=4, granularity=per_token())
        KVSpec(bits=4, granularity='per_token')
    """

    bits: int = 4
    granularity: Any = "per_token"

    def __post_init__(self) -> None:
        check_bits("KVSpec", "bits", self.bits)
        name, _, _ = parse_granularity(self.granularity, "KVSpec", "granularity")
        if name not in KV_GRANULARITIES:
            raise ValueError(f"KVSpec.granularity={self.granularity!r}: the KV cache is quantized per_token() or "
                             "per_head().")
        object.__setattr__(self, "granularity", name)


#: the default specs of ``QATConfig()``: 4 bits, per tensor, method left to the role (LSQ); no method is named here,
#: so that ``import fxqat.config`` loads no quantizer module
DEFAULT_WEIGHT = QuantSpec(bits=4)
DEFAULT_ACT = QuantSpec(bits=4)


def bind_role(spec: Any, role: str, owner: str = "QATConfig") -> Optional[QuantSpec]:
    """``spec`` with ``kind`` set for ``role`` and the role's defaults, checked to build (None stays None).

    A ``ValueError``/``TypeError`` names ``owner.role``: a spec of another kind, an activation spec that fixes
    ``signed`` (the sign of activations is ``QATConfig.act_signed``), options the method refuses.
    """
    if spec is None:
        if role == "weight":
            raise TypeError(f"{owner}.weight=None: give a QuantSpec (weights are always quantized; skip single layers "
                            "with fxqat.Override(match, skip=True)).")
        return None
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"{owner}.{role}={spec!r}: give a fxqat.QuantSpec(bits=..., method=..., granularity=...)"
                        f"{'' if role == 'weight' else ' or None'}.")
    kind = ROLES[role]
    if spec.kind not in (None, kind):
        raise ValueError(f"{owner}.{role}=QuantSpec(kind={spec.kind!r}, ...): the {role} role quantizes kind "
                         f"{kind!r}; leave kind out.")
    if role == "act" and spec.signed is not None:
        raise ValueError(f"{owner}.act=QuantSpec(signed={spec.signed!r}, ...): the sign of activations is "
                         f"{owner}.act_signed (write act_signed={spec.signed!r}); leave signed out of the spec.")
    signed = True if role != "act" and spec.signed is None else spec.signed
    try:
        out = replace(spec, kind=kind, signed=signed)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{owner}.{role}: {e}") from None
    check_buildable(owner, f"{role}.options", out)
    return out
