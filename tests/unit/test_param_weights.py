"""The reduction dims the recorder finds for each way a weight parameter can enter a matmul-like op, and the
``[rows, reduction]`` layout the quantizer then sees (fxqat.passes.param_weights, fxqat.capture.param_quant)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxqat.capture.param_quant import record_param_uses
from fxqat.config import QuantSpec
from fxqat.method_registry import make_quantizer
from fxqat.passes.param_weights import to_rows


class Uses(nn.Module):
    def __init__(self, fn, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape))
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.w)


E, O, I = 3, 5, 4  # experts, out, in
CASES = {  # name: (forward, weight shape, input shape, reduced dims)
    "linear": (lambda x, w: F.linear(x, w), (O, I), (2, I), (1,)),
    "matmul_t": (lambda x, w: x @ w.t(), (O, I), (2, I), (1,)),
    "matmul_in_out": (lambda x, w: x @ w, (I, O), (2, I), (0,)),
    "expert_slice": (lambda x, w: F.linear(x, w[1]), (E, O, I), (2, I), (2,)),
    "expert_gather_bmm": (lambda x, w: torch.bmm(w[torch.tensor([0, 2])], x.unsqueeze(-1)), (E, O, I), (2, I), (2,)),
    "transposed_bmm": (lambda x, w: torch.bmm(x.unsqueeze(1), w[torch.tensor([0, 2])]), (E, I, O), (2, I), (1,)),
    "batched_transpose": (lambda x, w: x.unsqueeze(0) @ w.transpose(-2, -1), (E, O, I), (2, I), (2,)),
    "einsum": (lambda x, w: torch.einsum("ti,eoi->teo", x, w), (E, O, I), (2, I), (2,)),
    "conv2d": (lambda x, w: F.conv2d(x, w), (O, I, 3, 3), (1, I, 6, 6), (1, 2, 3)),
    "conv_transpose2d": (lambda x, w: F.conv_transpose2d(x, w), (I, O, 3, 3), (1, I, 6, 6), (0, 2, 3)),
    "embedding": (lambda x, w: F.embedding(x.long().abs() % O, w), (O, I), (2, I), (1,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_reduction_dims(name):
    fn, shape, xshape, reduced = CASES[name]
    m = Uses(fn, shape)
    uses = record_param_uses(m, (torch.randn(*xshape),))
    assert uses["w"].reduced == reduced, uses


def test_a_product_that_is_not_a_weight_use_is_not_recorded():
    m = Uses(lambda x, w: x * w.sum() + w.mean(), (O, I))  # elementwise and reductions: no matmul
    assert record_param_uses(m, (torch.randn(2, I),)) == {}


def test_two_uses_that_disagree_leave_no_layout():
    m = Uses(lambda x, w: F.linear(x, w) @ w, (I, I))  # reduced over dim 1, then over dim 0
    use = record_param_uses(m, (torch.randn(2, I),))["w"]
    assert use.reduced is None and use.conflict


def test_router_is_the_product_that_reaches_topk():
    m = Uses(lambda x, w: torch.topk(torch.softmax(F.linear(x, w).float(), -1), 2).values, (O, I))
    assert record_param_uses(m, (torch.randn(2, I),))["w"].router


def test_per_channel_scales_are_per_expert_and_output_channel():
    """Experts (E, O, I) reduced over I: E*O rows; a row's values are one scale's multiples."""
    w = torch.randn(E, O, I)
    q = make_quantizer(QuantSpec(bits=3, kind="weight", granularity="per_channel"))
    rows = to_rows(w, (2,))
    out = q(rows)
    assert q.scale.numel() == E * O
    assert torch.equal(rows.reshape(E, O, I), w)  # row r is expert r // O, output channel r % O
    codes = out / q.scale.detach().reshape(-1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-5)  # on the grid: float rounding of a division only
