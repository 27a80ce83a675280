"""Transition-rate scheduling (fxqat.optim / fxqat.training.optim; methods.md §4)."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
import fxqat.optim
from fxqat import data
from fxqat.models import get_model
from fxqat.optim import SGDT, AdamT, AdamWT, TransitionRateScheduler, transition_codes

MNIST = data.data_available("mnist")
needs_mnist = pytest.mark.skipif(not MNIST, reason="MNIST (mnist.npz) not found in ../shared/data or $FXQAT_DATA")


def _mlp_qm(seed=0, method="lsq", g_bits=None, in_shape=(1, 6, 6), first_last=4):
    torch.manual_seed(seed)
    model = get_model("mlp", in_shape=in_shape, hidden=(32, 16))
    x = torch.randn(8, *in_shape)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, method=method, g_bits=g_bits, first_last=first_last)
    qm = fxqat.prepare_qat(model, (x,), cfg)
    qm.train()
    qm(x)  # initialise the quantizers
    return qm


def _batches(n, seed=0, in_shape=(1, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *in_shape, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _train(qm, opt, batches):
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(qm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _freeze_weight_scales(qm):
    for q in fxqat.named_quantizers(qm).values():
        if q.kind == "weight":
            for p in q.parameters():
                p.requires_grad_(False)


# --------------------------------------------------------------------------------------------- the update
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-4),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.05),
], ids=["sgd_momentum_wd", "sgd_nesterov", "adam", "adamw"])
def test_constant_talr_equals_the_wrapped_optimizer_at_lr_u(make):
    # with η = 0 the TALR stays U_0 = lr, so SGDT/AdamT/AdamWT must reproduce the plain optimizer bit for bit
    # (with the weight-quantizer scales frozen in both, as TR scheduling freezes them)
    a, b = _mlp_qm(), _mlp_qm()
    _freeze_weight_scales(b)
    talr = TransitionRateScheduler(make(a.parameters()), a, total_steps=10, eta=0.0)
    plain = make(b.parameters())
    batches = _batches(6)
    la, lb = _train(a, talr, batches), _train(b, plain, batches)
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_sgd_update_is_talr_times_the_momentum_buffer():
    qm = _mlp_qm()
    opt = SGDT(qm, total_steps=20, lr=0.05, momentum=0.9, weight_decay=1e-4)
    for x, y in _batches(8):
        u = opt.talr()
        old = {l.name: l.param.detach().clone() for l in opt.layers}
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        for l in opt.layers:
            d = opt.state[l.param]["momentum_buffer"]
            assert torch.equal(l.param.detach(), old[l.name].add(d, alpha=-u[l.name]))  # w ← w − U·d, bit for bit
    assert len(set(opt.talr().values())) > 1  # U moved, per layer


def test_adam_update_is_talr_times_the_adam_direction():
    qm = _mlp_qm()
    opt = AdamT(qm, total_steps=20, lr=1e-3)
    beta1, beta2 = 0.9, 0.999
    for x, y in _batches(6):
        u = opt.talr()
        old = {l.name: l.param.detach().clone() for l in opt.layers}
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        for l in opt.layers:
            st = opt.state[l.param]
            t = float(st["step"])
            d = (st["exp_avg"] / (1 - beta1**t)) / ((st["exp_avg_sq"] / (1 - beta2**t)).sqrt() + 1e-8)
            # tolerance: torch orders the bias corrections differently (float32 rounding, ~1e-7 relative)
            torch.testing.assert_close(l.param.detach(), old[l.name] - u[l.name] * d, atol=1e-7, rtol=1e-6)


def test_non_quantized_parameters_keep_the_normal_lr():
    a, b = _mlp_qm(), _mlp_qm()
    _freeze_weight_scales(b)
    opt_a = TransitionRateScheduler(torch.optim.SGD(a.parameters(), lr=0.05), a, total_steps=10, u0=0.2, eta=0.0)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    batches = _batches(1)
    _train(a, opt_a, batches), _train(b, opt_b, batches)
    talr_ids = {id(l.param) for l in opt_a.layers}
    same = diff = 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if id(p) in talr_ids:
            diff += not torch.equal(p, q)  # moved by U = 0.2 instead of lr = 0.05
        else:
            assert torch.equal(p, q), n  # BN, biases, activation scales: the plain lr update
            same += 1
    assert diff == len(opt_a.layers) and same > 0


def test_weight_scales_are_frozen_and_activation_scales_learn():
    qm = _mlp_qm()
    qs = fxqat.named_quantizers(qm)
    before = {n: q.scale.detach().clone() for n, q in qs.items()}
    opt = SGDT(qm, total_steps=10, lr=0.05)
    _train(qm, opt, _batches(3))
    for n, q in qs.items():
        if q.kind == "weight":
            assert not q.scale.requires_grad and torch.equal(q.scale, before[n])
        else:
            assert q.scale.requires_grad and not torch.equal(q.scale, before[n])


def test_measured_rate_counts_level_changes():
    qm = _mlp_qm()
    opt = SGDT(qm, total_steps=10, lr=0.5)
    for x, y in _batches(3):
        old = {l.name: l.quantizer.integer_repr(l.param.detach()) for l in opt.layers}
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        for l in opt.layers:
            new = l.quantizer.integer_repr(l.param.detach())
            assert opt.rates()[l.name] == (new != old[l.name]).sum().item() / new.numel()
    assert any(r > 0 for r in opt.rates().values())


def test_non_affine_quantizers_use_eval_mode_codes():
    qm = _mlp_qm(method="dsq")  # DSQ is tanh-shaped (not affine) in training mode
    opt = SGDT(qm, total_steps=10, lr=0.5)
    l = opt.layers[0]
    with pytest.raises(fxqat.NotAffineError):
        l.quantizer.integer_repr(l.param)
    old = transition_codes(l.quantizer, l.param)
    assert l.quantizer.training  # the mode is restored
    _train(qm, opt, _batches(1))
    new = transition_codes(l.quantizer, l.param)
    assert opt.rates()[l.name] == (new != old).sum().item() / new.numel()
    assert 0 < opt.rates()[l.name] < 1


# --------------------------------------------------------------------------------------------- schedule, U
def test_target_schedules():
    qm = _mlp_qm()
    opt = SGDT(qm, total_steps=100, lr=0.01, lam=5e-3)
    name = opt.layers[0].name
    r0 = 5e-3 * math.sqrt(4)
    assert opt.target(0, name) == pytest.approx(r0, rel=1e-12)
    assert opt.target(50, name) == pytest.approx(r0 / 2, rel=1e-12)
    assert opt.target(100, name) == pytest.approx(0.0, abs=1e-15)
    assert opt.target(500, name) == pytest.approx(0.0, abs=1e-15)  # stays at the end value
    step = SGDT(_mlp_qm(), total_steps=100, lr=0.01, schedule="step", milestones=(0.5, 0.75), decay=0.1)
    assert [step.target(t, name) for t in (0, 49, 50, 74, 75)] == pytest.approx([r0, r0, r0 / 10, r0 / 10, r0 / 100])
    assert SGDT(_mlp_qm(), total_steps=10, lr=0.01, target=0.02).target(7, name) == 0.02
    assert SGDT(_mlp_qm(), total_steps=10, lr=0.01, target=lambda t: 1e-3 * t).target(7, name) == pytest.approx(7e-3)
    with pytest.raises(ValueError, match="schedule"):
        SGDT(_mlp_qm(), total_steps=10, schedule="linear")


def test_talr_never_negative():
    # a zero target drives U down; the max(0, ·) clamp holds it at exactly 0 and the weights stop moving
    qm = _mlp_qm()
    opt = SGDT(qm, total_steps=50, lr=0.5, target=0.0, eta=5.0)
    us = []
    for x, y in _batches(30):
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        us.extend(opt.talr().values())
    assert min(us) == 0.0 and all(u >= 0.0 for u in us)
    w = {l.name: l.param.detach().clone() for l in opt.layers}
    _train(qm, opt, _batches(2, seed=1))
    assert all(torch.equal(l.param, w[l.name]) for l in opt.layers if opt.talr()[l.name] == 0.0)


def test_lr_schedulers_still_drive_the_other_groups():
    qm = _mlp_qm()
    opt = SGDT(qm, total_steps=10, lr=0.1, eta=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    for x, y in _batches(3):
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        opt.step()
        sched.step()
    plain = [g["lr"] for g in opt.param_groups if "fxqat_talr" not in g]
    assert plain and all(lr == pytest.approx(0.1 / 8) for lr in plain)
    assert set(opt.talr().values()) == {0.1}  # U is the TALR's own, not the LR scheduler's


def test_errors_name_the_problem():
    qm = _mlp_qm()
    params = [p for n, p in qm.named_parameters() if "net.1.weight" not in n]
    with pytest.raises(ValueError, match="not in the optimizer"):
        TransitionRateScheduler(torch.optim.SGD(params, lr=0.1), qm, total_steps=10)
    opt = SGDT(qm, total_steps=10)
    with pytest.raises(ValueError, match="do not match"):
        opt.load_state_dict({"step": 0, "layers": {"nope": {}}})


def test_factories():
    for make in (SGDT, AdamT, AdamWT):
        opt = make(_mlp_qm(), total_steps=10)
        assert isinstance(opt, TransitionRateScheduler) and len(opt.layers) == 3
    assert fxqat.optim.SGDT is SGDT


# --------------------------------------------------------------------------------------------- real data
def _mnist_setup(seed, total_steps, g_bits=None, make=SGDT, lr=0.02, **talr):
    torch.manual_seed(seed)
    ds = data.mnist(train=True)
    loader = data.BatchLoader(ds, batch_size=128, train=True, seed=seed)
    x0, _ = next(iter(loader))
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, first_last=4, g_bits=g_bits)
    qm = fxqat.prepare_qat(get_model("mlp", in_shape=(1, 28, 28)), (x0[:2],), cfg)
    qm.train()
    opt = make(qm, total_steps=total_steps, lr=lr, **talr)
    return qm, opt, loader


def _batch_stream(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


@needs_mnist
def test_measured_rate_tracks_the_cosine_target_on_mnist():
    """600 SGDT steps of an LSQ W4A4 MLP on MNIST with the default cosine target R_t (R_0 = 5e-3·√4).

    The run is ~200x shorter than the paper's, so the controller is made ~20x faster than the paper defaults
    (momentum 0.95 instead of 0.99, η = 20·U_0 instead of U_0). Checked between 15% (warm-up) and 65% of the run; past
    that R_t → 0 and any lagging average is off by a growing *relative* amount.
    """
    T = 600
    qm, opt, loader = _mnist_setup(0, T, tr_momentum=0.95, eta=20 * 0.02)
    assert opt.momentum == 0.95 and opt.optimizer.param_groups[0]["momentum"] == 0.9
    stream = _batch_stream(loader)
    run_k, targets, us = [], [], []
    for t in range(T):
        x, y = next(stream)
        opt.zero_grad()
        F.cross_entropy(qm(x), y).backward()
        targets.append(opt.target(t, opt.layers[0].name))
        opt.step()
        run_k.append(dict(opt.running_rates()))
        us.extend(opt.talr().values())
    assert min(us) >= 0.0
    window = range(int(0.15 * T), int(0.65 * T))
    layer_mean = [statistics.mean(run_k[t].values()) / targets[t] for t in window]
    assert all(0.75 <= r <= 1.25 for r in layer_mean), (min(layer_mean), max(layer_mean))
    for name in run_k[0]:
        ratio = statistics.mean(run_k[t][name] / targets[t] for t in window)
        assert 0.75 <= ratio <= 1.25, (name, ratio)


@needs_mnist
@pytest.mark.parametrize("make", [SGDT, AdamT], ids=["sgdt", "adamt"])
def test_resume_continues_the_identical_trajectory(make):
    lr = 1e-3 if make is AdamT else 0.02
    qm, opt, loader = _mnist_setup(0, 100, make=make, lr=lr)
    stream = _batch_stream(loader)
    batches = [next(stream) for _ in range(10)]
    _train(qm, opt, batches[:5])
    ckpt = copy.deepcopy({"model": qm.state_dict(), "opt": opt.optimizer.state_dict(), "talr": opt.state_dict(),
                          "rng": torch.get_rng_state()})
    losses = _train(qm, opt, batches[5:])
    after = (opt.talr(), opt.running_rates(), opt.rates())

    qm2, opt2, _ = _mnist_setup(1, 100, make=make, lr=lr)
    qm2.load_state_dict(ckpt["model"])
    opt2.optimizer.load_state_dict(ckpt["opt"])
    opt2.load_state_dict(ckpt["talr"])
    torch.set_rng_state(ckpt["rng"])
    losses2 = _train(qm2, opt2, batches[5:])
    assert all(torch.equal(a, b) for a, b in zip(losses, losses2))  # bit-exact
    assert (opt2.talr(), opt2.running_rates(), opt2.rates()) == after
    assert all(torch.equal(p, q) for p, q in zip(qm.parameters(), qm2.parameters()))


def test_per_group_codes_and_transition_rates():
    # integer_repr of a per-group quantizer works on the weight's own shape (codes per group), so TALR runs on the
    # LLM presets; codes × group scale is the eval-mode output bit for bit (both round the same x / s)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(8, 16)
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig.preset("int4_weight_only", group_size=8,
                                                                 first_last_layers=()))
    fxqat.calibrate(qm, [x])
    q = next(q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight")
    w = qm.get_parameter(q.weight_target).detach()
    codes = q.integer_repr(w)
    scale = q.affine_qparams()[0]
    assert codes.shape == w.shape and int(codes.min()) >= -8 and int(codes.max()) <= 7
    q.eval()
    assert torch.equal((codes.reshape(-1, 8) * scale.reshape(-1, 1)).reshape(w.shape), q(w))
    opt = SGDT(qm.train(), total_steps=10, lr=0.5)
    qm(x).square().mean().backward()
    opt.step()
    rates = opt.rates()
    assert len(rates) == 2 and all(0.0 < r <= 1.0 for r in rates.values())  # lr 0.5 moves some weights across
