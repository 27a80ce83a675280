"""Properties of parameter-following quantization on generated mixture-of-experts models (tests/strategies.py
``moe_st``): whatever way the experts are read (loop over ``w[e]``, ``bmm`` on ``w[ids]``, ``einsum``, batched
``matmul``) and however they are stored, every weight layer and weight parameter has exactly one weight quantizer,
the router is the one parameter left FP (with its reason), the quantizer's rows run along the reduction dim, and
quantization off reproduces the model exactly."""

import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import moe_st
from weight_coverage import check_one_quantizer_per_weight, weight_targets

import fxqat
from fxqat.capture.param_report import UnquantizedWeightWarning
from fxqat.passes.param_weights import from_rows, to_rows

SETTINGS = settings(max_examples=12, deadline=None)  # each example prepares a model (~1 s)


@SETTINGS
@given(moe_st(), st.integers(2, 8), st.sampled_from(("per_channel", "per_group")))
def test_one_quantizer_per_weight_parameter(drawn, bits, granularity):
    model, x = drawn
    cfg = fxqat.QATConfig(w_bits=bits, a_bits=None, first_last=8, w_granularity=granularity,
                          group_size=8 if granularity == "per_group" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedWeightWarning)
        qm = fxqat.prepare_qat(model, (x,), cfg)
    fp = check_one_quantizer_per_weight(model, qm)
    experts = {n for n, p in model.named_parameters() if p.dim() == 3}
    assert experts <= set(weight_targets(qm))
    assert set(fp) == {n for n, _ in model.named_parameters() if n.startswith("routers.")}
    assert all("router" in r for r in fp.values())
    qm(x)  # the first forward sizes the step sizes
    for name, q in fxqat.named_quantizers(qm).items():  # per-channel rows: one per (expert, output channel)
        if q.kind == "weight" and q.weight_target in experts and granularity == "per_channel":
            w = model.get_parameter(q.weight_target)
            n_out = w.shape[2] if model.experts[0].transposed else w.shape[1]
            assert q.scale.numel() == w.shape[0] * n_out, (name, tuple(q.scale.shape))
    fxqat.set_quantization(qm, False)
    assert torch.equal(qm(x), model(x))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_rows_round_trip(shape, data):
    """``from_rows(to_rows(w))`` is ``w`` bit for bit, and each row holds the reduced dims of one output index."""
    w = torch.randn(*shape)
    reduced = tuple(sorted(data.draw(st.sets(st.integers(0, len(shape) - 1), min_size=1))))
    rows = to_rows(w, reduced)
    n_red = 1
    for d in reduced:
        n_red *= shape[d]
    assert rows.shape == (w.numel() // n_red, n_red)
    assert torch.equal(from_rows(rows, w.shape, reduced), w)
    assert from_rows(rows, w.shape, reduced).is_contiguous()
