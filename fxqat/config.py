"""Typed, frozen configuration for fxqat: what to quantize, how, and whether block replacement is on.

Every dataclass validates itself on construction and raises a ``ValueError`` that says what to write instead, so a
bad configuration fails before any model is touched.

Example:
    >>> import fxqat
    >>> cfg = fxqat.QATConfig(w_bits=4, a_bits=4, method="lsq")
    >>> cfg.spec_for("weight", bits=4).bits
    4
    >>> fxqat.QATConfig(w_bits=0)
    Traceback (most recent call last):
    ...
    ValueError: QATConfig.w_bits=0 is out of range: use an integer from 1 to 16 (e.g. w_bits=4).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import torch.nn as nn

from fxqat.override_use import (
    UnmatchedOverrideWarning,
    current_override_use,
    track_overrides,
    warn_unmatched_overrides,
)
from fxqat.quant_spec import (
    GRANULARITIES,
    Kind,
    QuantSpec,
    check_bits,
    check_buildable,
    check_group_size,
    check_method,
)
from fxqat.validate import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    did_you_mean,
    name_tuple,
    options_tuple,
)

__all__ = [
    "QuantSpec", "Override", "HybridConfig", "QATConfig", "Kind", "GRANULARITIES", "PRESETS",
    "UnmatchedOverrideWarning", "track_overrides", "warn_unmatched_overrides",
]

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


@dataclass(frozen=True)
class HybridConfig:
    """Block replacement on a full-precision partner (BWRF, methods.md §1). Every default is fxqat's [R] choice.

    Attributes:
        paths: ``"all"`` cut points every step, or an int k of them sampled per step.
        partner: ``"frozen"`` (a frozen copy of the pre-trained model) or ``"shared"`` (the LP model's own latent
            weights without quantizers; no extra weight memory).
        mode: ``"lp_prefix"`` (LP blocks 1..i then FP blocks), ``"fp_prefix"`` (FP blocks 1..i then LP blocks) or
            ``"single"`` (the FP partner with only block i swapped for its LP block).
        kd_weight: λ_kd, weight of the distillation term KD(·, fp).
        temperature: T of the distillation softmax.
        path_weights: ``"uniform"`` (1/|S| each) or an explicit tuple of one weight per cut.
        task_weight: weight of the task loss on the backbone.
        seed: seed of the generator that samples paths.
        max_blocks: merge neighbouring blocks until at most this many remain (None = no limit).
        boundaries: module names whose outputs end a block (overrides automatic cut selection when given).
        cuts: where blocks may end. ``"residual"``: at every residual boundary the module hierarchy allows (a
            transformer block gives two blocks: attention and MLP); ``"layers"``: one block per layer of the model's
            layer stack (an element of a ``ModuleList``/``Sequential``: one block per transformer block);
            ``"auto"`` (default): ``"residual"`` for models whose root traces, ``"layers"`` for eager-root models
            (Hugging Face), where ``"residual"`` also cuts inside each layer that is a graph region, at the residual
            adds (attention, MLP); a layer that runs eagerly keeps one block (a warning names it).
        shared_suffix_grad: with ``partner="shared"`` only: ``False`` (default) runs the FP suffix of each path on
            detached views of the latent weights (same storage, no copy), so a loss on path i reaches LP blocks
            ``<= i`` only, as with a frozen partner; ``True`` lets it also train the weights of the blocks after i
            through their FP use (the earlier behaviour, kept as an option).

    Example:
        >>> HybridConfig(paths=2).paths
        2
    """

    paths: Union[Literal["all"], int] = "all"
    partner: Literal["frozen", "shared"] = "frozen"
    mode: Literal["lp_prefix", "fp_prefix", "single"] = "lp_prefix"
    kd_weight: float = 1.0
    temperature: float = 1.0
    path_weights: Union[Literal["uniform"], Tuple[float, ...]] = "uniform"
    task_weight: float = 1.0
    seed: int = 0
    max_blocks: Optional[int] = None
    boundaries: Tuple[str, ...] = ()
    shared_suffix_grad: bool = False
    cuts: Literal["auto", "layers", "residual"] = "auto"

    def __post_init__(self) -> None:
        check_choice("HybridConfig", "cuts", self.cuts, ("auto", "layers", "residual"))
        if self.paths != "all":
            if isinstance(self.paths, str):
                raise ValueError(f"HybridConfig.paths={self.paths!r}: use 'all' or a positive int k of paths per step."
                                 f"{did_you_mean(self.paths, ['all'])}")
            check_int("HybridConfig", "paths", self.paths, lo=1)
        check_choice("HybridConfig", "partner", self.partner, ("frozen", "shared"))
        check_choice("HybridConfig", "mode", self.mode, ("lp_prefix", "fp_prefix", "single"))
        check_number("HybridConfig", "kd_weight", self.kd_weight, lo=0.0)
        check_number("HybridConfig", "temperature", self.temperature, lo=0.0, lo_open=True)
        check_number("HybridConfig", "task_weight", self.task_weight, lo=0.0)
        check_int("HybridConfig", "seed", self.seed, lo=-(2**63), hi=2**64 - 1)
        check_int("HybridConfig", "max_blocks", self.max_blocks, lo=2, allow_none=True)
        check_bool("HybridConfig", "shared_suffix_grad", self.shared_suffix_grad)
        object.__setattr__(self, "boundaries", name_tuple("HybridConfig", "boundaries", self.boundaries))
        if self.path_weights != "uniform":
            object.__setattr__(self, "path_weights", _path_weights(self.path_weights))
        if self.shared_suffix_grad and self.partner != "shared":
            raise ValueError(
                f"HybridConfig.shared_suffix_grad=True needs partner='shared' (got partner={self.partner!r}): a frozen "
                "partner has no trainable weights; drop shared_suffix_grad or write partner='shared'."
            )


def _path_weights(value: Any) -> Tuple[float, ...]:
    if isinstance(value, str):
        raise ValueError(f"HybridConfig.path_weights={value!r}: use 'uniform' or one weight per path, e.g. (1.0, 2.0)."
                         f"{did_you_mean(value, ['uniform'])}")
    if not isinstance(value, Sequence):
        raise TypeError(f"HybridConfig.path_weights={value!r}: use 'uniform' or a tuple of one weight per path.")
    out = tuple(check_number("HybridConfig", f"path_weights[{i}]", w, lo=0.0) for i, w in enumerate(value))
    if not out or not any(w > 0 for w in out):
        raise ValueError(f"HybridConfig.path_weights={value!r}: give at least one positive weight (or 'uniform').")
    return out


@dataclass(frozen=True)
class QATConfig:
    """Everything ``prepare_qat`` needs to know.

    Attributes:
        w_bits: weight bits.
        a_bits: activation bits (inputs of quantized layers), or None for weight-only quantization (no activation
            quantizer anywhere; an ``Override.a_bits`` then has no effect).
        g_bits: bits of the gradient w.r.t. each quantized layer's output (None = gradients not quantized).
        method: quantizer method for weights and activations (``"lsq"``, ``"qil"``, ...).
        w_method: weight method if it differs from ``method``.
        a_method: activation method if it differs from ``method``.
        per_channel: per-output-channel weight scales (the same as ``w_granularity="per_channel"``).
        first_last: bits for the first and last quantized layer (weights, their input and, with ``g_bits``, their
            output gradient), or None to keep them FP (no quantizer at all, gradient included).
        first_last_layers: which of the two the ``first_last`` policy covers: ``("first", "last")`` (default),
            ``("last",)``, ``("first",)`` or ``()`` (every layer quantized like the others).
        act_signed: ``"auto"`` (unsigned after ReLU-like producers, otherwise decided from the first batch) or a bool.
        overrides: per-module exceptions, first match wins.
        hybrid: block replacement settings, or None for plain QAT.
        w_options: method options for weight quantizers (e.g. ``{"init": "mse"}``).
        a_options: method options for activation quantizers.
        g_options: options of the gradient quantizers (see ``fxqat.quantizers.grad``).
        leaf_modules: module types or qualified names the tracer must not enter.
        w_granularity: ``"per_tensor"``, ``"per_channel"`` or ``"per_group"``; None = from ``per_channel``.
        group_size: elements per weight group with ``w_granularity="per_group"``.
        a_granularity: ``"per_tensor"`` (static, learned range) or ``"per_token"`` (dynamic per-token asymmetric,
            always method ``"dynamic"``, whatever ``method``/``a_method`` say).
        quantize_matmuls: also quantize both operands of products of two activations where they sit in a graph
            region: attention's ``Q @ K^T`` and ``P @ V`` (``torch.matmul``, ``torch.bmm``, ``@``) and the query, key
            and value of ``F.scaled_dot_product_attention`` (its softmax stays in floating point). Off by default;
            needs ``a_bits``. Overrides match the module the product is written in. See :mod:`fxqat.passes.matmuls`.
        lora: what the weight quantizer of a LoRA layer (PEFT's, or :mod:`fxqat.capture.lora`'s protocol) sees:
            ``"merged"`` (default) the effective weight ``W + s·B·A``, so that merging the adapter deploys exactly
            the trained codes; ``"base"`` the base weight only, the adapter in floating point (torchtune's recipe).
            See docs/lora.md.
        quantize_router: also quantize mixture-of-experts routers (a weight whose product flows into ``topk``).
            Off by default: a router is a tiny share of the weights, and rounding its logits flips which experts a
            token goes to (docs/capture.md, "Mixture-of-experts and non-layer weights").
        quantize_embeddings: also quantize embedding tables (``F.embedding`` weights): weight-only, per-group along
            the embedding dim (``group_size``, default 32), ``w_bits`` bits; no activation quantizer.
        kv_bits: fake-quantize attention's keys and values (the KV cache) to this many bits, dynamic and asymmetric
            (LLM-QAT's W4A8-KV4: ``kv_bits=4``); None = off. Where the attention sits in a graph region; a model
            where no key/value is found gets a warning. See :mod:`fxqat.passes.kv_cache`.
        kv_granularity: ``"per_token"`` (one scale per token and head) or ``"per_head"`` (one per head).

    Presets (:meth:`preset`) build the usual LLM recipes.

    Example:
        >>> QATConfig(w_bits=2, a_bits=2, hybrid=HybridConfig(paths=2)).hybrid.paths
        2
    """

    w_bits: int = 4
    a_bits: Optional[int] = 4
    g_bits: Optional[int] = None
    method: str = "lsq"
    w_method: Optional[str] = None
    a_method: Optional[str] = None
    per_channel: bool = False
    first_last: Optional[int] = 8
    act_signed: Union[Literal["auto"], bool] = "auto"
    overrides: Tuple[Override, ...] = ()
    hybrid: Optional[HybridConfig] = None
    w_options: Tuple[Tuple[str, Any], ...] = field(default=())
    a_options: Tuple[Tuple[str, Any], ...] = field(default=())
    g_options: Tuple[Tuple[str, Any], ...] = field(default=())
    leaf_modules: Tuple[Union[str, type], ...] = ()
    w_granularity: Optional[str] = None
    group_size: Optional[int] = None
    a_granularity: str = "per_tensor"
    first_last_layers: Tuple[str, ...] = ("first", "last")
    quantize_matmuls: bool = False
    lora: str = "merged"
    quantize_router: bool = False
    quantize_embeddings: bool = False
    kv_bits: Optional[int] = None
    kv_granularity: str = "per_token"

    def __post_init__(self) -> None:
        check_bits("QATConfig", "w_bits", self.w_bits)
        check_bits("QATConfig", "a_bits", self.a_bits, allow_none=True)
        check_bits("QATConfig", "g_bits", self.g_bits, allow_none=True)
        check_bits("QATConfig", "first_last", self.first_last, allow_none=True)
        for name in ("method", "w_method", "a_method"):
            if name == "method" and self.method is None:
                raise TypeError("QATConfig.method=None: give a quantizer method name (e.g. 'lsq').")
            check_method("QATConfig", name, getattr(self, name))
        check_bool("QATConfig", "per_channel", self.per_channel)
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
        for name in ("w_options", "a_options", "g_options"):
            object.__setattr__(self, name, options_tuple("QATConfig", name, getattr(self, name)))
        object.__setattr__(self, "leaf_modules", name_tuple("QATConfig", "leaf_modules", self.leaf_modules, nn.Module))
        object.__setattr__(self, "first_last_layers",
                           name_tuple("QATConfig", "first_last_layers", self.first_last_layers))
        if not set(self.first_last_layers) <= {"first", "last"}:
            raise ValueError(
                f"QATConfig.first_last_layers={self.first_last_layers!r}: use a subset of ('first', 'last')."
            )
        check_choice("QATConfig", "w_granularity", self.w_granularity, ("per_tensor", "per_channel", "per_group"),
                     allow_none=True)
        check_choice("QATConfig", "a_granularity", self.a_granularity, ("per_tensor", "per_token"))
        check_bool("QATConfig", "quantize_matmuls", self.quantize_matmuls)
        check_choice("QATConfig", "lora", self.lora, ("merged", "base"))
        check_bool("QATConfig", "quantize_router", self.quantize_router)
        check_bool("QATConfig", "quantize_embeddings", self.quantize_embeddings)
        check_bits("QATConfig", "kv_bits", self.kv_bits, allow_none=True)
        check_choice("QATConfig", "kv_granularity", self.kv_granularity, ("per_token", "per_head"))
        if self.quantize_matmuls and self.a_bits is None:
            raise ValueError("QATConfig(quantize_matmuls=True, a_bits=None): matmul operands are activations; give "
                             "a_bits (e.g. a_bits=8) or drop quantize_matmuls.")
        if self.per_channel and self.w_granularity not in (None, "per_channel"):
            raise ValueError(
                f"QATConfig(per_channel=True, w_granularity={self.w_granularity!r}): give one of the two, not both."
            )
        check_group_size("QATConfig", self.group_size, self.w_granularity == "per_group")
        # the global specs are valid (method supports the granularity, knows the options) and build
        specs = [("w_options", self.spec_for("weight"))]
        if self.a_bits is not None:
            specs.append(("a_options", self.spec_for("act")))
        if self.g_bits is not None:
            specs.append(("g_options", self.spec_for("grad")))
        for name, spec in specs:
            check_buildable("QATConfig", name, spec)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "QATConfig":
        """A named LLM recipe, with any field changed by keyword (``group_size=`` included, default 32).

        * ``"int4_weight_only"``, ``"int3_weight_only"``, ``"int2_weight_only"``: symmetric signed per-group weights
          (``w_granularity="per_group"``, ``group_size=32``), activations not quantized (``a_bits=None``).
        * ``"8da4w"``: int4 symmetric per-group weights and int8 dynamic per-token asymmetric activations
          (``a_granularity="per_token"``, method ``"dynamic"``), torchao's 8da4w fake-quantization.
        * ``"gguf_q4_0"``, ``"gguf_q8_0"``: weights on llama.cpp's Q4_0 / Q8_0 grid exactly (method ``"gguf"``: a
          learned fp16 step per block of 32, llama.cpp's level range and rounding, :mod:`fxqat.quantizers.gguf`),
          activations not quantized; :func:`fxqat.export.to_gguf` writes them without error.

        Weight step sizes start at the clipping ratio of least squared error per group (LSQ option
        ``init="mse"``, :mod:`fxqat.quantizers.scale_init`) rather than the LSQ paper's ``2·mean|w|/√Q_P``: measured on the
        LLM benchmark's FP model (16 validation batches, before any training), int2 per-group-32 loss 1.856 vs 2.085
        (paper init) and 2.046 (torchao RTN); int4 1.530 vs 1.568 and 1.536. Pass ``w_options`` to choose another.

        First and last layer: every preset sets ``first_last=None, first_last_layers=("last",)``: the *last*
        quantized layer in graph order (an LM's ``lm_head``) stays in FP, the first one (e.g. layer 0's attention
        projection) is quantized like every other layer. Embeddings are never quantized. Change it with
        ``first_last_layers=()`` (quantize the last layer too), ``first_last=8`` (8 bits instead of FP) or
        ``Override``s.

        Example:
            >>> c = QATConfig.preset("8da4w", group_size=64)
            >>> (c.w_bits, c.a_bits, c.w_granularity, c.group_size, c.a_granularity, c.first_last)
            (4, 8, 'per_group', 64, 'per_token', None)
            >>> QATConfig.preset("int2_weight_only").a_bits is None
            True
        """
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"QATConfig.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}."
                             f"{did_you_mean(name, PRESETS)}")
        _check_field_names("QATConfig.preset", overrides)
        values = {
            "w_granularity": "per_group", "group_size": 32, "first_last": None, "first_last_layers": ("last",),
            **PRESETS[name], **overrides,
        }
        if "w_options" not in overrides and values.get("method", "lsq") in ("lsq", "lsq_plus"):
            values["w_options"] = {"init": "mse"}
        return cls(**values)

    def with_(self, **changes: Any) -> "QATConfig":
        """A copy with some fields changed (validated again)."""
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
        """The QuantSpec of one tensor of ``kind`` under this config (bits/method default to the global ones)."""
        if kind == "weight":
            gran = self.w_granularity or ("per_channel" if self.per_channel else "per_tensor")
            return QuantSpec(
                bits=bits or self.w_bits,
                method=method or self.w_method or self.method,
                kind="weight",
                signed=True,
                granularity=gran,
                group_size=self.group_size if gran == "per_group" else None,
                options=self.w_options,
            )
        if kind == "act":
            if self.a_granularity == "per_token":
                return QuantSpec(bits=bits or self.a_bits or 8, method="dynamic", kind="act", granularity="per_token")
            return QuantSpec(
                bits=bits or self.a_bits or 8,
                method=method or self.a_method or self.method,
                kind="act",
                signed=signed,
                options=self.a_options,
            )
        return QuantSpec(bits=bits or self.g_bits or 8, method="grad", kind="grad", signed=True, options=self.g_options)


#: preset name -> QATConfig fields (see :meth:`QATConfig.preset`)
PRESETS = {
    "int4_weight_only": {"w_bits": 4, "a_bits": None},
    "int3_weight_only": {"w_bits": 3, "a_bits": None},
    "int2_weight_only": {"w_bits": 2, "a_bits": None},
    "8da4w": {"w_bits": 4, "a_bits": 8, "a_granularity": "per_token"},
    "gguf_q4_0": {"w_bits": 4, "a_bits": None, "method": "gguf"},
    "gguf_q8_0": {"w_bits": 8, "a_bits": None, "method": "gguf"},
}


def _check_field_names(owner: str, given: Dict[str, Any]) -> None:
    known = [f.name for f in fields(QATConfig)]
    for k in given:
        if k not in known:
            raise TypeError(f"{owner}: QATConfig has no field {k!r}.{did_you_mean(k, known)}")
