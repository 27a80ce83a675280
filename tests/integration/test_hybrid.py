"""The generated hybrid graph against the method's definition (methods.md §1) and a hand-written wrapper."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat.models import get_model
from fxqat.passes.insert_quant import QROLE


def _resnet20(seed=0):
    torch.manual_seed(seed)
    return get_model("resnet20", 10)


def _x(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


class _QLayer(nn.Module):
    """An eager LP conv/linear using a prepared model's own module and quantizers."""

    def __init__(self, layer, wq, aq):
        super().__init__()
        self.layer, self.wq, self.aq = layer, wq, aq

    def forward(self, x):
        x = self.aq(x) if self.aq is not None else x
        w = self.wq(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        c = self.layer
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


def _eager_lp(qm, template):
    """A hand-written LP ResNet-20: the template's structure, qm's parameters, BN modules and quantizers."""
    lp = copy.deepcopy(template)
    wq = {q.weight_target: q for q in fxqat.named_quantizers(qm).values() if q.kind == "weight"}
    aq = {}
    for n in qm.graph.nodes:
        mod = n.meta.get("fxqat.module")
        if mod and n.args and getattr(n.args[0], "meta", {}).get(QROLE) == "act":
            aq[mod] = qm.get_submodule(n.args[0].target)
    for name, m in template.named_modules():
        parent, _, leaf = name.rpartition(".")
        owner = lp.get_submodule(parent) if parent else lp
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            setattr(owner, leaf, _QLayer(qm.get_submodule(name), wq[name + ".weight"], aq.get(name)))
        elif isinstance(m, nn.BatchNorm2d):
            setattr(owner, leaf, qm.get_submodule(name))
    return lp


def _blocks(model):
    """ResNet-20 as stem + 9 blocks + head, written by hand."""
    stem = lambda x: F.relu(model.bn1(model.conv1(x)))  # noqa: E731
    head = lambda h: model.fc(torch.flatten(model.avgpool(h), 1))  # noqa: E731
    return [stem, *model.layer1, *model.layer2, *model.layer3, head]


def _naive_wrapper(lp_model, fp_model, x):
    lp_blocks, fp_blocks = _blocks(lp_model), _blocks(fp_model)
    hs, h = [], x
    for b in lp_blocks:
        h = b(h)
        hs.append(h)
    with torch.no_grad():
        fp = fp_model(x)
    paths = []
    for i in range(len(lp_blocks) - 1):
        m = hs[i]
        for b in fp_blocks[i + 1:]:
            m = b(m)
        paths.append(m)
    return hs[-1], paths, fp


def test_resnet20_hybrid_equals_hand_written_wrapper():
    model = _resnet20()
    fp_model = copy.deepcopy(model).eval()
    x, y = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=fxqat.HybridConfig()))
    qm.train()
    qm(x)  # initialise quantizers from data
    out = qm(x)
    assert isinstance(out, fxqat.HybridOutput) and len(out.paths) == 10
    lp_model = _eager_lp(qm, model).train()
    lp, paths, fp = _naive_wrapper(lp_model, fp_model, x)
    assert torch.equal(out.lp, lp)  # same ops in the same order: bit-identical
    assert torch.equal(out.fp, fp)
    for a, b in zip(out.paths, paths):
        assert torch.equal(a, b)
    # gradients: the same loss through both gives the same gradient on every shared parameter
    params = list(fxqat.trainable_parameters(qm))
    loss, _ = fxqat.hybrid_loss(out, y)
    g1 = torch.autograd.grad(loss, params, allow_unused=True)
    loss2, _ = fxqat.hybrid_loss(fxqat.HybridOutput(lp, paths, fp, tuple(range(10)), qm.fxqat_hybrid), y)
    g2 = torch.autograd.grad(loss2, params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-7)  # summation order may differ


def test_shared_partner_paths_equal_lp_when_quantization_disabled():
    model = _resnet20()
    x, _ = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(partner="shared")))
    fxqat.set_quantization(qm, False)
    qm.train()
    bn = qm.get_submodule("layer1.0.bn1")
    before = bn.running_mean.clone()
    out = qm(x)
    for p in out.paths:
        assert torch.equal(p, out.lp)  # same modules, same op order, BN in train mode on both
    # the LP pass updates BN statistics once; FP passes through shared modules do not
    ref = copy.deepcopy(model).train()
    ref(x)
    assert torch.equal(bn.running_mean, ref.layer1[0].bn1.running_mean)
    assert not torch.equal(bn.running_mean, before)
    assert sum(p.numel() for p in qm.parameters()) == sum(p.numel() for p in fxqat.trainable_parameters(qm))


def test_loss_on_path_i_reaches_lp_blocks_up_to_i_only_and_never_the_partner():
    model = _resnet20()
    x, y = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    qm.train()
    out = qm(x)
    i = 3  # cut after block 3 (layer1.2): path 3 = LP blocks 0..3, FP blocks 4..
    F.cross_entropy(out.paths[i], y).backward()
    blocks = qm.meta["fxqat.blocks"]
    for b in blocks:
        names = [m for m in b.modules if isinstance(qm.get_submodule(m), (nn.Conv2d, nn.Linear))]
        for m in names:
            g = qm.get_submodule(m).weight.grad
            if b.index <= i:
                assert g is not None and g.abs().sum() > 0, m
            else:
                assert g is None, m
    assert all(p.grad is None for p in qm.fxqat_partner.parameters())
    assert not any(p.requires_grad for p in qm.fxqat_partner.parameters())


def test_lp_parameters_in_paths_are_the_backbone_objects():
    model = _resnet20()
    x, _ = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(mode="fp_prefix")))
    backbone = {id(p) for p in qm.parameters()}
    for name, v in qm._views.items():
        if name.startswith("lp"):
            assert {id(p) for p in v.parameters()} <= backbone
    shared = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(partner="shared")))
    ids = {id(p) for p in shared.parameters()}
    assert all({id(p) for p in v.parameters()} <= ids for v in shared._views.values())


@pytest.mark.parametrize("mode", ["lp_prefix", "fp_prefix", "single"])
def test_modes_path_counts_and_eval_output(mode):
    model = _resnet20()
    x, y = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(mode=mode)))
    out = qm.train()(x)
    assert len(out.paths) == (11 if mode == "single" else 10)
    loss, parts = fxqat.hybrid_loss(out, y)
    loss.backward()
    assert torch.isfinite(loss)
    qm.eval()
    assert torch.equal(qm(x), fxqat.convert(qm)(x))


def test_fp_prefix_single_block_paths_by_definition():
    model = _resnet20()
    x, _ = _x()
    fp_model = copy.deepcopy(model).eval()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(mode="single")))
    qm.train()(x)
    out = qm(x)
    lp_blocks, fp_blocks = _blocks(_eager_lp(qm, model).train()), _blocks(fp_model)
    with torch.no_grad():
        fcuts, f = [], x
        for b in fp_blocks:
            f = b(f)
            fcuts.append(f)
    k = 5
    h = lp_blocks[k](fcuts[k - 1])
    for b in fp_blocks[k + 1:]:
        h = b(h)
    assert torch.equal(out.paths[k], h)


def test_sampled_paths_are_seeded_and_unselected_paths_do_not_run():
    model = _resnet20()
    x, _ = _x()
    cfg = fxqat.QATConfig(hybrid=fxqat.HybridConfig(paths=2, seed=7))
    qm = fxqat.prepare_qat(model, (x,), cfg).train()
    calls = []
    for i in range(10):
        qm._views[f"fp_suffix{i}"].register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    ids = []
    for _ in range(3):
        calls.clear()
        out = qm(x)
        assert len(out.paths) == 2 and sorted(calls) == list(out.path_ids)
        ids.append(out.path_ids)
    other = fxqat.prepare_qat(model, (x,), cfg).train()
    assert [other(x).path_ids for _ in range(3)] == ids  # same seed, same steps: same paths
    assert len(set(ids)) > 1


def test_converted_state_dict_loads_into_plain_prepared_model():
    model = _resnet20()
    x, _ = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=3, hybrid=fxqat.HybridConfig()))
    qm.train()(x)
    lp = fxqat.convert(qm)
    assert not any(isinstance(m, fxqat.HybridOutput) for m in lp.modules())
    assert not any(k.startswith("fxqat_partner") for k in lp.state_dict())
    plain = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(w_bits=3, a_bits=3))
    plain.load_state_dict(lp.state_dict())  # strict: identical keys
    plain.eval()
    assert torch.equal(plain(x), lp(x))


def test_deepcopy_keeps_the_partner_and_the_paths():
    model = _resnet20()
    x, _ = _x()
    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig()))
    qm.train()(x)
    q2 = copy.deepcopy(qm)
    with torch.no_grad():
        for p in qm.parameters():
            p.add_(1.0)  # the copy must not see this
    q2.eval()
    assert isinstance(q2.train()(x), fxqat.HybridOutput)
    assert not any(a is b for a, b in zip(q2.parameters(), qm.parameters()))


def _mlp4(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


@pytest.mark.parametrize("mode", ["lp_prefix", "single"])
def test_shared_partner_path_loss_reaches_blocks_up_to_i_only(mode):
    net, x = _mlp4(), torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    layers = ["0", "2", "4", "6"]  # one Linear a block: stem, 2, 4, head
    outs = {}
    for suffix_grad in (False, True):
        cfg = fxqat.QATConfig(w_bits=2, a_bits=2,
                              hybrid=fxqat.HybridConfig(partner="shared", mode=mode, shared_suffix_grad=suffix_grad))
        qm = fxqat.prepare_qat(net, (x,), cfg).train()
        qm(x)  # initialise the quantizers
        assert [b.modules[0] for b in qm.meta["fxqat.blocks"]] == layers
        outs[suffix_grad] = out = qm(x)
        for i, path in enumerate(out.paths):
            params = [qm.get_submodule(m).weight for m in layers]
            grads = torch.autograd.grad(path.square().sum(), params, retain_graph=True, allow_unused=True)
            reached = [m for m, g in zip(layers, grads) if g is not None and g.abs().sum() > 0]
            lo = i if mode == "single" else 0  # single: path k = FP prefix (no grad), LP block k, FP suffix
            assert reached == (layers[lo:] if suffix_grad else layers[lo:i + 1]), (i, suffix_grad)
    for a, b in zip(outs[False].paths, outs[True].paths):
        assert torch.equal(a, b)  # detached weights are the same storage: identical values


def test_shared_suffix_grad_needs_a_shared_partner():
    with pytest.raises(ValueError, match="shared_suffix_grad=True needs partner='shared'"):
        fxqat.HybridConfig(shared_suffix_grad=True)


@pytest.mark.parametrize("partner", ["frozen", "shared"])
def test_forward_hooks_on_the_prepared_model_run_in_train_and_eval(partner):
    net, x = _mlp4(), torch.randn(16, 4)
    qm = fxqat.prepare_qat(net, (x,), fxqat.QATConfig(hybrid=fxqat.HybridConfig(partner=partner)))
    calls = []
    qm.register_forward_pre_hook(lambda m, args: calls.append(("pre", args[0] is x)))
    qm.register_forward_hook(lambda m, args, out: calls.append(("post", type(out).__name__)))
    out = qm.train()(x)
    assert isinstance(out, fxqat.HybridOutput) and calls == [("pre", True), ("post", "HybridOutput")]
    calls.clear()
    lp = qm.eval()(x)
    assert calls == [("pre", True), ("post", "Tensor")]
    assert torch.equal(lp, out.lp)  # no BatchNorm, quantizers initialised by the train call: same LP output
    assert torch.equal(qm.lp_forward(x), lp)
