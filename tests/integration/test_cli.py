"""The ``fxqat`` command: help, inspect, train + exact resume, bad input (exit 2), DDP with 2 processes, demo."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fxqat import data
from fxqat.cli import main

REPO = Path(__file__).resolve().parents[2]
needs_mnist = pytest.mark.skipif(not data.data_available("mnist"),
                                 reason=f"mnist.npz not found in {[str(p) for p in data.search_paths()]}")
needs_cifar = pytest.mark.skipif(not data.data_available("cifar10"),
                                 reason=f"cifar10_jpeg.npz not found in {[str(p) for p in data.search_paths()]}")

# a handful of steps on a slice of MNIST; FP pre-training 20 steps (cached in the test's own cache dir)
TRAIN = ["train", "--model", "cnn", "--data", "mnist", "--bits", "4/4", "--fp-steps", "20", "--steps", "6",
         "--batch-size", "32", "--train-subset", "512", "--test-subset", "256", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fxqat", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout, cwd=REPO)


def test_help_lists_the_four_commands():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("demo", "train", "inspect", "bench"):
        assert re.search(rf"^\s+{cmd}\s", r.stdout, re.M), r.stdout


def test_inspect_resnet18(capsys, tmp_path):
    png = tmp_path / "blocks.png"
    assert main(["inspect", "resnet18", "--input-shape", "3,64,64", "--png", str(png)]) == 0
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    m = re.search(r"^(\d+) quantizers \(W4A4", out, re.M)
    assert m, out
    n_q = int(m.group(1))
    lines = [line for line in out.splitlines() if line.startswith("fxqat_quant.")]
    assert len(lines) == n_q
    # resnet18: 20 conv/linear layers with weights -> 20 weight quantizers; first conv and fc at 8 bits
    w_lines = [line.split() for line in lines if line.split()[1] == "weight"]
    assert len(w_lines) == 21  # 17 3x3/7x7 convs + 3 downsample 1x1 convs + fc
    assert sorted(int(x[2]) for x in w_lines).count(8) == 2
    import fxqat

    if hasattr(fxqat, "find_blocks"):
        assert re.search(r"^resnet18: \d+ blocks", out, re.M), out


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


@needs_mnist
@pytest.mark.parametrize("extra", [[], ["--hybrid", "--paths", "2", "--bits", "2/2"]], ids=["lsq", "lsq_hybrid_k2"])
def test_train_then_resume_gives_the_identical_next_loss(tmp_path, capsys, extra):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(TRAIN + extra + ["--out", str(full)]) == 0
    ref = _metrics(full)
    assert ref["status"] == "complete" and [s["step"] for s in ref["steps"]] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(s["loss"]) for s in ref["steps"])

    assert main(TRAIN + extra + ["--out", str(part), "--stop-after", "3"]) == 0
    mid = _metrics(part)
    assert mid["status"] == "interrupted" and len(mid["steps"]) == 3
    assert not (part / "model.pt").exists()  # nothing that looks like a finished run
    assert "continue with --resume" in capsys.readouterr().out

    assert main(TRAIN + extra + ["--out", str(part), "--resume"]) == 0
    res = _metrics(part)
    assert res["status"] == "complete"
    # bit-exact: same data order/augmentation, same RNG, same optimizer state (atol=0, rtol=0)
    assert [s["loss"] for s in res["steps"]] == [s["loss"] for s in ref["steps"]]
    a = torch.load(full / "model.pt", weights_only=False)["model"]
    b = torch.load(part / "model.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert (full / "curves.png").stat().st_size > 0 and not list(full.glob(".*tmp*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--data", "imagenet"], "unknown dataset"),
        (["--data-dir", "/nonexistent/fxqat"], "no such folder"),
        (["--method", "magic"], "--method 'magic'"),
    ],
    ids=["model", "dataset", "data_dir", "method"],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    base = ["train", "--model", "cnn", "--data", "digits", "--steps", "1", "--out", str(tmp_path / "r")]
    rc = main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.startswith("fxqat: error:"), err
    assert not (tmp_path / "r" / "model.pt").exists()


def test_missing_data_lists_the_places_searched(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", "--model", "cnn", "--data", "mnist", "--data-dir", str(empty), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and str(empty / "mnist.npz") in err and "FXQAT_DATA" in err


def test_malformed_bits_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--bits", "4x4", "--out", "x"])
    assert e.value.code == 2 and "--bits '4x4'" in capsys.readouterr().err


def test_corrupt_checkpoint_exits_2_and_leaves_no_finished_run(tmp_path, capsys):
    run = tmp_path / "r"
    base = ["train", "--model", "mlp", "--data", "digits", "--fp-steps", "5", "--steps", "4", "--batch-size", "32",
            "--no-progress", "--out", str(run)]
    assert main(base + ["--stop-after", "2"]) == 0
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rc = main(base + ["--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt" in err and str(run / "checkpoint.pt") in err
    assert _metrics(run)["status"] == "interrupted" and not (run / "model.pt").exists()


def test_resume_with_other_flags_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    base = ["train", "--model", "mlp", "--data", "digits", "--fp-steps", "5", "--steps", "4", "--no-progress",
            "--out", str(run)]
    assert main(base + ["--stop-after", "1"]) == 0
    assert main(base + ["--resume", "--bits", "2/2"]) == 2
    assert "different ['bits']" in capsys.readouterr().err


_WORKER = textwrap.dedent("""
    import sys, torch
    import fxqat.training.loop as loop
    seen = {}
    orig = loop.fit
    def fit(model, *a, **k):
        seen["model"] = model
        return orig(model, *a, **k)
    loop.fit = fit  # before the CLI (and recipes, which binds fit) is imported
    from fxqat.cli import main
    rank = int(__import__("os").environ["RANK"])
    rc = main(sys.argv[2:])
    flat = torch.cat([p.detach().reshape(-1) for p in seen["model"].parameters()])
    torch.save(flat, f"{sys.argv[1]}/params_rank{rank}.pt")
    sys.exit(rc)
""")


@needs_mnist
@pytest.mark.parametrize(
    "extra", [[], pytest.param(["--hybrid", "--paths", "2"], marks=pytest.mark.slow)], ids=["lsq", "lsq_hybrid_k2"]
)
def test_ddp_two_processes_agree(tmp_path, extra):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(tmp_path), *TRAIN, *extra, "--out", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "FXQAT_CACHE": str(tmp_path / "c")},
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    p0, p1 = torch.load(tmp_path / "params_rank0.pt"), torch.load(tmp_path / "params_rank1.pt")
    assert p0.numel() > 1000
    torch.testing.assert_close(p0, p1, atol=0, rtol=0)  # DDP all-reduces gradients: identical updates
    m = _metrics(run)
    assert m["status"] == "complete" and m["run"]["world_size"] == 2 and len(m["steps"]) == 6
    assert not (run / "params_rank1.pt").exists()


_ROW = re.compile(r"^(FP \(32-bit\)|LSQ[^\d]*W\d+A\d+)\s+([-\d.naif]+)\s+([\d.]+)", re.M)


@pytest.mark.slow
def test_demo_quick_table_is_finite_and_above_chance(tmp_path):
    r = _run("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {m.group(1): float(m.group(2)) for m in _ROW.finditer(r.stdout)}
    assert len(rows) == 5, r.stdout
    assert {"FP (32-bit)", "LSQ W2A2", "LSQ + KD W2A2", "LSQ + block repl. W2A2", "LSQ + KD, BR's time W2A2"} == set(rows)
    for name, top1 in rows.items():
        assert math.isfinite(top1) and top1 > 10.0 + 2.0, (name, top1)  # 10 classes: chance is 10 %
    res = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert res["arms"]["LSQ W2A2"]["top1"] == pytest.approx(rows["LSQ W2A2"], abs=0.006)
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 0


def test_bench_runs_both_scripts_with_their_flags(monkeypatch, capsys):
    import fxqat.commands.run_jobs as jobs

    calls = []
    monkeypatch.setattr(jobs.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    present = [n for n in ("step_time.py", "hybrid_cost.py") if (REPO / "benchmarks" / n).is_file()]
    if not present:
        assert main(["bench"]) == 2 and "no benchmark scripts" in capsys.readouterr().err
        return
    assert main(["bench", "--quick", "--", "--rounds", "2"]) == 0
    assert [Path(c[1]).name for c in calls] == present
    assert all(c[0] == sys.executable and c[2:] == ["--quick", "--rounds", "2"] for c in calls)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    base = ["train", "--model", "mlp", "--data", "digits", "--method", "fp", "--steps", "5", "--no-progress"]
    torch.manual_seed(123)  # the global state before the call must not matter
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    torch.rand(7)
    assert main(base + ["--out", str(tmp_path / "b")]) == 0
    assert main(base + ["--seed", "1", "--out", str(tmp_path / "c")]) == 0
    la, lb, lc = ([s["loss"] for s in _metrics(tmp_path / r)["steps"]] for r in "abc")
    assert la == lb and la != lc


def test_demo_falls_back_to_digits_without_cifar(tmp_path, capsys):
    empty = tmp_path / "no_cifar_here"
    empty.mkdir()
    assert main(["-q", "demo", "--quick", "--data-dir", str(empty), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "cnn on digits" in out
    rows = {m.group(1): float(m.group(2)) for m in _ROW.finditer(out)}
    assert len(rows) == 5 and all(math.isfinite(v) and v > 50.0 for v in rows.values()), out  # chance: 10 %
    res = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert res["config"]["data"] == "digits" and set(res["arms"]) == set(rows)
