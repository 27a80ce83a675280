"""``fxqat.allocate_bits`` returns ``(config, allocation)`` (as documented); ``prepare_qat`` takes the pair too."""

import pytest
import torch
import torch.nn as nn

import fxqat
from fxqat.mixed.table import BlockSensitivity, SensitivityTable


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def _table():
    """Blocks "2" and "4" (64 weights each; 0 and 6 are first/last) at 2 and 4 bits: "2" is the sensitive one."""
    rows = (BlockSensitivity("b2", 0, ("2",), 64, (5.0, 1.0), (0.0, 0.0)),
            BlockSensitivity("b4", 1, ("4",), 64, (0.5, 0.1), (0.0, 0.0)))
    return SensitivityTable("paths", (2, 4), rows)


def test_allocate_bits_returns_the_documented_pair():
    pair = fxqat.allocate_bits(_table(), avg_bits=3)
    assert isinstance(pair, tuple) and len(pair) == 2
    cfg, alloc = pair
    assert isinstance(cfg, fxqat.QATConfig) and isinstance(alloc, fxqat.Allocation)
    assert alloc.bits == (("b2", 4), ("b4", 2)) and alloc.used_bits == 64 * 6


def test_prepare_qat_takes_the_pair_and_equals_the_config():
    torch.manual_seed(0)
    model, x = _mlp(), torch.randn(4, 6)
    pair = fxqat.allocate_bits(_table(), avg_bits=3)
    from_pair, from_cfg = fxqat.prepare_qat(model, (x,), pair), fxqat.prepare_qat(model, (x,), pair[0])
    bits = {n: q.bits for n, q in fxqat.named_quantizers(from_pair).items()}
    assert bits == {n: q.bits for n, q in fxqat.named_quantizers(from_cfg).items()}
    assert {q.weight_layer: q.bits for q in fxqat.named_quantizers(from_pair).values() if q.kind == "weight"} == {
        "0": 8, "2": 4, "4": 2, "6": 8}
    torch.testing.assert_close(from_pair(x), from_cfg(x), rtol=0, atol=0)  # same quantizers, same init: bit-exact


def test_prepare_qat_still_refuses_other_tuples():
    with pytest.raises(TypeError, match="config must be a fxqat.QATConfig, got tuple"):
        fxqat.prepare_qat(_mlp(), (torch.randn(2, 6),), (fxqat.QATConfig(), None))
