"""prepare_qat / convert / calibrate behaviour and errors for bad input (the user's model is never modified)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


X = torch.randn(2, 3, 8, 8)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items()) and set(snap) == set(model.state_dict())


@pytest.mark.parametrize(
    "call, exc, msg",
    [
        (lambda m: fxqat.prepare_qat(m, (X,), fxqat.QATConfig(w_bits=0)), ValueError, "w_bits=0 is out of range"),
        (lambda m: fxqat.prepare_qat(m, (X,), fxqat.QATConfig(a_bits=17)), ValueError, "a_bits=17 is out of range"),
        (lambda m: fxqat.prepare_qat(m, (X,), fxqat.QATConfig(method="lqs")), ValueError, "choose one of"),
        (lambda m: fxqat.prepare_qat("resnet", (X,)), TypeError, "expects a torch.nn.Module"),
        (lambda m: fxqat.prepare_qat(m, (torch.randn(2, 5, 8, 8),)), ValueError,
         r"(?s)example_inputs \(Tensor\(2, 5, 8, 8\)\) do not fit Sequential: module '0' \(Conv2d\) failed with "
         r"RuntimeError: .*3 channels.*shaped like one real batch"),
        (lambda m: fxqat.prepare_qat(m, (X, X)), ValueError, "do not fit Sequential"),
        (lambda m: fxqat.prepare_qat(m, [X], {"w_bits": 4}), TypeError, "fxqat.QATConfig"),
        (lambda m: fxqat.prepare_qat(m, X.numpy()), TypeError, "tuple of the model's positional inputs"),
    ],
)
def test_bad_input_raises_clear_error_and_leaves_model_untouched(call, exc, msg):
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(exc, match=msg):
        call(model)
    assert _unchanged(model, snap)


def test_prepare_works_on_a_copy_and_training_does_not_touch_the_original():
    model = _net()
    snap = _snapshot(model)
    qm = fxqat.prepare_qat(model, (X,))
    opt = torch.optim.SGD(qm.parameters(), lr=0.1)
    qm.train()
    qm(X).sum().backward()
    opt.step()
    assert _unchanged(model, snap)
    assert not any(a is b for a, b in zip(qm.parameters(), model.parameters()))


def test_inplace_shares_parameters():
    model = _net()
    qm = fxqat.prepare_qat(model, (X,), inplace=True)
    assert {id(p) for p in model.parameters()} <= {id(p) for p in qm.parameters()}


def test_one_activation_quantizer_per_tensor_shared_by_consumers():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.stem(x))
            return self.out(self.a(h) + self.b(h))

    qm = fxqat.prepare_qat(TwoHeads(), (torch.randn(2, 4),), fxqat.QATConfig(first_last=None))
    acts = [n for n in qm.graph.nodes if n.op == "call_module" and n.target.startswith("fxqat_quant.a_")]
    users = {n.target: sorted(u.meta["fxqat.module"] for u in n.users) for n in acts}
    assert users["fxqat_quant.a_relu"] == ["a", "b"]
    assert not qm.get_submodule("fxqat_quant.a_relu").signed  # after ReLU: unsigned
    # first (stem) and last (out) layers stay FP with first_last=None
    assert set(fxqat.named_quantizers(qm)) == {"fxqat_quant.a_relu", "fxqat_quant.w_a", "fxqat_quant.w_b"}


def test_first_last_policy_and_overrides():
    model = _net()
    qm = fxqat.prepare_qat(model, (X,), fxqat.QATConfig(w_bits=4, first_last=8))
    bits = {q.weight_target: q.bits for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"}
    assert bits == {"0.weight": 8, "3.weight": 4, "7.weight": 8}
    qm = fxqat.prepare_qat(model, (X,), fxqat.QATConfig(w_bits=4, first_last=None))
    assert {q.weight_target for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"} == {"3.weight"}
    cfg = fxqat.QATConfig(w_bits=4, overrides=(fxqat.Override("3", w_bits=2, a_bits=3), fxqat.Override(nn.Linear, skip=True)))
    qm = fxqat.prepare_qat(model, (X,), cfg)
    qs = fxqat.named_quantizers(qm)
    assert {q.weight_target: q.bits for q in qs.values() if q.kind == "weight"} == {"0.weight": 8, "3.weight": 2}
    assert qs["fxqat_quant.a__2"].bits == 3


def test_functional_linear_and_multihead_attention_weights_are_quantized():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(8, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.proj = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            h = self.mha(h, h, h, need_weights=False)[0]
            h = F.linear(h, self.proj.weight, self.proj.bias)
            return self.head(h.mean(1))

    x = torch.randn(2, 5, 8)
    m = Attn().eval()
    qm = fxqat.prepare_qat(m, (x,), fxqat.QATConfig(w_bits=4))
    targets = {q.weight_target for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"}
    assert targets == {"inp.weight", "mha.in_proj_weight", "mha.out_proj.weight", "proj.weight", "head.weight"}
    fxqat.set_quantization(qm, False)
    assert torch.equal(qm.eval()(x), m(x))
    fxqat.set_quantization(qm, True)
    assert not torch.equal(qm(x), m(x))


def test_convert_prequantizes_weights_and_matches_eval_output():
    model = _net()
    qm = fxqat.prepare_qat(model, (X,), fxqat.QATConfig(w_bits=3, a_bits=3))
    qm.train()(X)
    qm.eval()
    lp = fxqat.convert(qm)
    assert torch.equal(lp(X), qm(X))
    assert not any(p.requires_grad for p in lp.parameters())
    weight_nodes = [n for n in lp.graph.nodes if n.op == "call_module" and "w_" in n.target]
    assert weight_nodes == []  # no weight quantizer runs at inference: the weights are pre-quantized buffers
    assert set(lp.state_dict()) == set(qm.state_dict())
    # loading another state refreshes the pre-quantized weights
    qm2 = copy.deepcopy(qm)
    with torch.no_grad():
        qm2.get_parameter("3.weight").mul_(-1)
    lp.load_state_dict(qm2.state_dict())
    assert torch.equal(lp(X), qm2.eval()(X))


def test_calibrate_initialises_without_touching_bn_statistics():
    model = _net()
    qm = fxqat.prepare_qat(model, (X,))
    bn = qm.get_submodule("1")
    before = bn.running_mean.clone()
    fxqat.calibrate(qm, [X])
    assert all(q.is_initialized for q in fxqat.named_quantizers(qm).values())
    assert torch.equal(bn.running_mean, before)
    assert qm.training == model.training


class _Keywords(nn.Module):
    """A model called with keyword inputs only (as Hugging Face models are by transformers.Trainer)."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, *, pixel_values, scale=1.0):
        return self.net(pixel_values) * scale


def test_calibrate_accepts_keyword_batches():
    # a dict batch is passed as keyword inputs: the same initialisation as the positional call on the same tensor
    # (eval mode: the capture's recording call of the keyword model would otherwise update BatchNorm statistics)
    positional = fxqat.prepare_qat(_net().eval(), (X,))
    fxqat.calibrate(positional, [X])
    wrapped = _Keywords().eval()
    qm = fxqat.prepare_qat(wrapped, (), example_kwargs={"pixel_values": X})
    fxqat.calibrate(qm, [{"pixel_values": X, "scale": 2.0}])
    assert all(q.is_initialized for q in fxqat.named_quantizers(qm).values())
    # the child is a graph region of its own (the root takes keywords only): same quantizers in the same order
    scales = [(q.kind, q.scale) for q in fxqat.named_quantizers(qm).values()]
    ref = [(q.kind, q.scale) for q in fxqat.named_quantizers(positional).values()]
    assert len(scales) == len(ref) == 6
    assert all(k == kr and torch.equal(s, sr) for (k, s), (kr, sr) in zip(scales, ref))  # atol=0: same maths, same x


def test_quantizers_is_the_package_and_the_old_call_warns_once():
    import warnings

    import fxqat.quantizers.ewgs as ewgs  # the documented path imports (the function no longer shadows the package)

    assert callable(ewgs.refresh_ewgs_delta)
    qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), fxqat.QATConfig(w_bits=4, a_bits=4))
    type(fxqat.quantizers)._warned = False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        old = fxqat.quantizers(qm)
        again = fxqat.quantizers(qm)
    assert [w.category for w in seen] == [DeprecationWarning]
    assert "named_quantizers" in str(seen[0].message)
    assert old == again == fxqat.named_quantizers(qm) and len(old) >= 2
