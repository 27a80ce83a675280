"""The compiled path: prepared models (plain, hybrid, every quantizer method) trace into one dynamo graph and match
eager numerics."""

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.models import CifarResNet, get_model
from fxqat.models.hf import char_llama


def _assert_one_graph(cfg, model=None, x=None):
    """A prepared model (default ResNet-20; quantizers initialised eagerly: they read their first tensor) traces into
    one dynamo graph."""
    torch.manual_seed(0)
    if model is None:
        model, x = get_model("resnet20", 10), torch.randn(4, 3, 32, 32)
    qm = fxqat.prepare_qat(model, (x,), cfg)
    qm.train()
    qm(x)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(qm)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


# shared partner: dynamo traces torch.func.functional_call (detached suffix weights) per path, ~30 s on 2 cores for
# ResNet-20's 11 blocks; test_no_graph_breaks_with_a_shared_partner takes a ResNet-8 (5 blocks) for it
@pytest.mark.parametrize("hybrid", [None, fxqat.HybridConfig()])
def test_no_graph_breaks(hybrid):
    _assert_one_graph(fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=hybrid))


@pytest.mark.slow
def test_no_graph_breaks_with_a_shared_partner():
    torch.manual_seed(0)
    model = CifarResNet([1, 1, 1])  # ResNet-8: stem, three residual blocks, head
    assert len(fxqat.find_blocks(model, (torch.randn(2, 3, 32, 32),))) == 5
    _assert_one_graph(fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig(partner="shared")), model,
                      torch.randn(4, 3, 32, 32))


@pytest.mark.slow  # dynamo tracing: about 20 s a method on the shared 2-core machine
# gguf: weights only, per group of 32 (its compiled forward is checked in tests/unit/test_granularity.py)
@pytest.mark.parametrize("method", [m for m in fxqat.available_methods() if m not in ("grad", "lsq", "dynamic", "gguf")])
def test_method_compiles_without_graph_breaks(method):
    """Flags, gradient factors and the noise-tempering clock are Python mirrors or tensors: one dynamo graph."""
    _assert_one_graph(fxqat.QATConfig(w_bits=4, a_bits=4, method=method))


@pytest.mark.slow
def test_8da4w_preset_compiles_without_graph_breaks():
    """Per-token dynamic activations (method 'dynamic', activation-only) with per-group LSQ weights: one graph.
    A Linear-only model: per-group-32 weights need input widths that are multiples of 32 (ResNet-20's stem has 27)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    _assert_one_graph(fxqat.QATConfig.preset("8da4w", first_last_layers=()), model, torch.randn(4, 64))


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4)).eval()
    qm(x)
    compiled = torch.compile(qm)
    ref = qm(x)
    out = compiled(x)
    # inductor may compute x/s as x·(1/s): an element within an ulp of a rounding boundary can move by one step
    step = max(q.scale.abs().max().item() for q in fxqat.named_quantizers(qm).values())
    assert torch.allclose(out, ref, atol=4 * step, rtol=0)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.75
    qm.train()
    torch.nn.functional.cross_entropy(compiled(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in qm.parameters() if p.grad is not None)


@pytest.mark.slow  # dynamo + AOTAutograd trace a 2-layer tiny Llama: ~6 s on 2 cores
def test_prepared_hf_llama_runs_under_torch_compile():
    """Transformers passes the attention mask as None in eager mode but as a tensor under torch.compile, and sdpa runs
    other code for each (``is_causal``): each decoder layer's graph region captures a second graph for the tensor
    mask at the first compiled call, over the same quantizers (none added, the state_dict unchanged), and agrees
    with eager.

    ``aot_eager`` (dynamo + AOTAutograd, no inductor): the mask is a tensor to dynamo whatever the backend, and
    inductor's own compile of this model took 20 s of the test's 28 s; inductor is covered by
    test_compiled_training_step_matches_eager and benchmarks/step_time.py --llm."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randint(0, 65, (2, 16))
    # two decoder layers (the benchmark model has four): two regions, half the compile time
    qm = fxqat.prepare_qat(char_llama(num_hidden_layers=2), (x,), fxqat.QATConfig.preset("int4_weight_only"))
    fxqat.calibrate(qm, [x])
    qm.train()
    quantizers, keys = fxqat.named_quantizers(qm), sorted(qm.state_dict())
    ref = qm(x).logits
    out = torch.compile(qm, backend="aot_eager")(x).logits
    layers = qm.model.layers
    assert [len(m.fxqat_variants) for m in layers] == [1] * len(layers)  # the tensor-mask graph
    assert fxqat.named_quantizers(qm) == quantizers and sorted(qm.state_dict()) == keys
    # decomposed ops in another order (weight-only int4: the fake-quantized weights are bit-equal): 1e-5
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in fxqat.trainable_parameters(qm) if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
