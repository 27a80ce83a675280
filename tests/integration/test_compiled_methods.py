"""Under torch.compile every method runs its plain-ops form (``use_function()`` is False while dynamo traces):
same values and gradients as the eager hand-written autograd functions, checked in float64 with the ``aot_eager``
backend (dynamo + AOTAutograd without inductor's reordering, so the comparison is tight and fast)."""

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.quantizers.base import use_function

METHODS = ["lsq", "qil", "lsq_plus", "pact", "dorefa", "ewgs", "dsq", "noise_temper"]


def _model():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 5))


def test_use_function_is_false_only_while_compiling():
    seen = []

    def f(x):
        seen.append(use_function())
        return x + 1

    assert use_function()
    torch.compile(f, backend="eager")(torch.zeros(2))
    assert seen == [False]


@pytest.mark.parametrize("method", METHODS)
def test_compiled_gradients_match_eager_function(method):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (4,))
    qm = fxqat.prepare_qat(_model().double(), (x,), fxqat.QATConfig(w_bits=4, a_bits=4, method=method)).double().train()
    with torch.no_grad():
        qm(x)  # initialise the quantizers eagerly
    for q in fxqat.named_quantizers(qm).values():
        if method == "noise_temper":
            q.step.fill_(10**6)  # ρ = 0: no noise, so both paths compute the same values (they draw differently)
    grads = []
    for run in (qm, torch.compile(qm, backend="aot_eager")):
        qm.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in qm.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert eager.keys() == compiled.keys() and len(eager) > 0
    for name in eager:  # float64; the two forms differ only in the order of floating-point operations
        assert torch.allclose(eager[name], compiled[name], rtol=1e-8, atol=1e-10), name
