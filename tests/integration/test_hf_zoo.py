"""Hierarchical capture on a zoo of tiny Hugging Face transformers models (random weights, no downloads).

Each model: prepares with the one-liner, leaves the user's model untouched, reproduces the original outputs exactly
with quantization off in eval and in train mode (same seed), gives every weight layer exactly one weight quantizer,
trains a step, partitions into at least one block per layer, and builds the hybrid model whose paths equal the LP
output with quantization off and a shared partner.
"""


import pytest
import torch

import fxqat
from fxqat.layer_registry import is_weight_layer
from fxqat.training.losses import logits_of

pytest.importorskip("transformers")
from hf_zoo import ZOO, build  # noqa: E402
from weight_coverage import check_one_quantizer_per_weight  # noqa: E402

NAMES = sorted(ZOO)


def _weight_quantizers_per_layer(qm):
    """Weight-layer name -> number of weight quantizers attached to it (eager layers and graph regions)."""
    counts = {}
    for name, q in fxqat.named_quantizers(qm).items():
        if q.kind == "weight":
            counts[q.weight_target] = counts.get(q.weight_target, 0) + 1
    return counts


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_prepare_matches_original_and_quantizes_every_layer(name):
    model, args, kwargs = build(name)
    before = _state(model)
    qm = fxqat.prepare_qat(model, args, fxqat.QATConfig(w_bits=4, a_bits=8), example_kwargs=kwargs)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, fxqat.Quantizer) for m in model.modules())
    assert type(qm) is type(model)
    # every weight layer and weight parameter (MoE experts) has exactly one weight quantizer (tied weights: one
    # Parameter, one layer that uses it), except those the capture report lists as FP with a reason (routers)
    layers = [n for n, m in model.named_modules() if is_weight_layer(m)]
    check_one_quantizer_per_weight(model, qm)
    fxqat.set_quantization(qm, False)
    for mode in ("eval", "train"):
        model.train(mode == "train")
        qm.train(mode == "train")
        torch.manual_seed(1)
        ref = model(*args, **kwargs)
        torch.manual_seed(1)
        out = qm(*args, **kwargs)
        assert type(out) is type(ref)
        assert torch.equal(logits_of(out), logits_of(ref)), mode  # bit-exact: the same operations in the same order
    report = qm.fxqat_capture
    assert report.regions[0].name == "" and report.regions[0].kind == "eager"
    assert sorted(report.weight_layers) == sorted(layers)


@pytest.mark.parametrize("name", NAMES)
def test_trains_and_partitions(name):
    model, args, kwargs = build(name)
    qm = fxqat.prepare_qat(model, args, fxqat.QATConfig(w_bits=4, a_bits=8), example_kwargs=kwargs)
    qm.train()
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=1e-2)
    loss = logits_of(qm(*args, **kwargs)).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in qm.named_parameters() if n.endswith("weight") and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    before = {n: p.detach().clone() for n, p in qm.named_parameters()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in qm.named_parameters())
    blocks = fxqat.find_blocks(qm, args)
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer")
    assert len(blocks) >= n_layers
    owned = [m for b in blocks for m in b.modules]
    assert len(owned) == len(set(owned))  # blocks partition the modules they own


@pytest.mark.parametrize("name", NAMES)
def test_hybrid_paths_equal_lp_with_quantization_off(name):
    model, args, kwargs = build(name, dropout=False)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=8, hybrid=fxqat.HybridConfig(partner="shared"))
    qm = fxqat.prepare_qat(model, args, cfg, example_kwargs=kwargs)
    qm.train()
    fxqat.set_quantization(qm, False)
    torch.manual_seed(2)
    out = qm(*args, **kwargs)
    assert isinstance(out, fxqat.HybridOutput) and len(out.paths) >= 1
    lp = logits_of(out.lp)
    # bit-exact, except T5: its partner call (torch.func.functional_call over the tied, detached weights) rounds the
    # encoder's attention differently in the last float32 bit (measured max 1.2e-6 on logits of magnitude ~1)
    atol = 1e-5 if name == "t5" else 0.0
    for path in out.paths:
        assert type(path) is type(out.lp)
        torch.testing.assert_close(logits_of(path), lp, rtol=0, atol=atol)
    # and with quantization on, a hybrid step trains
    fxqat.set_quantization(qm, True)
    out = qm(*args, **kwargs)
    target = torch.zeros(logits_of(out.lp).shape[:-1], dtype=torch.long)
    loss, parts = fxqat.hybrid_loss(out, target)
    loss.backward()
    assert torch.isfinite(loss) and "ce_path0" in parts
