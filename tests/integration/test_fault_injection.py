"""Fault injection on real ``python -m fxqat train`` processes: SIGKILL mid-step, SIGKILL while a checkpoint is being
written, SIGKILL (and SIGSTOP) of one rank of a 2-process gloo DDP run, SIGKILL of one rank of a 2-process FSDP2
run inside a sharded save. After each kill, ``--resume`` must finish
with exactly the weights, quantizer state, optimizer state and metrics of an uninterrupted run (atol=0), and no
incomplete file is ever taken for a checkpoint.

The kill points are drawn from seeded generators (the seed is in each test), so a failure can be replayed; the
exact step a kill lands on still depends on the machine's speed, which is the point: any point must be safe.
The DDP processes are started directly with torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), without torchrun's agent, so what stops the survivors is fxqat itself, not the agent tearing the
job down.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fxqat.training.checkpoint import CheckpointError, load_checkpoint
from fxqat.training.dcp import MARKER, latest_sharded, verify_sharded

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 48, 4  # 512 digits at batch 32: 16 steps per epoch (8 per rank x 2 ranks under DDP)
# -q (a global flag): only warnings and errors on stderr, so a survivor's last line is its error message
TRAIN = ["-q", "train", "--model", "cnn", "--data", "digits", "--bits", "4/4", "--fp-steps", "0", "--steps",
         str(STEPS), "--batch-size", "32", "--train-subset", "512", "--test-subset", "64", "--checkpoint-every",
         str(EVERY), "--no-progress", "--threads", "1"]
SURVIVOR_BOUND_S = 60.0  # a survivor must exit this long after its peer died (measured: about 1 s)
HUNG_TIMEOUT_S = 20  # --ddp-timeout of the hung-peer test


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _start(out: Path, *extra, env=None, args=TRAIN) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fxqat", *args, *extra, "--out", str(out)], cwd=REPO,
                            env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen, timeout: float = 900) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, (p.returncode, out[-2000:], err[-3000:])
    return out + err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ddp(out: Path, *extra, world: int = 2, args=TRAIN, **env):
    port = _free_port()
    return [_start(out, *extra, args=args,
                   env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                            GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env))
            for r in range(world)]


def _finish_all(procs) -> None:
    try:
        for p in procs:
            _finish(p)
    finally:
        _kill_all(procs)


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _kill_one_rank(procs, victim: int, ready, delay: float) -> None:
    """Once ``ready()`` holds, SIGKILL rank ``victim`` ``delay`` s later; the other rank must exit with status 1
    within ``SURVIVOR_BOUND_S``, its last line the one-line message naming its rank and ``--resume``."""
    try:
        t0 = time.monotonic()
        while not ready():
            assert all(p.poll() is None for p in procs), "the run ended before the kill point"
            assert time.monotonic() - t0 < 600, "the kill point was not reached within 600 s"
            time.sleep(0.005)
        time.sleep(delay)
        procs[victim].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=SURVIVOR_BOUND_S)
        waited = time.monotonic() - t_kill
    finally:
        _kill_all(procs)
    assert procs[victim].returncode == -signal.SIGKILL
    assert survivor.returncode == 1 and waited < SURVIVOR_BOUND_S, (survivor.returncode, err[-3000:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("fxqat: error: fit(") and "lost contact with another process of the DDP run" in last, err
    assert f"(rank {1 - victim} of 2)" in last and "--resume" in last and "Traceback" not in err


def _metrics_step(out: Path) -> int:
    """The newest step of ``metrics.json`` (0 before the first checkpoint); it is replaced atomically, so it parses."""
    try:
        steps = json.loads((out / "metrics.json").read_text())["steps"]
    except FileNotFoundError:
        return 0
    return steps[-1]["step"] if steps else 0


def _wait_for_step(out: Path, target: int, procs, timeout: float = 600.0) -> None:
    t0 = time.monotonic()
    while _metrics_step(out) < target:
        assert all(p.poll() is None for p in procs), "the run ended before the kill point"
        assert time.monotonic() - t0 < timeout, f"no checkpoint at step {target} after {timeout} s"
        time.sleep(0.005)


def _assert_same(a, b, where="", skip=("time_s", "elapsed")):
    """Recursive equality, bit for bit for tensors (atol=0, rtol=0); wall-clock fields are skipped."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype, where
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            if k not in skip:
                _assert_same(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", skip)
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def _assert_same_run(ref: Path, run: Path) -> None:
    """Final weights + quantizer state (model.pt), optimizer/scheduler/RNG/position (checkpoint.pt) and every
    metric except wall-clock times are those of the uninterrupted ``ref``."""
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert ma["status"] == mb["status"] == "complete"
    assert [s["step"] for s in mb["steps"]] == list(range(1, STEPS + 1))
    _assert_same(ma, mb, "metrics")
    wa, wb = (load_checkpoint(d / "model.pt")["model"] for d in (ref, run))
    qkeys = [k for k in wa if "fxqat_quant" in k]
    assert any(k.endswith("scale") for k in qkeys) and any(k.endswith("initialized") for k in qkeys)
    _assert_same(wa, wb, "model")
    ca, cb = (load_checkpoint(d / "checkpoint.pt") for d in (ref, run))
    assert ca["optimizer"]["state"]  # momentum buffers exist, so their equality means something
    _assert_same(ca, cb, "checkpoint")
    assert not list(run.glob(".*.tmp"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fxqat_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("ref") / "run"
    _finish(_start(out, env=_env(FXQAT_CACHE=str(cache))))
    return out


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("ddp_ref") / "run"
    _finish_all(_start_ddp(out))
    assert json.loads((out / "metrics.json").read_text())["run"]["world_size"] == 2
    return out


# --------------------------------------------------------------------------------------------- single process
def test_sigkill_mid_step_then_resume_is_exact(tmp_path, reference, cache):
    rng = random.Random(1801)
    target, delay = rng.randrange(6, 34), rng.uniform(0.0, 0.03)
    out = tmp_path / "run"
    p = _start(out, env=_env(FXQAT_CACHE=str(cache)))
    try:
        _wait_for_step(out, target, [p])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        _kill_all([p])
    assert p.returncode == -signal.SIGKILL
    ck = load_checkpoint(out / "checkpoint.pt")  # whatever the kill hit, the checkpoint on disk is complete
    assert target <= ck["pos"]["step"] < STEPS and json.loads((out / "metrics.json").read_text())["status"] == "running"
    assert not (out / "model.pt").exists()
    log = _finish(_start(out, "--resume", env=_env(FXQAT_CACHE=str(cache))))
    assert "Traceback" not in log
    _assert_same_run(reference, out)


def test_sigkill_while_writing_a_checkpoint_then_resume_is_exact(tmp_path, reference, cache):
    rng = random.Random(1802)
    nth = rng.randrange(1, 5)  # kill inside the nth save (the first one leaves no checkpoint at all)
    out = tmp_path / "run"
    p = _start(out, env=_env(FXQAT_CACHE=str(cache), FXQAT_FAULT_SLEEP_IN_SAVE="0.5"))
    tmp = out / f".checkpoint.pt.{p.pid}.tmp"
    try:
        seen, present, t0 = 0, False, time.monotonic()
        while seen < nth:
            now = tmp.exists()
            seen += now and not present
            present = now
            assert p.poll() is None and time.monotonic() - t0 < 600, "the run ended before the kill point"
            time.sleep(0.005)
        time.sleep(0.15)  # well inside the 0.5 s between the temporary file's fsync and its rename
        assert tmp.exists()
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
    finally:
        _kill_all([p])
    assert p.returncode == -signal.SIGKILL
    # the interrupted save: a complete temporary file of step EVERY * nth that never became checkpoint.pt
    assert load_checkpoint(tmp)["pos"]["step"] == EVERY * nth
    if nth == 1:
        assert not (out / "checkpoint.pt").exists()
    else:
        assert load_checkpoint(out / "checkpoint.pt")["pos"]["step"] == EVERY * (nth - 1)
    # a writer killed inside torch.save leaves half a file: make it so, it must never be read
    tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp)
    _finish(_start(out, "--resume", env=_env(FXQAT_CACHE=str(cache))))
    assert not tmp.exists()  # removed by the first save of the resumed run: its writer is dead
    _assert_same_run(reference, out)


# --------------------------------------------------------------------------------------------- DDP (gloo)
def test_ddp_sigkill_of_one_rank_stops_the_other_then_resume_is_exact(tmp_path, ddp_reference, cache):
    rng = random.Random(1806)  # victim: rank 0, the writer and the store host
    victim, target, delay = rng.randrange(2), rng.randrange(6, 30), rng.uniform(0.0, 0.03)
    out = tmp_path / "run"
    _kill_one_rank(_start_ddp(out), victim, lambda: _metrics_step(out) >= target, delay)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert 0 < ck["pos"]["step"] < STEPS
    _finish_all(_start_ddp(out, "--resume"))
    _assert_same_run(ddp_reference, out)


def test_ddp_hung_rank_stops_the_other_after_the_timeout(tmp_path, cache):
    """A peer that stops answering (SIGSTOP) without dying: without a collective timeout the other rank would wait
    in the next all-reduce for torch's default of 30 minutes."""
    out = tmp_path / "run"
    # long enough for the two processes to meet at the rendezvous on a loaded machine, short enough for a test
    procs = _start_ddp(out, "--ddp-timeout", str(HUNG_TIMEOUT_S))
    try:
        _wait_for_step(out, EVERY, procs)
        procs[1].send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        _, err = procs[0].communicate(timeout=HUNG_TIMEOUT_S + SURVIVOR_BOUND_S)
        waited = time.monotonic() - t_stop
        procs[1].send_signal(signal.SIGKILL)
    finally:
        _kill_all(procs)
    assert procs[0].returncode == 1 and HUNG_TIMEOUT_S <= waited < HUNG_TIMEOUT_S + SURVIVOR_BOUND_S, (waited, err)
    assert "lost contact with another process of the DDP run" in err and "Timed out" in err
    assert "(rank 0 of 2)" in err and "is complete: relaunch the same command with --resume" in err
    load_checkpoint(out / "checkpoint.pt")


# --------------------------------------------------------------------------------------------- FSDP2 (gloo)
FSDP_STEPS, FSDP_EVERY = 20, 4
FSDP_TRAIN = ["-q", "train", "--model", "mlp", "--data", "digits", "--bits", "4/4", "--fp-steps", "0", "--steps",
              str(FSDP_STEPS), "--batch-size", "32", "--train-subset", "256", "--test-subset", "64",
              "--checkpoint-every", str(FSDP_EVERY), "--no-progress", "--threads", "1", "--fsdp"]


def test_fsdp_sigkill_of_one_rank_while_checkpointing_then_resume_is_exact(tmp_path):
    """Under FSDP2 every rank writes its shard: one rank is SIGKILLed inside the nth sharded save (the folder
    exists under its temporary name; each ``atomic_save`` of the save is held 0.5 s by the test hook). The survivor
    stops with the message, the half-written folder is never taken for a checkpoint, and a 2-process ``--resume``
    ends with the model, metrics and training state of an uninterrupted run, bit for bit."""
    rng = random.Random(1807)
    victim, nth, delay = rng.randrange(2), rng.randrange(2, 5), rng.uniform(0.05, 0.4)
    ref, out = tmp_path / "ref", tmp_path / "run"
    _finish_all(_start_ddp(ref, args=FSDP_TRAIN))
    procs = _start_ddp(out, args=FSDP_TRAIN, FXQAT_FAULT_SLEEP_IN_SAVE="0.5")
    tmp = out / "dcp" / f".step-{FSDP_EVERY * nth:08d}.tmp"
    _kill_one_rank(procs, victim, tmp.exists, delay)
    # the interrupted save never became a checkpoint: the newest complete one is the save before it
    newest = latest_sharded(out / "dcp")
    assert newest is not None and newest.name == f"step-{FSDP_EVERY * (nth - 1):08d}", newest
    assert verify_sharded(newest)["world_size"] == 2
    assert not (tmp.is_dir() and (tmp / MARKER).exists())
    _finish_all(_start_ddp(out, "--resume", args=FSDP_TRAIN))
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert mb["status"] == "complete" and [s["step"] for s in mb["steps"]] == list(range(1, FSDP_STEPS + 1))
    _assert_same(ma, mb, "metrics")
    _assert_same(*(load_checkpoint(d / "model.pt")["model"] for d in (ref, out)), "model")
    final = [latest_sharded(d / "dcp") for d in (ref, out)]
    assert [f.name for f in final] == [f"step-{FSDP_STEPS:08d}"] * 2
    for name in ("train.pt", "rng-rank0.pt", "rng-rank1.pt"):  # optimizer's plain state, scheduler, RNG, position
        _assert_same(*(load_checkpoint(f / name) for f in final), name)
    assert sorted(p.name for p in (out / "dcp").iterdir()) == [f"step-{FSDP_STEPS:08d}"]  # no temporary left
