"""The public one-liners: ``prepare_qat``, ``quantizers``, ``set_quantization``, ``calibrate``, ``convert``.

Example:
    >>> import torch, torchvision, fxqat
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> x = torch.randn(2, 3, 64, 64)
    >>> qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    >>> qm(x).shape
    torch.Size([2, 10])
    >>> sum(q.kind == "weight" for q in fxqat.quantizers(qm).values())
    21
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxqat.config import QATConfig
from fxqat.passes.annotate import QMETA, annotate
from fxqat.passes.insert_quant import QROLE, OpaqueWeightQuant, insert_quant
from fxqat.passes.normalize import normalize
from fxqat.quantizers.base import Quantizer
from fxqat.trace import trace

__all__ = [
    "prepare_qat", "quantizers", "set_quantization", "calibrate", "convert", "trainable_parameters",
    "prepare_fp_graph", "find_blocks",
]

log = logging.getLogger(__name__)


def _as_tuple(example_inputs: Any) -> Tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(
            f"example_inputs must be a tuple of the model's positional inputs (e.g. (x,)), got "
            f"{type(example_inputs).__name__}."
        )
    return example_inputs


def _describe(inputs: Tuple) -> str:
    return ", ".join(f"Tensor{tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs)


class _FailingNode(Exception):
    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(where)
        self.where, self.cause = where, cause


class _ShapeProp(ShapeProp):
    """ShapeProp that reports which module or node failed, with the original error."""

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as exc:  # noqa: BLE001
            cause = exc.__cause__ or exc
            if n.op == "call_module":
                where = f"module {n.target!r} ({type(self.module.get_submodule(n.target)).__name__})"
            else:
                where = f"node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)})"
            raise _FailingNode(where, cause) from cause


def _fake_propagate(gm: fx.GraphModule, inputs: Tuple) -> bool:
    """Shape propagation on fake tensors (no arithmetic: a ViT-B/16 at 224 px takes ~0.3 s instead of seconds).

    Returns False when some node cannot run on fake tensors (e.g. data-dependent code in a leaf module); the caller
    then propagates real tensors, which also produces the error message for inputs that really do not fit.
    """
    try:
        from torch._subclasses import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
        ShapeProp(gm, fake_mode=mode).propagate(*fake)
        return True
    except Exception:  # noqa: BLE001
        log.debug("fake-tensor shape propagation failed; using real tensors", exc_info=True)
        return False


def _propagate_shapes(gm: fx.GraphModule, inputs: Tuple, model_name: str) -> None:
    """Run the example inputs through the traced graph once (eval mode, no grad) to record tensor metadata."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in phs if not n.args]
    if not len(required) <= len(inputs) <= len(phs):
        raise ValueError(
            f"the example_inputs ({_describe(inputs)}) do not fit {model_name}: its forward takes "
            f"{len(required)}..{len(phs)} inputs ({', '.join(n.name for n in phs)}), got {len(inputs)}. "
            "Pass one tensor per forward argument, e.g. (x,)."
        )
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if not _fake_propagate(gm, inputs):
                _ShapeProp(gm).propagate(*inputs)
    except _FailingNode as exc:
        raise ValueError(
            f"the example_inputs ({_describe(inputs)}) do not fit {model_name}: {exc.where} failed with "
            f"{type(exc.cause).__name__}: {exc.cause}\n"
            "Pass a tuple of tensors shaped like one real batch, e.g. (torch.randn(2, 3, 32, 32),)."
        ) from exc.cause
    except Exception as exc:  # noqa: BLE001 - e.g. a wrong number of inputs
        raise ValueError(
            f"the example_inputs ({_describe(inputs)}) do not fit {model_name}: {type(exc).__name__}: {exc}\n"
            "Pass a tuple of tensors shaped like one real batch, e.g. (torch.randn(2, 3, 32, 32),)."
        ) from exc
    finally:
        gm.train(was_training)


def prepare_fp_graph(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    inplace: bool = False,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Trace and normalise ``model`` (no quantizers yet), with shape metadata from ``example_inputs``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxqat expects a torch.nn.Module, got {type(model).__name__}: pass your model object.")
    config = config or QATConfig()
    inputs = _as_tuple(example_inputs)
    work = model if inplace else copy.deepcopy(model)
    gm = trace(work, concrete_args, config.leaf_modules)
    gm = normalize(gm)
    _propagate_shapes(gm, inputs, type(model).__name__)
    gm.train(model.training)
    return gm


def prepare_qat(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    inplace: bool = False,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> fx.GraphModule:
    """Turn ``model`` into a QAT model: trace, annotate, insert quantizers, and (optionally) build hybrid paths.

    Args:
        model: any ``nn.Module``; it is not modified unless ``inplace=True``.
        example_inputs: a tuple of the model's positional inputs (one small batch).
        config: a :class:`~fxqat.config.QATConfig` (default: LSQ W4A4, first/last layer at 8 bits).
        inplace: work on ``model`` itself instead of a copy (the result then shares its modules).
        concrete_args: non-tensor arguments to specialise while tracing.

    Returns:
        A ``torch.fx.GraphModule`` whose output has the structure of ``model``'s; with ``config.hybrid`` it returns
        ``HybridOutput(lp, paths, fp)`` in train mode.

    Example:
        >>> import torch, torch.nn as nn, fxqat
        >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), (torch.randn(2, 4),))
        >>> sorted(fxqat.quantizers(qm))
        ['fxqat_quant.a__1', 'fxqat_quant.a_input_1', 'fxqat_quant.w_0', 'fxqat_quant.w_2']
    """
    config = config or QATConfig()
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a fxqat.QATConfig, got {type(config).__name__}.")
    gm = prepare_fp_graph(model, example_inputs, config, inplace, concrete_args)
    annotate(gm, config)
    n_layers = sum(1 for n in gm.graph.nodes if QMETA in n.meta)
    if n_layers == 0:
        log.warning("fxqat: %s has no conv/linear layer to quantize; the model is returned unchanged.",
                    type(model).__name__)
    fp_graph = None
    if config.hybrid is not None:
        from fxqat.passes.build_hybrid import mark_cuts

        fp_graph = mark_cuts(gm, config)
    insert_quant(gm, config)
    if config.hybrid is not None:
        from fxqat.passes.build_hybrid import build_hybrid

        gm = build_hybrid(gm, fp_graph, config.hybrid)
    gm.train(model.training)
    return gm


def find_blocks(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QATConfig] = None,
    concrete_args: Optional[Dict[str, Any]] = None,
) -> list:
    """The blocks block replacement would use for ``model`` (a list of :class:`fxqat.graph.Block`).

    Blocks end at residual boundaries (nodes every input-to-output path passes through) and each holds at least one
    layer that ``config`` quantizes; ``config.hybrid`` (if set) supplies ``max_blocks`` and ``boundaries``.

    Example:
        >>> import torch, torchvision, fxqat
        >>> blocks = fxqat.find_blocks(torchvision.models.resnet18(), (torch.randn(1, 3, 64, 64),))
        >>> [b.name for b in blocks][:3]
        ['stem', 'layer1.0', 'layer1.1']
    """
    from fxqat.config import HybridConfig
    from fxqat.graph.blocks import partition

    config = config or QATConfig()
    h = config.hybrid or HybridConfig()
    gm = prepare_fp_graph(model, example_inputs, config, concrete_args=concrete_args)
    annotate(gm, config)
    return partition(gm, lambda n: QMETA in n.meta, max_blocks=h.max_blocks, boundaries=h.boundaries)


def quantizers(qm: nn.Module) -> Dict[str, Quantizer]:
    """Every quantizer of a prepared model, by qualified module name."""
    return {name: m for name, m in qm.named_modules() if isinstance(m, Quantizer)}


def set_quantization(qm: nn.Module, enabled: bool = True, kinds: Iterable[str] = ("weight", "act", "grad")) -> nn.Module:
    """Enable or disable quantizers of the given kinds (disabled = identity). Returns ``qm``."""
    kinds = set(kinds)
    for q in quantizers(qm).values():
        if q.kind in kinds:
            q.enable_fake_quant(enabled)
    return qm


@torch.no_grad()
def calibrate(qm: nn.Module, batches: Iterable[Any], reset: bool = False) -> nn.Module:
    """Initialise data-dependent quantizer parameters from ``batches`` (eval mode; BN statistics untouched).

    Quantizers initialise from the first batch that reaches them; already initialised ones are kept unless
    ``reset=True``.
    """
    qs = quantizers(qm)
    if reset:
        for q in qs.values():
            q.reset()
    was_training = qm.training
    qm.eval()
    try:
        for batch in batches:
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            qm(*inputs)
            if all(q.is_initialized for q in qs.values() if q.kind != "grad"):
                break
    finally:
        qm.train(was_training)
    return qm


def trainable_parameters(qm: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters an optimizer should update: everything that requires grad (the frozen partner does not)."""
    seen = set()
    for p in qm.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p


def convert(qm: fx.GraphModule) -> fx.GraphModule:
    """The LP inference model: no hybrid paths or FP partner, weights pre-quantized, quantizer state frozen.

    Pre-quantized weights are non-persistent buffers, so ``convert(qm).state_dict()`` has exactly the keys of a
    plain ``prepare_qat`` model (and loads into one); loading a state_dict into the converted model refreshes them.
    """
    lp_graph = copy.deepcopy(qm.graph)
    lp = fx.GraphModule(qm, lp_graph, type(qm).__name__ + "LP")
    for m in list(lp.modules()):
        if isinstance(m, OpaqueWeightQuant):  # the wrapped leaf stays registered at its own path
            lp.add_submodule(m.module_path, m.module)
    lp = copy.deepcopy(lp)
    lp.eval()
    for p in lp.parameters():
        p.requires_grad_(False)
    frozen = []
    for node in lp.graph.nodes:
        if node.op == "call_module" and node.meta.get(QROLE) == "weight" and node.args[0].op == "get_attr":
            frozen.append(node)
    container = lp.get_submodule("fxqat_quant") if frozen else None
    for node in frozen:
        buf = f"frozen_{node.target.split('.')[-1]}"
        container.register_buffer(buf, torch.empty(0), persistent=False)
        node.meta["fxqat.frozen_from"] = (node.target, node.args[0].target)
        with lp.graph.inserting_before(node):
            ga = lp.graph.get_attr(f"fxqat_quant.{buf}")
        ga.meta["fxqat.frozen_from"] = node.meta["fxqat.frozen_from"]
        node.replace_all_uses_with(ga)
        lp.graph.erase_node(node)
    lp.graph.eliminate_dead_code()
    lp.graph.lint()
    lp.recompile()
    _refresh_frozen(lp)
    lp.register_load_state_dict_post_hook(lambda mod, _keys: _refresh_frozen(mod))
    return lp


@torch.no_grad()
def _refresh_frozen(lp: fx.GraphModule) -> None:
    container = lp.get_submodule("fxqat_quant") if hasattr(lp, "fxqat_quant") else None
    for node in lp.graph.nodes:
        src = node.meta.get("fxqat.frozen_from")
        if node.op == "get_attr" and src is not None:
            q_name, w_name = src
            q = lp.get_submodule(q_name)
            w = lp.get_parameter(w_name) if "." in w_name else getattr(lp, w_name)
            q.eval()
            setattr(container, node.target.split(".")[-1], q(w).detach().clone())
    for m in lp.modules():
        if isinstance(m, OpaqueWeightQuant):
            m.freeze()
