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
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch.nn as nn

__all__ = ["QuantSpec", "Override", "HybridConfig", "QATConfig", "Kind"]

Kind = Literal["weight", "act", "grad"]
_KINDS = ("weight", "act", "grad")


def _check_bits(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
        hint = " or None" if allow_none else ""
        raise ValueError(
            f"{owner}.{name}={value!r} is out of range: use an integer from 1 to 16{hint} (e.g. {name}=4)."
        )


def _check_method(owner: str, name: str, value: Optional[str]) -> None:
    if value is None:
        return
    from fxqat.quantizers.registry import available_methods  # late import: the registry imports config

    known = available_methods()
    if value not in known:
        raise ValueError(f"{owner}.{name}={value!r} is not a known quantizer method; choose one of {sorted(known)}.")


def _freeze_options(options: Any) -> Tuple[Tuple[str, Any], ...]:
    if options is None:
        return ()
    if isinstance(options, Mapping):
        return tuple(sorted(options.items()))
    return tuple(options)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: bit-width, 1..16.
        method: registered quantizer name (``fxqat.available_methods()``).
        kind: ``"weight"``, ``"act"`` or ``"grad"``.
        signed: signed grid (``True``), unsigned (``False``) or decided from the data on the first batch (``None``).
        per_channel: one scale per output channel (weights only).
        ch_axis: the channel axis for ``per_channel``.
        options: method-specific keyword arguments, e.g. ``{"grad_scale": False}``; stored as sorted pairs.

    Example:
        >>> QuantSpec(bits=4, kind="weight", per_channel=True).options_dict()
        {}
    """

    bits: int = 4
    method: str = "lsq"
    kind: Kind = "weight"
    signed: Optional[bool] = None
    per_channel: bool = False
    ch_axis: int = 0
    options: Tuple[Tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check_bits("QuantSpec", "bits", self.bits)
        if self.kind not in _KINDS:
            raise ValueError(f"QuantSpec.kind={self.kind!r}: use one of {_KINDS}.")
        if self.per_channel and self.kind != "weight":
            raise ValueError(
                f"QuantSpec(kind={self.kind!r}, per_channel=True): per-channel scales are for weights only; "
                "set per_channel=False for activations and gradients."
            )
        object.__setattr__(self, "options", _freeze_options(self.options))
        _check_method("QuantSpec", "method", self.method)

    def options_dict(self) -> dict:
        """The method-specific options as a plain dict."""
        return dict(self.options)


@dataclass(frozen=True)
class Override:
    """A per-module exception to the global settings.

    Attributes:
        match: a glob on the module's qualified name (``"layer1.*"``, ``"fc"``) or a module type (``nn.Linear``).
        w_bits: weight bits for matching modules (None = keep the global value).
        a_bits: activation bits for the matching modules' inputs (None = keep the global value).
        method: quantizer method (None = keep the global value).
        skip: keep matching modules in full precision.
        act_signed: force a signed (True) or unsigned (False) grid on the matching modules' inputs.

    Example:
        >>> Override("fc", skip=True).matches("fc", nn.Linear(2, 2))
        True
    """

    match: Union[str, type]
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    method: Optional[str] = None
    skip: bool = False
    act_signed: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.match, (str, type)):
            raise ValueError(f"Override.match={self.match!r}: give a module-name glob (str) or a module type.")
        _check_bits("Override", "w_bits", self.w_bits, allow_none=True)
        _check_bits("Override", "a_bits", self.a_bits, allow_none=True)
        _check_method("Override", "method", self.method)

    def matches(self, name: str, module: Optional[nn.Module]) -> bool:
        """Whether this override applies to the module called ``name``."""
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

    def __post_init__(self) -> None:
        if self.shared_suffix_grad and self.partner != "shared":
            raise ValueError(
                f"HybridConfig.shared_suffix_grad=True needs partner='shared' (got partner={self.partner!r}): a frozen "
                "partner has no trainable weights; drop shared_suffix_grad or write partner='shared'."
            )
        if self.paths != "all" and (isinstance(self.paths, bool) or not isinstance(self.paths, int) or self.paths < 1):
            raise ValueError(f"HybridConfig.paths={self.paths!r}: use 'all' or a positive int k of paths per step.")
        if self.partner not in ("frozen", "shared"):
            raise ValueError(f"HybridConfig.partner={self.partner!r}: use 'frozen' or 'shared'.")
        if self.mode not in ("lp_prefix", "fp_prefix", "single"):
            raise ValueError(f"HybridConfig.mode={self.mode!r}: use 'lp_prefix', 'fp_prefix' or 'single'.")
        if self.temperature <= 0:
            raise ValueError(f"HybridConfig.temperature={self.temperature!r}: must be > 0 (e.g. 1.0 or 4.0).")
        if self.kd_weight < 0 or self.task_weight < 0:
            raise ValueError("HybridConfig.kd_weight and task_weight must be >= 0.")
        if self.path_weights != "uniform":
            object.__setattr__(self, "path_weights", tuple(float(w) for w in self.path_weights))
        if self.max_blocks is not None and self.max_blocks < 2:
            raise ValueError(f"HybridConfig.max_blocks={self.max_blocks!r}: need at least 2 blocks for one path.")
        object.__setattr__(self, "boundaries", tuple(self.boundaries))


@dataclass(frozen=True)
class QATConfig:
    """Everything ``prepare_qat`` needs to know.

    Attributes:
        w_bits: weight bits.
        a_bits: activation bits (inputs of quantized layers).
        g_bits: bits of the gradient w.r.t. each quantized layer's output (None = gradients not quantized).
        method: quantizer method for weights and activations (``"lsq"``, ``"qil"``, ...).
        w_method: weight method if it differs from ``method``.
        a_method: activation method if it differs from ``method``.
        per_channel: per-output-channel weight scales.
        first_last: bits for the first and last quantized layer (weights and their input), or None to keep them FP.
        act_signed: ``"auto"`` (unsigned after ReLU-like producers, otherwise decided from the first batch) or a bool.
        overrides: per-module exceptions, first match wins.
        hybrid: block replacement settings, or None for plain QAT.
        w_options: method options for weight quantizers (e.g. ``{"init": "mse"}``).
        a_options: method options for activation quantizers.
        g_options: options of the gradient quantizers (see ``fxqat.quantizers.grad``).
        leaf_modules: module types or qualified names the tracer must not enter.

    Example:
        >>> QATConfig(w_bits=2, a_bits=2, hybrid=HybridConfig(paths=2)).hybrid.paths
        2
    """

    w_bits: int = 4
    a_bits: int = 4
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

    def __post_init__(self) -> None:
        _check_bits("QATConfig", "w_bits", self.w_bits)
        _check_bits("QATConfig", "a_bits", self.a_bits)
        _check_bits("QATConfig", "g_bits", self.g_bits, allow_none=True)
        _check_bits("QATConfig", "first_last", self.first_last, allow_none=True)
        for name in ("method", "w_method", "a_method"):
            _check_method("QATConfig", name, getattr(self, name))
        if self.act_signed not in ("auto", True, False):
            raise ValueError(f"QATConfig.act_signed={self.act_signed!r}: use 'auto', True or False.")
        overrides = tuple(self.overrides) if isinstance(self.overrides, Sequence) else (self.overrides,)
        for o in overrides:
            if not isinstance(o, Override):
                raise ValueError(f"QATConfig.overrides holds {o!r}: wrap each rule in fxqat.Override(match=..., ...).")
        object.__setattr__(self, "overrides", overrides)
        if self.hybrid is not None and not isinstance(self.hybrid, HybridConfig):
            raise ValueError("QATConfig.hybrid must be None or a fxqat.HybridConfig(...).")
        for name in ("w_options", "a_options", "g_options"):
            object.__setattr__(self, name, _freeze_options(getattr(self, name)))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))

    def with_(self, **changes: Any) -> "QATConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def override_for(self, name: str, module: Optional[nn.Module]) -> Optional[Override]:
        """The first override matching the module called ``name``, or None."""
        for o in self.overrides:
            if o.matches(name, module):
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
            return QuantSpec(
                bits=bits or self.w_bits,
                method=method or self.w_method or self.method,
                kind="weight",
                signed=True,
                per_channel=self.per_channel,
                options=self.w_options,
            )
        if kind == "act":
            return QuantSpec(
                bits=bits or self.a_bits,
                method=method or self.a_method or self.method,
                kind="act",
                signed=signed,
                options=self.a_options,
            )
        return QuantSpec(bits=bits or self.g_bits or 8, method="grad", kind="grad", signed=True, options=self.g_options)
