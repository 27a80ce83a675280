"""LSQFunction keeps no weight-sized tensor of its own between forward and backward when it quantizes a weight (a
leaf or a view of one, e.g. the per-group view): it saves the weight itself and recomputes ``x/s`` and the codes in
backward. Activations (non-leaf inputs) save ``x/s`` and the codes. Both give the same gradients, bit for bit."""

from __future__ import annotations

import torch

from fxqat.quantizers.lsq import LSQFunction


def test_weight_view_is_saved_not_copied_and_gradients_match():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 96, generator=g))
    s = (torch.rand(64 * 3, generator=g) + 0.1).requires_grad_()
    xg = w.reshape(-1, 32)  # the per-group view of the weight
    y = LSQFunction.apply(xg, s, 0.1, -8, 7, 0)
    saved = y.grad_fn.saved_tensors
    assert saved[0].data_ptr() == w.data_ptr() and saved[0].shape == xg.shape  # the weight's own storage
    assert saved[1].numel() == s.numel()  # and the step sizes: nothing weight-sized allocated
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    gw, gs = w.grad.clone(), s.grad.clone()
    w.grad = s.grad = None
    y2 = LSQFunction.apply(xg * 1.0, s, 0.1, -8, 7, 0)  # a non-leaf input: the saving path of activations
    assert y2.grad_fn.saved_tensors[0].data_ptr() != w.data_ptr()
    assert torch.equal(y2, y)
    y2.backward(grad)
    assert torch.equal(w.grad, gw) and torch.equal(s.grad, gs)


def test_per_tensor_weight_recompute_matches():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(10, 7, generator=g))
    s = torch.tensor([0.3], requires_grad=True)
    y = LSQFunction.apply(w, s, 1.0, -4, 3, None)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    gw, gs = w.grad.clone(), s.grad.clone()
    w.grad = s.grad = None
    LSQFunction.apply(w + 0.0, s, 1.0, -4, 3, None).backward(grad)
    assert torch.equal(w.grad, gw) and torch.equal(s.grad, gs)


def test_bf16_weight_saves_itself_and_matches_the_float32_copy_path():
    """A bf16 weight goes into LSQFunction as it is (no float32 copy whose x/s and codes autograd would keep): the
    saved tensor is the weight's own storage, and output and gradients equal the float32-copy path bit for bit."""
    g = torch.Generator().manual_seed(2)
    w = torch.nn.Parameter(torch.randn(64, 96, generator=g).to(torch.bfloat16))
    s = (torch.rand(64 * 3, generator=g) * 0.1 + 0.01).requires_grad_()
    y = LSQFunction.apply(w.reshape(-1, 32), s, 0.1, -8, 7, 0)
    assert y.dtype == torch.bfloat16
    saved = y.grad_fn.saved_tensors
    assert saved[0].data_ptr() == w.data_ptr() and saved[0].dtype == torch.bfloat16
    grad = torch.randn(y.shape, generator=g).to(torch.bfloat16)
    y.backward(grad)
    gw, gs = w.grad.clone(), s.grad.clone()
    w.grad = s.grad = None
    y32 = LSQFunction.apply(w.float().reshape(-1, 32), s, 0.1, -8, 7, 0).to(torch.bfloat16)  # the old path
    assert torch.equal(y32, y)
    y32.backward(grad)
    assert w.grad.dtype == torch.bfloat16 and torch.equal(w.grad, gw) and torch.equal(s.grad, gs)
