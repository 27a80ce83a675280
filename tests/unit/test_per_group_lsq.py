"""Per-group LSQ on an ``nn.Linear`` equals a per-group LSQ written here from the paper (issue #15).

Esser et al., *Learned Step Size Quantization*, ICLR 2020, one step size ``s_g`` per group of 32 consecutive input
weights of an output row, at 4 bits signed (``Q_N = 8``, ``Q_P = 7``)::

    ŵ = ⌊clip(w/s_g, −Q_N, Q_P)⌉ · s_g                                   (eq. 1, 2)
    ∂ŵ/∂w   = 1 if −Q_N < w/s_g < Q_P, else 0                             (STE)
    ∂ŵ/∂s_g = −w/s_g + ⌊w/s_g⌉ inside, −Q_N if w/s_g ≤ −Q_N, Q_P if w/s_g ≥ Q_P   (eq. 3)
    gradient scale g = 1/√(N·Q_P), N = weights per step size = 32          (section 2.2)
    init s_g = 2·mean|w_g| / √Q_P                                           (section 2.1)

Everything in float64. Values are compared with atol = 0 (the same float operations in the same order); gradients
with rtol 1e-12 (fxqat's backward sums ``g·⌊c⌉ − g_w·v`` per group, the reference ``g·∂ŵ/∂s``: the same terms
regrouped, a few ulps apart).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat

Q_N, Q_P, GROUP = 8, 7, 32


def lsq_per_group_reference(w, s):
    """``(ŵ, ∂ŵ/∂w mask, ∂ŵ/∂s)`` of the paper's quantizer, one step per group (``s``: [out, in/GROUP])."""
    out, n_in = w.shape
    wg = w.reshape(out, n_in // GROUP, GROUP)
    v = wg / s[..., None]
    inside = (v > -Q_N) & (v < Q_P)
    w_hat = torch.round(torch.clamp(v, -Q_N, Q_P)) * s[..., None]
    dw_ds = torch.where(inside, -v + torch.round(v), torch.where(v <= -Q_N, torch.full_like(v, -Q_N),
                                                                 torch.full_like(v, Q_P)))
    return w_hat.reshape(out, n_in), inside.reshape(out, n_in), dw_ds


@pytest.fixture
def prepared():
    torch.manual_seed(0)
    lin = nn.Linear(64, 8).double()
    with torch.no_grad():  # Gaussian rows with outliers at both clipping ends (LSQ's init clips at ≈ 4.2σ, −4.8σ)
        lin.weight.copy_(torch.randn(8, 64, dtype=torch.float64))
        lin.weight[0, 3], lin.weight[2, 40], lin.weight[5, 7], lin.weight[7, 63] = 9.0, -9.0, 6.0, -7.5
    x = torch.randn(5, 64, dtype=torch.float64)
    cfg = fxqat.QATConfig(w_bits=4, a_bits=None, w_granularity="per_group", group_size=GROUP, first_last_layers=())
    qm = fxqat.prepare_qat(lin, (x,), cfg).double()  # float64 quantizer state before its first batch
    (wq,) = fxqat.named_quantizers(qm).values()
    return lin, qm, wq, x


def test_per_group_lsq_linear_matches_the_paper(prepared):
    lin, qm, wq, x = prepared
    assert wq.method == "lsq" and wq.granularity == "per_group" and wq.kind == "weight"
    g = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(3):  # init step, then two SGD steps: the learned s_g keep matching
        qm.zero_grad(set_to_none=True)
        y = qm(x)
        (y * g).sum().backward()
        w = qm.weight  # the Linear's own Parameter (traced root: F.linear on get_attr weight)
        s = wq.scale.detach().reshape(8, 64 // GROUP)
        if step == 0:
            s_paper = 2 * w.detach().reshape(8, 2, GROUP).abs().mean(-1) / math.sqrt(Q_P)
            # fxqat initialises in float32 (fxqat.quantizers.scale_init): one float32 rounding, rtol 2^-23
            assert torch.allclose(s, s_paper, rtol=2e-7, atol=0)
            assert wq.scale.dtype == torch.float64 and wq.scale.shape == (16,)
            assert float(wq.grad_factor) == pytest.approx(1 / math.sqrt(GROUP * Q_P), rel=1e-15)
        w_hat, inside, dw_ds = lsq_per_group_reference(w.detach(), s)
        assert 0 < int((~inside).sum()) < inside.numel() // 4  # both regimes (STE inside, clipped) present
        assert torch.equal(y, F.linear(x, w_hat, qm.bias))  # values: atol = 0
        dw_hat = g.t() @ x  # ∂L/∂ŵ of y = x ŵᵀ + b
        assert torch.allclose(w.grad, dw_hat * inside, rtol=1e-12, atol=0)
        ds = (dw_hat.reshape(8, 2, GROUP) * dw_ds).sum(-1) / math.sqrt(GROUP * Q_P)
        assert torch.allclose(wq.scale.grad.reshape(8, 2), ds, rtol=1e-12, atol=1e-15)
        with torch.no_grad():
            for p in qm.parameters():
                p -= 0.05 * p.grad


def test_per_group_lsq_groups_are_independent(prepared):
    """Changing the weights of one group changes that group's quantized values only."""
    lin, qm, wq, x = prepared
    qm(x)
    w = qm.weight
    w_hat = wq(w).detach()
    with torch.no_grad():
        w[3, 32:64] *= 1.7  # group (row 3, second half)
    w_hat2 = wq(w).detach()
    changed = (w_hat2 != w_hat).reshape(8, 2, GROUP).any(-1)
    expect = torch.zeros(8, 2, dtype=torch.bool)
    expect[3, 1] = True
    assert torch.equal(changed, expect)
