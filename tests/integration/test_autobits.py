"""Mixed precision end to end: the allocated config prepares and trains ResNet-20 and the tiny Llama; the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

import fxqat
from fxqat import data
from fxqat.cli import main
from fxqat.mixed.quant_layers import quant_layers
from fxqat.models import get_model

needs_digits = pytest.mark.skipif(not data.data_available("digits"), reason="scikit-learn digits not available")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))


def _check_bits_and_train(model, cfg, alloc, batch, loss_fn, steps=6, lr=0.05):
    """The prepared model has the allocated bits on every allocated layer; a few SGD steps on one batch lower the
    loss (a deterministic overfitting check: same batch, fixed initial weights)."""
    x, y = batch
    qm = fxqat.prepare_qat(model, (x[:2],), cfg).train()
    layers = quant_layers(qm)
    for name, bits in alloc.modules.items():
        for q in layers[name].weights + layers[name].acts:
            assert qm.get_submodule(q).bits == bits, (name, q)
    assert {layers[n].fixed for n in alloc.modules} == {False}
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = loss_fn(qm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    return qm


@pytest.mark.slow
@pytest.mark.parametrize("method", ["paths", "hessian"])
def test_resnet20_allocation_prepares_and_trains(method):
    torch.manual_seed(0)
    model = get_model("resnet20")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    base = fxqat.QATConfig(w_bits=4, a_bits=4)
    probe = fxqat.prepare_qat(model, (batches[0][0][:2],), base.with_(hybrid=fxqat.HybridConfig()))
    table = fxqat.sensitivity(probe, batches, bits=(2, 3, 4), method=method)
    assert [r.block for r in table.rows][:2] == ["stem", "layer1.0"] and len(table.rows) == 11
    assert table.total_weight_count == sum(p.numel() for n, p in model.named_parameters()
                                           if n.endswith("conv1.weight") or n.endswith("conv2.weight")) - 432
    cfg, alloc = fxqat.allocate_bits(table, avg_bits=3, base_config=base)
    assert alloc.used_bits <= 3 * table.total_weight_count and len(alloc.bits) == 9
    _check_bits_and_train(model, cfg, alloc, batches[0], F.cross_entropy)


@pytest.mark.slow
def test_tiny_llama_allocation_prepares_and_trains():
    pytest.importorskip("transformers")
    from fxqat.models.hf import char_llama

    model = char_llama(vocab_size=65, seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 65, (4, 16), generator=g), torch.randint(0, 65, (4, 16), generator=g))
               for _ in range(2)]
    base = fxqat.QATConfig.preset("int4_weight_only")
    probe = fxqat.prepare_qat(model, (batches[0][0][:1],), base.with_(hybrid=fxqat.HybridConfig()))
    table = fxqat.sensitivity(probe, batches, bits=(2, 4, 8))
    assert [r.block for r in table.rows] == [f"model.layers.{i}" for i in range(4)]
    assert all(len(r.modules) == 7 for r in table.rows) and table.kinds == ("weight", "act")
    # every Linear but lm_head (kept in FP by the preset): 4 layers x (4 attention + 3 MLP projections)
    assert table.total_weight_count == 4 * (128 * 128 * 2 + 64 * 128 * 2 + 3 * 128 * 384)
    cfg, alloc = fxqat.allocate_bits(table, avg_bits=3, base_config=base)
    assert cfg.a_bits is None and all(o.a_bits is None for o in cfg.overrides)  # weight-only stays weight-only
    assert 2 <= alloc.avg_bits <= 3
    lm = lambda out, y: fxqat.hybrid_loss(out, y)[0]  # noqa: E731 - CE over (N, T, V) logits
    _check_bits_and_train(model, cfg, alloc, batches[0], lm, lr=0.01)
    hyb = _check_bits_and_train(model, cfg.with_(hybrid=fxqat.HybridConfig()), alloc, batches[0], lm, steps=3,
                                lr=0.01)
    assert len(hyb(batches[0][0]).paths) == 3  # the allocated config also trains with block replacement


@pytest.mark.slow
@needs_digits
def test_cli_autobits_on_digits(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["autobits", "--model", "cnn", "--data", "digits", "--avg-bits", "3", "--choices", "2,4,8",
            "--fp-steps", "40", "--steps", "8", "--batch-size", "64", "--sens-batches", "2", "--test-subset", "128",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bits per block: features.1=" in printed and "top-1" in printed
    summary = json.loads((out / "autobits.json").read_text())
    alloc = summary["allocation"]
    assert alloc["used_bits"] <= alloc["budget_bits"] == 3 * (4608 + 9216 + 18432)
    assert set(alloc["bits"]) == {"features.1", "features.2", "features.3"}
    assert set(alloc["bits"].values()) <= {2, 4, 8}
    table = fxqat.SensitivityTable.from_json((out / "sensitivity.json").read_text())
    assert table.method == "paths" and table.bits == (2, 4, 8) and table.n_batches == 2
    for name in ("bits.png", "sensitivity.png", "curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert summary["final"]["step"] == 8 and summary["final"]["test_top1"] > 50
    # the FP model is cached: a second run (another estimator) trains no FP model
    assert main(args[:-1] + [str(tmp_path / "run2"), "--sensitivity", "fisher"]) == 0
    assert "(cached)" in capsys.readouterr().out


def test_cli_autobits_bad_input(tmp_path, capsys):
    assert main(["autobits", "--model", "cnn", "--data", "digits", "--out", str(tmp_path)]) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert main(["autobits", "--data", "nope", "--avg-bits", "3", "--out", str(tmp_path)]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage message, status 2
        main(["autobits", "--choices", "2,x", "--avg-bits", "3"])
    assert e.value.code == 2 and "--choices '2,x'" in capsys.readouterr().err


@needs_digits
def test_cli_autobits_infeasible_budget(tmp_path, capsys):
    rc = main(["autobits", "--model", "cnn", "--data", "digits", "--avg-bits", "1.5", "--fp-steps", "0",
               "--sens-batches", "1", "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "infeasible: the smallest feasible budget is avg_bits=2 (max_bytes=8064)" in err, err
