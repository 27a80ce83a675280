"""``QATConfig(quantize_matmuls=True)``: both operands of attention's activation products get activation quantizers.

On a hand-written attention that traces (``Q @ K^T``, softmax, ``P @ V``), its ``scaled_dot_product_attention``
twin, a timm ViT whose attention is written out (``fused_attn=False``, so it traces), and the Hugging Face zoo (whose
attention modules all run eagerly under transformers 5: nothing to add there). Off by default; with quantization
off the outputs are exact.
"""

from __future__ import annotations

import doctest
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxqat
from fxqat.passes import matmuls as matmuls_mod
from fxqat.passes import signedness
from fxqat.passes.insert_quant import QROLE
from fxqat.passes.matmuls import MATMUL_FUNCTIONS, MATMUL_METHODS, matmul_inputs


class Attention(nn.Module):
    """Multi-head self-attention written out; ``sdpa=True`` uses ``F.scaled_dot_product_attention`` instead."""

    def __init__(self, dim: int = 8, heads: int = 2, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(dim // heads, dim // heads))  # a weight: not an activation product

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q = q @ self.rel
        if self.sdpa:
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            p = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
            h = p @ v
        return self.proj(h.transpose(1, 2).reshape(b, n, c))


class Net(nn.Module):
    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.embed, self.attn, self.head = nn.Linear(4, 8), Attention(sdpa=sdpa), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h)
        return self.head(h.mean(1))


def _products(qm):
    """The activation-product nodes of a prepared graph and, per node, the quantizer nodes feeding its operands."""
    found = {}
    for n in qm.graph.nodes:
        positions = MATMUL_FUNCTIONS.get(n.target) if n.op == "call_function" else (
            MATMUL_METHODS.get(n.target) if n.op == "call_method" else None)
        if positions:
            found[n.name] = [n.args[i] for i in positions]
    return found


def _is_act_quantizer(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_module" and node.meta.get(QROLE) == "act"


@pytest.mark.parametrize("sdpa", [False, True], ids=["written_out", "sdpa"])
def test_matmul_operands_get_activation_quantizers_only_with_the_option(sdpa):
    torch.manual_seed(0)
    model, x = Net(sdpa).eval(), torch.randn(2, 5, 4)
    off = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=8))
    on = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=8, quantize_matmuls=True))
    prod_off, prod_on = _products(off), _products(on)
    expected = 2 if sdpa else 3  # q @ rel, (q @ k^T or sdpa), p @ v
    assert len(prod_off) == len(prod_on) == expected
    for name, operands in prod_off.items():  # default: no operand is quantized
        assert not any(_is_act_quantizer(a) for a in operands), name
    # q @ rel multiplies by a weight parameter: rel gets a weight quantizer (fxqat.capture.param_graph), no act one
    with_weight = [name for name, ops in prod_on.items() if any(a.meta.get(QROLE) == "weight" for a in ops)]
    assert len(with_weight) == 1 and not any(_is_act_quantizer(a) for a in prod_on[with_weight[0]])
    quantized = {name: ops for name, ops in prod_on.items() if name not in with_weight}
    assert len(quantized) == expected - 1
    for name, operands in quantized.items():
        assert all(_is_act_quantizer(a) for a in operands), (name, operands)
    n_act = lambda qm: sum(q.kind == "act" for q in fxqat.named_quantizers(qm).values())  # noqa: E731
    assert n_act(on) - n_act(off) == (3 if sdpa else 4)  # q, k, v  /  q, k^T, p, v: each operand its own quantizer
    if not sdpa:  # P = softmax(...) is non-negative: its quantizer is unsigned; q and k^T are decided from data
        p_quant = next(ops[0] for ops in quantized.values() if ops[0].args[0].target is torch.softmax)
        assert on.get_submodule(p_quant.target).spec.signed is False
    weight_layers = lambda qm: sorted(q.weight_layer for q in fxqat.named_quantizers(qm).values()  # noqa: E731
                                      if q.kind == "weight")
    assert weight_layers(on) == weight_layers(off) == ["attn", "attn.proj", "attn.qkv", "embed", "head"]
    for qm in (off, on):
        fxqat.set_quantization(qm, False)
        with torch.no_grad():
            assert torch.equal(qm(x), model(x))  # quantizers off: the same operations in the same order
    fxqat.set_quantization(on, True)
    on.train()
    y = on(x)
    y.square().mean().backward()
    scales = [p.grad for n, q in fxqat.named_quantizers(on).items() if q.kind == "act" for p in q.parameters()]
    assert scales and all(g is not None and torch.isfinite(g).all() for g in scales)


def test_matmul_option_is_validated_and_overrides_apply():
    with pytest.raises(ValueError, match="quantize_matmuls=True, a_bits=None"):
        fxqat.QATConfig(a_bits=None, quantize_matmuls=True)
    with pytest.raises(TypeError, match="quantize_matmuls='yes'"):
        fxqat.QATConfig(quantize_matmuls="yes")
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 5, 4)
    skip = fxqat.QATConfig(quantize_matmuls=True, overrides=(fxqat.Override("attn", skip=True),))
    qm = fxqat.prepare_qat(model, (x,), skip)
    assert not any(_is_act_quantizer(a) for ops in _products(qm).values() for a in ops)
    six = fxqat.QATConfig(a_bits=8, quantize_matmuls=True, overrides=(fxqat.Override("attn", a_bits=6),))
    qm = fxqat.prepare_qat(model, (x,), six)
    bits = {qm.get_submodule(a.target).bits for ops in _products(qm).values() for a in ops if _is_act_quantizer(a)}
    assert bits == {6}


def test_timm_vit_written_out_attention_is_traced_and_its_matmuls_quantized():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # timm's own switch: Q @ K^T, softmax, P @ V written out (no `if self.training`)
    x = torch.randn(1, 3, 32, 32)
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=8, quantize_matmuls=True))
    assert not [o for o in qm.meta["fxqat.opaque"] if o.endswith(".attn")]  # the attention is in the graph
    products = _products(qm)
    assert len(products) == 2 * 2 and all(_is_act_quantizer(a) for ops in products.values() for a in ops)
    fxqat.set_quantization(qm, False)
    with torch.no_grad():
        assert torch.equal(qm(x), model(x))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_hf_zoo_attention_matmuls_in_graph_regions_are_quantized_and_stay_exact(name):
    pytest.importorskip("transformers")
    from hf_zoo import build

    model, args, kwargs = build(name)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=8)
    base = fxqat.prepare_qat(model, args, cfg, example_kwargs=kwargs)
    qm = fxqat.prepare_qat(model, args, cfg.with_(quantize_matmuls=True), example_kwargs=kwargs)
    # products inside graph regions (found independently of annotate): each operand gets one quantizer
    in_graphs = [n for m in qm.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
                 if n.target in (torch.matmul, torch.bmm, operator.matmul, F.scaled_dot_product_attention)]
    added = len(fxqat.named_quantizers(qm)) - len(fxqat.named_quantizers(base))
    assert added == sum(len(MATMUL_FUNCTIONS[n.target]) for n in in_graphs if matmul_inputs(n))
    if name in ("llama", "gpt2"):  # decoder attention is captured as a graph (sdpa: q, k, v of each layer)
        assert added == 3 * model.config.num_hidden_layers
        attn = [r for r in fxqat.capture_report(qm).regions if r.name.endswith(("attn", "self_attn"))]
        assert not [r for r in attn if r.kind == "eager"]
    fxqat.set_quantization(qm, False)
    model.eval(), qm.eval()
    with torch.no_grad():
        assert torch.equal(qm(*args, **kwargs).logits, model(*args, **kwargs).logits)


@pytest.mark.parametrize("module", [matmuls_mod, signedness], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
