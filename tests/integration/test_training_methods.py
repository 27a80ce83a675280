"""Gradient quantization (LBT) and transition-rate scheduling (TRS) together, with block replacement, several
quantizer methods, MNIST data, and a resume (methods.md §1, §3, §4)."""

from __future__ import annotations

import copy

import pytest
import torch

import fxqat
from fxqat import data
from fxqat.models import get_model
from fxqat.optim import SGDT
from fxqat.training.grad_quant import gammas, grad_quantizers, update_intervals

pytestmark = pytest.mark.skipif(
    not data.data_available("mnist"), reason="MNIST (mnist.npz) not found in ../shared/data or $FXQAT_DATA"
)


@pytest.fixture(scope="module")
def batches():
    loader = data.BatchLoader(data.mnist(train=True).subset(2048), batch_size=64, train=True, seed=0)
    return [b for _, b in zip(range(12), loader)]


def _prepare(method, batches, g_bits=4, seed=0, **hybrid):
    torch.manual_seed(seed)
    model = get_model("cnn", width=8, in_shape=(1, 28, 28))
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, g_bits=g_bits, method=method, hybrid=fxqat.HybridConfig(**hybrid))
    qm = fxqat.prepare_qat(model, (batches[0][0][:2],), cfg)
    qm.train()
    return qm


def _step(qm, opt, x, y):
    opt.zero_grad()
    loss, _ = fxqat.hybrid_loss(qm(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("method", ["lsq", "pact", "dsq"])
def test_gradient_quantization_and_talr_with_block_replacement(method, batches):
    assert method in fxqat.available_methods()
    qm = _prepare(method, batches)
    opt = SGDT(qm, total_steps=100, lr=0.02)
    gqs = grad_quantizers(qm)
    assert len(gqs) == len(opt.layers) == 5  # one of each per quantized layer (first/last at 8 bits included)
    steps = 8
    losses = [_step(qm, opt, x, y) for x, y in batches[:steps]]
    assert all(torch.isfinite(l) for l in losses)
    assert float(losses[-1]) < float(losses[0])
    # lp_prefix: the LP backbone runs once per step, so each gradient quantizer sees exactly one backward per step
    assert all(int(q.n_backward) == steps for q in gqs.values())
    for q in gqs.values():  # initialised on the first backward, then one ±ε update per later backward
        assert q.is_initialized and 0.001 <= float(q.gamma) <= 1.0  # gamma is clamped to [eps, 1]
    assert all(u >= 0.0 for u in opt.talr().values())
    assert all(0.0 <= r <= 1.0 for r in opt.rates().values()) and any(r > 0 for r in opt.rates().values())
    for layer in opt.layers:
        assert all(not p.requires_grad for p in layer.quantizer.parameters())  # weight scales frozen
    out = qm(batches[0][0])
    assert isinstance(out, fxqat.HybridOutput) and len(out.paths) >= 1


def test_hybrid_forward_is_bit_identical_with_and_without_gradient_quantization(batches):
    a, b = _prepare("lsq", batches, g_bits=None), _prepare("lsq", batches, g_bits=4)
    x = batches[1][0]
    oa, ob = a(x), b(x)
    assert torch.equal(oa.lp, ob.lp) and torch.equal(oa.fp, ob.fp)
    assert all(torch.equal(p, q) for p, q in zip(oa.paths, ob.paths))


def test_manual_interval_update_is_once_per_step_when_blocks_run_several_times(batches):
    # fp_prefix: LP blocks run once per path, so backward-time updates would move γ several ε per step;
    # update="manual" + update_intervals() moves it exactly one ε per step
    torch.manual_seed(0)
    model = get_model("cnn", width=8, in_shape=(1, 28, 28))
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, g_bits=4, g_options={"update": "manual"},
                          hybrid=fxqat.HybridConfig(mode="fp_prefix"))
    qm = fxqat.prepare_qat(model, (batches[0][0][:2],), cfg)
    qm.train()
    opt = SGDT(qm, total_steps=100, lr=0.02)
    _step(qm, opt, *batches[0])
    update_intervals(qm)  # the first backward initialised γ
    prev = gammas(qm)
    for x, y in batches[1:5]:
        _step(qm, opt, x, y)
        assert any(int(q.n_backward) > 1 for q in grad_quantizers(qm).values())
        update_intervals(qm)
        now = gammas(qm)
        for name in now:
            assert abs(now[name] - prev[name]) in (pytest.approx(1e-3, abs=1e-6), 0.0)
        prev = now


def test_resume_is_bit_exact_with_gradient_quantization_and_talr(batches):
    qm = _prepare("lsq", batches)
    opt = SGDT(qm, total_steps=100, lr=0.02)
    torch.manual_seed(1)
    for x, y in batches[:5]:
        _step(qm, opt, x, y)
    ckpt = copy.deepcopy({"model": qm.state_dict(), "opt": opt.optimizer.state_dict(), "talr": opt.state_dict(),
                          "rng": torch.get_rng_state()})  # the global RNG drives the stochastic rounding
    losses = [_step(qm, opt, x, y) for x, y in batches[5:10]]

    qm2 = _prepare("lsq", batches, seed=3)
    opt2 = SGDT(qm2, total_steps=100, lr=0.02)
    qm2.load_state_dict(ckpt["model"])
    opt2.optimizer.load_state_dict(ckpt["opt"])
    opt2.load_state_dict(ckpt["talr"])
    torch.set_rng_state(ckpt["rng"])
    losses2 = [_step(qm2, opt2, x, y) for x, y in batches[5:10]]
    assert all(torch.equal(a, b) for a, b in zip(losses, losses2))
    assert gammas(qm2) == gammas(qm) and opt2.talr() == opt.talr()
    assert all(torch.equal(p, q) for p, q in zip(qm.parameters(), qm2.parameters()))
