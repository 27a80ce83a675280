"""``HybridConfig(cuts=...)`` on eager-root models: one block per chain layer (``"layers"``, the default there), or
also cuts inside each layer that is a graph region, at its residual adds (``"residual"``).

On the LLM benchmark's char Llama and the tiny Hugging Face zoo: the block count grows, the blocks still own every
weight layer exactly once, the hybrid paths equal the LP output with quantization off (the FP rest of a layer from
a recorded LP activation computes the same operations), a path loss at a cut inside layer i trains the part of
layer i before the cut and nothing after it, and ``convert`` leaves no recording taps behind.
"""

from __future__ import annotations

import operator
import warnings

import pytest
import torch

import fxqat
from fxqat.capture.inner_cuts import RecordTap
from fxqat.capture.region import GraphRegion
from fxqat.training.losses import logits_of

pytest.importorskip("transformers")
from hf_zoo import ZOO, build  # noqa: E402
from qat_helpers import block_owners  # noqa: E402

from fxqat.models.hf import char_llama  # noqa: E402

RESIDUAL = fxqat.QATConfig(hybrid=fxqat.HybridConfig(cuts="residual"))
LAYERS = fxqat.QATConfig(hybrid=fxqat.HybridConfig(cuts="layers"))


def _llama():
    model = char_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    return model, torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(0))


def _assert_owned_once(qm, blocks) -> None:
    layers = sorted({q.weight_layer for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"})
    assert layers and all(qm.get_submodule(name) is not None for name in layers)  # qualified names in the model
    where = block_owners(blocks)
    unowned = {layer: where.get(layer, []) for layer in layers if len(where.get(layer, [])) != 1}
    assert not unowned, f"weight layers not owned by exactly one block: {unowned}"


def test_char_llama_residual_cuts_split_every_decoder_layer_after_attention_and_after_mlp():
    model, x = _llama()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=8))
    layers, residual = fxqat.find_blocks(qm, (x,), LAYERS), fxqat.find_blocks(qm, (x,), RESIDUAL)
    assert [b.name for b in fxqat.find_blocks(qm, (x,))] == [b.name for b in layers]  # the default: one per layer
    assert [b.name for b in layers] == ["model.layers.0", "model.layers.1", "suffix"]
    assert [b.name for b in residual] == ["model.layers.0.self_attn", "model.layers.0.mlp",
                                          "model.layers.1.self_attn", "model.layers.1.mlp", "suffix"]
    for i in (0, 1):
        attn, mlp = residual[2 * i], residual[2 * i + 1]
        layer, _, node_name = attn.exit.partition(":")
        assert layer == f"model.layers.{i}" and mlp.exit == f"{layer}:out" and mlp.entry == attn.exit
        region = qm.get_submodule(layer)
        assert isinstance(region, GraphRegion)
        cut = next(n for n in region.graph.nodes if n.name == node_name)  # the residual add after the attention
        assert cut.target is operator.add and any(a.op == "placeholder" for a in cut.args)
        assert f"{layer}.self_attn.q_proj" in attn.modules and f"{layer}.mlp.down_proj" in mlp.modules
        assert f"{layer}.post_attention_layernorm" in mlp.modules and f"{layer}.input_layernorm" in attn.modules
    for blocks in (layers, residual):
        _assert_owned_once(qm, blocks)
        assert [b.entry for b in blocks[1:]] == [b.exit for b in blocks[:-1]]


@pytest.mark.parametrize("partner", ["shared", "frozen"])
def test_char_llama_residual_paths_equal_lp_and_train_only_what_precedes_the_cut(partner):
    model, x = _llama()
    cfg = fxqat.QATConfig(w_bits=4, a_bits=8, hybrid=fxqat.HybridConfig(partner=partner, cuts="residual"))
    qm = fxqat.prepare_qat(model, (x,), cfg)
    assert [b.name for b in fxqat.find_blocks(qm, (x,))][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    qm.train()
    fxqat.set_quantization(qm, False)
    out = qm(x)
    assert len(out.paths) == 4
    for path in out.paths:  # bit-exact: the partner's rest of a layer runs the same ops on the same weights
        assert torch.equal(path.logits, out.lp.logits)
    fxqat.set_quantization(qm, True)
    out = qm(x)
    attn_w = qm.get_parameter("model.layers.1.self_attn.q_proj.weight")
    mlp_w = qm.get_parameter("model.layers.1.mlp.gate_proj.weight")
    early_w = qm.get_parameter("model.layers.0.mlp.down_proj.weight")
    # path 2 branches off inside layer 1, after its attention: the LP attention of layer 1 and everything before
    # it get gradients, the LP MLP of layer 1 (computed by the partner on that path) does not
    g_attn, g_mlp, g_early = torch.autograd.grad(out.paths[2].logits.square().mean(), [attn_w, mlp_w, early_w],
                                                 allow_unused=True, retain_graph=True)
    assert g_attn is not None and g_attn.abs().sum() > 0 and g_early.abs().sum() > 0
    assert g_mlp is None or torch.count_nonzero(g_mlp) == 0
    loss, parts = fxqat.hybrid_loss(out, torch.zeros(2, 12, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and {"ce_path0", "ce_path3"} <= set(parts)
    lp = fxqat.convert(qm)
    assert not any(isinstance(m, RecordTap) for m in lp.modules())
    qm.eval()
    with torch.no_grad():
        assert torch.equal(lp(x).logits, qm(x).logits)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_residual_cuts_add_blocks_partition_layers_and_keep_paths_exact(name):
    model, args, kwargs = build(name, dropout=False)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=8, hybrid=fxqat.HybridConfig(partner="shared", cuts="residual"))
    qm = fxqat.prepare_qat(model, args, cfg, example_kwargs=kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        residual = fxqat.find_blocks(qm, args)
    layers = fxqat.find_blocks(qm, args, LAYERS)
    chain = [b.name for b in layers if b.name not in ("prefix", "suffix")]
    eager = [layer for layer in chain if not isinstance(qm.get_submodule(layer), GraphRegion)]
    if eager:  # a layer that runs eagerly: no graph, no cut inside, and a visible warning says so
        assert len(residual) == len(layers)
        assert all(any(layer in str(w.message) for w in caught) for layer in eager)
    elif getattr(model.config, "use_parallel_residual", False) or name == "t5":
        # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x)); T5: the first sub-layer's position bias is an output of the block
        # too. Neither has a node inside the layer that every path crosses: one block per layer, and a warning
        assert len(residual) == len(layers)
        assert all(any(layer in str(w.message) and "no cut" in str(w.message) for w in caught) for layer in chain)
    else:
        assert len(residual) > len(layers), [b.name for b in residual]
    for blocks in (layers, residual):
        _assert_owned_once(qm, blocks)
    qm.train()
    fxqat.set_quantization(qm, False)
    torch.manual_seed(2)
    out = qm(*args, **kwargs)
    assert len(out.paths) == len(residual) - 1
    atol = 1e-5 if name == "t5" else 0.0  # see test_hf_zoo: T5's partner call rounds its attention differently
    for path in out.paths:
        torch.testing.assert_close(logits_of(path), logits_of(out.lp), rtol=0, atol=atol)


def test_cuts_option_is_validated():
    with pytest.raises(ValueError, match="cuts='blocks'"):
        fxqat.HybridConfig(cuts="blocks")
    assert fxqat.HybridConfig().cuts == "auto"


def test_hf_vit_and_deit_give_one_block_per_transformer_layer():
    for name, cls in (("vit", "ViTLayer"), ("deit", "DeiTLayer")):
        model, args, kwargs = build(name)
        layers = [n for n, m in model.named_modules() if type(m).__name__ == cls]
        assert len(layers) == model.config.num_hidden_layers == 2
        blocks = fxqat.find_blocks(model, args)
        assert [b.name for b in blocks] == ["prefix", *layers, "suffix"]
        assert any(m.endswith("patch_embeddings.projection") for m in blocks[0].modules)
        assert "classifier" in blocks[-1].modules
