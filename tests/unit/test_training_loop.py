"""fxqat.training.loop / checkpoint: losses, schedule, atomic checkpoints, FP cache, plain and hybrid QAT steps."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxqat
from fxqat import data
from fxqat.models import get_model
from fxqat.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fxqat.training.loop import TrainConfig, compute_loss, evaluate, fit, kd_loss, lr_schedule
from fxqat.training.recipes import train_fp, train_qat


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))


def _digits(bs=64):
    tr, te = data.digits(train=True), data.digits(train=False)
    return tr, data.BatchLoader(tr, bs, seed=0, rank=0, world_size=1), \
        data.BatchLoader(te, 512, train=False, rank=0, world_size=1)


def test_kd_loss_is_t2_kl_of_softmaxes():
    torch.manual_seed(0)
    a, f = torch.randn(5, 7), torch.randn(5, 7)
    t = 3.0
    p, q = F.softmax(f / t, 1), F.softmax(a / t, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * t * t
    torch.testing.assert_close(kd_loss(a, f, t), expected, atol=1e-6, rtol=1e-5)  # float32 log/softmax rounding
    assert float(kd_loss(f, f, t)) == pytest.approx(0.0, abs=1e-7)


def test_kd_arm_loss_equals_the_hybrid_backbone_term():
    torch.manual_seed(0)
    out, teacher, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    hc = fxqat.HybridConfig()
    total, parts, logits = compute_loss(out, y, teacher, hc.kd_weight, hc.temperature)
    ref = F.cross_entropy(out, y) + hc.kd_weight * kd_loss(out, teacher, hc.temperature)
    torch.testing.assert_close(total, ref, atol=1e-6, rtol=0)
    assert logits is out
    plain, parts, _ = compute_loss(out, y)
    torch.testing.assert_close(plain, F.cross_entropy(out, y), atol=0, rtol=0)


def test_cosine_schedule_with_warmup():
    p = nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(lr=0.1, warmup_steps=2)
    opt = torch.optim.SGD([{"params": [p], "lr": 0.1}], lr=0.1)
    sched = lr_schedule(opt, cfg, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.05 * (1 + math.cos(math.pi * 4 / 8)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_roundtrip_and_corruption(tmp_path):
    p = tmp_path / "c.pt"
    atomic_save({"model": {"w": torch.arange(3)}, "step": 7}, p)
    assert load_checkpoint(p, required=("model",))["step"] == 7
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(p, required=("optimizer",))
    p.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(p)


def test_fit_learns_digits_and_train_fp_caches():
    tr, loader, test = _digits()
    cfg = TrainConfig(steps=60, lr=0.05, progress=False)
    m = get_model("mlp", in_shape=tr.input_shape)
    torch.manual_seed(0)
    m, info = train_fp(m, loader, cfg, key={"model": "mlp", "data": "digits"}, test_loader=test)
    assert not info["cached"] and info["top1"] > 85.0  # 10 classes; a 2-layer MLP reaches >90% in 60 steps
    m2, info2 = train_fp(get_model("mlp", in_shape=tr.input_shape), loader, cfg,
                         key={"model": "mlp", "data": "digits"}, test_loader=test)
    assert info2["cached"] and info2["top1"] == info["top1"] and info2["path"] == info["path"]
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert evaluate(m2, test) == pytest.approx(info["top1"], abs=0)


@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid"])
def test_train_qat_from_fp(hybrid, tmp_path):
    tr, loader, test = _digits()
    fp = get_model("cnn", in_shape=tr.input_shape)
    torch.manual_seed(0)
    fit(fp, loader, TrainConfig(steps=80, lr=0.1, progress=False), test_loader=None)
    fp_top1 = evaluate(fp, test)
    hc = fxqat.HybridConfig() if hybrid else None
    qm = fxqat.prepare_qat(fp, (tr[0][0][None].repeat(2, 1, 1, 1),), fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=hc))
    hist = train_qat(qm, loader, TrainConfig(steps=20, lr=0.01, progress=False), test_loader=test,
                     out_dir=tmp_path / "run")
    assert hist["status"] == "complete" and len(hist["steps"]) == 20
    assert all(math.isfinite(s["loss"]) for s in hist["steps"])
    if hybrid:  # the hybrid loss logs the task loss of the LP backbone separately
        assert "ce" in hist["steps"][0] and hist["steps"][0]["loss"] > hist["steps"][0]["ce"]
    # W4A4 fine-tuned from a >90% FP model stays well above chance (10%)
    assert fp_top1 > 85.0 and hist["final"]["test_top1"] > 60.0
    assert (tmp_path / "run" / "metrics.json").exists() and (tmp_path / "run" / "curves.png").exists()
