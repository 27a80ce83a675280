"""Block replacement on eager-root models (a Hugging Face ``...ForCausalLM``): paths that branch off the LP backbone.

In train mode one call runs

1. the LP model once, recording the output of every chain layer (:mod:`fxqat.capture.chain`): h_1 .. h_n;
2. the FP partner once without gradients: ``fp``;
3. for each selected path i, the partner again with chain layers ≤ i *replaying* the LP outputs (their code is
   skipped; the gradient of the path loss flows through h_i into LP blocks ≤ i) and the layers after i in FP.

The LP prefix is never recomputed. Each of ``lp``, ``paths[i]`` and ``fp`` has the user's output type (a
transformers ``ModelOutput`` with ``.logits``, a tuple, a dict); :func:`fxqat.hybrid_loss` reads ``.logits``.
``partner="frozen"`` keeps a frozen copy of the user's FP model under ``fxqat_partner``; ``partner="shared"`` runs the
LP model's own (detached) weights with quantizers off: no weight memory, and a path-i loss reaches LP blocks ≤ i only.
Only ``mode="lp_prefix"`` exists for eager roots. In eval mode the model is the plain LP model. Hooks registered on
the prepared model run in both modes.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
    ...         self.head = nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         for layer in self.layers:
    ...             x = layer(x) if x.sum() > -1e9 else x  # data-dependent: eager root
    ...         return {"logits": self.head(x)}
    >>> qm = fxqat.prepare_qat(Net(), (torch.randn(4, 8),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    >>> out = qm(torch.randn(4, 8))
    >>> len(out.paths), out.paths[0]["logits"].shape
    (3, torch.Size([4, 2]))
"""

from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fxqat.capture.chain import ChainCut
from fxqat.capture.inner_cuts import insert_tap, remove_taps, suffix_runner
from fxqat.config import HybridConfig
from fxqat.graph.blocks import Block
from fxqat.hybrid_output import HybridOutput, select_paths
from fxqat.path_losses import PathLossAverages
from fxqat.quantizers.base import Quantizer

__all__ = ["EagerHybrid", "make_eager_hybrid", "remove_hybrid", "ReplayMixin", "make_replayable", "record_output_hook",
           "record_input_hook"]


class ReplayMixin:
    """Mixed into a partner's chain layer (its class is swapped, so ``isinstance`` still holds): the layer runs as
    usual, or returns a replayed output without running, or runs on a replayed first input."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D401 - nn.Module.forward
        out, inp = self.__dict__.get("_fxqat_replay_out"), self.__dict__.get("_fxqat_replay_in")
        if out is not None:
            return out
        suffix = self.__dict__.get("_fxqat_replay_suffix")
        if suffix is not None:  # the rest of the layer from a recorded activation inside it
            run, h = suffix
            return run(h)
        if inp is not None:
            if args:
                args = (inp, *args[1:])
            else:
                kwargs = {**kwargs, next(iter(kwargs)): inp}
        return super().forward(*args, **kwargs)

    def set_replay(self, output: Any = None, first_input: Optional[torch.Tensor] = None,
                   suffix: Optional[Tuple[Callable[[Any], Any], Any]] = None) -> None:
        """Replay ``output`` (skip the layer), feed ``first_input``, or return ``run(h)`` for ``suffix=(run, h)``
        (the layer from a cut inside it); all None: run normally."""
        self.__dict__["_fxqat_replay_out"] = output
        self.__dict__["_fxqat_replay_in"] = first_input
        self.__dict__["_fxqat_replay_suffix"] = suffix


_REPLAY_CLASSES: Dict[type, type] = {}


def make_replayable(module: nn.Module) -> ReplayMixin:
    """Swap ``module``'s class for a replayable subclass of it (in place)."""
    cls = type(module)
    sub = _REPLAY_CLASSES.get(cls)
    if sub is None:
        sub = _REPLAY_CLASSES[cls] = type(cls.__name__, (ReplayMixin, cls), {"__module__": cls.__module__})
    module.__class__ = sub
    module.set_replay()
    return module


_RECORDER = "_fxqat_recorder"


def record_output_hook(mod: nn.Module, args: Tuple, out: Any) -> None:
    """Forward hook of an LP chain layer: store its output while the hybrid model records."""
    ctrl, name = mod.__dict__.get(_RECORDER, (None, None))
    if ctrl is not None and ctrl.record is not None:
        ctrl.record[name] = out


def record_input_hook(mod: nn.Module, args: Tuple) -> None:
    """Forward pre-hook of the first chain layer: store its input (the prefix block's output)."""
    ctrl, _ = mod.__dict__.get(_RECORDER, (None, None))
    if ctrl is not None and ctrl.record is not None and args:
        ctrl.record["<input>"] = args[0]


def remove_hybrid(model: nn.Module) -> nn.Module:
    """Undo :func:`make_eager_hybrid` on ``model`` (in place): the plain LP model."""
    if not isinstance(model, _EagerHybridMixin):
        return model
    for m in model.modules():
        m.__dict__.pop(_RECORDER, None)
        for hooks, fn in ((m._forward_hooks, record_output_hook), (m._forward_pre_hooks, record_input_hook)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
    remove_taps(model)
    if "fxqat_partner" in model._modules:
        del model._modules["fxqat_partner"]
    model.__dict__.pop("fxqat_hybrid_ctrl", None)
    model.__dict__.pop("fxqat_hybrid", None)
    model.__class__ = type(model).__bases__[1]
    return model


class EagerHybrid:
    """The train-mode logic of an eager-root hybrid model (held by the model, not a submodule)."""

    def __init__(self, model: nn.Module, partner: nn.Module, layers: Sequence[str], cuts: Sequence[ChainCut],
                 blocks: Sequence[Block], hybrid: HybridConfig, shared: bool) -> None:
        self.hybrid, self.shared = hybrid, shared
        self.layers, self.cuts, self.blocks = list(layers), list(cuts), list(blocks)
        self.partner = partner
        self.replays: Dict[str, ReplayMixin] = {name: make_replayable(partner.get_submodule(name))
                                                   for name in self.layers}
        self.record: Optional[Dict[str, Any]] = None
        self.path_losses = PathLossAverages(len(self.cuts))  # running path losses (fxqat.running_sensitivity)
        for name in self.layers:  # the recorder is found through the module, so deep copies record into their own
            layer = model.get_submodule(name)
            layer.__dict__[_RECORDER] = (self, name)
            layer.register_forward_hook(record_output_hook)
        model.get_submodule(self.layers[0]).register_forward_pre_hook(record_input_hook)
        self.suffixes: Dict[str, Callable[[Any], Any]] = {}
        for cut in self.cuts:  # cuts inside a layer: record there in the LP layer, run the partner's rest of it
            if cut.kind == "inside":
                key = f"{cut.layer}:{cut.node}"
                lp_layer = model.get_submodule(cut.layer)
                insert_tap(lp_layer, cut.node, self, key)
                self.suffixes[key] = suffix_runner(partner.get_submodule(cut.layer), lp_layer, cut.node)

    @property
    def n_paths(self) -> int:
        return len(self.cuts)

    def select_paths(self, step: int) -> List[int]:
        """The path ids run at ``step`` (see :func:`fxqat.hybrid_output.select_paths`)."""
        return select_paths(self.hybrid, self.n_paths, step)

    @contextlib.contextmanager
    def recording(self):
        self.record = {}
        try:
            yield self.record
        finally:
            self.record = None

    def _partner_call(self, model: nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        if not self.shared:
            return self.partner(*args, **kwargs)
        detached = {k: v.detach() for k, v in self.partner.named_parameters()}
        return torch.func.functional_call(self.partner, detached, args, kwargs, strict=False)

    def path(self, model: nn.Module, cut: ChainCut, record: Dict[str, Any], args: Tuple, kwargs: Dict) -> Any:
        stop = self.layers.index(cut.layer)
        try:
            for j, name in enumerate(self.layers):
                if (cut.kind == "out" and j <= stop) or (cut.kind == "inside" and j < stop):
                    self.replays[name].set_replay(output=record[name])
                elif cut.kind == "in" and j == stop:
                    self.replays[name].set_replay(first_input=record["<input>"])
                elif cut.kind == "inside" and j == stop:
                    key = f"{cut.layer}:{cut.node}"
                    self.replays[name].set_replay(suffix=(self.suffixes[key], record[key]))
            return self._partner_call(model, args, kwargs)
        finally:
            for rep in self.replays.values():
                rep.set_replay()

    def run(self, model: nn.Module, lp_forward, args: Tuple, kwargs: Dict[str, Any]) -> HybridOutput:
        step = int(model.fxqat_step)
        ids = self.select_paths(step)
        model.fxqat_step.fill_(step + 1)
        with self.recording() as record:
            lp = lp_forward(*args, **kwargs)
        if not self.shared:
            self.partner.eval()
        else:
            self.partner.train(model.training)
        with torch.no_grad():
            fp = self._partner_call(model, args, kwargs)
        paths = [self.path(model, self.cuts[i], record, args, kwargs) for i in ids]
        return HybridOutput(lp=lp, paths=paths, fp=fp, path_ids=tuple(ids), config=self.hybrid,
                            stats=self.path_losses)


class _EagerHybridMixin:
    """``forward`` of an eager-root hybrid model: the LP model in eval mode, LP + partner + paths in train mode."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D401 - nn.Module.forward
        orig = type(self)._fxqat_orig_forward
        if not self.training:
            return orig(self, *args, **kwargs)
        return self.fxqat_hybrid_ctrl.run(self, lambda *a, **k: orig(self, *a, **k), args, kwargs)


_CLASSES: Dict[type, type] = {}


def _signed_forward(orig: Any) -> Any:
    """The mixin's ``forward`` under the name, docstring and signature of the user's ``forward`` (``__wrapped__``):
    code that inspects it (transformers.Trainer keeps only the dataset columns the signature names) sees the same
    parameters as on the original model."""

    @functools.wraps(orig)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return _EagerHybridMixin.forward(self, *args, **kwargs)

    return forward


def _hybrid_class(cls: type) -> type:
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (_EagerHybridMixin, cls), {"_fxqat_orig_forward": cls.forward,
                                                              "forward": _signed_forward(cls.forward),
                                                              "__module__": cls.__module__})
        _CLASSES[cls] = sub
    return sub


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` sharing its parameters and buffers, with every quantizer disabled."""
    memo: Dict[int, Any] = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    dup = copy.deepcopy(model, memo)
    for m in dup.modules():
        if isinstance(m, Quantizer):
            m.enable_fake_quant(False)
    return dup


def make_eager_hybrid(
    model: nn.Module, fp_model: nn.Module, layers: Sequence[str], cuts: Sequence[ChainCut],
    blocks: Sequence[Block], hybrid: HybridConfig,
) -> nn.Module:
    """Turn the captured LP ``model`` (in place) into an eager-root hybrid model (see the module docstring).

    Args:
        model: the captured LP model.
        fp_model: a copy of the user's FP model (the frozen partner).
        layers: the chain layers; cuts: where blocks end; blocks: the partition (for reports).
        hybrid: the block-replacement settings.
    """
    if hybrid.mode != "lp_prefix":
        raise ValueError(
            f"HybridConfig(mode={hybrid.mode!r}) is not available for {type(model).__name__}, whose root forward runs "
            "eagerly: use mode='lp_prefix' (the default)."
        )
    if len(cuts) < 1:
        raise ValueError(f"block replacement needs at least 2 blocks, but {type(model).__name__} has one.")
    if hybrid.path_weights != "uniform" and len(hybrid.path_weights) != len(cuts):
        raise ValueError(f"HybridConfig.path_weights has {len(hybrid.path_weights)} entries but this model has "
                         f"{len(cuts)} paths; give one weight per path or 'uniform'.")
    shared = hybrid.partner == "shared"
    if shared:
        partner = _shared_copy(model)
    else:
        partner = fp_model
        for p in partner.parameters():
            p.requires_grad_(False)
        model.add_module("fxqat_partner", partner.eval())
    if not hasattr(model, "fxqat_step"):
        model.register_buffer("fxqat_step", torch.zeros((), dtype=torch.long))
    ctrl = EagerHybrid(model, partner, layers, cuts, blocks, hybrid, shared)
    model.__dict__["fxqat_hybrid_ctrl"] = ctrl
    model.__dict__["fxqat_hybrid"] = hybrid
    model.__class__ = _hybrid_class(type(model))
    return model
