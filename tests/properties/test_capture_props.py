"""Property tests of hierarchical capture on random nested module trees with untraceable modules."""

import torch
from capture_strategies import eager_tree_st
from hypothesis import given

import fxqat
from fxqat.layer_registry import is_weight_layer


def _weight_layers(model):
    return [n for n, m in model.named_modules() if is_weight_layer(m)]


@given(eager_tree_st())
def test_capture_reproduces_outputs_exactly_with_quantization_off(drawn):
    model, x = drawn
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=4))
    fxqat.set_quantization(qm, False)
    for train in (False, True):
        model.train(train)
        qm.train(train)
        assert torch.equal(qm(x)["logits"], model(x)["logits"])


@given(eager_tree_st())
def test_every_weight_layer_has_one_weight_quantizer(drawn):
    model, x = drawn
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=4))
    weight_qs = [q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]
    assert len(weight_qs) == len(_weight_layers(model))  # Twice's Linear (called twice) counts once
    assert sorted(qm.fxqat_capture.weight_layers) == sorted(_weight_layers(model))
    report = qm.fxqat_capture
    graph = [w for r in report.regions if r.kind == "graph" for w in r.weight_layers]
    eager = [w for r in report.regions if r.kind == "eager" for w in r.weight_layers]
    assert sorted(graph + eager) == sorted(_weight_layers(model))  # each weight layer reported in one region


@given(eager_tree_st())
def test_blocks_own_every_weight_layer_once(drawn):
    model, x = drawn
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=4))
    blocks = fxqat.find_blocks(qm, (x,))
    assert len(blocks) >= len(model.layers)
    owned = [w for b in blocks for w in _weight_layers(model) if w in b.modules]
    assert sorted(owned) == sorted(_weight_layers(model))


@given(eager_tree_st(max_depth=1))
def test_hybrid_paths_share_parameters_and_equal_lp_when_off(drawn):
    model, x = drawn
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(partner="shared")))
    qm.train()
    fxqat.set_quantization(qm, False)
    out = qm(x)
    for path in out.paths:
        assert torch.equal(path["logits"], out.lp["logits"])
    partner = qm.fxqat_hybrid_ctrl.partner
    lp_params = {id(p) for p in qm.parameters()}
    assert all(id(p) in lp_params for p in partner.parameters())
