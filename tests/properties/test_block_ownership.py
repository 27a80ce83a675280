"""Blocks own every weight layer exactly once (graph-root models).

*Owned*: every weight layer that gets a weight quantizer (``fxqat.named_quantizers(qm)``, kind ``"weight"``, its
``weight_layer``) is in the ``modules`` of exactly one :class:`fxqat.Block`, the block whose nodes compute it. The
layers that used to fall through: ``nn.Conv2d`` subclasses traced as functional ops on a transformed weight (timm's
``StdConv2d`` / ``ScaledStdConv2d``: weight standardisation, then ``F.conv2d``), ``nn.Linear`` subclasses whose
``forward`` calls ``F.linear`` (timm's ``Linear``, the classifier of ghostnet / lcnet), and weight layers inside
modules the tracer kept as leaves (attention of levit, pit, cait).
"""

from __future__ import annotations

import functools
from typing import List

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from qat_helpers import block_owners
from strategies import GeneratedNet, any_model_st
from torch import nn

import fxqat
from fxqat.api import prepare_fp_graph
from fxqat.graph import META_KEY, partition
from fxqat.layer_registry import is_weight_layer
from fxqat.passes.annotate import QMETA, annotate


class StdConv2d(nn.Conv2d):
    """timm's ``StdConv2d``: the weight is standardised per output channel before the convolution."""

    eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """timm's ``ScaledStdConv2d``: standardisation with a learned gain (a second parameter of the same module)."""

    eps = 1e-6

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalLinear(nn.Linear):
    """timm's ``Linear``: ``forward`` calls ``F.linear`` on the module's own parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Untraceable(nn.Module):
    """Data-dependent control flow: the tracer keeps it as a leaf (its conv is quantized by substitution)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > -1e30 else -y


class HandMade(nn.Module):
    """Stem (StdConv), a residual block of ScaledStdConvs, an untraceable leaf, a ``Linear``-subclass head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = ScaledStdConv2d(8, 8, 3, padding=1), ScaledStdConv2d(8, 8, 3, padding=1)
        self.leaf = Untraceable(8)
        self.head = FunctionalLinear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.conv2(torch.relu(self.conv1(x))))
        x = self.leaf(x)
        return self.head(x.mean((2, 3)))


def _quantized_layers(qm) -> List[str]:
    return sorted(q.weight_layer for q in fxqat.named_quantizers(qm).values() if q.kind == "weight")


def _check_owned(model: nn.Module, x: torch.Tensor, config: fxqat.QATConfig) -> list:
    """Every quantized weight layer is in exactly one block's modules; returns the blocks."""
    qm = fxqat.prepare_qat(model, (x,), config)
    layers = _quantized_layers(qm)
    assert layers == sorted(n for n, m in model.named_modules() if is_weight_layer(m))  # one quantizer per layer
    blocks = fxqat.find_blocks(model, (x,), config)
    where = block_owners(blocks)
    unowned = {layer: where.get(layer, []) for layer in layers if len(where.get(layer, [])) != 1}
    assert not unowned, f"weight layers not owned by exactly one block: {unowned}"
    return blocks


def test_hand_made_functional_layers_are_owned_by_the_block_that_computes_them():
    torch.manual_seed(0)
    model, x = HandMade().eval(), torch.randn(2, 3, 8, 8)
    cfg = fxqat.QATConfig()
    gm = prepare_fp_graph(model, (x,), cfg)
    annotate(gm, cfg)
    layers = {n: n.meta[QMETA] for n in gm.graph.nodes if QMETA in n.meta}
    assert sorted((lq.style, lq.owner) for lq in layers.values()) == [
        ("functional", "conv1"), ("functional", "conv2"), ("functional", "head"), ("functional", "stem"),
        ("opaque", "leaf"),
    ]
    blocks = partition(gm, lambda n: QMETA in n.meta)
    assert [b.name for b in blocks] == ["stem", "block1", "leaf", "head"]
    assert [b.modules for b in blocks] == [("stem",), ("conv1", "conv2"), ("leaf", "leaf.conv"), ("head",)]
    for node, lq in layers.items():  # the owner is listed by the block that runs the layer's node
        assert lq.owner in blocks[node.meta[META_KEY]].modules
    assert _check_owned(model, x, cfg) == blocks

    qm = fxqat.prepare_qat(model, (x,), cfg)
    wq = {q.weight_layer: q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"}
    # a standardised weight is not the parameter itself: no weight_target (TALR reads that), but its layer is known
    assert {k: q.weight_target for k, q in wq.items()} == {
        "stem": None, "conv1": None, "conv2": None, "leaf.conv": "leaf.conv.weight", "head": "head.weight",
    }
    fxqat.set_quantization(qm, False)
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))  # same operations in the same order


def test_root_level_parameter_of_a_functional_layer_has_no_owning_submodule():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.w = nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            return F.linear(torch.relu(self.fc(x)), self.w)

    gm = prepare_fp_graph(Root(), (torch.randn(2, 4),))
    blocks = partition(gm)
    assert [b.modules for b in blocks] == [("fc",), ()]  # the root holds "w": nothing to name, the block still exists
    assert "linear" in blocks[-1].nodes


_SWAPS = {nn.Conv2d: (StdConv2d, ScaledStdConv2d), nn.Linear: (FunctionalLinear,)}


@st.composite
def functional_model_st(draw):
    """A :func:`any_model_st` model whose conv/linear layers are randomly turned into functional-style subclasses
    (standardised convs, ``F.linear`` linears) and one of whose body blocks is randomly kept as a leaf."""
    model, x = draw(any_model_st(max_blocks=4))
    for name, m in model.named_modules():
        options = _SWAPS.get(type(m))
        if options is not None and isinstance(m, nn.Conv2d) and m.weight[0].numel() == 1:
            options = ()  # standardising a single value per channel is undefined (batch_norm refuses it)
        if options is not None:
            choice = draw(st.sampled_from((None,) + options), label=name)
            if choice is ScaledStdConv2d:
                m.gain = nn.Parameter(torch.linspace(0.5, 1.5, m.out_channels).view(-1, 1, 1, 1))
                m.scale = m.weight[0].numel() ** -0.5
            if choice is not None:
                m.__class__ = choice
    assert isinstance(model, GeneratedNet)
    holders = [f"body.{i}" for i, b in enumerate(model.body) if any(is_weight_layer(s) for s in b.modules())]
    leaves = tuple(draw(st.lists(st.sampled_from(holders), max_size=1, unique=True))) if holders else ()
    return model, x, leaves


@given(functional_model_st())
def test_random_models_with_functional_layers_and_leaves_own_every_layer_once(model_x_leaves):
    model, x, leaves = model_x_leaves
    cfg = fxqat.QATConfig(leaf_modules=leaves)
    blocks = _check_owned(model, x, cfg)
    for leaf in leaves:  # the weight layers inside a leaf are owned by the block that calls it
        (index,) = block_owners(blocks)[leaf]
        inner = [n for n, m in model.get_submodule(leaf).named_modules() if is_weight_layer(m)]
        assert all(block_owners(blocks)[f"{leaf}.{n}"] == [index] for n in inner)


TIMM = [  # (name, create_model kwargs, input size); depths and resolutions cut down to keep the test short
    ("nf_regnet_b0", {}, 32),  # ScaledStdConv2d
    ("nf_resnet26", {}, 32),  # ScaledStdConv2d
    ("resnetv2_bit", {}, 32),  # BiT (resnetv2_50x1_bit's recipe, one block per stage): StdConv2d
    ("ghostnet_050", {}, 32),  # timm Linear classifier
    ("lcnet_050", {}, 32),  # timm Linear classifier
    ("levit_128s", {"img_size": 64}, 64),  # attention kept as a leaf
    ("pit_ti_224", {"img_size": 64}, 64),  # attention kept as a leaf
    ("cait_xxs24_224", {"img_size": 32, "depth": 2}, 32),  # class-attention kept as a leaf
]


def _timm_model(timm, name: str, kwargs: dict) -> nn.Module:
    if name == "resnetv2_bit":  # what timm's _create_resnetv2_bit builds, with layers=[1, 1, 1, 1]
        from timm.models.resnetv2 import ResNetV2

        return ResNetV2(layers=[1, 1, 1, 1], stem_type="fixed",
                        conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8))
    return timm.create_model(name, pretrained=False, **kwargs)


@pytest.mark.slow
def test_timm_models_own_every_weight_layer_once():
    timm = pytest.importorskip("timm")
    seen = {}
    for name, kwargs, size in TIMM:
        torch.manual_seed(0)
        model = _timm_model(timm, name, kwargs).eval()
        n_std = sum(isinstance(m, (timm.layers.StdConv2d, timm.layers.ScaledStdConv2d)) for m in model.modules())
        assert (n_std > 0) == name.startswith(("nf_", "resnetv2")), name
        blocks = _check_owned(model, torch.randn(1, 3, size, size), fxqat.QATConfig())
        seen[name] = len(blocks)
    assert all(n >= 3 for n in seen.values()), seen
