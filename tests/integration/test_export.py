"""Export to torch.ao, torchao PT2E and ONNX QDQ (issue #6): parity with fxqat's eval-mode fake-quant model.

Tolerances. A deployed model quantizes with the runtime's own kernels: torch's ``quantize_per_tensor`` and
``fake_quantize_*`` compute ``round(x · (1/s))``, fxqat's quantizers ``round(x / s)``; the two differ only when
``x/s`` lies within an ulp of a half-integer (about 1 element in 10^6 in ResNet-20's activations), and different
conv/GEMM kernels reassociate float sums (~1e-6 relative). On small models with random inputs no element sits on a
tie, so the fast tests use ``atol = 1e-4 · max|y|``-style bounds; the CIFAR-10 parity test uses the issue's
criterion (one quantization step of the logits, see ``_logit_step``) plus top-1 agreement.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.export import ExportError, quant_points, to_onnx, to_pt2e, to_qconfig_mapping, to_torch_ao

try:
    import onnx
    import onnxruntime as ort
except ImportError:  # CI installs only .[dev]; the torch.ao path needs nothing more
    onnx = ort = None
try:
    import torchao
except ImportError:
    torchao = None

_HOW = "not installed: pip install -e '.[export]'"
needs_onnx = pytest.mark.skipif(onnx is None, reason=f"onnx/onnxruntime {_HOW}")
needs_torchao = pytest.mark.skipif(torchao is None, reason=f"torchao {_HOW}")

pytestmark = pytest.mark.filterwarnings("ignore")

PATHS = ["torch_ao", pytest.param("pt2e", marks=needs_torchao), pytest.param("onnx", marks=needs_onnx)]
AVAILABLE = ["torch_ao"] + ["pt2e"] * (torchao is not None) + ["onnx"] * (onnx is not None)  # for loops


def _run(path: str, qm, example, x, tmp_path):
    """Export ``qm`` through ``path`` and run the deployed model on ``x`` (a float tensor out)."""
    if path == "torch_ao":
        with torch.no_grad():
            return to_torch_ao(qm, example)(x)
    if path == "pt2e":
        with torch.no_grad():
            return to_pt2e(qm, example)(x)
    file = to_onnx(qm, example, tmp_path / "model.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # deterministic float sums
    sess = ort.InferenceSession(file, opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input_0": x.numpy()})[0])


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def _trained(model, x, cfg, steps=3):
    """A prepared model after a few SGD steps (scales and BN statistics moved away from their initial values)."""
    torch.manual_seed(0)
    qm = fxqat.prepare_qat(model, (x[:4],), cfg)
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.01)
    qm.train()
    for _ in range(steps):
        loss = qm(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qm.eval()


# ------------------------------------------------------------------------------------------------ small models
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bits, per_channel", [(8, False), (4, True), (2, False)])
def test_small_cnn_matches_fake_quant(path, bits, per_channel, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=bits, a_bits=bits, per_channel=per_channel, first_last=None))
    with torch.no_grad():
        ref = qm(x)
    out = _run(path, qm, (x[:4],), x, tmp_path)
    # float-kernel differences only (no element of these random inputs sits on a rounding tie)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@needs_onnx
def test_onnx_has_one_qdq_pair_per_quantizer_and_a_clip_per_narrow_activation(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_bits=4, per_channel=True))  # first/last layer at 8 bits
    points = quant_points(qm)
    file = to_onnx(qm, (x[:4],), tmp_path / "m.onnx")
    model = onnx.load(file)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == ops.count("DequantizeLinear") == len(points)
    narrow = [p for p in points.values() if p.kind == "act" and p.params.narrow]
    assert len(narrow) == 2 and ops.count("Clip") == len(narrow)  # the two 4-bit activations; 8-bit ones need none
    # the learned scales are in the file, exactly (float32)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = model.graph.node
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    values = {**inits, **consts}
    q_scales = sorted(float(values[n.input[1]].reshape(-1)[0]) for n in nodes if n.op_type == "QuantizeLinear")
    expected = sorted(float(p.params.scale[0]) for p in points.values())
    assert q_scales == expected


@needs_torchao
def test_pt2e_graph_clips_to_the_real_bit_width():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=3, a_bits=3, first_last=None))
    pm = to_pt2e(qm, (x[:4],))
    q_nodes = [n for n in pm.graph.nodes if n.op == "call_function" and "quantize_per_tensor" in str(n.target)
               and "dequantize" not in str(n.target)]
    ranges = {(n.args[3], n.args[4]) for n in q_nodes}
    n_act = sum(p.kind == "act" for p in quant_points(qm).values())
    assert ranges == {(0, 7)} and len(q_nodes) == n_act == 2  # one quantize per (post-ReLU) activation quantizer
    assert not any("fxqat.qpoint" in str(n.target) for n in pm.graph.nodes)


def test_torch_ao_reference_model_uses_reference_modules_and_learned_scales():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_bits=4, per_channel=True, first_last=None))
    ref = to_torch_ao(qm, (x[:4],))
    import torch.ao.nn.quantized.reference as nnqr

    convs = {n: m for n, m in ref.named_modules() if isinstance(m, (nnqr.Conv2d, nnqr.Linear))}
    assert sorted(convs) == ["3", "7"]  # first/last layer kept in FP by first_last=None
    learned = fxqat.named_quantizers(qm)["fxqat_quant.w_3"].scale.detach().abs()
    assert torch.equal(convs["3"].weight_scale, learned)
    assert torch.equal(convs["3"].weight_zero_point, torch.zeros_like(learned, dtype=torch.int32))
    # BN is not folded (fxqat quantizes the conv's own weight)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules()) == 2


def test_hybrid_model_exports_its_lp_path(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig())
    qm = fxqat.prepare_qat(_cnn(), (x[:4],), cfg)
    qm.train()(x)
    qm.eval()
    with torch.no_grad():
        ref = qm(x)
    for path in AVAILABLE:
        out = _run(path, qm, (x[:4],), x, tmp_path)
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), path


# ------------------------------------------------------------------------------------------------ torch.ao inward
def test_fxqat_quantizers_inside_a_torch_ao_qconfig_mapping():
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_qat_fx

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    mapping = to_qconfig_mapping(fxqat.QATConfig(w_bits=8, a_bits=8, method="lsq"))
    pm = prepare_qat_fx(_cnn().train(), mapping, (x,))
    fqs = [m for m in pm.modules() if isinstance(m, fxqat.Quantizer)]
    assert {type(m).__name__ for m in fqs} == {"LSQQuantizer"}
    assert {m.kind for m in fqs} == {"weight", "act"}
    opt = torch.optim.SGD(pm.parameters(), lr=0.01)
    for _ in range(2):
        loss = pm(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m.scale.grad is not None for m in fqs)  # LSQ step sizes train inside torch.ao's flow
    pm.eval()
    with torch.no_grad():
        ref = pm(x)
        out = convert_to_reference_fx(pm)(x)
    # 8 bits: the same grid as the carrier, so torch.ao's reference ops reproduce the fake-quant model
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_to_qconfig_mapping_overrides():
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, overrides=(fxqat.Override(nn.Linear, skip=True),
                                                          fxqat.Override("0", w_bits=8, method="pact")))
    with pytest.raises(ValueError, match=r"pass the model"):
        to_qconfig_mapping(cfg)
    model = _cnn()
    m = to_qconfig_mapping(cfg, model=model)
    assert m.object_type_qconfigs[nn.Linear] is None
    qc = m.module_name_qconfigs["0"]
    assert qc.weight().bits == 8 and qc.weight().method == "pact" and qc.activation().bits == 4
    assert m.global_qconfig.weight().bits == 4 and m.global_qconfig.activation().dtype == torch.quint8


# ------------------------------------------------------------------------------------------------ errors
class _Leafy(nn.Module):
    """A user module applying an fxqat quantizer inside its own forward, traced as a leaf."""

    def __init__(self):
        super().__init__()
        self.q = fxqat.named_quantizers(fxqat.prepare_qat(nn.Sequential(nn.Linear(8, 8)), (torch.randn(2, 8),)))[
            "fxqat_quant.a_input_1"]

    def forward(self, x):
        return self.q(x) * 2


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("path", PATHS)
def test_opaque_leaf_with_quantized_weights_fails_naming_the_module(path, tmp_path):
    x = torch.randn(2, 5, 8)
    qm = fxqat.prepare_qat(_Attn(), (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    qm.train()(x)
    with pytest.raises(ExportError, match=r"module 'mha' \(MultiheadAttention\).*Override\('mha', skip=True\)"):
        _run(path, qm.eval(), (x,), x, tmp_path)


@pytest.mark.parametrize("path", PATHS)
def test_leaf_module_with_a_quantizer_inside_fails_naming_the_module(path, tmp_path):
    x = torch.randn(2, 8)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), _Leafy(), nn.Linear(8, 2))
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(leaf_modules=(_Leafy,)))
    qm.train()(x)
    with pytest.raises(ExportError, match=r"module '2' \(_Leafy\) is a leaf module with quantizer\(s\) inside"):
        _run(path, qm.eval(), (x,), x, tmp_path)


def test_non_affine_quantizer_fails_naming_quantizer_and_reason():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_bits=4, method="dorefa", first_last=None), steps=1)
    with pytest.raises(ExportError, match=r"quantizer 'fxqat_quant.w_3' \(DoReFaQuantizer.*layer '3'.*tanh"):
        to_torch_ao(qm, (x,))
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_method="lsq", w_method="dsq", first_last=None), steps=1)
    with pytest.raises(ExportError, match=r"quantizer 'fxqat_quant.w_3' \(DSQQuantizer.*no integer zero point"):
        quant_points(qm)
    qm = fxqat.prepare_qat(_cnn(), (x[:4],), fxqat.QATConfig(w_bits=4, a_bits=4, method="qil", first_last=None))
    qm.train()(x)
    act = next(q for q in fxqat.named_quantizers(qm).values() if q.kind == "act")
    with torch.no_grad():
        act.c.mul_(1.2)  # a pruning band (c > d) shifts the activation grid off the integers
    with pytest.raises(ExportError, match=r"QILQuantizer, 4-bit act.*c = d"):
        quant_points(qm)


def test_qil_weights_with_gamma_export_their_output_grid(tmp_path):
    """Weights are constants: QIL's non-linear transformer (γ ≠ 1) still lands on the uniform grid k·o/n."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = fxqat.prepare_qat(_cnn(), (x[:4],), fxqat.QATConfig(w_bits=4, a_bits=4, method="qil", first_last=None))
    qm.train()(x)
    w = [q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]
    with torch.no_grad():
        w[0].gamma.fill_(1.5)
        w[1].c.mul_(1.3)
    with pytest.raises(Exception, match=r"γ=\[1.5\]"):
        w[0].affine_qparams()
    qm.eval()
    assert w[0].weight_target == "3.weight"
    p = next(pt.params for pt in quant_points(qm).values() if pt.source == "3.weight")
    assert (p.qmin, p.qmax) == (-7, 7) and bool((p.zero_point == 0).all())
    with torch.no_grad():
        ref = qm(x)
    for path in AVAILABLE:
        out = _run(path, qm, (x[:4],), x, tmp_path)
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), path


METHOD_CONFIGS = {
    # QIL starts at c = d (affine); noise tempering's noise is off in eval mode; DSQ's soft forward is training-only
    "qil": dict(method="qil"),
    "noise_temper": dict(method="noise_temper"),
    "lsq+dsq": dict(w_method="lsq", a_method="dsq"),
    "lsq+pact": dict(w_method="lsq", a_method="pact"),
    "lsq+lsq_plus": dict(w_method="lsq", a_method="lsq_plus", a_options={"offset_on_grid": True}),
    "lsq+ewgs": dict(w_method="lsq", a_method="ewgs"),
    "lsq+int4 gradients": dict(method="lsq", g_bits=4),  # gradient quantizers are the identity in the forward pass
}
# learned activation offsets that are not a multiple of the step: exported as x - offset -> Q/DQ -> + offset
OFFSET_CONFIGS = {
    "lsq+lsq_plus": dict(w_method="lsq", a_method="lsq_plus"),
    "lsq+dsq": dict(w_method="lsq", a_method="dsq"),
    "lsq+ewgs": dict(w_method="lsq", a_method="ewgs"),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_other_methods_export_their_eval_mode_equivalent(name, path, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, first_last=None, **METHOD_CONFIGS[name])
    qm = fxqat.prepare_qat(_cnn(), (x[:4],), cfg)
    qm.train()(x)  # initialise
    qm.eval()
    with torch.no_grad():
        ref = qm(x)
    out = _run(path, qm, (x[:4],), x, tmp_path)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(OFFSET_CONFIGS))
def test_learned_activation_offsets_export_with_a_float_shift(name, path, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_bits=4, first_last=None, **OFFSET_CONFIGS[name]), steps=2)
    if name == "lsq+lsq_plus":  # post-ReLU inputs start at β = 0 and two steps barely move it: move it
        with torch.no_grad():
            for q in fxqat.named_quantizers(qm).values():
                if q.kind == "act":
                    q.offset.copy_(-0.37 * q.scale)
    acts = [p for p in quant_points(qm).values() if p.kind == "act"]
    assert any(p.params.offset != 0.0 for p in acts)  # trained lower bounds left the integer grid
    with torch.no_grad():
        ref = qm(x)
    out = _run(path, qm, (x[:4],), x, tmp_path)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_more_than_8_bits_and_uninitialised_quantizers_are_refused():
    x = torch.randn(4, 3, 8, 8)
    qm = fxqat.prepare_qat(_cnn(), (x,), fxqat.QATConfig(w_bits=10, a_bits=8, first_last=None))
    with pytest.raises(ExportError, match=r"uninit|never initialised"):
        quant_points(qm)
    qm.eval()(x)
    with pytest.raises(ExportError, match=r"quantizer 'fxqat_quant.w_3'.*1024 levels.*<= 8 bits"):
        quant_points(qm)


def test_export_does_not_modify_the_model(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    qm = _trained(_cnn(), x, fxqat.QATConfig(w_bits=4, a_bits=4))
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    for path in AVAILABLE:
        _run(path, qm, (x,), x, tmp_path)
    after = qm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ torchvision
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])  # ~9 s each on one CPU thread
def test_torchvision_round_trip(name, tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    x = torch.randn(8, 3, 32, 32)
    qm = _trained(model, x, fxqat.QATConfig(w_bits=4, a_bits=4, per_channel=True), steps=2)
    with torch.no_grad():
        ref = qm(x)
    for path in AVAILABLE:
        out = _run(path, qm, (x[:2],), x, tmp_path)
        # float-kernel differences of a deep 4-bit network: 1e-3 of the logits' magnitude
        tol = 1e-3 * max(1.0, ref.abs().max().item())
        print(f"{name} {path}: max|Δ| {(out - ref).abs().max().item():.2e} (tolerance {tol:.2e})")
        assert (out - ref).abs().max().item() <= tol, (path, (out - ref).abs().max().item())


# ------------------------------------------------------------------------------------------------ CIFAR-10 parity
def _logit_step(logits: torch.Tensor, bits: int) -> float:
    """One quantization step of the logits: their range over the test images on a ``bits``-bit grid (the
    activation bit-width of the model: 8 for W8A8, 4 for W4A4)."""
    return (logits.max() - logits.min()).item() / (2**bits - 1)


@pytest.fixture(scope="module")
def cifar():
    from fxqat import data as fdata

    if not fdata.data_available("cifar10"):
        pytest.skip("CIFAR-10 not found (see ../shared/data/README.md or set $FXQAT_DATA)")
    tr = fdata.load("cifar10", train=True)
    te = fdata.load("cifar10", train=False).subset(500)
    x_test = torch.cat([x for x, _ in fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)])
    return tr, x_test


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_resnet20_cifar10_parity(cifar, bits, tmp_path):
    from fxqat import data as fdata
    from fxqat.models import get_model

    tr, x_test = cifar
    torch.manual_seed(0)
    net = get_model("resnet20", num_classes=10, in_shape=tr.input_shape)
    qm = fxqat.prepare_qat(net, (x_test[:8],), fxqat.QATConfig(w_bits=bits, a_bits=bits, method="lsq"))
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.05, momentum=0.9)
    qm.train()
    for i, (x, y) in enumerate(fdata.BatchLoader(tr, 64, train=True, seed=0, rank=0, world_size=1)):
        loss = F.cross_entropy(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i == 39:  # "trained briefly": 40 steps of LSQ QAT from the random initialisation
            break
    qm.eval()
    with torch.no_grad():
        ref = qm(x_test)
    step = _logit_step(ref, bits)
    for path in AVAILABLE:
        out = _run(path, qm, (x_test[:8],), x_test, tmp_path)
        diff = (out - ref).abs().max().item()
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        exact = ((out - ref).abs() <= 1e-4).float().mean().item()
        print(f"W{bits}A{bits} {path}: max|Δ| {diff:.4f} (step {step:.4f}), top-1 agreement {agree:.3f}, "
              f"logits within 1e-4: {exact:.4f}")
        # at most two output steps: an activation within an ulp of a rounding boundary can round the other way in
        # the exported kernel (x/s vs x*(1/s)), which moves the next layer's input by one step and the logit by up
        # to one more (measured at W8A8: 1.05 steps on torch_ao)
        assert math.isfinite(diff) and diff <= 2 * step, (path, diff, step)
        assert agree >= 0.99, (path, agree)


@pytest.mark.parametrize("module", ["fxqat.export", "fxqat.export.affine", "fxqat.export.torch_ao",
                                    pytest.param("fxqat.export.pt2e", marks=needs_torchao),
                                    pytest.param("fxqat.export.onnx", marks=needs_onnx)])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    failures, tried = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
