"""clip_ste: values of torch.clamp bit for bit, gradients of the comparison-based masks (ties by convention), no
boolean tensor saved for the backward (what makes the compiled PACT/DoReFa/noise-tempering steps slow)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from fxqat.quantizers.ste import clip_ste

VALUES = st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 3.0]) | st.floats(-4, 4), min_size=1,
                  max_size=12)


def _reference(v, lo, hi, lo_closed, hi_closed):
    """Gradients by comparisons: inside to v, above to hi, below to lo."""
    inside_lo = v >= lo if lo_closed else v > lo
    inside_hi = v <= hi if hi_closed else v < hi
    inside = inside_lo & inside_hi
    return inside.double(), (~inside_hi).double(), (~inside_lo & inside_hi).double()


@given(VALUES, st.booleans(), st.booleans(), st.booleans())
def test_values_and_gradients_match_comparisons(vals, lo_closed, hi_closed, tensor_lo):
    v = torch.tensor(vals, dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True) if tensor_lo else -1.0
    g = torch.linspace(0.5, 2.0, len(vals), dtype=torch.float64)
    y = clip_ste(v, lo, hi, lo_closed, hi_closed)
    assert torch.equal(y.detach(), torch.clamp(v.detach(), -1.0, 1.0))  # exact values
    y.backward(g)
    inside, above, below = _reference(v.detach(), -1.0, 1.0, lo_closed, hi_closed)
    assert torch.equal(v.grad, g * inside)  # 0/1 masks: exact
    assert torch.equal(hi.grad, (g * above).sum().reshape(1))
    if tensor_lo:
        assert torch.equal(lo.grad, (g * below).sum().reshape(1))


def test_matches_torch_clamp_with_number_bounds_at_ties():
    """Open ends reproduce torch.clamp's own gradient with number bounds (ties get none)."""
    v = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0], requires_grad=True)
    w = v.detach().clone().requires_grad_(True)
    clip_ste(v, -1.0, 1.0, lo_closed=False, hi_closed=False).sum().backward()
    torch.clamp(w, -1.0, 1.0).sum().backward()
    assert torch.equal(v.grad, w.grad)


def test_saves_no_boolean_tensor():
    kinds = []

    def pack(t):
        kinds.append(t.dtype)
        return t

    v = torch.randn(64, requires_grad=True)
    hi = torch.tensor([0.5], requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = clip_ste(v, 0.0, hi, True, False)
    assert kinds and torch.bool not in kinds, kinds
    y.sum().backward()
    assert v.grad is not None and hi.grad is not None
