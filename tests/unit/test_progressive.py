"""Progressive bit-width schedule (QIL Tables 2-3): stage order, state hand-over, validation, a real QIL run."""

import pytest
import torch

from fxqat.config import QATConfig, QuantSpec
from fxqat.quantizers import make_quantizer
from fxqat.training.progressive import iter_progressive, progressive_bits, stage_config


def test_each_stage_starts_from_the_previous_state():
    calls = []

    def train_stage(bits, state):
        calls.append((bits, None if state is None else dict(state)))
        return {"bits": bits, "n": 0 if state is None else state["n"] + 1}

    out = progressive_bits(train_stage, bits=(5, 4, 3, 2))
    assert [b for b, _ in out] == [5, 4, 3, 2]
    assert [s["n"] for _, s in out] == [0, 1, 2, 3]
    assert calls[0] == (5, None)  # 5 bits fine-tuned from FP
    assert calls[1:] == [(4, {"bits": 5, "n": 0}), (3, {"bits": 4, "n": 1}), (2, {"bits": 3, "n": 2})]


def test_initial_state_goes_to_the_first_stage():
    seen = []
    progressive_bits(lambda b, s: seen.append(s) or {"b": b}, bits=(3,), initial_state={"from": "ckpt"})
    assert seen == [{"from": "ckpt"}]


def test_iteration_is_lazy():
    calls = []
    it = iter_progressive(lambda b, s: calls.append(b) or {"b": b}, bits=(5, 4, 3, 2))
    for b, _ in it:
        if b == 4:
            break
    assert calls == [5, 4]


@pytest.mark.parametrize("bits", [(), (0,), (4, 17), (4, True), (4, 2.0)])
def test_bad_bits_are_rejected(bits):
    with pytest.raises(ValueError, match="progressive_bits"):
        progressive_bits(lambda b, s: {}, bits=bits)


def test_stage_returning_none_is_an_error():
    with pytest.raises(ValueError, match="returned None"):
        progressive_bits(lambda b, s: None, bits=(4, 3))


def test_stage_config_sets_bits():
    c = QATConfig(method="qil", w_bits=8, a_bits=8)
    assert (stage_config(c, 3).w_bits, stage_config(c, 3).a_bits) == (3, 3)
    assert (stage_config(c, 3, activations=False).w_bits, stage_config(c, 3, activations=False).a_bits) == (3, 8)


def test_progressive_qil_run_hands_intervals_down():
    """A QIL weight quantizer fitted to its own latent weights, 4 -> 3 -> 2 bits: each stage's intervals start
    where the previous stage ended, and the reconstruction error grows as bits drop."""
    target = torch.randn(256, generator=torch.Generator().manual_seed(0))
    starts, errors = {}, {}

    def train_stage(bits, state):
        torch.manual_seed(bits)
        w = torch.nn.Parameter(target.clone())
        q = make_quantizer(QuantSpec(bits=bits, method="qil", kind="weight"))
        q(w.detach())
        if state is not None:
            q.load_state_dict(state["q"])
        starts[bits] = (q.c.item(), q.d.item())
        opt = torch.optim.Adam([*q.parameters()], lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            loss = (q(w) - target).pow(2).mean()
            loss.backward()
            opt.step()
        errors[bits] = (q(w) - target).pow(2).mean().item()
        return {"q": {k: v.clone() for k, v in q.state_dict().items()}}

    out = progressive_bits(train_stage, bits=(4, 3, 2))
    for (b_prev, s_prev), (b, _) in zip(out, out[1:]):
        assert starts[b] == (s_prev["q"]["c"].item(), s_prev["q"]["d"].item())
    assert errors[4] < errors[3] < errors[2] < 1.0
