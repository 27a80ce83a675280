"""Hypothesis strategies shared by fxqat's property tests (strategies are named ``*_st``).

Model strategies draw ``(model, example_input)`` pairs of small random networks:

* :func:`cnn_st`: a conv stem, a body of 0..``max_blocks`` blocks drawn from sequential conv-BN-activation layers,
  residual blocks (identity or 1x1 projection shortcut, optionally strided), inception-like branches rejoined by
  ``torch.cat``, dense concatenation (DenseNet-style), several branches summed, and pooling; then global average
  pooling, ``flatten`` and a ``Linear`` head.
* :func:`mlp_st`: ``Linear`` layers with LayerNorm/BatchNorm1d and activations, residual MLP blocks (identity or
  projection), branches rejoined by ``torch.cat``; a ``Linear`` head.
* :func:`any_model_st`: either.

Invariants every generated model satisfies (tests may rely on them):

1. ``torch.fx.symbolic_trace(model)`` succeeds; the graph has one placeholder and returns one tensor of shape
   ``[2, n_out]`` (``n_out`` in 1..4); the example input has batch size 2.
2. Deterministic given the draw: parameters, BatchNorm running statistics and the example input come from a seed
   that is part of the draw (``torch.random.fork_rng``: the global RNG is left untouched). The model is returned in
   ``eval()`` mode and its forward has no randomness (no dropout), no in-place operation, no dead code, no module
   called twice, and no ``get_attr`` node (all parameters live in submodules).
3. It holds at least one ``Conv``/``Linear`` layer (the ``Linear`` head), so at least one quantized layer.
4. Small: channels and features <= 8, spatial size <= 8x8; a forward pass takes milliseconds on a CPU.
5. Every structure that branches and rejoins is one submodule whose class is in :data:`REJOIN_CLASSES`
   (``Residual``, ``Inception``, ``DenseConcat``, ``BranchSum``, ``MLPResidual``, ``MLPBranchCat``), so a test can
   check that no cut falls inside it; the model's ``body`` is an ``nn.Sequential`` of the drawn blocks.
6. The output is finite for the example input.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from fxqat.quant_spec import granularity_support

__all__ = [
    "low_precision_quant_st",
    "LOW_PRECISION",
    "REJOIN_CLASSES",
    "cnn_st",
    "mlp_st",
    "any_model_st",
    "activation_st",
    "scale_rows_st",
    "moe_st",
    "MoENet",
    "ConvBNAct",
    "Residual",
    "Inception",
    "DenseConcat",
    "BranchSum",
    "MLPResidual",
    "MLPBranchCat",
    "GeneratedNet",
]

MAX_C = 8
ACTIVATIONS = ("relu", "relu6", "gelu", "silu", "hardswish", "leaky", "relu_f", "none")


def activation_st() -> st.SearchStrategy[str]:
    """An activation name from :data:`ACTIVATIONS` (``"relu_f"``: functional ``F.relu``, ``"none"``: identity)."""
    return st.sampled_from(ACTIVATIONS)


def _act_module(name: str) -> Optional[nn.Module]:
    return {
        "relu": nn.ReLU,
        "relu6": nn.ReLU6,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "hardswish": nn.Hardswish,
        "leaky": lambda: nn.LeakyReLU(0.1),
    }.get(name, lambda: None)()


class ConvBNAct(nn.Module):
    """``act(bn(conv(x)))``; BN and activation optional, ``act="relu_f"`` calls ``F.relu`` in ``forward``."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, bn: bool = True, act: str = "relu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else None
        self.act = _act_module(act)
        self.functional_relu = act == "relu_f"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        if self.functional_relu:
            x = F.relu(x)
        return x


class Residual(nn.Module):
    """``act(body(x) + shortcut(x))``: identity shortcut, or a 1x1 conv (+BN) projection."""

    def __init__(self, body: nn.Module, proj: Optional[nn.Module], act: str):
        super().__init__()
        self.body, self.proj, self.act = body, proj, _act_module(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x) + (x if self.proj is None else self.proj(x))
        return y if self.act is None else self.act(y)


class Inception(nn.Module):
    """Parallel branches on the same input, rejoined by ``torch.cat`` over channels."""

    def __init__(self, branches: List[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([b(x) for b in self.branches], dim=1)


class DenseConcat(nn.Module):
    """DenseNet-style: layer ``i`` reads the concatenation of the input and all earlier outputs; returns them all."""

    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class BranchSum(nn.Module):
    """Several branches on the same input, summed (no identity path)."""

    def __init__(self, branches: List[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


class MLPResidual(nn.Module):
    """``x + fc2(act(fc1(x)))``, or with a ``Linear`` projection shortcut when ``proj`` is given."""

    def __init__(self, d: int, hidden: int, dout: int, act: str, proj: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, dout)
        self.act = _act_module(act) or nn.ReLU()
        self.proj = nn.Linear(d, dout) if proj or d != dout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x if self.proj is None else self.proj(x)) + self.fc2(self.act(self.fc1(x)))


class MLPBranchCat(nn.Module):
    """Two ``Linear`` branches on the same input, rejoined by ``torch.cat``."""

    def __init__(self, d: int, a: int, b: int):
        super().__init__()
        self.left, self.right = nn.Linear(d, a), nn.Linear(d, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), torch.tanh(self.right(x))], dim=-1)


REJOIN_CLASSES = (Residual, Inception, DenseConcat, BranchSum, MLPResidual, MLPBranchCat)


class GeneratedNet(nn.Module):
    """``fc(flatten(pool(body(stem(x)))))``; the pooling is skipped for MLPs (``spatial=False``)."""

    def __init__(self, stem: nn.Module, body: List[nn.Module], fc: nn.Linear, spatial: bool):
        super().__init__()
        self.stem, self.body, self.fc, self.spatial = stem, nn.Sequential(*body), fc, spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        if self.spatial:
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _seeded(seed: int, build: Callable[[], nn.Module], shape: Tuple[int, ...]) -> Tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.1 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
        x = torch.randn(*shape)
    return model.eval(), x


@st.composite
def _cnn_block(draw: st.DrawFn, c: int, hw: int) -> Tuple[Callable[[], nn.Module], int, int]:
    """One body block: (builder, out channels, out spatial size)."""
    kinds = ["chain", "res_id", "res_proj", "inception", "sum"] + (["dense"] if c <= 6 else [])
    kinds += ["pool"] if hw >= 2 else []
    kind = draw(st.sampled_from(kinds))
    act, bn = draw(activation_st()), draw(st.booleans())
    ch = st.integers(1, MAX_C)
    if kind == "chain":
        cout, k = draw(ch), draw(st.sampled_from([1, 3]))
        return (lambda: ConvBNAct(c, cout, k, bn=bn, act=act)), cout, hw
    if kind == "res_id":
        mid = draw(ch)
        return (lambda: Residual(nn.Sequential(ConvBNAct(c, mid, 3, bn=bn, act=act), ConvBNAct(mid, c, 3, bn=bn,
                                                                                               act="none")),
                                 None, act)), c, hw
    if kind == "res_proj":
        cout, stride = draw(ch), draw(st.sampled_from([1, 2] if hw >= 2 else [1]))
        out_hw = (hw + stride - 1) // stride
        return (lambda: Residual(nn.Sequential(ConvBNAct(c, cout, 3, stride, bn=bn, act=act),
                                               ConvBNAct(cout, cout, 3, bn=bn, act="none")),
                                 ConvBNAct(c, cout, 1, stride, bn=bn, act="none"), act)), cout, out_hw
    if kind == "inception":
        n = draw(st.integers(2, 3))
        widths = [draw(st.integers(1, MAX_C // n)) for _ in range(n)]
        pool_branch = draw(st.booleans())

        def inception() -> nn.Module:
            branches: List[nn.Module] = [ConvBNAct(c, widths[0], 1, bn=bn, act=act)]
            branches.append(nn.Sequential(ConvBNAct(c, widths[1], 1, bn=bn, act=act),
                                          ConvBNAct(widths[1], widths[1], 3, bn=bn, act=act)))
            if n == 3:
                first = nn.MaxPool2d(3, 1, 1) if pool_branch else nn.Identity()
                branches.append(nn.Sequential(first, ConvBNAct(c, widths[2], 1, bn=bn, act=act)))
            return Inception(branches)

        return inception, sum(widths), hw
    if kind == "sum":
        n, cout = draw(st.integers(2, 3)), draw(ch)
        return (lambda: BranchSum([ConvBNAct(c, cout, 1 + 2 * (i % 2), bn=bn, act=act) for i in range(n)])), cout, hw
    if kind == "dense":
        growth = draw(st.integers(1, 2))
        layers = draw(st.integers(1, (MAX_C - c) // growth))
        return (lambda: DenseConcat([ConvBNAct(c + i * growth, growth, 3, bn=bn, act=act) for i in range(layers)])), \
            c + layers * growth, hw
    pool = draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))
    return (lambda: pool(2)), c, hw // 2


@st.composite
def cnn_st(draw: st.DrawFn, max_blocks: int = 5) -> Tuple[nn.Module, torch.Tensor]:
    """A random CNN and an example input ``[2, C, H, W]`` (see the module docstring for the invariants)."""
    cin, hw = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
    c = draw(st.integers(2, MAX_C))
    stem_act, stem_bn = draw(activation_st()), draw(st.booleans())
    builders = []
    cur, cur_hw = c, hw
    for _ in range(draw(st.integers(0, max_blocks))):
        build, cur, cur_hw = draw(_cnn_block(cur, cur_hw))
        builders.append(build)
    n_out, seed = draw(st.integers(1, 4)), draw(st.integers(0, 2**16))
    final = cur

    def build() -> nn.Module:
        stem = ConvBNAct(cin, c, 3, bn=stem_bn, act=stem_act)
        return GeneratedNet(stem, [b() for b in builders], nn.Linear(final, n_out), spatial=True)

    return _seeded(seed, build, (2, cin, hw, hw))


@st.composite
def _mlp_block(draw: st.DrawFn, d: int) -> Tuple[Callable[[], nn.Module], int]:
    kind = draw(st.sampled_from(["linear", "res", "res_proj", "cat"]))
    act = draw(activation_st())
    width = st.integers(1, MAX_C)
    if kind == "linear":
        dout, norm = draw(width), draw(st.sampled_from(["none", "layer", "batch"]))

        def linear() -> nn.Module:
            layers: List[nn.Module] = [nn.Linear(d, dout)]
            layers += [nn.LayerNorm(dout)] if norm == "layer" else [nn.BatchNorm1d(dout)] if norm == "batch" else []
            layers += [m for m in [_act_module(act)] if m is not None]
            return nn.Sequential(*layers)

        return linear, dout
    if kind in ("res", "res_proj"):
        hidden = draw(width)
        dout = d if kind == "res" else draw(width)
        return (lambda: MLPResidual(d, hidden, dout, act, proj=kind == "res_proj")), dout
    a = draw(st.integers(1, MAX_C - 1))
    b = draw(st.integers(1, MAX_C - a))
    return (lambda: MLPBranchCat(d, a, b)), a + b


@st.composite
def mlp_st(draw: st.DrawFn, max_blocks: int = 5) -> Tuple[nn.Module, torch.Tensor]:
    """A random MLP and an example input ``[2, D]`` (see the module docstring for the invariants)."""
    din, d = draw(st.integers(1, MAX_C)), draw(st.integers(1, MAX_C))
    stem_act = draw(activation_st())
    builders = []
    cur = d
    for _ in range(draw(st.integers(0, max_blocks))):
        build, cur = draw(_mlp_block(cur))
        builders.append(build)
    n_out, seed = draw(st.integers(1, 4)), draw(st.integers(0, 2**16))
    final = cur

    def build() -> nn.Module:
        stem = nn.Sequential(nn.Linear(din, d), *[m for m in [_act_module(stem_act)] if m is not None])
        return GeneratedNet(stem, [b() for b in builders], nn.Linear(final, n_out), spatial=False)

    return _seeded(seed, build, (2, din))


def any_model_st(max_blocks: int = 5) -> st.SearchStrategy[Tuple[nn.Module, torch.Tensor]]:
    """Either a :func:`cnn_st` or an :func:`mlp_st` draw."""
    return st.one_of(cnn_st(max_blocks), mlp_st(max_blocks))


@st.composite
def scale_rows_st(draw: st.DrawFn) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``(rows, qrange)`` for step-size searches: a ``[R, n]`` float32 tensor (R 1..300, n 1..70) drawn from a seed,
    a scale (1e-4..1e2) and a shape (normal, heavy-tailed cube of a normal, values on a coarse grid so that errors
    tie, one sign only, some rows all zero) and a signed or unsigned integer grid of 1..8 bits."""
    r, n = draw(st.integers(1, 300)), draw(st.integers(1, 70))
    seed, kind = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(("normal", "cube", "grid", "positive", "zeros")))
    scale = draw(st.sampled_from((1e-4, 0.02, 1.0, 1e2)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, n, generator=g)
    if kind == "cube":
        x = x ** 3
    elif kind == "grid":
        x = torch.round(x * 2) / 2
    elif kind == "positive":
        x = x.abs()
    elif kind == "zeros":
        x[torch.rand(r, generator=g) < 0.3] = 0
    bits, signed = draw(st.integers(1, 8)), draw(st.booleans())
    qrange = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed and bits > 1 else (0, 2 ** bits - 1)
    return x * scale, qrange


# ----------------------------------------------------------------------------------------------- mixture of experts
class ExpertBank(nn.Module):
    """Experts as one 3-D parameter per projection, read the way transformers' experts implementations read them:
    ``"loop"`` (``w[e]`` into ``F.linear``), ``"bmm"`` (``w[ids]`` into ``torch.bmm``), ``"einsum"`` (all experts,
    masked) or ``"matmul"`` (``x @ w.transpose(-2, -1)``); ``transposed`` stores ``(experts, in, out)`` instead of
    ``(experts, out, in)``, as GPT-OSS does."""

    def __init__(self, n_experts: int, d: int, inter: int, impl: str, transposed: bool):
        super().__init__()
        self.impl, self.transposed, self.n = impl, transposed, n_experts
        up, down = (n_experts, d, inter), (n_experts, inter, d)
        if not transposed:
            up, down = (n_experts, inter, d), (n_experts, d, inter)
        self.up = nn.Parameter(torch.randn(*up) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(*down) / inter ** 0.5)

    def _proj(self, x: torch.Tensor, w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x[t] @ W_{e[t]}`` for every token ``t`` (``W`` as ``(out, in)``)."""
        if self.impl == "loop":
            out = x.new_zeros(x.shape[0], w.shape[-1] if self.transposed else w.shape[-2])
            for k in range(self.n):
                rows = (e == k).nonzero().flatten()
                if rows.numel():
                    wk = w[k].t() if self.transposed else w[k]
                    out[rows] = F.linear(x[rows], wk)
            return out
        if self.impl == "bmm":
            we = w[e]
            return torch.bmm(x.unsqueeze(1), we).squeeze(1) if self.transposed else torch.bmm(
                we, x.unsqueeze(-1)).squeeze(-1)
        if self.impl == "einsum":
            every = torch.einsum("td,edo->teo", x, w) if self.transposed else torch.einsum("td,eod->teo", x, w)
            return every[torch.arange(x.shape[0]), e]
        every = x.unsqueeze(0) @ (w if self.transposed else w.transpose(-2, -1))
        return every[e, torch.arange(x.shape[0])]

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self._proj(F.silu(self._proj(x, self.up, e)), self.down, e)


class Router(nn.Module):
    def __init__(self, d: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_experts, d) / d ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(torch.softmax(F.linear(x, self.weight), dim=-1), 1, dim=-1).indices.flatten()


class MoENet(nn.Module):
    """A Linear stem, ``n_blocks`` residual mixture-of-experts blocks (a :class:`Router` with a bare weight and an
    :class:`ExpertBank`), a Linear head."""

    def __init__(self, d: int, inter: int, n_experts: int, n_blocks: int, impl: str, transposed: bool):
        super().__init__()
        self.stem, self.head = nn.Linear(d, d), nn.Linear(d, 4)
        self.routers = nn.ModuleList([Router(d, n_experts) for _ in range(n_blocks)])
        self.experts = nn.ModuleList([ExpertBank(n_experts, d, inter, impl, transposed) for _ in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for router, bank in zip(self.routers, self.experts):
            h = h + bank(h, router(h))
        return self.head(h)


@st.composite
def moe_st(draw: st.DrawFn) -> Tuple[nn.Module, torch.Tensor]:
    """``(MoENet, input [6, d])``: 1..4 experts, 1..2 blocks, d and the expert width in {8, 16}, any of the
    :class:`ExpertBank` read patterns, either weight layout; seeded like the other model strategies, in eval mode."""
    d, inter = draw(st.sampled_from((8, 16))), draw(st.sampled_from((8, 16)))
    n_experts, n_blocks = draw(st.integers(1, 4)), draw(st.integers(1, 2))
    impl, transposed = draw(st.sampled_from(("loop", "bmm", "einsum", "matmul"))), draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoENet(d, inter, n_experts, n_blocks, impl, transposed).eval()
        x = torch.randn(6, d)
    return model, x


#: narrow float dtypes a model may come in (fxqat's quantizers compute in float32 and hand these back)
LOW_PRECISION = (torch.bfloat16, torch.float16)


@st.composite
def low_precision_quant_st(draw: st.DrawFn) -> Tuple[str, str, str, torch.dtype, torch.Tensor, int]:
    """``(method, granularity, kind, dtype, x, seed)``: one registered weight/activation method with a granularity
    and tensor kind it supports, a narrow dtype, and a ``[rows, 64]`` input in that dtype (normal values times a
    drawn magnitude, 1e-3..1e2, some rows all zero) made from the drawn seed."""
    cases = sorted((m, g, k) for m, row in granularity_support().items() for g, kinds in row.items() for k in kinds
                   if k != "grad")
    method, gran, kind = draw(st.sampled_from(cases))
    dtype, seed = draw(st.sampled_from(LOW_PRECISION)), draw(st.integers(0, 2**31 - 1))
    rows, mag = draw(st.integers(1, 6)), draw(st.sampled_from((1e-3, 0.05, 1.0, 1e2)))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g) * mag
    if draw(st.booleans()) and rows > 1:
        x[0] = 0
    return method, gran, kind, dtype, x.to(dtype), seed
