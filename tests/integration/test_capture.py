"""Regression tests for hierarchical capture and the defects of issue #8 (one weight quantizer per Parameter,
idempotence, hooks in train mode, partner semantics, conversion, reports)."""

import pytest
import torch
import torch.nn as nn
from qat_helpers import DataDepRoot

import fxqat
from fxqat.trace import FxqatTracer


class TwiceLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class TiedEager(nn.Module):
    """Two Linear modules sharing one weight Parameter, called from eager code."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        if x.sum() > 1e9:
            return x
        return self.b(torch.relu(self.a(x)))


def _weight_quantizers(qm):
    return [q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"]


def test_linear_called_twice_has_one_weight_quantizer_graph_and_eager():
    x = torch.randn(2, 4)
    assert len(_weight_quantizers(fxqat.prepare_qat(TwiceLinear(), (x,)))) == 1

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TwiceLinear()

        def forward(self, x):
            return self.inner(x) if x.sum() < 1e9 else x

    assert len(_weight_quantizers(fxqat.prepare_qat(Root(), (x,)))) == 1


def test_tied_parameter_has_one_weight_quantizer():
    qm = fxqat.prepare_qat(TiedEager(), (torch.randn(2, 4),))
    qs = _weight_quantizers(qm)
    assert len(qs) == 1
    assert qm.a.fxqat_wq is qm.b.fxqat_wq


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), DataDepRoot(2, 4)])
def test_preparing_a_prepared_model_is_refused(model):
    x = torch.randn(2, 4)
    qm = fxqat.prepare_qat(model, (x,))
    n = len(fxqat.named_quantizers(qm))
    with pytest.raises(ValueError, match="already prepared"):
        fxqat.prepare_qat(qm, (x,))
    assert len(fxqat.named_quantizers(qm)) == n


def test_eager_root_outputs_tuple_structure_and_report():
    model, x = DataDepRoot(), torch.randn(3, 8)
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=4, a_bits=4))
    fxqat.set_quantization(qm, False)
    ref, out = model(x), qm(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    report = fxqat.capture_report(qm)
    kinds = {r.name: r.kind for r in report.regions}
    assert kinds[""] == "eager" and kinds["layers.0"] == "graph"
    assert "TraceError" in report.regions[0].reason or "control flow" in report.regions[0].reason
    assert report.graph_share == 1.0  # the head, called by the eager root, is a one-layer graph region
    assert [r.name for r in report.regions if r.kind == "graph"][-1] == "head" and not report.regions[0].weight_layers
    assert "| `layers.0` | graph | 1 |" in report.to_markdown()


def test_hooks_run_in_train_and_eval_mode_on_eager_hybrid():
    qm = fxqat.prepare_qat(DataDepRoot(), (torch.randn(2, 8),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    calls = {"pre": 0, "post": 0}
    qm.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    qm.register_forward_hook(lambda m, a, o: calls.__setitem__("post", calls["post"] + 1))
    qm.train()
    out = qm(torch.randn(2, 8))
    assert isinstance(out, fxqat.HybridOutput)
    qm.eval()
    qm(torch.randn(2, 8))
    assert calls == {"pre": 2, "post": 2}


def _grad_blocks(qm, loss):
    qm.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    got = set()
    for name, p in qm.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0 and not name.startswith("fxqat_partner"):
            if name.startswith("layers."):
                got.add(int(name.split(".")[1]))
            elif name.startswith("head."):
                got.add("head")
    return got


@pytest.mark.parametrize("partner", ["frozen", "shared"])
def test_path_loss_reaches_lp_blocks_up_to_its_cut_only(partner):
    torch.manual_seed(0)
    cfg = fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=fxqat.HybridConfig(partner=partner))
    qm = fxqat.prepare_qat(DataDepRoot(), (torch.randn(4, 8),), cfg)
    qm.train()
    out = qm(torch.randn(4, 8))
    assert [b.name for b in fxqat.find_blocks(qm, (torch.randn(4, 8),))] == ["layers.0", "layers.1", "layers.2",
                                                                           "suffix"]
    for i, path in enumerate(out.paths):  # cuts after layers.0, layers.1, layers.2
        assert _grad_blocks(qm, path[0].sum()) == set(range(i + 1))
    assert _grad_blocks(qm, out.lp[0].sum()) == {0, 1, 2, "head"}


def test_frozen_partner_is_never_updated():
    torch.manual_seed(0)
    model = DataDepRoot()
    qm = fxqat.prepare_qat(model, (torch.randn(4, 8),), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    partner = {k: v.clone() for k, v in qm.fxqat_partner.state_dict().items()}
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=1e-2)
    qm.train()
    for _ in range(3):
        out = qm(torch.randn(4, 8))
        loss, _ = fxqat.hybrid_loss(tuple_first(out), torch.zeros(4, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = qm.fxqat_partner.state_dict()
    assert all(torch.equal(partner[k], after[k]) for k in partner)
    assert all(not p.requires_grad for p in qm.fxqat_partner.parameters())
    assert int(qm.fxqat_step) == 3


def tuple_first(out):
    """A HybridOutput whose parts are the first element of each tuple output (the logits)."""
    return fxqat.HybridOutput(lp=out.lp[0], paths=[p[0] for p in out.paths], fp=out.fp[0], path_ids=out.path_ids,
                              config=out.config)


def test_convert_eager_model_matches_eval_and_drops_the_partner():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    qm = fxqat.prepare_qat(DataDepRoot(), (x,), fxqat.QATConfig(w_bits=3, a_bits=4, hybrid=fxqat.HybridConfig()))
    qm.train()
    qm(x)  # initialise the quantizers on a batch
    qm.eval()
    ref = qm(x)[0]
    lp = fxqat.convert(qm)
    assert not hasattr(lp, "fxqat_partner") and not isinstance(lp(x), fxqat.HybridOutput)
    torch.testing.assert_close(lp(x)[0], ref, rtol=0, atol=1e-6)  # weights pre-quantized: same values, same ops
    w = lp.layers[1][0].weight
    assert torch.unique(w).numel() <= 2 ** 3


def test_graph_region_called_differently_names_the_module():
    model, x = DataDepRoot(), torch.randn(2, 8)
    qm = fxqat.prepare_qat(model, (x,))
    with pytest.raises(ValueError, match="layers.0"):
        qm.layers[0](x, torch.ones(1))


def test_leaf_fallback_has_no_retry_cap():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    class Many(nn.Module):  # 80 failing leaves: more than the old cap of 64 retries
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.blocks = nn.Sequential(*[Untraceable() for _ in range(80)])

        def forward(self, x):
            return self.blocks(self.fc(x))

    gm = fxqat.trace(Many())
    assert len(gm.meta["fxqat.opaque"]) == 80


class _CountingTracer(FxqatTracer):
    traces = 0

    def trace(self, root, concrete_args=None):
        type(self).traces += 1
        return super().trace(root, concrete_args)


def test_failing_class_without_weight_layers_becomes_a_leaf_in_one_retry():
    """mobileone_s0: 113 BatchNormAct2d fail alike (a branch on the training flag); one retry, not 113."""

    class BranchyNorm(nn.Module):  # no weight layer: every instance runs (and fails on) the same code
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x) if self.training else x

    class WithLinear(BranchyNorm):  # holds a weight layer: its instances stay one retry each
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if self.training else x

    model = nn.Sequential(*[BranchyNorm() for _ in range(30)], WithLinear(), WithLinear(), nn.Linear(4, 2))
    _CountingTracer.traces = 0
    gm = fxqat.trace(model, tracer_cls=_CountingTracer)
    assert len(gm.meta["fxqat.opaque"]) == 32
    assert _CountingTracer.traces == 4  # BranchyNorm (all 30), each WithLinear, then the success
    assert "same class" in gm.meta["fxqat.opaque_reasons"]["1"]
    x = torch.randn(3, 4)
    for mode in (True, False):  # leaves run their own code: train and eval outputs of the original
        torch.testing.assert_close(gm.train(mode)(x), model.train(mode)(x), atol=0, rtol=0)


def test_reading_a_weight_attribute_is_not_a_second_layer():
    """edgenext's positional encoding reads ``self.proj.weight.device`` before calling ``self.proj``."""

    class PosEnc(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            pos = torch.ones(x.shape, device=self.proj.weight.device, dtype=self.proj.weight.dtype)
            return x + self.proj(pos)

    qm = fxqat.prepare_qat(PosEnc(), (torch.randn(1, 4, 3, 3),))
    assert len(_weight_quantizers(qm)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpn68", "mobileone_s0", "edgenext_xx_small"])
def test_timm_models_that_used_to_fail_prepare_with_one_quantizer_per_layer(name):
    timm = pytest.importorskip("timm")
    from fxqat.layer_registry import is_weight_layer

    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    qm = fxqat.prepare_qat(model, (torch.randn(1, 3, 64, 64),))
    assert len(_weight_quantizers(qm)) == sum(is_weight_layer(m) for m in model.modules())
    fxqat.set_quantization(qm, False)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(qm.eval()(x), model(x))


def test_registered_custom_weight_layer_is_quantized_in_eager_regions():
    class Scale(nn.Module):  # y = x * w (elementwise), a user's own weight layer
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(-1.0, 1.0, 8).reshape(8, 1))

        def forward(self, x):
            return x * self.weight.t()

    fxqat.register_weight_layer(Scale, compute=lambda m, x, w: x * w.t())

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = Scale()

        def forward(self, x):
            return self.scale(x) if x.sum() < 1e9 else x

    x = torch.randn(3, 8)
    qm = fxqat.prepare_qat(Root(), (x,), fxqat.QATConfig(w_bits=2, a_bits=None, first_last_layers=()))
    assert fxqat.capture_report(qm).weight_layers == ("scale",)
    qm.eval()
    wq = qm.scale.fxqat_wq(qm.scale.weight)
    assert torch.unique(wq).numel() <= 4  # 2-bit grid
    assert torch.equal(qm(x), x * wq.t())  # the layer computes on the quantized weight, input unquantized
