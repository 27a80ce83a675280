"""Property tests of prepare_qat over random residual/branching CNNs and MLPs (tests/strategies.py)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import any_model_st

import fxqat
from fxqat.quant_spec import granularity_support
from fxqat.trace import trace

# methods offered per-tensor for both weights and activations (dynamic is per-token only, gguf per-group weights only)
METHODS = [m for m, g in granularity_support().items() if set(g.get("per_tensor", ())) >= {"weight", "act"}]


@given(any_model_st())
def test_trace_preserves_outputs_bit_exactly_in_eval_and_train(pair):
    model, x = pair
    gm = trace(model)
    gm.graph.lint()
    assert torch.equal(gm.eval()(x), model.eval()(x))
    a, b = copy.deepcopy(model).train(), copy.deepcopy(gm).train()
    assert torch.equal(a(x), b(x))  # BN in batch-statistics mode on both


@given(any_model_st(), st.booleans())
def test_disabled_quantization_is_bit_identical(pair, per_channel):
    model, x = pair
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=3, per_channel=per_channel))
    qm.graph.lint()
    fxqat.set_quantization(qm, False)
    assert torch.equal(qm.eval()(x), model.eval()(x))


@pytest.mark.parametrize("method", METHODS)
@given(pair=any_model_st(max_blocks=3), bits=st.integers(2, 4))
@settings(max_examples=8)
def test_weight_fake_quant_outputs_lie_on_grid(method, pair, bits):
    model, x = pair
    cfg = fxqat.QATConfig(w_bits=bits, a_bits=bits, method=method, first_last=bits)
    qm = fxqat.prepare_qat(model, (x,), cfg)
    qm.train()(x)  # data-dependent initialisation
    qm.eval()
    for name, q in fxqat.named_quantizers(qm).items():
        if q.kind != "weight" or q.weight_target is None:
            continue
        w = qm.get_parameter(q.weight_target)
        y = q(w).detach()
        rows = y.transpose(0, q.ch_axis).reshape(y.shape[q.ch_axis], -1) if q.per_channel else y.reshape(1, -1)
        for r in rows:
            assert len(torch.unique(r)) <= 2**bits, (name, method)
        assert torch.equal(q(y), y) or method in {"dorefa", "pact", "qil", "ewgs", "dsq"}  # LSQ grids are fixed points


@given(any_model_st(), st.sampled_from(["lsq", "lsq_plus"]))
def test_activation_outputs_lie_on_affine_grid(pair, method):
    model, x = pair
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=3, method=method))
    qm.train()(x)
    qm.eval()
    seen = {}
    for name, q in fxqat.named_quantizers(qm).items():
        if q.kind == "act":
            q.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (m, a[0], o)))
    qm(x)
    assert seen
    for name, (q, inp, out) in seen.items():
        grid = q.grid()
        assert grid.dim() == 1 and len(grid) == 2**q.bits
        dist = (out.reshape(-1, 1) - grid.reshape(1, -1)).abs().min(dim=1).values
        assert dist.max() <= 1e-5 * max(1.0, float(grid.abs().max())), name  # float rounding of s·k + β only


@given(any_model_st())
def test_state_dict_round_trip(pair):
    model, x = pair
    cfg = fxqat.QATConfig(w_bits=2, a_bits=2)
    qm = fxqat.prepare_qat(model, (x,), cfg)
    qm.train()(x)
    with torch.no_grad():
        for q in fxqat.named_quantizers(qm).values():
            for p in q.parameters():
                p.mul_(1.25)  # state that a fresh initialisation would not reproduce
    fresh = fxqat.prepare_qat(model, (x,), cfg)
    fresh.load_state_dict(qm.state_dict())
    assert torch.equal(fresh.eval()(x), qm.eval()(x))
    assert torch.equal(fresh(x * 3), qm(x * 3))  # no re-initialisation on a new batch


@given(any_model_st(max_blocks=4))
@settings(max_examples=15)
def test_hybrid_paths_share_parameters_and_equal_lp_when_disabled(pair):
    model, x = pair
    blocks = fxqat.find_blocks(model, (x,))
    if len(blocks) < 2:
        with pytest.raises(ValueError, match="at least 2 blocks"):
            fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
        return
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(partner="shared")))
    ids = {id(p) for p in qm.parameters()}
    assert all({id(p) for p in v.parameters()} <= ids for v in qm._views.values())
    fxqat.set_quantization(qm, False)
    model = copy.deepcopy(model)
    for m in list(qm.modules()) + list(model.modules()):
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False  # batch statistics in both passes, nothing updated
    out = qm.train()(x)
    assert len(out.paths) == len(blocks) - 1
    for p in out.paths:
        assert torch.equal(p, out.lp)
