"""fxqat.sensitivity: path / Fisher / Hessian estimates, determinism, the model left unchanged, known values."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.config import QuantSpec
from fxqat.mixed.quant_layers import quant_layers
from fxqat.quantizers import make_quantizer


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


class EagerNet(nn.Module):
    """Data-dependent forward: an eager root whose ModuleList is the block chain."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3)])
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x) if x.sum() > -1e9 else x
        return {"logits": self.head(x)}


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(n)]


def _prepare(model, hybrid=True, **cfg):
    x = torch.randn(2, 6)
    c = fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig() if hybrid else None, **cfg)
    return fxqat.prepare_qat(model, (x,), c)


def _state(qm):
    return {k: v.clone() for k, v in qm.state_dict().items()}


@pytest.mark.parametrize("method", ["paths", "fisher", "hessian"])
@pytest.mark.parametrize("make", [_mlp, EagerNet], ids=["graph_root", "eager_root"])
@pytest.mark.parametrize("calibrated", [False, True], ids=["fresh", "calibrated"])
def test_deterministic_and_model_unchanged(method, make, calibrated):
    torch.manual_seed(0)
    qm = _prepare(make(), per_channel=True).train()  # per-channel: initialisation changes the scales' shape
    if calibrated:
        fxqat.calibrate(qm, [torch.randn(8, 6)])
    inited = {n: q.is_initialized for n, q in fxqat.named_quantizers(qm).items()}
    assert all(inited.values()) == calibrated
    before, params = _state(qm), {n: p for n, p in qm.named_parameters()}
    modes = [m.training for m in qm.modules()]
    bits = {n: q.bits for n, q in fxqat.named_quantizers(qm).items()}
    t1 = fxqat.sensitivity(qm, _batches(), bits=(2, 4, 8), method=method, probes=2, seed=3)
    t2 = fxqat.sensitivity(qm, _batches(), bits=(2, 4, 8), method=method, probes=2, seed=3)
    assert [r.sensitivity for r in t1.rows] == [r.sensitivity for r in t2.rows]  # bit-exact: same ops, same order
    assert [r.spread for r in t1.rows] == [r.spread for r in t2.rows]
    after = qm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p is params[n] for n, p in qm.named_parameters())  # same Parameter objects (optimizers stay valid)
    assert [m.training for m in qm.modules()] == modes
    assert {n: q.bits for n, q in fxqat.named_quantizers(qm).items()} == bits
    assert {n: q.is_initialized for n, q in fxqat.named_quantizers(qm).items()} == inited
    allocatable = [r for r in t1.rows if r.weight_count]
    assert len(allocatable) == 3  # first and last layer: the first/last policy
    assert all(any(s != 0 for s in r.sensitivity) for r in allocatable)


def test_hybrid_step_counter_and_sampled_paths_are_restored():
    qm = fxqat.prepare_qat(_mlp(), (torch.randn(2, 6),),
                           fxqat.QATConfig(hybrid=fxqat.HybridConfig(paths=1, seed=5))).train()
    qm(torch.randn(4, 6))
    assert qm.step == 1
    t = fxqat.sensitivity(qm, _batches(2), bits=(2, 4))
    assert qm.step == 1 and int(qm.fxqat_step) == 1 and qm.fxqat_hybrid.paths == 1
    assert len(t.rows) == 5  # every path measured although training samples one per step
    assert len(qm(torch.randn(4, 6)).paths) == 1


@pytest.mark.parametrize("make", [_mlp, EagerNet], ids=["graph_root", "eager_root"])
def test_path_sensitivity_of_a_block_without_quantizers_is_zero(make):
    qm = _prepare(make()).train()
    blocks = {r.block: r for r in fxqat.sensitivity(qm, _batches(1), bits=(2,)).rows}
    target = [b for b, r in blocks.items() if r.weight_count][1]  # a middle block
    layers = quant_layers(qm)
    qs = fxqat.named_quantizers(qm)
    for name in blocks[target].modules:
        for q in layers[name].weights + layers[name].acts:
            qs[q].enable_fake_quant(False)
    t = fxqat.sensitivity(qm, _batches(), bits=(2, 3, 8))
    # Without quantizers LP block i computes the FP partner's block i on the same input and the same (copied) weights,
    # so L_i - L_{i-1} is a difference of equal losses. The LP graph calls F.linear where the partner calls the
    # nn.Linear module: the same kernel, so this is exact today; 1e-6 leaves room for a kernel that rounds otherwise.
    assert np.abs(t.row(target).sensitivity).max() <= 1e-6
    assert np.abs(t.row(target).spread).max() <= 1e-6
    others = [r for r in t.rows if r.block != target and r.weight_count]
    assert all(abs(r.sensitivity[0]) > 1e-6 for r in others)  # measurably non-zero (float32 loss differences)
    assert all(not qs[q].fake_quant_enabled[0] for q in layers[blocks[target].modules[0]].weights)  # left disabled


def test_path_sensitivities_telescope_to_the_lp_loss_increase():
    fp = _mlp()
    qm = _prepare(fp).train()
    data = _batches(2)
    t = fxqat.sensitivity(qm, data, bits=(2, 3))
    for k, b in enumerate(t.bits):
        lp = copy.deepcopy(qm).eval()
        layers = quant_layers(lp)
        for r in t.rows:
            for name in r.modules:
                for q in layers[name].weights + layers[name].acts:
                    lp.get_submodule(q).set_bits(b)
        diffs = []
        with torch.no_grad():
            for x, y in data:
                diffs.append(float(F.cross_entropy(lp(x), y)) - float(F.cross_entropy(fp(x), y)))
        # sum of consecutive path differences = L_LP - L_FP; float64 sums of the same float32 losses: 1e-6
        assert sum(r.sensitivity[k] for r in t.rows) == pytest.approx(np.mean(diffs), abs=1e-6)


def test_fisher_matches_a_direct_computation():
    fp = _mlp()
    qm = _prepare(fp)
    data = _batches(2)
    t = fxqat.sensitivity(qm, data, bits=(2, 4), method="fisher")
    for r in t.rows:
        if not r.weight_count:
            assert r.sensitivity == (0.0, 0.0)
            continue
        for k, b in enumerate(t.bits):
            per_batch = []
            for x, y in data:
                (name,) = r.modules
                w = fp.get_submodule(name).weight
                g, = torch.autograd.grad(F.cross_entropy(fp(x), y), [w])
                q = make_quantizer(QuantSpec(bits=b, kind="weight")).eval()  # the config's method: LSQ, per tensor
                with torch.no_grad():
                    d = q(w) - w
                per_batch.append(0.5 * float((g.pow(2) * d.pow(2)).sum()))
            # float32 sums in a different order: 1e-5 relative
            assert r.sensitivity[k] == pytest.approx(np.mean(per_batch), rel=1e-5)
            assert r.spread[k] == pytest.approx(np.std(per_batch, ddof=1), rel=1e-4, abs=1e-12)


def test_hessian_trace_agrees_with_the_exact_trace():
    torch.manual_seed(0)
    fp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                       nn.Linear(4, 2))
    qm = fxqat.prepare_qat(fp, (torch.randn(2, 3),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    t = fxqat.sensitivity(qm, [(x, y)], bits=(2,), method="hessian", probes=3000, seed=0)
    for r in t.rows:
        if not r.weight_count:
            continue
        (name,) = r.modules
        w = fp.get_submodule(name).weight

        def loss_of(v, name=name):
            return F.cross_entropy(torch.func.functional_call(fp, {f"{name}.weight": v}, (x,)), y)

        exact = torch.autograd.functional.hessian(loss_of, w.detach()).reshape(w.numel(), w.numel()).trace()
        q = make_quantizer(QuantSpec(bits=2, kind="weight")).eval()
        with torch.no_grad():
            norm2 = float((q(w) - w).pow(2).sum())
        expected = 0.5 * float(exact) / w.numel() * norm2
        # Hutchinson, 3000 Rademacher probes per block (fixed seed, so deterministic): the standard error, from the
        # off-diagonal entries of these 16x16 Hessian blocks, is 2.3% and 2.6% of the trace; 15% is > 5 sigma
        assert r.sensitivity[0] == pytest.approx(expected, rel=0.15)


def test_first_last_layers_are_fixed_unless_included():
    qm = _prepare(_mlp())
    t = fxqat.sensitivity(qm, _batches(1), bits=(2, 4), method="fisher")
    assert t.rows[0].modules == () and t.rows[0].fixed == ("0",) and t.rows[-1].fixed == ("8",)
    assert t.total_weight_count == 3 * 256
    t2 = fxqat.sensitivity(qm, _batches(1), bits=(2, 4), method="fisher", include_first_last=True)
    assert t2.rows[0].modules == ("0",) and t2.rows[0].fixed == () and t2.total_weight_count == 3 * 256 + 96 + 64


def test_errors_say_what_to_do():
    plain = _prepare(_mlp(), hybrid=False)
    with pytest.raises(ValueError, match="method='paths' needs a model prepared with block replacement"):
        fxqat.sensitivity(plain, _batches(1), blocks=fxqat.find_blocks(_mlp(), (torch.randn(2, 6),)))
    with pytest.raises(ValueError, match="carries no block partition"):
        fxqat.sensitivity(plain, _batches(1), method="fisher")
    t = fxqat.sensitivity(plain, _batches(1), method="fisher", blocks=fxqat.find_blocks(_mlp(), (torch.randn(2, 6),)))
    assert [r.modules for r in t.rows] == [(), ("2",), ("4",), ("6",), ()]
    hyb = _prepare(_mlp())
    with pytest.raises(ValueError, match="method='nope'"):
        fxqat.sensitivity(hyb, _batches(1), method="nope")
    with pytest.raises(ValueError, match="measures weights only"):
        fxqat.sensitivity(hyb, _batches(1), method="fisher", kinds=("weight", "act"))
    with pytest.raises(ValueError, match=r"each batch must be \(inputs, target\)"):
        fxqat.sensitivity(hyb, [torch.randn(2, 6)])
    single = fxqat.prepare_qat(_mlp(), (torch.randn(2, 6),), fxqat.QATConfig(hybrid=fxqat.HybridConfig(mode="single")))
    with pytest.raises(ValueError, match="mode='lp_prefix'"):
        fxqat.sensitivity(single, _batches(1))


def test_table_outputs(tmp_path):
    t = fxqat.sensitivity(_prepare(_mlp()), _batches(2), bits=(2, 8))
    assert fxqat.SensitivityTable.from_json(t.to_json()) == t
    md = t.to_markdown()
    assert md.splitlines()[0].startswith("| # | block | layers | weights | bytes@2 | bytes@8 | ΔL@2 | ΔL@8 |")
    assert "| 1 | 2 | 1 | 256 | 64 | 256 |" in md and "Fixed by the first/last policy" in md
    png = t.plot(tmp_path / "s.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
