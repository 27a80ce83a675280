"""EWGS's δ refresh (methods.md §6): Hutchinson's Tr(H)/N over 3σ(g), checked on losses with a known Hessian."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from fxqat.config import QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.quantizers.ewgs import EWGSQuantizer, refresh_ewgs_delta

seed_st = st.integers(0, 2**16)


def _ewgs_act(bits=3, **opts):
    return make_quantizer(QuantSpec(bits=bits, method="ewgs", kind="act", signed=False, options=opts))


@given(seed=seed_st, curvature=st.floats(0.1, 50.0), n_hutchinson=st.integers(1, 3))
def test_delta_on_quadratic_loss_is_exact(seed, curvature, n_hutchinson):
    """loss = c/2·Σ x_q²: H = c·I, so Tr(H)/N = c (Hutchinson is exact on a diagonal Hessian), g = c·x_q and
    δ = c / (3·c·std(x_q)) = 1 / (3·std(x_q))."""
    x = torch.rand(6, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    q = _ewgs_act(act_output="unit").double()
    q(x)

    def loss_fn(out, target):
        return 0.5 * curvature * out.pow(2).sum()

    deltas = refresh_ewgs_delta(q, loss_fn, [(x, None)], n_hutchinson=n_hutchinson)
    xq = q(x).detach()
    expect = 1 / (3 * xq.std().item())
    assert deltas == [pytest.approx(expect, rel=1e-9)]
    assert q.delta.item() == pytest.approx(expect, rel=1e-9)
    assert q.captured is None and not q._capture


def test_delta_is_averaged_over_batches():
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(4, 30, generator=g, dtype=torch.float64) * k for k in (1.0, 3.0)]
    q = _ewgs_act(act_output="unit").double()
    q(xs[0])
    deltas = refresh_ewgs_delta(q, lambda out, _: 0.5 * out.pow(2).sum(), [(x, None) for x in xs])
    expect = sum(1 / (3 * q(x).detach().std().item()) for x in xs) / 2
    assert deltas[0] == pytest.approx(expect, rel=1e-9)


def test_negative_curvature_clamps_delta_to_zero():
    x = torch.rand(4, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = _ewgs_act(act_output="unit").double()
    q(x)
    assert refresh_ewgs_delta(q, lambda out, _: -out.pow(2).sum(), [(x, None)]) == [0.0]
    assert q.delta.item() == 0.0


def test_refresh_on_a_network_sets_every_quantizer():
    torch.manual_seed(0)
    qa = lambda: _ewgs_act(bits=2)  # noqa: E731
    qw = make_quantizer(QuantSpec(bits=2, method="ewgs", kind="weight"))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a1, self.a2, self.wq = qa(), qa(), qw
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(self.a1(x)))
            return nn.functional.linear(self.a2(h), self.wq(self.fc2.weight), self.fc2.bias)

    net = Net().double()
    batches = [(torch.rand(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))) for _ in range(3)]
    net(batches[0][0])
    net.train()
    deltas = refresh_ewgs_delta(net, nn.functional.cross_entropy, batches, n_hutchinson=2)
    qs = [m for m in net.modules() if isinstance(m, EWGSQuantizer)]
    assert len(deltas) == 3 == len(qs)
    assert all(d >= 0.0 and d == q.delta.item() for d, q in zip(deltas, qs))
    assert any(d > 0.0 for d in deltas)  # cross-entropy is convex in the logits: positive curvature somewhere
    assert net.training  # mode left as it was


def test_refresh_errors_name_the_fix():
    with pytest.raises(ValueError, match="method='ewgs'"):
        refresh_ewgs_delta(nn.Linear(2, 2), nn.functional.mse_loss, [])
    q = _ewgs_act()
    with pytest.raises(ValueError, match="empty"):
        refresh_ewgs_delta(q, nn.functional.mse_loss, [])
