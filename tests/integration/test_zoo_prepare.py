"""Every zoo method inside ``fxqat.prepare_qat`` on torchvision's ResNet-18: forward, backward, finite gradients,
quantizers of the right method, ``convert`` bit-identical to eval mode, and the same under block replacement
(``HybridConfig``)."""

import pytest
import torch
import torchvision

import fxqat

METHODS = ["qil", "lsq_plus", "pact", "dorefa", "ewgs", "dsq", "noise_temper"]


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _check_grads(qm):
    grads = {n: p.grad for n, p in qm.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    bad = [n for n, g in grads.items() if g is not None and not bool(torch.isfinite(g).all())]
    assert not bad, f"non-finite gradients: {bad[:5]}"
    return missing


@pytest.mark.parametrize("method", METHODS)
def test_method_in_prepare_qat_resnet18(method):
    x = torch.randn(1, 3, 64, 64)
    qm = fxqat.prepare_qat(_resnet(), (x,), fxqat.QATConfig(w_bits=4, a_bits=4, method=method))
    qs = fxqat.named_quantizers(qm)
    assert len(qs) > 0
    assert {q.method for q in qs.values() if q.kind != "grad"} == {method}
    qm.train()
    y = qm(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10) and bool(torch.isfinite(y).all())
    y.logsumexp(1).sum().backward()
    missing = _check_grads(qm)
    assert missing == [], f"parameters without a gradient: {missing[:5]}"
    assert all(q.is_initialized for q in qs.values() if q.kind != "grad")
    lp = fxqat.convert(qm)
    qm.eval()
    with torch.no_grad():
        ye, yl = qm(x), lp(x)
    assert ye.shape == (1, 10) and bool(torch.isfinite(ye).all())
    assert torch.equal(yl, ye)  # pre-quantized weights in the converted model: bit-identical eval output


@pytest.mark.parametrize("method", METHODS)
def test_method_under_block_replacement(method):
    x = torch.randn(2, 3, 32, 32)  # smallest input whose last BN still sees > 1 value per channel
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, method=method, hybrid=fxqat.HybridConfig(paths=2))
    qm = fxqat.prepare_qat(_resnet(), (x,), cfg)
    qm.train()
    out = qm(x)
    assert len(out.paths) == 2 and out.lp.shape == (2, 10)
    loss, _ = fxqat.hybrid_loss(out, torch.tensor([1, 7]))
    assert bool(torch.isfinite(loss))
    loss.backward()
    _check_grads(qm)
    qgrads = [p.grad for q in fxqat.named_quantizers(qm).values() for p in q.parameters() if p.requires_grad]
    assert all(g is not None for g in qgrads)
