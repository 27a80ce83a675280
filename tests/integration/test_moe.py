"""Mixture-of-experts models of the HF zoo: every expert parameter quantized where it is used.

transformers 5 stores the experts as 3-D parameters read through grouped/batched matmuls and the router as a module
with a bare ``weight``; the package's floor (4.45) has per-expert ``nn.Linear`` and an ``nn.Linear`` router, built
here as :class:`LegacyMoE` (the same structure, written out). Each model: every expert parameter has one weight
quantizer, quantization off gives the original logits bit for bit (eval and train), int4 per-group expert weights
hold at most 16 values per group after ``fxqat.convert``, routers stay FP by default and the capture report lists
every unquantized parameter of >= 2 dims with its reason.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxqat
from fxqat.capture.param_report import UnquantizedWeightWarning
from fxqat.training.losses import logits_of

pytest.importorskip("transformers")
from hf_zoo import MOE, build  # noqa: E402
from weight_coverage import check_one_quantizer_per_weight, weight_targets  # noqa: E402

INT4_G16 = fxqat.QATConfig.preset("int4_weight_only", group_size=16)


def _expert_params(model):
    return {n: p for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}


def _router_params(model):
    return [n for n, _ in model.named_parameters() if n.endswith(("mlp.gate.weight", "mlp.router.weight"))]


def _prepare(name, config=INT4_G16, dropout=True):
    model, args, kwargs = build(name, dropout=dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedWeightWarning)  # nothing left FP for no configured reason
        qm = fxqat.prepare_qat(model, args, config, example_kwargs=kwargs)
    return model, qm, args, kwargs


@pytest.mark.parametrize("name", MOE)
def test_every_expert_parameter_has_one_quantizer_and_off_is_exact(name):
    model, qm, args, kwargs = _prepare(name)
    experts = _expert_params(model)
    assert len(experts) == 2 * model.config.num_hidden_layers  # gate_up_proj and down_proj per layer
    targets = weight_targets(qm)
    assert set(experts) <= set(targets)
    fp = check_one_quantizer_per_weight(model, qm)
    routers = _router_params(model)
    assert routers and all("router" in fp[r] for r in routers)  # FP by default, with that reason
    assert "embedding" in fp["model.embed_tokens.weight"]
    fxqat.set_quantization(qm, False)
    for mode in (False, True):
        model.train(mode)
        qm.train(mode)
        torch.manual_seed(1)
        ref = logits_of(model(*args, **kwargs))
        torch.manual_seed(1)
        out = logits_of(qm(*args, **kwargs))
        assert torch.equal(out, ref), mode  # bit-exact: the same operations on the same tensors


def _groups(w: torch.Tensor, reduced_dim: int, group: int) -> torch.Tensor:
    """``w`` as rows of ``group`` consecutive elements along ``reduced_dim`` (every other dim a row index)."""
    moved = w.movedim(reduced_dim, -1)
    return moved.reshape(-1, group)


@pytest.mark.parametrize("name", MOE)
def test_int4_per_group_experts_after_convert(name):
    model, qm, args, kwargs = _prepare(name)
    fxqat.calibrate(qm, [args])
    lp = fxqat.convert(qm)
    with torch.no_grad():
        ref = logits_of(qm.eval()(*args, **kwargs))
        got = logits_of(lp(*args, **kwargs))
    # the converted model computes with the fake-quantized weights, so its logits are the QAT model's eval logits
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # same values; only the summation order may differ
    converted = dict(lp.named_parameters())
    for pname, w in _expert_params(model).items():
        wq = converted[pname].detach()
        assert not torch.equal(wq, w.detach())  # the weights really are on a grid now
        groups = _groups(wq, 2, 16)  # Mixtral/Qwen layout (experts, out, in): groups along the input dim
        n_values = torch.tensor([len(torch.unique(g)) for g in groups])
        assert int(n_values.max()) <= 16, (pname, int(n_values.max()))
        # and the grid is per group: a group's values are integer multiples of one step (symmetric int4)
        g = groups[0]
        step = g.abs().max() / 7 if g.abs().max() > 0 else torch.tensor(1.0)
        assert int(torch.unique(torch.round(g / step)).numel()) <= 16


@pytest.mark.parametrize("name", MOE)
def test_trains_expert_weights(name):
    model, qm, args, kwargs = _prepare(name, fxqat.QATConfig.preset("8da4w", group_size=16))
    qm.train()
    loss = logits_of(qm(*args, **kwargs)).float().pow(2).mean()
    loss.backward()
    for pname in _expert_params(model):
        p = qm.get_parameter(pname)
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    scales = [q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight" and ".experts." in q.weight_target]
    assert scales and all(any(t.grad is not None for t in q.parameters()) for q in scales)


def test_router_and_embedding_flags():
    cfg = INT4_G16.with_(quantize_router=True, quantize_embeddings=True)
    model, qm, args, kwargs = _prepare("mixtral", cfg)
    targets = set(weight_targets(qm))
    assert set(_router_params(model)) <= targets and "model.embed_tokens.weight" in targets
    fp = check_one_quantizer_per_weight(model, qm)
    assert not any("router" in r or "embedding" in r for r in fp.values())
    lp = fxqat.convert(qm)
    table = dict(lp.named_parameters())["model.embed_tokens.weight"].detach()
    # per-group along the embedding dim, QATConfig.group_size (16) elements per group
    assert max(len(torch.unique(g)) for g in table.reshape(-1, 16)) <= 16


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_expert_implementations_quantize_the_same_layout(impl):
    """The eager loop (``w[e]`` into ``F.linear``), batched ``bmm`` on ``w[ids]`` and ``grouped_mm`` on
    ``w.transpose(-2, -1)`` all reduce over the input dim: the converted experts are the same tensors."""
    ref_model, args, _ = build("qwen3_moe")
    ref = dict(fxqat.convert(fxqat.prepare_qat(ref_model, args, INT4_G16)).named_parameters())
    model, args, _ = build("qwen3_moe")
    model.config._experts_implementation = impl
    got = dict(fxqat.convert(fxqat.prepare_qat(model, args, INT4_G16)).named_parameters())
    for pname in _expert_params(model):
        assert torch.equal(got[pname], ref[pname]), (impl, pname)


class LegacyExpert(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False), nn.Linear(
            inter, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LegacyMoE(nn.Module):
    """The MoE block of transformers < 5 (Mixtral 4.45): an ``nn.Linear`` router, one ``nn.Linear`` MLP per
    expert, a data-dependent loop over the experts a batch hits."""

    def __init__(self, d: int = 16, inter: int = 32, n_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList([LegacyExpert(d, inter) for _ in range(n_experts)])

    def forward(self, h):
        b, t, d = h.shape
        h = h.view(-1, d)
        probs = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(h.dtype)
        out = torch.zeros_like(h)
        hit = torch.nn.functional.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            idx, tok = torch.where(hit[e])
            if tok.numel():
                out.index_add_(0, tok, expert(h[tok]) * weights[tok, idx, None])
        return out.view(b, t, d)


class LegacyLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([LegacyMoE(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def test_legacy_per_expert_linear_layout():
    torch.manual_seed(0)
    model = LegacyLM()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnquantizedWeightWarning)
        qm = fxqat.prepare_qat(model, (ids,), INT4_G16)
    targets = set(weight_targets(qm))
    experts = {n for n, _ in model.named_parameters() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3 and experts <= targets
    fp = check_one_quantizer_per_weight(model, qm)
    assert {"blocks.0.gate.weight", "blocks.1.gate.weight"} <= set(fp) and "router" in fp["blocks.0.gate.weight"]
    fxqat.set_quantization(qm, False)
    assert torch.equal(qm.eval()(ids), model.eval()(ids))


class ReadsChildWeight(nn.Module):
    """A parent reading its child's parameter in its own forward: fxqat follows parameters inside their owner's
    forward only, so this weight stays FP, and a warning says so."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Module()
        self.inner.w = nn.Parameter(torch.randn(8, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: eager root
            x = -x
        return self.fc(x @ self.inner.w.t())


def test_unexpected_fp_weight_warns_and_is_reported():
    model, x = ReadsChildWeight(), torch.randn(3, 8)
    with pytest.warns(UnquantizedWeightWarning, match="inner.w"):
        qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=None, first_last=4))
    fp = dict(fxqat.capture_report(qm).unquantized)
    assert fp["inner.w"].startswith("enters matmul")
