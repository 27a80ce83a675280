"""Block partitions of known architectures: counts, names, entries/exits and where the cuts fall.

Models are traced with ``torch.fx.symbolic_trace`` (torchvision models with ``weights=None``); only the vision
transformer is not run (its partition needs tracing only).
"""

from __future__ import annotations

import doctest
import operator
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import fxqat
import fxqat.graph
from fxqat.graph import (
    META_KEY,
    block_params,
    dominance,
    merge,
    modinfo,
    node_stack,
    nxview,
    partition,
    plot,
    plot_partition,
    prefix_module,
    split,
    suffix_module,
    summary_table,
)
from fxqat.graph import blocks as blocks_mod
from fxqat.models.resnet_cifar import resnet20


def _block_of_module(gm: fx.GraphModule, path: str):
    return {n.meta[META_KEY] for n in gm.graph.nodes if any(e.path == path for e in node_stack(n, gm))}


@pytest.mark.parametrize("option", ["A", "B"])
def test_cifar_resnet20_gives_stem_nine_residual_blocks_and_head(option):
    torch.manual_seed(0)
    model = resnet20(shortcut=option).eval()  # the library's own CIFAR ResNet-20
    gm = fx.symbolic_trace(model)
    blocks = partition(gm)
    expected = ["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)] + ["head"]
    assert [b.name for b in blocks] == expected
    assert blocks[0].modules == ("conv1", "bn1") and blocks[0].entry == "x"
    assert blocks[-1].modules == ("avgpool", "fc") and blocks[-1].exit == "fc"
    for k, b in enumerate(blocks[1:-1], start=1):
        assert b.exit == blocks[k + 1].entry
        exit_node = next(n for n in gm.graph.nodes if n.name == b.exit)  # the post-add ReLU
        assert exit_node.target is F.relu and exit_node.args[0].target is operator.add
        assert _block_of_module(gm, b.name) == {k}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y = gm(x)
        for i in range(len(blocks)):
            assert torch.equal(suffix_module(gm, blocks, i)(prefix_module(gm, blocks, i)(x)), y)


def test_torchvision_resnet18_gives_eight_basic_blocks_between_stem_and_head():
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None))
    blocks = partition(gm)
    assert [b.name for b in blocks] == ["stem"] + [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)] + ["head"]
    assert blocks[0].modules == ("conv1", "bn1", "relu", "maxpool")
    assert (blocks[0].entry, blocks[0].exit) == ("x", "maxpool")
    assert blocks[-1].modules == ("avgpool", "fc") and blocks[-1].exit == "fc"
    assert blocks[3].modules[-2:] == ("layer2.0.downsample.0", "layer2.0.downsample.1")
    assert [b.exit for b in blocks[1:-1]] == [f"layer{s}_{i}_relu_1" for s in (1, 2, 3, 4) for i in (0, 1)]
    assert sum(block_params(gm, b.nodes) for b in blocks) == sum(p.numel() for p in gm.parameters())


def test_resnet18_max_blocks_and_boundaries():
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None))
    merged = partition(gm, max_blocks=4)
    assert len(merged) == 4
    assert merged[0].entry == "x" and merged[-1].exit == "fc"
    # cheapest pairs merge first: the small early blocks go together, layer4.1 (4.7M) and the head stay apart
    assert merged[0].modules[0] == "conv1" and "layer4.1.conv1" in merged[-2].modules + merged[-1].modules
    kept = partition(gm, max_blocks=3, boundaries=["layer2", "layer3.0"])
    assert {"layer2_1_relu_1", "layer3_0_relu_1"} <= {b.exit for b in kept}
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1' does not end at a cut node.*'layer1\.0'"):
        partition(gm, boundaries=["layer1.0.conv1"])
    with pytest.raises(ValueError, match="smaller than the 4 blocks"):
        partition(gm, max_blocks=2, boundaries=["layer1", "layer2", "layer3"])


def test_vit_b_16_cuts_at_every_residual_add():
    gm = fx.symbolic_trace(torchvision.models.vit_b_16(weights=None, image_size=32))
    blocks = partition(gm)
    assert len(blocks) == 1 + 2 * 12 + 1
    assert blocks[0].name == "stem" and blocks[-1].name == "head"
    assert blocks[0].modules == ("conv_proj", "encoder.dropout")
    assert blocks[-1].modules == ("encoder.ln", "heads.head")
    residual_adds = [
        n.name
        for n in gm.graph.nodes
        if n.target is operator.add and any(e.path.startswith("encoder.layers.encoder_layer_") for e in node_stack(n))
    ]
    assert len(residual_adds) == 24
    assert [b.exit for b in blocks[1:-1]] == residual_adds
    for layer in range(12):
        prefix = f"encoder.layers.encoder_layer_{layer}"
        assert blocks[1 + 2 * layer].name == f"{prefix}.self_attention"
        assert blocks[2 + 2 * layer].name == f"{prefix}.mlp"
        assert f"{prefix}.self_attention" in blocks[1 + 2 * layer].modules


def test_densenet121_cuts_only_between_dense_blocks():
    gm = fx.symbolic_trace(torchvision.models.densenet121(weights=None))
    blocks = partition(gm)
    names = ["stem"]
    for k in (1, 2, 3):
        names += [f"features.denseblock{k}", f"features.transition{k}"]
    names += ["features.denseblock4", "head"]
    assert [b.name for b in blocks] == names
    for k, layers in zip((1, 2, 3, 4), (6, 12, 24, 16)):
        dense = f"features.denseblock{k}"
        assert len(_block_of_module(gm, dense)) == 1
        index = names.index(dense)
        assert sum(1 for m in blocks[index].modules if m.endswith(".conv2")) == layers
        exit_node = next(n for n in gm.graph.nodes if n.name == blocks[index].exit)
        assert exit_node.target is torch.cat
    assert blocks[-1].modules == ("features.norm5", "classifier")


def test_mobilenet_v2_cuts_between_inverted_residuals_with_or_without_skip():
    model = torchvision.models.mobilenet_v2(weights=None)
    gm = fx.symbolic_trace(model)
    blocks = partition(gm)
    assert [b.name for b in blocks] == ["stem"] + [f"features.{i}" for i in range(1, 19)] + ["head"]
    with_skip = {i for i in range(1, 18) if model.features[i].use_res_connect}
    assert with_skip == {3, 5, 6, 8, 9, 10, 12, 13, 15, 16}
    for i in range(1, 18):
        b = blocks[i]
        exit_node = next(n for n in gm.graph.nodes if n.name == b.exit)
        assert (exit_node.target is operator.add) == (i in with_skip), b
        n_convs = 2 if i == 1 else 3
        assert sum(isinstance(gm.get_submodule(m), nn.Conv2d) for m in b.modules) == n_convs
    assert blocks[-1].modules == ("classifier.0", "classifier.1")


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        h = torch.relu(self.body(x)) * self.scale  # get_attr: a free node
        h.size()  # dead code
        return {"a": self.a(h), "b": self.b(h)}


def test_multi_output_last_block_ends_at_the_output_node_and_free_nodes_join_their_user():
    gm = fx.symbolic_trace(_TwoHeads())
    blocks = partition(gm)
    assert [(b.name, b.entry, b.exit) for b in blocks] == [("stem", "x", "mul"), ("head", "mul", "output")]
    assert blocks[0].nodes == ("body", "relu", "scale", "mul")  # graph order: the get_attr comes after relu
    assert blocks[1].nodes == ("size", "a", "b")  # dead code joins the block running at that point
    assert blocks[1].modules == ("a", "b")
    x = torch.randn(3, 4)
    full, out = gm(x), suffix_module(gm, blocks, 0)(prefix_module(gm, blocks, 0)(x))
    assert out.keys() == full.keys() and all(torch.equal(out[k], full[k]) for k in full)
    whole = prefix_module(gm, blocks, 1)(x)
    assert all(torch.equal(whole[k], full[k]) for k in full)
    assert suffix_module(gm, blocks, 1)(full) is full


def test_summary_table_and_plot(tmp_path):
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None))
    blocks = partition(gm)
    lines = summary_table(blocks, gm).splitlines()
    assert len(lines) == 1 + len(blocks)
    assert lines[0].split("|")[1].strip() == "name" and lines[-1].split("|")[-1].strip() == "513000"
    for name, model in [("resnet18", gm), ("densenet121", fx.symbolic_trace(torchvision.models.densenet121(weights=None)))]:
        path = plot_partition(model, partition(model), tmp_path / f"{name}.png")  # densenet121: 433 nodes
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000


@pytest.mark.parametrize("module", [fxqat.graph, nxview, dominance, merge, modinfo, blocks_mod, split, plot],
                         ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_without_module_stack_metadata_the_targets_give_the_same_blocks():
    gm = fx.symbolic_trace(torchvision.models.resnet18(weights=None))
    expected = [(b.name, b.exit, b.modules) for b in partition(gm)]
    for n in gm.graph.nodes:
        n.meta.pop("nn_module_stack", None)
    assert [(b.name, b.exit, b.modules) for b in partition(gm)] == expected


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Linear(4, 2)

    def forward(self, x, bias):
        h = torch.relu(self.conv(x) + bias)
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean((2, 3)))


def test_two_inputs_are_read_by_the_first_block_and_the_prefix_keeps_the_signature():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_TwoInputs())
    blocks = partition(gm)
    assert [(b.name, b.entry, b.exit) for b in blocks] == [("stem", "x", "relu"), ("conv2", "relu", "mean"),
                                                           ("head", "mean", "fc")]
    x, bias = torch.randn(2, 3, 4, 4), torch.randn(1, 4, 1, 1)
    prefix = prefix_module(gm, blocks, 0)
    assert [n.name for n in prefix.graph.nodes if n.op == "placeholder"] == ["x", "bias"]
    assert torch.equal(suffix_module(gm, blocks, 0)(prefix(x, bias)), gm(x, bias))


class _MaskedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, causal=False):
        h = self.fc(x)
        if mask is not None:  # never taken when traced with the default
            h = h * mask
        return x + (torch.tanh(h) if causal else torch.relu(h))


class _MaskedStack(nn.Module):
    """timm ViT's pattern: ``forward(x, attn_mask=None, is_causal=False)`` hands both to every block."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.blocks = nn.ModuleList(_MaskedBlock() for _ in range(3))

    def forward(self, x, attn_mask=None, is_causal=False):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x, attn_mask, is_causal)
        return self.head(x)


class _KeepBlocks(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _MaskedBlock) or super().is_leaf_module(m, qualname)


def test_constant_inputs_read_by_every_block_do_not_block_the_cuts():
    torch.manual_seed(0)
    model = _MaskedStack()
    gm = fx.GraphModule(model, _KeepBlocks().trace(model))
    ph = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert [nxview.is_constant_input(n) for n in ph.values()] == [False, True, True]
    blocks = partition(gm)
    assert [(b.name, b.exit) for b in blocks] == [("stem", "stem"), ("blocks.0", "blocks_0"),
                                                  ("blocks.1", "blocks_1"), ("blocks.2", "blocks_2"),
                                                  ("head", "head")]
    x = torch.randn(5, 3)
    for i in range(len(blocks) - 1):
        suffix = suffix_module(gm, blocks, i)
        reads = ["attn_mask", "is_causal"] if i < 3 else []  # a _MaskedBlock runs after block i
        assert [n.name for n in suffix.graph.nodes if n.op == "placeholder"][1:] == reads
        assert torch.equal(suffix(prefix_module(gm, blocks, i)(x)), gm(x))  # the defaults: same ops, bit-exact
        causal = {"is_causal": True} if reads else {}
        assert torch.equal(suffix(prefix_module(gm, blocks, i)(x, None, True), **causal), gm(x, None, True))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_and_deit_cut_at_every_residual_add(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, img_size=32).eval()
    blocks = fxqat.find_blocks(model, (torch.randn(1, 3, 32, 32),))
    assert len(blocks) == 1 + 2 * 12 + 1  # attn_mask / is_causal inputs used to keep all 12 blocks in one
    assert blocks[0].modules[0] == "patch_embed.proj" and blocks[-1].modules[-1] == "head"
    for layer in range(12):
        attn, mlp = blocks[1 + 2 * layer], blocks[2 + 2 * layer]
        assert (attn.name, mlp.name) == (f"blocks.{layer}.attn", f"blocks.{layer}.mlp")
        assert attn.modules[0] == f"blocks.{layer}.attn" and mlp.modules[-1] == f"blocks.{layer}.drop_path2"
        assert attn.exit.startswith("add") and mlp.exit.startswith("add")


def test_vit_b_16_layers_cuts_give_one_block_per_encoder_layer():
    gm = fx.symbolic_trace(torchvision.models.vit_b_16(weights=None, image_size=32))
    residual, layers = partition(gm), partition(gm, cuts="layers")
    assert [b.name for b in layers] == ["stem"] + [f"encoder.layers.encoder_layer_{i}" for i in range(12)] + ["head"]
    assert [b.exit for b in layers] == [b.exit for b in residual[::2]] + [residual[-1].exit]  # every second cut
    assert [n for b in layers for n in b.nodes] == [n for b in residual for n in b.nodes]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = gm(x)
        for i in (0, 6, 12):
            assert torch.equal(suffix_module(gm, layers, i)(prefix_module(gm, layers, i)(x)), y)
    with pytest.raises(ValueError, match="cuts='blocks'"):
        partition(gm, cuts="blocks")


def test_layers_cuts_change_nothing_where_every_layer_is_one_block_already():
    for model in (torchvision.models.resnet18(weights=None), torchvision.models.mobilenet_v2(weights=None)):
        gm = fx.symbolic_trace(model)
        assert [(b.name, b.exit) for b in partition(gm, cuts="layers")] == [(b.name, b.exit) for b in partition(gm)]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_and_deit_give_one_block_per_transformer_block_with_layers_cuts(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    cfg = fxqat.QATConfig(hybrid=fxqat.HybridConfig(cuts="layers"))
    blocks = fxqat.find_blocks(model, (x,), cfg)
    assert [b.name for b in blocks] == ["stem"] + [f"blocks.{i}" for i in range(12)] + ["head"]
    for i, b in enumerate(blocks[1:-1]):
        assert b.modules[0] == f"blocks.{i}.attn" and b.modules[-1] == f"blocks.{i}.drop_path2"
        assert {f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc2"} <= set(b.modules)  # the attention leaf's layers too
    qm = fxqat.prepare_qat(model, (x,), cfg.with_(hybrid=fxqat.HybridConfig(cuts="layers", partner="shared")))
    assert qm.n_paths == len(blocks) - 1
