"""What every export path shares: the learned affine parameters of each quantizer, and an FP copy of the LP graph.

An fxqat QAT model computes ``conv(Q_a(x), Q_w(W))``: activation quantizers sit on the *inputs* of conv/linear
layers and weight quantizers on their weights. Exporting means reading, for each quantizer node of the graph, the
eval-mode affine equivalent ``(scale, zero_point, qmin, qmax)`` (:meth:`fxqat.Quantizer.affine_qparams`) and
rebuilding the graph with a deployment-specific "quantization point" in place of each quantizer:

* :func:`quant_points` reads and checks them (one :class:`QuantPoint` per quantizer node);
* :func:`fp_module` copies the LP graph (no hybrid paths), pre-quantizes every weight with its own fxqat quantizer
  (so a deployment re-quantizing it on the same grid is exact) and calls ``make_point`` for each quantizer node.

Bit-widths below 8 live on an 8-bit *carrier* (``int8`` when the codes need a sign, else ``uint8``); the real
range ``[qmin, qmax]`` is kept in :class:`AffineParams` so each path can clip to it.

Per-group weights (``granularity="per_group"``: one scale per ``group_size`` consecutive input elements of each
output channel) have :attr:`AffineParams.group_size` set and are *not* per-channel. The Q/DQ paths (torch.ao, PT2E,
ONNX) carry per-tensor and per-channel scales only and refuse them, as they refuse dynamic per-token activation
quantizers; :func:`fxqat.export.to_torchao` (and ExecuTorch through it) carries both.

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> from fxqat.export.affine import quant_points
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(8, 4),), fxqat.QATConfig(w_bits=4, a_bits=4, first_last=None))
    >>> _ = qm(torch.randn(8, 4))
    >>> [(p.kind, p.layer, p.params.qmin, p.params.qmax) for p in quant_points(qm).values()]
    [('act', '2', 0, 15), ('weight', '2', -8, 7)]
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from fxqat.passes.insert_quant import QROLE, OpaqueWeightQuant
from fxqat.quantizers.base import NotAffineError, Quantizer, from_groups, to_groups

__all__ = [
    "ExportError", "AffineParams", "QuantPoint", "quant_points", "fp_module", "safe_name", "cpu_inputs",
    "affine_params", "lp_graph_copy",
]


class ExportError(ValueError):
    """A model (or one of its quantizers) that an export path cannot represent; the message names it."""


def safe_name(name: str) -> str:
    """``name`` as a Python identifier (for submodule and buffer names)."""
    return re.sub(r"\W", "_", name) or "root"


@dataclass(frozen=True)
class AffineParams:
    """Eval-mode affine quantization of one tensor::

        code = clamp(round((x - offset) / scale) + zp, qmin, qmax);   value = (code - zp) * scale + offset

    Attributes:
        scale: float32, shape ``[1]`` (per tensor), ``[C]`` (per channel) or ``[C·G]`` (per group: ``G`` groups per
            channel, in (channel, group) order, the rows of :func:`fxqat.quantizers.base.to_groups`).
        zero_point: int32, same shape, already shifted onto the carrier (see ``signed``).
        qmin, qmax: integer range of the real bit-width, on the carrier.
        ch_axis: channel axis for per-channel and per-group parameters, None per tensor.
        signed: carrier is int8 (True, codes -128..127) or uint8 (False, 0..255).
        offset: a float shift of the whole grid (0.0 almost always): activation grids whose lowest level is not a
            multiple of the step (a learned lower bound: LSQ+ without ``offset_on_grid``, DSQ, EWGS) have no integer
            zero point; they are exported as ``x - offset -> Q/DQ -> + offset``.
        group_size: elements per group for per-group weights, None otherwise.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    ch_axis: Optional[int]
    signed: bool
    offset: float = 0.0
    group_size: Optional[int] = None

    @property
    def per_channel(self) -> bool:
        """One scale per output channel (False for per-group parameters, which have several per channel)."""
        return self.ch_axis is not None and self.group_size is None

    @property
    def per_group(self) -> bool:
        return self.group_size is not None

    @property
    def granularity(self) -> str:
        """``"per_tensor"``, ``"per_channel"`` or ``"per_group"``."""
        return "per_group" if self.per_group else "per_channel" if self.per_channel else "per_tensor"

    @property
    def carrier_range(self) -> Tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)

    @property
    def narrow(self) -> bool:
        """Whether the real range is narrower than the carrier's (a clip is needed where the runtime saturates)."""
        return (self.qmin, self.qmax) != self.carrier_range

    @property
    def torch_qdtype(self) -> torch.dtype:
        return torch.qint8 if self.signed else torch.quint8

    @property
    def int_dtype(self) -> torch.dtype:
        return torch.int8 if self.signed else torch.uint8

    @property
    def qscheme(self) -> torch.qscheme:
        """torch's qscheme (there is none for per-group parameters: ExportError)."""
        if self.per_group:
            raise ExportError(f"per-group parameters (group_size={self.group_size}) have no torch qscheme.")
        return torch.per_channel_affine if self.per_channel else torch.per_tensor_affine

    def clip_range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float bounds ``((qmin - zp)·s, (qmax - zp)·s)`` of ``x - offset``: clipping to them then quantizing on the
        full carrier range gives the same codes as quantizing on ``[qmin, qmax]``."""
        z = self.zero_point.float()
        return (self.qmin - z) * self.scale, (self.qmax - z) * self.scale

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """torch's fake-quant kernel with these parameters (the real range)."""
        if self.offset:
            return self._fq(x - self.offset) + self.offset
        return self._fq(x)

    def _fq(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_group:
            xg = to_groups(x, self.ch_axis, self.group_size)
            y = torch.fake_quantize_per_channel_affine(xg, self.scale, self.zero_point, 0, self.qmin, self.qmax)
            return from_groups(y, x.shape, self.ch_axis)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.ch_axis, self.qmin, self.qmax
            )
        return torch.fake_quantize_per_tensor_affine(
            x, float(self.scale), int(self.zero_point), self.qmin, self.qmax
        )


@dataclass(frozen=True)
class QuantPoint:
    """One quantizer node of an fxqat graph, with its exported parameters.

    Attributes:
        index: position among the model's quantization points (stable: graph order).
        node: name of the quantizer's call node in the prepared graph.
        quantizer: qualified name of the quantizer module (e.g. ``"fxqat_quant.w_conv1"``).
        kind: ``"weight"`` or ``"act"``.
        layer: qualified name of the (first) layer that reads it.
        params: the :class:`AffineParams`.
        source: for weights, the ``get_attr`` target of the latent weight (e.g. ``"conv1.weight"``), else None.
    """

    index: int
    node: str
    quantizer: str
    kind: str
    layer: str
    params: AffineParams
    source: Optional[str]


def _carrier(qmin: int, qmax: int, zp: torch.Tensor, where: str) -> Tuple[int, int, torch.Tensor, bool]:
    """Place the codes ``[qmin, qmax]`` and the zero points on an int8/uint8 carrier (shifting them if needed)."""
    lo, hi = min(qmin, int(zp.min())), max(qmax, int(zp.max()))
    if qmax - qmin > 255:
        raise ExportError(
            f"{where}: {qmax - qmin + 1} levels do not fit an 8-bit carrier; integer export supports <= 8 bits "
            "(use an Override with w_bits/a_bits <= 8 for this layer)."
        )
    if lo >= 0 and hi <= 255:
        return qmin, qmax, zp, False
    if lo >= -128 and hi <= 127:
        return qmin, qmax, zp, True
    if hi - lo <= 255:  # shift codes and zero point together: (k + c - (z + c))·s is unchanged
        return qmin - lo, qmax - lo, zp - lo, False
    raise ExportError(
        f"{where}: zero point(s) {zp.flatten().tolist()[:4]} lie too far from the code range [{qmin}, {qmax}] "
        "for an 8-bit carrier."
    )


def affine_params(name: str, q: Quantizer, layer: str) -> AffineParams:
    """The eval-mode :class:`AffineParams` of quantizer ``q`` (called ``name``, of layer ``layer``).

    Raises:
        ExportError: naming the quantizer, for a dynamic (per-token) quantizer, a non-affine eval function, a
            non-positive scale or codes that do not fit an 8-bit carrier.
    """
    where = f"quantizer {name!r} ({type(q).__name__}, {q.bits}-bit {q.kind}) of layer {layer!r}"
    if q.is_dynamic:
        raise ExportError(
            f"{where} is dynamic ({q.granularity}: scale and zero point computed from each input at run time); it "
            "has no fixed parameters. Static Q/DQ export (to_torch_ao, to_pt2e, to_onnx) cannot carry it: use "
            "fxqat.export.to_torchao(qm) (8-bit per-token) and torch.export / fxqat.export.to_executorch."
        )
    ev = copy.deepcopy(q).eval()
    offset = 0.0
    try:
        scale, zp, qmin, qmax = ev.affine_qparams()
    except NotAffineError as exc:
        from_grid = _grid_affine(ev) if q.kind == "weight" else _probed_act_grid(ev)
        if from_grid is None:
            raise ExportError(f"{where} has no integer (affine-uniform) eval-mode equivalent: {exc}") from exc
        scale, zp, qmin, qmax, offset = from_grid
    scale = scale.detach().float().reshape(-1).clone()
    zp = zp.detach().round().to(torch.int32).reshape(-1).clone()
    if scale.numel() > 1 and zp.numel() == 1:
        zp = zp.expand(scale.numel()).clone()
    if not bool(torch.all(scale > 0)):
        raise ExportError(f"{where}: scale {scale.tolist()[:4]} is not positive.")
    qmin, qmax, zp, signed = _carrier(int(qmin), int(qmax), zp, where)
    if q.granularity == "per_group":  # the quantizer's channel axis is 0 of its grouped view, not of the weight
        return AffineParams(scale.cpu(), zp.cpu(), qmin, qmax, q.spec.ch_axis, signed, offset, q.group_size)
    axis = q.ch_axis if scale.numel() > 1 else None
    return AffineParams(scale.cpu(), zp.cpu(), qmin, qmax, axis, signed, offset)


@torch.no_grad()
def _grid_affine(q: Quantizer) -> Optional[Tuple[torch.Tensor, torch.Tensor, int, int, float]]:
    """Affine parameters of a weight quantizer's eval-mode *output grid*, when that grid is uniform with a level at
    zero (``None`` otherwise).

    Weights are constants: export stores ``q(w)`` (computed by fxqat), so only the levels must be an integer grid,
    not the map from ``w`` to them. This covers e.g. QIL weights with γ ≠ 1 or a pruning band (levels
    ``k·o/n``), but not DoReFa/EWGS/DSQ weights (``2^b`` levels symmetric about 0, no zero level).
    """
    try:
        g = q.grid().detach().double()
    except Exception:  # noqa: BLE001 - no grid, no fallback
        return None
    g = g.reshape(-1, g.shape[-1])
    if g.shape[1] < 2:
        return None
    d = g[:, 1:] - g[:, :-1]
    step = d.mean(dim=1)
    if not bool(torch.all(step > 0)) or not torch.allclose(d, step[:, None].expand_as(d), rtol=1e-4, atol=0):
        return None
    z = -g[:, 0] / step
    if not torch.allclose(z, z.round(), atol=1e-3, rtol=0) or not bool(torch.all(z.round() == z.round()[0])):
        return None
    zc, levels = int(z[0].round()), g.shape[1]
    return step.float(), torch.zeros(step.shape, dtype=torch.int32), -zc, levels - 1 - zc, 0.0


@torch.no_grad()
def _probed_act_grid(q: Quantizer, per_step: int = 8):
    """Parameters ``(scale, 0, 0, L-1, offset)`` of a per-tensor activation quantizer whose eval-mode function is
    nearest-level rounding onto a uniform grid ``offset + k·scale`` (k = 0..L-1) with clipping, but whose lowest
    level is not a multiple of the step; ``None`` unless a probe of the quantizer confirms exactly that function.

    The probe runs the quantizer (eval mode) on points spread over the grid and three steps beyond each end, at
    odd multiples of ``step / (2·per_step)`` (never on a rounding tie).
    """
    try:
        g = q.grid().detach().double()
    except Exception:  # noqa: BLE001
        return None
    if g.dim() != 1 or g.numel() < 2:
        return None
    d = g[1:] - g[:-1]
    step = d.mean()
    if step <= 0 or not torch.allclose(d, step.expand_as(d), rtol=1e-4, atol=0):
        return None
    levels, g0 = g.numel(), g[0]
    k = torch.arange(-3 * per_step, (levels + 2) * per_step, dtype=torch.float64)
    probe = g0 + step * (k + 0.5) / per_step
    expected = g0 + step * torch.clamp(torch.round((probe - g0) / step), 0, levels - 1)
    try:
        got = q(probe.float()).double()
    except Exception:  # noqa: BLE001
        return None
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(g.abs().max())):
        return None
    return step.float().reshape(1), torch.zeros(1, dtype=torch.int32), 0, levels - 1, float(g0)


def _check_supported(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, OpaqueWeightQuant):
            raise ExportError(
                f"module {mod.module_path!r} ({type(mod.module).__name__}) is an opaque leaf module whose weights "
                "fxqat quantizes inside its own forward (OpaqueWeightQuant); integer export cannot see those "
                f"weights. Keep it in FP with QATConfig(overrides=(Override({mod.module_path!r}, skip=True),)), or "
                "make it traceable (remove it from leaf_modules)."
            )
        if not isinstance(mod, Quantizer):
            inner = [n for n, m in mod.named_modules() if isinstance(m, Quantizer)]
            if inner:
                raise ExportError(
                    f"module {node.target!r} ({type(mod).__name__}) is a leaf module with quantizer(s) inside it "
                    f"({', '.join(inner[:3])}); export only handles quantizers that are nodes of the fxqat graph. "
                    "Let fxqat quantize that module (do not put quantizers inside leaf modules)."
                )


def _layer_of(node: fx.Node) -> str:
    for user in node.users:
        if "fxqat.module" in user.meta:
            return str(user.meta["fxqat.module"])
    return next((u.name for u in node.users), node.name)


def quant_points(qm: fx.GraphModule) -> Dict[str, QuantPoint]:
    """The enabled weight and activation quantizers of ``qm``'s graph, by node name, with exported parameters.

    Gradient quantizers (identity in the forward pass) and disabled quantizers are left out.

    Raises:
        ExportError: naming the module or quantizer, for an opaque leaf with quantized weights, a leaf module with
            a quantizer inside, an uninitialised quantizer, a non-affine eval function or more than 8 bits.
    """
    if not isinstance(qm, fx.GraphModule):
        hint = ""
        if any(isinstance(m, Quantizer) for m in qm.modules()):
            hint = (" This model was prepared through hierarchical capture (its root forward runs eagerly, e.g. a "
                    "Hugging Face model), which the Q/DQ paths do not handle: use fxqat.export.to_torchao(qm) "
                    "(linear layers, weight-only or 8da4w) and torch.export / fxqat.export.to_executorch.")
        raise ExportError(f"expected the GraphModule returned by fxqat.prepare_qat, got {type(qm).__name__}.{hint}")
    _check_supported(qm)
    points: Dict[str, QuantPoint] = {}
    for node in qm.graph.nodes:
        if node.op != "call_module" or not isinstance(qm.get_submodule(node.target), Quantizer):
            continue
        q = qm.get_submodule(node.target)
        kind = node.meta.get(QROLE, q.kind)
        if kind == "grad" or not q._fq_on:
            continue
        layer = _layer_of(node)
        if not q.is_initialized:
            raise ExportError(
                f"quantizer {node.target!r} of layer {layer!r} was never initialised: run the model on data "
                "(fxqat.calibrate(qm, batches) or a training step) before exporting."
            )
        src = node.args[0]
        source = str(src.target) if isinstance(src, fx.Node) and src.op == "get_attr" else None
        params = affine_params(str(node.target), q, layer)
        points[node.name] = QuantPoint(len(points), node.name, str(node.target), kind, layer, params, source)
    return points


def cpu_inputs(example_inputs: Any) -> Tuple:
    """``example_inputs`` as a tuple, tensors moved to the CPU."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return tuple(t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in inputs)


MakePoint = Callable[[fx.GraphModule, fx.Node, QuantPoint], fx.Node]


def fp_module(qm: fx.GraphModule, make_point: MakePoint) -> Tuple[fx.GraphModule, Dict[str, QuantPoint]]:
    """An eval-mode copy of ``qm``'s LP graph with each quantizer node replaced by ``make_point(gm, node, point)``.

    ``make_point`` is called with the graph's insertion point set just before the quantizer node and returns the
    node that replaces it. Latent weights read by a weight quantizer are replaced (in the copy) by their fxqat
    eval-mode quantized values. Gradient and disabled quantizers become the identity. ``qm`` is not modified; the
    copy lives on the CPU (export artefacts are built there; move the result afterwards if needed).
    """
    points = quant_points(qm)
    grouped = [p for p in points.values() if p.params.per_group]
    if grouped:
        p = grouped[0]
        raise ExportError(
            f"quantizer {p.quantizer!r} of layer {p.layer!r} has per-group weights (group_size="
            f"{p.params.group_size}; {len(grouped)} such quantizer(s)): the Q/DQ export paths (to_torch_ao, "
            "to_pt2e, to_onnx) carry per-tensor or per-channel scales only. Use fxqat.export.to_torchao(qm) "
            "(torchao's IntxUnpackedToInt8Tensor, for torch.export / ExecuTorch: fxqat.export.to_executorch)."
        )
    gm = lp_graph_copy(qm, "FxqatExport")
    graph = gm.graph
    with torch.no_grad():
        for node in list(graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Quantizer):
                continue
            q = gm.get_submodule(node.target)
            point = points.get(node.name)
            if point is not None and point.kind == "weight" and point.source is not None:
                w = gm.get_parameter(point.source) if _is_param(gm, point.source) else _get_attr(gm, point.source)
                w.copy_(q.eval()(w))
            if point is None:
                repl = node.args[0]
            else:
                with graph.inserting_before(node):
                    repl = make_point(gm, node, point)
            node.replace_all_uses_with(repl)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    for p in gm.parameters():
        p.requires_grad_(False)
    return gm, points


def lp_graph_copy(qm: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """An eval-mode CPU copy of ``qm``'s LP graph (no hybrid paths) over a copy of its modules; layer modules are
    kept whole (a ``GraphModule`` only copies the attributes its graph reads)."""
    root = copy.deepcopy(qm).cpu()
    graph = copy.deepcopy(qm.graph)
    gm = fx.GraphModule(root, graph, class_name)
    for layer in {str(n.meta["fxqat.module"]) for n in graph.nodes if n.meta.get("fxqat.module")}:
        try:
            gm.add_submodule(layer, root.get_submodule(layer))
        except AttributeError:
            pass
    gm.eval()
    return gm


def _is_param(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _get_attr(gm: nn.Module, target: str) -> torch.Tensor:
    *path, name = target.split(".")
    mod = gm.get_submodule(".".join(path)) if path else gm
    return getattr(mod, name)
