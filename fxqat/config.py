"""Typed, frozen configuration for fxqat: what to quantize, how, and whether block replacement is on.

A :class:`QATConfig` holds one :class:`QuantSpec` per role: ``weight``, ``act`` (the inputs of quantized layers),
``grad`` (output gradients) and ``kv`` (the KV cache, :class:`~fxqat.roles.KVSpec`); each spec has one granularity
value (:mod:`fxqat.granularity`: ``per_tensor()``, ``per_channel(axis)``, ``per_group(32)``, ``per_token()``).
The short form ``QATConfig(w_bits=4, a_bits=4, method="lsq")`` builds the same specs (:mod:`fxqat.shorthand`).
Every dataclass validates itself on construction and raises a ``ValueError`` that says what to write instead, so a
bad configuration fails before any model is touched.

Example:
    >>> import fxqat
    >>> from fxqat.granularity import per_group, per_token
    >>> cfg = fxqat.QATConfig(weight=QuantSpec(bits=4, granularity=per_group(32)),
    ...                       act=QuantSpec(bits=8, method="dynamic", granularity=per_token()))
    >>> cfg == fxqat.QATConfig(w_bits=4, w_granularity="per_group", group_size=32, a_bits=8, a_granularity="per_token")
    True
    >>> cfg.spec_for("weight", bits=8).bits
    8
    >>> fxqat.QATConfig(w_bits=0)
    Traceback (most recent call last):
    ...
    ValueError: QATConfig.w_bits=0 is out of range: use an integer from 1 to 16 (e.g. w_bits=4).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import torch.nn as nn

from fxqat.granularity import per_group, per_token
from fxqat.hybrid_config import HybridConfig
from fxqat.override import Override
from fxqat.override_use import (
    UnmatchedOverrideWarning,
    current_override_use,
    track_overrides,
    warn_unmatched_overrides,
)
from fxqat.quant_spec import GRANULARITIES, Kind, QuantSpec, check_bits, method_supports
from fxqat.roles import DEFAULT_ACT, DEFAULT_WEIGHT, ROLES, KVSpec, bind_role
from fxqat.shorthand import SHORTHAND, ShorthandViews, apply_shorthand
from fxqat.validate import check_bool, check_choice, did_you_mean, name_tuple

__all__ = [
    "QuantSpec", "KVSpec", "Override", "HybridConfig", "QATConfig", "Kind", "GRANULARITIES", "PRESETS", "SHORTHAND",
    "UnmatchedOverrideWarning", "track_overrides", "warn_unmatched_overrides",
]


@dataclass(frozen=True)
class QATConfig(ShorthandViews):
    """Everything ``prepare_qat`` needs to know: one spec per role, and the policies around them.

    Attributes:
        weight: the :class:`QuantSpec` of every quantized layer's weight (``kind`` left out; default 4-bit LSQ per
            tensor). Overrides change its bits and method per layer.
        act: the spec of the activations that quantized layers read, or None for weight-only quantization (no
            activation quantizer anywhere; an ``Override.a_bits`` then has no effect). Default 4-bit LSQ. A
            per-token spec names its method: ``QuantSpec(bits=8, method="dynamic", granularity=per_token())``
            (it keeps that method under an ``Override.method``). Its sign is ``act_signed``.
        grad: the spec of the gradient w.r.t. each quantized layer's output (method ``"grad"``), or None (default).
        kv: fake-quantize attention's keys and values (the KV cache), a :class:`~fxqat.roles.KVSpec` (LLM-QAT's
            W4A8-KV4: ``KVSpec(bits=4)``), or None (default). Where the attention sits in a graph region; a model
            where no key/value is found gets a warning. See :mod:`fxqat.passes.kv_cache`.
        first_last: bits for the first and last quantized layer (weights, their input and, with ``grad``, their
            output gradient), or None to keep them FP (no quantizer at all, gradient included).
        first_last_layers: which of the two the ``first_last`` policy covers: ``("first", "last")`` (default),
            ``("last",)``, ``("first",)`` or ``()`` (every layer quantized like the others).
        act_signed: ``"auto"`` (unsigned after ReLU-like producers, otherwise decided from the first batch) or a bool.
        overrides: per-module exceptions, first match wins.
        hybrid: block replacement settings, or None for plain QAT.
        leaf_modules: module types or qualified names the tracer must not enter.
        quantize_matmuls: also quantize both operands of products of two activations where they sit in a graph
            region: attention's ``Q @ K^T`` and ``P @ V`` (``torch.matmul``, ``torch.bmm``, ``@``) and the query, key
            and value of ``F.scaled_dot_product_attention`` (its softmax stays in floating point). Off by default;
            needs ``act``. Overrides match the module the product is written in. See :mod:`fxqat.passes.matmuls`.
        lora: what the weight quantizer of a LoRA layer (PEFT's, or :mod:`fxqat.capture.lora`'s protocol) sees:
            ``"merged"`` (default) the effective weight ``W + s·B·A``, so that merging the adapter deploys exactly
            the trained codes; ``"base"`` the base weight only, the adapter in floating point (torchtune's recipe).
            See docs/lora.md.
        quantize_router: also quantize mixture-of-experts routers (a weight whose product flows into ``topk``).
            Off by default: a router is a tiny share of the weights, and rounding its logits flips which experts a
            token goes to (docs/capture.md, "Mixture-of-experts and non-layer weights").
        quantize_embeddings: also quantize embedding tables (``F.embedding`` weights): weight-only, per-group along
            the embedding dim (the weight's group size if per-group, else 32), ``weight.bits`` bits; no activation
            quantizer.

    Short form: the keywords of :data:`~fxqat.shorthand.SHORTHAND` (``w_bits``, ``a_bits``, ``g_bits``,
    ``method``, ``w_method``, ``a_method``, ``per_channel``, ``w_granularity``, ``group_size``, ``a_granularity``,
    ``w_options``, ``a_options``, ``g_options``, ``kv_bits``, ``kv_granularity``) are accepted by the constructor,
    :meth:`with_` and :meth:`preset`, and edit the role specs (the ones given, else the defaults); read back
    (``cfg.w_bits``) they give the specs' values. ``QATConfig(w_bits=4, a_bits=4, method="lsq")`` is the default
    config. Presets (:meth:`preset`) build the usual LLM recipes.

    Example:
        >>> QATConfig(w_bits=2, a_bits=2, hybrid=HybridConfig(paths=2)).hybrid.paths
        2
        >>> QATConfig(weight=QuantSpec(bits=3, method="qil"), act=None).a_bits is None
        True
    """

    weight: QuantSpec = DEFAULT_WEIGHT
    act: Optional[QuantSpec] = DEFAULT_ACT
    grad: Optional[QuantSpec] = None
    kv: Optional[KVSpec] = None
    first_last: Optional[int] = 8
    first_last_layers: Tuple[str, ...] = ("first", "last")
    act_signed: Union[Literal["auto"], bool] = "auto"
    overrides: Tuple[Override, ...] = ()
    hybrid: Optional[HybridConfig] = None
    leaf_modules: Tuple[Union[str, type], ...] = ()
    quantize_matmuls: bool = False
    lora: str = "merged"
    quantize_router: bool = False
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        for role in ROLES:
            object.__setattr__(self, role, bind_role(getattr(self, role), role))
        if self.kv is not None and not isinstance(self.kv, KVSpec):
            raise TypeError(f"QATConfig.kv={self.kv!r}: give a fxqat.KVSpec(bits=4, granularity='per_token') or None.")
        check_bits("QATConfig", "first_last", self.first_last, allow_none=True)
        if self.act_signed != "auto" and not isinstance(self.act_signed, bool):
            raise ValueError(f"QATConfig.act_signed={self.act_signed!r}: use 'auto', True or False."
                             f"{did_you_mean(self.act_signed, ['auto'])}")
        if isinstance(self.overrides, (str, bytes)) or not isinstance(self.overrides, (Sequence, Override)):
            raise TypeError(f"QATConfig.overrides={self.overrides!r}: give a tuple of fxqat.Override(match=..., ...).")
        overrides = tuple(self.overrides) if isinstance(self.overrides, Sequence) else (self.overrides,)
        for o in overrides:
            if not isinstance(o, Override):
                raise ValueError(f"QATConfig.overrides holds {o!r}: wrap each rule in fxqat.Override(match=..., ...).")
        object.__setattr__(self, "overrides", overrides)
        if self.hybrid is not None and not isinstance(self.hybrid, HybridConfig):
            raise ValueError("QATConfig.hybrid must be None or a fxqat.HybridConfig(...).")
        object.__setattr__(self, "leaf_modules", name_tuple("QATConfig", "leaf_modules", self.leaf_modules, nn.Module))
        object.__setattr__(self, "first_last_layers",
                           name_tuple("QATConfig", "first_last_layers", self.first_last_layers))
        if not set(self.first_last_layers) <= {"first", "last"}:
            raise ValueError(
                f"QATConfig.first_last_layers={self.first_last_layers!r}: use a subset of ('first', 'last')."
            )
        check_bool("QATConfig", "quantize_matmuls", self.quantize_matmuls)
        check_choice("QATConfig", "lora", self.lora, ("merged", "base"))
        check_bool("QATConfig", "quantize_router", self.quantize_router)
        check_bool("QATConfig", "quantize_embeddings", self.quantize_embeddings)
        if self.quantize_matmuls and self.act is None:
            raise ValueError("QATConfig(quantize_matmuls=True, a_bits=None) (act=None): matmul operands are "
                             "activations; give act (e.g. a_bits=8) or drop quantize_matmuls.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QATConfig":
        """A named LLM recipe (:data:`PRESETS`), with any field or short-form keyword changed (``group_size=64``).

        * ``"int4_weight_only"``, ``"int3_weight_only"``, ``"int2_weight_only"``: symmetric signed per-group weights
          (``per_group(32)``), activations not quantized (``act=None``).
        * ``"8da4w"``: int4 symmetric per-group weights and int8 dynamic per-token asymmetric activations
          (``act=QuantSpec(bits=8, method="dynamic", granularity=per_token())``), torchao's 8da4w fake-quantization.
        * ``"gguf_q4_0"``, ``"gguf_q8_0"``: weights on llama.cpp's Q4_0 / Q8_0 grid exactly (method ``"gguf"``: a
          learned fp16 step per block of 32, llama.cpp's level range and rounding, :mod:`fxqat.quantizers.gguf`),
          activations not quantized; :func:`fxqat.export.to_gguf` writes them without error.

        Weight step sizes start at the clipping ratio of least squared error per group (LSQ option
        ``init="mse"``, :mod:`fxqat.quantizers.scale_init`) rather than the LSQ paper's ``2·mean|w|/√Q_P``: measured on the
        LLM benchmark's FP model (16 validation batches, before any training), int2 per-group-32 loss 1.856 vs 2.085
        (paper init) and 2.046 (torchao RTN); int4 1.530 vs 1.568 and 1.536. Pass ``w_options`` (or ``weight=``) to
        choose another.

        First and last layer: every preset sets ``first_last=None, first_last_layers=("last",)``: the *last*
        quantized layer in graph order (an LM's ``lm_head``) stays in FP, the first one (e.g. layer 0's attention
        projection) is quantized like every other layer. Embeddings are never quantized. Change it with
        ``first_last_layers=()`` (quantize the last layer too), ``first_last=8`` (8 bits instead of FP) or
        ``Override``s.

        Example:
            >>> c = QATConfig.preset("8da4w", group_size=64)
            >>> (c.weight.bits, c.weight.granularity, c.weight.group_size, c.first_last)
            (4, 'per_group', 64, None)
            >>> (c.act.bits, c.act.method, c.act.granularity)
            (8, 'dynamic', 'per_token')
            >>> QATConfig.preset("int2_weight_only").act is None
            True
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"QATConfig.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}."
                             f"{did_you_mean(name, PRESETS)}")
        _check_field_names("QATConfig.preset", overrides)
        recipe = {k: QuantSpec(**v) if isinstance(v, dict) else v for k, v in PRESETS[name].items()}
        values: Dict[str, Any] = {"first_last": None, "first_last_layers": ("last",), **recipe, **overrides}
        if "w_options" not in overrides and "weight" not in overrides:
            method = overrides.get("w_method") or overrides.get("method") or values["weight"].method
            if method in ("lsq", "lsq_plus"):
                values["weight"] = replace(values["weight"], options={"init": "mse"})
        return cls(**values)

    def with_(self, **changes: Any) -> "QATConfig":
        """A copy with some fields (or short-form keywords) changed, validated again.

        Example:
            >>> QATConfig().with_(w_bits=2, a_bits=None).weight.bits
            2
        """
        _check_field_names("QATConfig.with_", changes)
        return replace(self, **changes)

    def override_for(self, name: str, module: Optional[nn.Module]) -> Optional[Override]:
        """The first override matching the module called ``name``, or None (recorded by :func:`track_overrides`)."""
        use = current_override_use()
        if use is not None:
            use.names.append(name)
        for i, o in enumerate(self.overrides):
            if o.matches(name, module):
                if use is not None:
                    use.used.add(i)
                return o
        return None

    def spec_for(
        self,
        kind: Kind,
        bits: Optional[int] = None,
        method: Optional[str] = None,
        signed: Optional[bool] = None,
    ) -> QuantSpec:
        """The QuantSpec of one tensor of ``kind``: the role's spec with ``bits``/``method``/``signed`` changed where
        given (a layer's override or the first/last policy).

        A per-token activation spec keeps its method and sign (dynamic, asymmetric). Without an ``act`` role an
        activation spec (an ``Override.a_bits`` on an eager layer) is 8-bit, per tensor, with the weight method.
        Without a ``grad`` role a gradient spec is 8-bit, method ``"grad"``.

        Example:
            >>> QATConfig(w_bits=4).spec_for("weight", bits=8, method="qil").method
            'qil'
        """
        if kind == "weight":
            base = self.weight
        elif kind == "act":
            fallback = self.weight.method if method_supports(self.weight.method, "per_tensor", "act") else "lsq"
            base = self.act or QuantSpec(bits=8, method=fallback, kind="act")
        else:
            base = self.grad or QuantSpec(bits=8, method="grad", kind="grad", signed=True)
        changes: Dict[str, Any] = {}
        if bits:
            changes["bits"] = bits
        if kind != "grad" and base.granularity != "per_token":
            if method and method != base.method:
                changes["method"] = method
            if kind == "act":
                changes["signed"] = signed
        return replace(base, **changes) if changes else base


_ROLE_FIELDS = ("weight", "act", "grad", "kv")


def _shorthand_init(init: Any) -> Any:
    """Wrap the dataclass ``__init__`` so that it also takes the short-form keywords (:mod:`fxqat.shorthand`)."""

    @functools.wraps(init)
    def __init__(self: QATConfig, *args: Any, **kwargs: Any) -> None:
        short = {k: kwargs.pop(k) for k in SHORTHAND if k in kwargs}
        if short:
            if args:
                raise TypeError("QATConfig: give the fields by keyword when using the short form "
                                f"({', '.join(sorted(short))}).")
            defaults = {f.name: f.default for f in fields(QATConfig)}
            try:
                kwargs.update(apply_shorthand({r: kwargs.get(r, defaults[r]) for r in _ROLE_FIELDS}, short))
                init(self, *args, **kwargs)
            except (ValueError, TypeError) as e:
                if any(f"{k}=" in str(e) for k in short):
                    raise
                given = ", ".join(f"{k}={v!r}" for k, v in short.items())
                raise type(e)(f"{e} (in the specs built from QATConfig({given}))") from None
            return
        init(self, *args, **kwargs)

    params = list(inspect.signature(init).parameters.values())
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None) for k in SHORTHAND]
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return __init__


QATConfig.__init__ = _shorthand_init(QATConfig.__init__)  # type: ignore[method-assign]

#: preset name -> QATConfig fields (see :meth:`QATConfig.preset`); a role's dict holds its ``QuantSpec`` arguments
#: (built when the preset is, so that ``import fxqat.config`` loads no quantizer). Every spec names its method.
PRESETS: Dict[str, Dict[str, Any]] = {
    "int4_weight_only": {"weight": dict(bits=4, method="lsq", granularity=per_group(32)), "act": None},
    "int3_weight_only": {"weight": dict(bits=3, method="lsq", granularity=per_group(32)), "act": None},
    "int2_weight_only": {"weight": dict(bits=2, method="lsq", granularity=per_group(32)), "act": None},
    "8da4w": {"weight": dict(bits=4, method="lsq", granularity=per_group(32)),
              "act": dict(bits=8, method="dynamic", granularity=per_token())},
    "gguf_q4_0": {"weight": dict(bits=4, method="gguf", granularity=per_group(32)), "act": None},
    "gguf_q8_0": {"weight": dict(bits=8, method="gguf", granularity=per_group(32)), "act": None},
}


def _check_field_names(owner: str, given: Dict[str, Any]) -> None:
    known = [f.name for f in fields(QATConfig)] + list(SHORTHAND)
    for k in given:
        if k not in known:
            raise TypeError(f"{owner}: QATConfig has no field {k!r}.{did_you_mean(k, known)}")
