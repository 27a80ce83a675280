"""Quantization that follows a weight *parameter*, not a module class (MoE experts, routers, bare weights).

transformers 5 keeps the experts of Mixtral or Qwen3-MoE as 3-D parameters (``experts.gate_up_proj`` of shape
``(experts, 2·inter, hidden)``) read by whatever experts implementation runs (an eager loop over ``w[e]``, batched
``bmm`` on ``w[expert_ids]``, ``grouped_mm`` on ``w.transpose(-2, -1)``), and a router as a module with a bare
``weight``. No module class says "weight layer" there. Two steps find and quantize such parameters:

1. :class:`ParamUseRecorder` watches the example forward with a ``TorchFunctionMode``: it follows every parameter
   through views (indexing, transposes, ...) into matmul-like ops and records which parameter dims each op reduces
   over (:mod:`fxqat.passes.param_weights`), which module's forward was running, and whether the op's output flows
   into a ``topk`` (a router).
2. :func:`quantize_params` gives the owning module a weight quantizer per such parameter (child ``fxqat_pq``) and
   swaps its class for a subclass whose attribute lookup returns the fake-quantized parameter while the module's own
   ``forward`` runs (computed once per call, in the ``[rows, reduction]`` layout, so per-channel means per expert and
   output channel and per-group runs along the reduction dim). The ``Parameter`` stays where it was: same name, same
   object, same ``state_dict`` key; outside ``forward`` the attribute is the FP parameter.

Example:
    >>> import torch, torch.nn as nn
    >>> from fxqat.config import QuantSpec
    >>> class Experts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = nn.Parameter(torch.randn(2, 3, 8))  # (experts, out, in)
    ...     def forward(self, x, e):
    ...         return x @ self.w[e].t()
    >>> m, x = Experts(), torch.randn(4, 8)
    >>> uses = record_param_uses(m, (x, 1))
    >>> uses["w"].reduced, uses["w"].ops
    ((2,), ('matmul',))
    >>> q = quantize_params(m, {"w": (2,)}, QuantSpec(bits=2, kind="weight", granularity="per_channel"), "")
    >>> len(torch.unique(m(torch.eye(8), 0)[:, 0])) <= 4  # expert 0, output channel 0: a 2-bit grid
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from fxqat.config import QATConfig, QuantSpec
from fxqat.layer_registry import weight_layer_entry
from fxqat.method_registry import make_quantizer
from fxqat.passes.param_weights import (
    MATMUL_OPS,
    ROUTER_PASS_OPS,
    ROUTER_SINKS,
    VIEW_OPS,
    Dims,
    follow_view,
    from_rows,
    op_name,
    to_rows,
    weight_use,
)
from fxqat.quantizers.base import Quantizer

__all__ = ["ParamUse", "ParamUseRecorder", "record_param_uses", "quantize_params", "unquantize_params",
           "quantized_param", "param_quantizers", "freeze_params", "PARAM_QUANT", "ParamPlan", "plan_params",
           "embedding_spec", "layer_weight_names", "RowsQuant"]

log = logging.getLogger(__name__)
PARAM_QUANT = "fxqat_pq"  # child ModuleDict of an owner: parameter name -> its weight quantizer
_LAYOUT = "_fxqat_pq_layout"  # owner.__dict__: parameter name -> reduced dims
_CACHE = "_fxqat_pq_cache"  # owner.__dict__: parameter name -> fake-quantized tensor while forward runs


@dataclass
class ParamUse:
    """How the example forward used one parameter as a weight.

    Attributes:
        reduced: parameter dims the ops reduce over (None when two uses disagree).
        ops: the matmul-like ops that read it (``"linear"``, ``"matmul"``, ``"grouped_mm"``, ``"embedding"``, ...).
        users: qualified names of the modules whose ``forward`` was running (innermost) at each use.
        router: its product flows into a ``topk``/``argmax`` (it chooses experts).
    """

    reduced: Optional[Tuple[int, ...]] = None
    ops: Tuple[str, ...] = ()
    users: Tuple[str, ...] = ()
    router: bool = False
    conflict: bool = field(default=False, repr=False)


class ParamUseRecorder(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records :class:`ParamUse` per parameter of ``model`` (see the module docstring).

    Use :meth:`watch` around one forward call; :attr:`uses` maps qualified parameter names to their uses.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: Dict[int, str] = {}
        for name, p in model.named_parameters():
            self.names.setdefault(id(p), name)
        self.params = {name: p for name, p in model.named_parameters()}
        self.tracked = WeakIdKeyDictionary()  # derived tensor -> (parameter name, dims)
        self.logits = WeakIdKeyDictionary()  # product of a tracked weight -> parameter name
        self.uses: Dict[str, ParamUse] = {}
        self.stack: List[str] = []

    def _source(self, t: Any) -> Optional[Tuple[str, Dims]]:
        if not isinstance(t, torch.Tensor):
            return None
        name = self.names.get(id(t))
        if name is not None and t is self.params.get(name):
            return name, tuple(range(t.dim()))
        return self.tracked.get(t)

    def _record(self, pname: str, op: str, reduced: Tuple[int, ...]) -> None:
        use = self.uses.setdefault(pname, ParamUse())
        if use.ops and use.reduced != reduced:
            use.conflict = True
        use.reduced = None if use.conflict else reduced
        use.ops = tuple(dict.fromkeys(use.ops + (op,)))
        user = self.stack[-1] if self.stack else ""
        use.users = tuple(dict.fromkeys(use.users + (user,)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        if name in VIEW_OPS:
            src = self._source(args[0]) if args else None
            if src is not None and isinstance(out, torch.Tensor):
                dims = follow_view(name, src[1], args[1:], out.dim())
                if dims is not None and len(dims) == out.dim():
                    self.tracked[out] = (src[0], dims)
        if name in MATMUL_OPS:
            operands = list(args)
            if name == "einsum" and len(args) == 2 and isinstance(args[1], (list, tuple)):
                operands = [args[0], *args[1]]
            if "weight" in kwargs:
                operands = operands[:1] + [kwargs["weight"]]
            for pos, a in enumerate(operands):
                src = self._source(a)
                if src is None:
                    continue
                use = weight_use(name, pos, src[1], operands)
                if use is not None:
                    self._record(src[0], *use)
                    if isinstance(out, torch.Tensor):
                        self.logits[out] = src[0]
        elif args and isinstance(args[0], torch.Tensor) and args[0] in self.logits:
            pname = self.logits[args[0]]
            if name in ROUTER_SINKS:
                self.uses[pname].router = True
            elif name in ROUTER_PASS_OPS and isinstance(out, torch.Tensor):
                self.logits[out] = pname
        return out

    def watch(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` with this recorder active (module stack kept with forward hooks)."""
        names = {id(m): n for n, m in self.model.named_modules()}

        def pre(mod, _a):
            self.stack.append(names.get(id(mod), "?"))

        def post(mod, _a, _o):
            if self.stack:
                self.stack.pop()

        handles = [m.register_forward_pre_hook(pre) for m in self.model.modules()]
        handles += [m.register_forward_hook(post, always_call=True) for m in self.model.modules()]
        try:
            with self:
                return fn(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            self.stack.clear()


def record_param_uses(model: nn.Module, args: Tuple, kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, ParamUse]:
    """Run ``model(*args, **kwargs)`` once (no grad, RNG and buffers restored: BatchNorm statistics are left as they
    were) and return its parameters' weight uses."""
    rec = ParamUseRecorder(model)
    buffers = [(b, b.clone()) for b in model.buffers()]
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            rec.watch(model, *args, **(kwargs or {}))
        finally:
            for b, saved in buffers:
                b.copy_(saved)
    return rec.uses


# ---------------------------------------------------------------------------------------------- the swap
class _ParamQuantMixin:
    """Attribute lookup and ``forward`` of a module whose parameters follow :func:`quantize_params`."""

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        cache = d.get(_CACHE)
        if cache is not None and name in d.get(_LAYOUT, {}):
            t = cache.get(name)
            if t is None:
                t = cache[name] = quantized_param(self, name)
            return t
        return type(self)._fxqat_pq_getattr(self, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D401 - nn.Module.forward
        if self.__dict__.get(_CACHE) is not None:  # re-entered (a module calling itself): one cache per outer call
            return type(self)._fxqat_pq_forward(self, *args, **kwargs)
        self.__dict__[_CACHE] = {}
        try:
            return type(self)._fxqat_pq_forward(self, *args, **kwargs)
        finally:
            self.__dict__[_CACHE] = None


_SUBCLASSES: Dict[type, type] = {}


def _swap_class(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"ParamQuant{cls.__name__}", (_ParamQuantMixin, cls), {
            "_fxqat_pq_getattr": cls.__getattr__, "_fxqat_pq_forward": cls.forward, "__module__": cls.__module__,
        })
        _SUBCLASSES[cls] = sub
    return sub


def quantized_param(owner: nn.Module, name: str) -> torch.Tensor:
    """The fake-quantized value of ``owner``'s parameter ``name`` (quantized in its ``[rows, reduction]`` layout)."""
    w = owner._parameters[name]
    reduced = owner.__dict__[_LAYOUT][name]
    q = owner._modules[PARAM_QUANT][name]
    return from_rows(q(to_rows(w, reduced)), w.shape, reduced)


def quantize_params(
    owner: nn.Module, layouts: Dict[str, Tuple[int, ...]], spec: QuantSpec, prefix: str,
    specs: Optional[Dict[str, QuantSpec]] = None,
) -> Dict[str, Quantizer]:
    """Give ``owner``'s own parameters ``layouts`` (name -> reduced dims) weight quantizers with ``spec`` (or
    ``specs[name]``); ``prefix`` is ``owner``'s qualified name. Returns name -> quantizer.

    Raises:
        ValueError: a parameter is not ``owner``'s own, or a per-group ``spec`` does not divide its reduction size.
    """
    if not layouts:
        return {}
    quantizers = {}
    for name, reduced in layouts.items():
        w = owner._parameters.get(name)
        if not isinstance(w, nn.Parameter):
            raise ValueError(f"quantize_params: {prefix or '<root>'!r} has no parameter {name!r} of its own.")
        s = (specs or {}).get(name, spec)
        n_in = to_rows(w.detach(), reduced).shape[1]
        if s.granularity == "per_group" and n_in % s.group_size:
            where = f"{prefix}.{name}" if prefix else name
            raise ValueError(
                f"parameter {where!r} of shape {tuple(w.shape)} has {n_in} elements along its reduction dims "
                f"{reduced}, not divisible by group_size={s.group_size}; change group_size or add an "
                f"fxqat.Override({prefix!r}, skip=True) for this module."
            )
        q = make_quantizer(QuantSpec(**{**s.__dict__, "ch_axis": 0}))
        q.weight_target = f"{prefix}.{name}" if prefix else name
        q.weight_layer = prefix
        quantizers[name] = q
    if PARAM_QUANT in owner._modules:
        raise TypeError(f"module {prefix or '<root>'!r} already has parameter quantizers.")
    owner.add_module(PARAM_QUANT, nn.ModuleDict(quantizers))
    owner.__dict__[_LAYOUT] = dict(layouts)
    owner.__dict__[_CACHE] = None
    owner.__class__ = _swap_class(type(owner))
    return quantizers


def param_quantizers(owner: nn.Module) -> Dict[str, Quantizer]:
    """``owner``'s parameter name -> quantizer ({} when :func:`quantize_params` was not applied)."""
    pq = owner._modules.get(PARAM_QUANT)
    return dict(pq.items()) if isinstance(pq, nn.ModuleDict) and _LAYOUT in owner.__dict__ else {}


def unquantize_params(owner: nn.Module) -> Dict[str, Quantizer]:
    """Undo :func:`quantize_params` in place; returns the quantizers removed (parameters are left as they are)."""
    qs = param_quantizers(owner)
    if not qs:
        return {}
    del owner._modules[PARAM_QUANT]
    owner.__dict__.pop(_LAYOUT, None)
    owner.__dict__.pop(_CACHE, None)
    owner.__class__ = type(owner).__bases__[1]
    return qs


@torch.no_grad()
def freeze_params(owner: nn.Module) -> None:
    """Write the fake-quantized values into ``owner``'s parameters and disable their quantizers (``convert``)."""
    for name, q in param_quantizers(owner).items():  # again after a load_state_dict: the grid is idempotent
        q.eval()
        q.enable_fake_quant(True)
        owner._parameters[name].copy_(quantized_param(owner, name))
        q.enable_fake_quant(False)



@dataclass(frozen=True)
class ParamPlan:
    """What :func:`plan_params` decided for the parameters registered weight layers do not cover.

    Attributes:
        owners: owning module name -> {own parameter name: reduced dims} to quantize with :func:`quantize_params`.
        specs: qualified parameter name -> its weight spec.
        fp_layer_weights: qualified names of the weights kept FP wherever they are read (routers).
        reasons: qualified parameter name -> why it stays FP (for ``capture_report``).
    """

    owners: Dict[str, Dict[str, Tuple[int, ...]]]
    specs: Dict[str, QuantSpec]
    fp_layer_weights: frozenset
    reasons: Dict[str, str]


def embedding_spec(config: QATConfig, bits: Optional[int] = None, method: Optional[str] = None) -> QuantSpec:
    """The weight-only per-group spec of an embedding table (``QATConfig.quantize_embeddings``)."""
    base = config.spec_for("weight", bits=bits, method=method)
    return QuantSpec(**{**base.__dict__, "granularity": "per_group", "group_size": config.group_size or 32})


def plan_params(
    model: nn.Module, uses: Dict[str, ParamUse], config: QATConfig, layer_weights: Dict[int, str],
) -> ParamPlan:
    """Decide, per parameter the recorder saw as a weight, whether :func:`quantize_params` takes it.

    Args:
        model: the model (parameter names are qualified from it).
        uses: :func:`record_param_uses` of the example call.
        config: ``quantize_router``, ``quantize_embeddings``, overrides and bits.
        layer_weights: ``id(parameter)`` -> qualified name, for the weights registered weight layers hold (they
            are quantized by the layer machinery; only their router status is decided here).
    """
    owners: Dict[str, Dict[str, Tuple[int, ...]]] = {}
    specs: Dict[str, QuantSpec] = {}
    fp_layers, reasons = set(), {}
    params = dict(model.named_parameters())
    for pname, use in uses.items():
        p = params.get(pname)
        if p is None or p.dim() < 2:
            continue
        owner, _, local = pname.rpartition(".")
        if use.router and not config.quantize_router:
            reasons[pname] = "FP by config: a router (its product chooses experts; QATConfig.quantize_router=False)"
            fp_layers.add(layer_weights.get(id(p), pname))  # FP in graph regions too (annotate's fp_weights)
            continue
        if id(p) in layer_weights:
            continue
        embedding = set(use.ops) == {"embedding"}
        if embedding and not config.quantize_embeddings:
            reasons[pname] = "FP by config: an embedding table (QATConfig.quantize_embeddings=False)"
            continue
        if use.conflict or use.reduced is None:
            reasons[pname] = f"enters {', '.join(use.ops)} with different reduction dims; fxqat gives it no quantizer"
            continue
        if any(u != owner and not u.startswith(owner + ".") for u in use.users) if owner else False:
            reasons[pname] = (f"enters {', '.join(use.ops)} in the forward of {use.users[0]!r}, not of its owner "
                              f"{owner!r}; fxqat follows a parameter only inside its owner's forward")
            continue
        ov = config.override_for(owner, model.get_submodule(owner))
        if ov is not None and ov.skip:
            reasons[pname] = "FP by config: Override(skip=True)"
            continue
        bits = ov.w_bits if ov is not None and ov.w_bits else None
        method = ov.method if ov is not None else None
        try:
            spec = embedding_spec(config, bits, method) if embedding else config.spec_for("weight", bits=bits,
                                                                                           method=method)
        except ValueError as e:
            raise ValueError(f"parameter {pname!r}: {e}") from None
        owners.setdefault(owner, {})[local] = use.reduced
        specs[pname] = spec
    return ParamPlan(owners, specs, frozenset(fp_layers), reasons)


def layer_weight_names(model: nn.Module) -> Dict[int, str]:
    """``id(parameter)`` -> qualified name of every registered weight layer's weight in ``model``."""
    found: Dict[int, str] = {}
    for name, m in model.named_modules():
        entry = weight_layer_entry(m)
        if entry is not None:
            found.setdefault(id(getattr(m, entry.weight)), f"{name}.{entry.weight}" if name else entry.weight)
    return found


class RowsQuant(nn.Module):
    """A weight quantizer applied in the ``[rows, reduction]`` layout (for a parameter a graph reads directly).

    Example:
        >>> rq = RowsQuant(make_quantizer(QuantSpec(bits=2, kind="weight", granularity="per_channel")), (1,))
        >>> w = torch.randn(3, 4, 5)  # reduced over dim 1: one row per (dim 0, dim 2) pair
        >>> y = rq(w); [len(torch.unique(y[i, :, j])) <= 4 for i, j in ((0, 0), (2, 4))]
        [True, True]
    """

    def __init__(self, quantizer: Quantizer, reduced: Tuple[int, ...]) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.reduced = tuple(reduced)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return from_rows(self.quantizer(to_rows(w, self.reduced)), w.shape, self.reduced)
