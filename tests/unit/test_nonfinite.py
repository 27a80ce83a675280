"""Non-finite steps and quantizer health: a poisoned batch is skipped without a trace, persistent NaNs stop the run
at a named step with the last good checkpoint intact, ``raise`` raises, and ``fxqat inspect --health`` reports
collapsed, exploded and non-finite quantizer scales.

The model is a QAT MLP (Linear-BatchNorm-ReLU, LSQ W4A4) on 256 digits, batch 32: 8 steps per epoch.
"""

import json
import logging
import re

import pytest
import torch

import fxqat
from fxqat import data
from fxqat.cli import main
from fxqat.models import get_model
from fxqat.training.checkpoint import atomic_save, load_checkpoint
from fxqat.training.health import HUGE_SCALE, TINY_SCALE, quantizer_health
from fxqat.training.loop import TrainConfig
from fxqat.training.recipes import train_qat

EPOCH = 8


class Poisoned:
    """A BatchLoader whose batches at the given (1-based, global) steps hold a NaN in their input."""

    def __init__(self, inner, bad=()):
        self.inner, self.bad, self.epoch, self.start = inner, set(bad), 0, 0

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start = epoch, start_batch
        self.inner.set_epoch(epoch, start_batch)

    def __iter__(self):
        for i, (x, y) in enumerate(self.inner, start=self.start):
            if self.epoch * len(self) + i + 1 in self.bad:
                x = x.clone()
                x.view(-1)[7] = float("nan")
            yield x, y


def _loader(bad=()):
    return Poisoned(data.BatchLoader(data.digits(train=True).subset(256), 32, seed=0), bad)


def _qat_model():
    torch.manual_seed(0)
    m = get_model("mlp", in_shape=(1, 8, 8))
    return fxqat.prepare_qat(m, (torch.zeros(2, 1, 8, 8),), fxqat.QATConfig(w_bits=4, a_bits=4))


def _run(bad=(), steps=16, out=None, **kw):
    cfg_kw = {k: kw.pop(k) for k in ("nonfinite", "max_nonfinite", "checkpoint_every") if k in kw}
    cfg = TrainConfig(steps=steps, lr=0.05, progress=False, plot=False, **cfg_kw)
    qm = _qat_model()
    return qm, train_qat(qm, _loader(bad), cfg, out_dir=out, **kw)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)  # exact: the skipped step changed nothing


def test_one_poisoned_batch_is_skipped_counted_and_reported(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fxqat.training.health"):
        qm, hist = _run(bad={5}, out=tmp_path / "run")
    assert hist["status"] == "complete" and hist["nonfinite_steps"] == [5]
    assert [s["step"] for s in hist["steps"]] == [s for s in range(1, 17) if s != 5]
    assert all(torch.isfinite(torch.tensor([s["loss"] for s in hist["steps"]])))
    assert all(bool(torch.isfinite(t).all()) for t in qm.state_dict().values() if t.is_floating_point())
    assert any("step 5 skipped (loss nan)" in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["nonfinite_steps"] == [5]


def test_a_skipped_step_leaves_weights_buffers_quantizers_and_optimizer_untouched(tmp_path):
    # stopped right after the poisoned step 5 vs a clean run stopped before it: the same state, bit for bit
    poisoned, _ = _run(bad={5}, out=tmp_path / "p", stop_after=5)
    clean, _ = _run(out=tmp_path / "c", stop_after=4)
    _same_state(poisoned.state_dict(), clean.state_dict())  # BatchNorm statistics and quantizer buffers included
    p, c = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("p", "c"))
    assert (p["pos"]["step"], c["pos"]["step"]) == (5, 4)
    for i, st in c["optimizer"]["state"].items():
        _same_state(p["optimizer"]["state"][i], st)  # momentum buffers


def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped(tmp_path):
    qm = _qat_model()
    loader = _loader()
    w = next(p for n, p in qm.named_parameters() if n.endswith("weight"))
    calls = {"n": 0}

    def poison_step_4(g):  # calibration runs without autograd, so call k is the backward of step k
        calls["n"] += 1
        return torch.full_like(g, float("inf")) if calls["n"] == 4 else g

    w.register_hook(poison_step_4)
    hist = train_qat(qm, loader, TrainConfig(steps=8, lr=0.05, progress=False, plot=False))
    assert hist["status"] == "complete" and hist["nonfinite_steps"] == [4]
    assert all(torch.isfinite(torch.tensor([s["loss"] for s in hist["steps"]])))


def test_persistent_nan_stops_at_a_named_step_and_keeps_the_last_good_checkpoint(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="fxqat.training.loop"):
        _, hist = _run(bad=range(3, 100), out=out, max_nonfinite=3, checkpoint_every=2)
    msg = hist["error"]
    assert hist["status"] == "diverged" and hist["nonfinite_steps"] == [3, 4, 5]
    assert "3 consecutive non-finite steps (loss nan) ending at step 5; stopped." in msg
    assert f"{out / 'checkpoint.pt'} (step 2), is kept" in msg and any(msg in r.getMessage() for r in caplog.records)
    assert json.loads((out / "metrics.json").read_text())["error"] == msg
    ck = load_checkpoint(out / "checkpoint.pt")  # intact, and the state of a clean run after 2 steps
    clean, _ = _run(out=tmp_path / "clean", stop_after=2)
    assert ck["pos"]["step"] == 2
    _same_state(ck["model"], clean.state_dict())
    # the data fixed, --resume continues from it exactly as an uninterrupted clean run
    _, resumed = _run(out=out, resume=True)
    _, ref = _run()
    assert resumed["status"] == "complete" and resumed["nonfinite_steps"] == []
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in ref["steps"]]


def test_policy_stop_stops_at_the_first_nonfinite_step(tmp_path):
    _, hist = _run(bad={6}, out=tmp_path / "run", nonfinite="stop", checkpoint_every=4)
    assert hist["status"] == "diverged" and hist["nonfinite_steps"] == [6]
    assert hist["error"].startswith("fit(qat): 1 non-finite step (loss nan) ending at step 6; stopped.")
    assert "(step 4), is kept" in hist["error"] and load_checkpoint(tmp_path / "run" / "checkpoint.pt")


def test_policy_raise_raises_naming_the_step(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite step 6 \(loss nan\)"):
        _run(bad={6}, out=tmp_path / "run", nonfinite="raise", checkpoint_every=4)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["pos"]["step"] == 4


def test_cli_diverging_run_exits_1_naming_the_step_and_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    # lr 1e30: step 1 is finite, then the weights are so large that every loss is NaN
    rc = main(["-q", "train", "--model", "mlp", "--data", "digits", "--method", "fp", "--lr", "1e30", "--steps", "12",
               "--batch-size", "32", "--train-subset", "256", "--checkpoint-every", "1", "--max-nonfinite", "2",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("fxqat: error: fit(fp): 2 consecutive non-finite steps (loss nan) ending at "
                                      "step 3; stopped."), err
    assert f"{out / 'checkpoint.pt'} (step 1), is kept" in err and not (out / "model.pt").exists()
    ck = load_checkpoint(out / "checkpoint.pt")
    assert all(bool(torch.isfinite(t).all()) for t in ck["model"].values() if t.is_floating_point())


# ------------------------------------------------------------------------------------- quantizer health
_ROW = re.compile(r"^(fxqat_quant\.\S+)\s+(weight|act)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", re.M)


def test_inspect_health_shows_saturated_quantizers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["-q", "train", "--model", "mlp", "--data", "digits", "--fp-steps", "0", "--steps", "3",
                 "--batch-size", "32", "--train-subset", "256", "--no-progress", "--out", str(out)]) == 0
    ck = load_checkpoint(out / "model.pt")
    scales = sorted(k for k in ck["model"] if k.startswith("fxqat_quant.") and k.endswith(".scale"))
    assert len(scales) >= 3
    broken = {scales[0]: TINY_SCALE / 1e4, scales[1]: HUGE_SCALE * 1e2, scales[2]: float("nan")}
    for k, v in broken.items():
        ck["model"][k] = torch.full_like(ck["model"][k], v)
    bad = tmp_path / "broken.pt"
    atomic_save(ck, bad)
    capsys.readouterr()
    assert main(["inspect", "mlp", "--input-shape", "1,8,8", "--checkpoint", str(bad)]) == 0
    text = capsys.readouterr().out
    health = text[text.index("quantizer health of"):]
    rows = {m.group(1): m.group(6) for m in _ROW.finditer(health)}
    expect = {k[: -len(".scale")]: s for k, s in zip(broken, ("collapsed", "exploded", "non-finite"))}
    assert {n: rows[n] for n in expect} == expect
    assert all(s == "ok" for n, s in rows.items() if n not in expect) and len(rows) == len(scales)
    assert f"{len(rows) - 3} ok, 3 not (collapsed, exploded, non-finite)" in health
    # the library view agrees with the table
    qm = _qat_model()
    qm.load_state_dict(load_checkpoint(bad)["model"])
    assert {r["name"]: r["status"] for r in quantizer_health(qm) if r["name"] in expect} == expect
