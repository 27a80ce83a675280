"""Property tests of graph regions with several captured graphs (:mod:`fxqat.capture.dispatch`): whatever sequence of
call structures a decoder makes (a ``None`` or tensor mask, one token or many, a cache or none), the prepared model
gives the original's outputs exactly with quantization off, and never gains a quantizer or a ``state_dict`` key."""

import copy
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from capture_strategies import D, region_calls_st
from hypothesis import given, settings

import fxqat
from fxqat.capture.dispatch import MAX_VARIANTS


class _Cache:
    """A cache handed on to the layers (like transformers' ``DynamicCache``): ``update`` appends and returns all."""

    def __init__(self, past):
        self.k, self.v = list(past), list(past)

    def update(self, k, v, idx):
        self.k[idx], self.v[idx] = torch.cat([self.k[idx], k], 1), torch.cat([self.v[idx], v], 1)
        return self.k[idx], self.v[idx]


def _attend(q, k, v, mask):
    is_causal = q.shape[1] > 1 and mask is None  # sdpa's branch in transformers: other code for a mask or one token
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class _Layer(nn.Module):
    def __init__(self, idx):
        super().__init__()
        self.idx, self.qkv, self.out = idx, nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask=None, cache=None):
        q, k, v = self.qkv(x).view(*x.shape[:-1], 3, -1).unbind(-2)
        if cache is not None:
            k, v = cache.update(k, v, self.idx)
        return x + self.out(_attend(q, k, v, mask))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Layer(0), _Layer(1)])

    def forward(self, x, mask=None, cache=None):
        if x.sum() > -1e9:  # data-dependent: the root stays eager, the layers are graph regions
            for layer in self.layers:
                x = layer(x, mask=mask, cache=cache)
        return x


@functools.lru_cache(maxsize=1)
def _prepared():
    torch.manual_seed(0)
    model = _Decoder()
    qm = fxqat.prepare_qat(model, (torch.randn(2, 4, D),), fxqat.QATConfig(w_bits=4, a_bits=8))
    fxqat.set_quantization(qm, False)
    return model.eval(), qm.eval()


@settings(max_examples=10)
@given(region_calls_st())
def test_any_sequence_of_call_structures_runs_exactly_on_the_same_quantizers(calls):
    model, prepared = _prepared()
    qm = copy.deepcopy(prepared)
    assert all(layer.fxqat_recapture is not None for layer in qm.layers)
    quantizers, keys = sorted(fxqat.named_quantizers(qm)), sorted(qm.state_dict())
    gen = torch.Generator().manual_seed(len(calls))
    with torch.no_grad():
        for batch, new, past, masked, cached in calls:
            x = torch.randn(batch, new, D, generator=gen)
            mask = None
            if masked:  # a random mask that leaves every query at least its own position
                mask = torch.rand(batch, new, past + new, generator=gen) > 0.5
                mask[:, torch.arange(new), past + torch.arange(new)] = True
            prefix = [torch.randn(batch, past, D, generator=gen)] * 2
            ref = model(x, mask=mask, cache=_Cache(prefix) if cached else None)
            out = qm(x, mask=mask, cache=_Cache(prefix) if cached else None)
            assert torch.equal(out, ref), (batch, new, past, masked, cached)
    assert sorted(fxqat.named_quantizers(qm)) == quantizers and sorted(qm.state_dict()) == keys
    # what decides a graph: mask or None, cache or None, and `q.shape[1] > 1` (evaluated first, so guarded either way)
    structures = {(masked, cached, new == 1) for _, new, _, masked, cached in calls}
    assert all(len(layer.fxqat_variants) <= min(len(structures), MAX_VARIANTS) for layer in qm.layers)
