"""FSDP2 on 2 CPU processes (gloo), nothing mocked: a traced MLP through ``fit(fsdp=True)`` and a tiny HF
``LlamaForCausalLM`` through ``shard_prepared`` + ``dcp``, each plain and hybrid (block replacement, frozen partner).

Two spawned runs are shared by every assertion (module fixture ``runs``): the first trains each case without a
break and, separately, up to a sharded DCP checkpoint at step ``K``; the second, in fresh processes, resumes from it.
A single-process run of the same global batches (in the test process) gives the reference loss curve.

Tolerances: the resumed run is compared bit-exactly (atol=0) with the uninterrupted one: the same collectives run
in the same order on the same values. The FSDP loss curve vs the single-process one is compared with rtol=2e-5:
gradients are averaged by a reduce-scatter of per-rank gradients (rank 0's half of the batch plus rank 1's, then
/ 2) instead of one mean over the whole batch, a different float summation order. Measured max relative difference
over the curve: mlp 4e-8, llama 6e-8, llama_hybrid 1e-7, mlp_hybrid 5e-6 (Adam on 4-bit LSQ: a rounding-sized
change of a weight or scale moves the next steps' losses more).
"""

import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxqat
from fxqat.models import get_model
from fxqat.training.checkpoint import CheckpointError, atomic_save, load_checkpoint
from fxqat.training.dcp import MARKER, latest_sharded, load_sharded, save_sharded, verify_sharded
from fxqat.training.fsdp import full_state_dict, shard_prepared
from fxqat.training.loop import TrainConfig, fit

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS, K, B = 6, 3, 8  # optimizer steps, checkpoint step, global batch (B / 2 per rank)
LLAMA_STEPS, LLAMA_K = 4, 2
RTOL = 2e-5  # FSDP vs single-process loss curve (see the module docstring)
CASES = ("mlp", "mlp_hybrid", "llama", "llama_hybrid")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Loader:
    """Fixed global batches of ``B``; rank r reads rows r::world of each (fit's ``set_epoch`` protocol)."""

    def __init__(self, x, y, rank=0, world=1):
        self.x, self.y, self.rank, self.world, self.start = x, y, rank, world, 0

    def __len__(self):
        return len(self.x) // B

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __iter__(self):
        for j in range(self.start, len(self)):
            sl = slice(j * B, (j + 1) * B)
            yield self.x[sl][self.rank::self.world], self.y[sl][self.rank::self.world]


def _mlp_data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(STEPS * B, 8, generator=g), torch.randint(0, 4, (STEPS * B,), generator=g)


def _mlp(hybrid: bool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, hybrid=fxqat.HybridConfig(seed=1) if hybrid else None)
    qm = fxqat.prepare_qat(net, (torch.randn(2, 8),), cfg)
    x, _ = _mlp_data()
    fxqat.calibrate(qm, [x[:B]])  # the same calibration batch in every process (and the single-process reference)
    return qm


def _mlp_cfg(hybrid: bool):
    return TrainConfig(steps=STEPS, lr=0.02, optimizer="adam" if hybrid else "sgd", progress=False, plot=False)


def _llama(hybrid: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    ids = _llama_ids()
    qcfg = fxqat.QATConfig.preset("int4_weight_only")
    if hybrid:
        qcfg = qcfg.with_(hybrid=fxqat.HybridConfig(seed=1))
    qm = fxqat.prepare_qat(LlamaForCausalLM(cfg), (ids[:2, :-1],), qcfg)
    fxqat.calibrate(qm, [ids[:B, :-1]])
    return qm


def _llama_ids():
    return torch.randint(0, 64, (LLAMA_STEPS * B, 13), generator=torch.Generator().manual_seed(5))


def _partner(qm):
    """The frozen FP partner's full (gathered) state, or None for a plain model."""
    if getattr(qm, "fxqat_partner", None) is None:
        return None
    return {k: v.clone() for k, v in full_state_dict(qm).items() if k.startswith("fxqat_partner.")}


def _record(qm, opt, losses):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    _, osd = get_state_dict(qm, opt, options=StateDictOptions(full_state_dict=True))
    return {"model": {k: v.clone() for k, v in full_state_dict(qm).items()}, "losses": losses,
            "optim": {f"{n}.{k}": v.clone() for n, st in osd["state"].items() for k, v in st.items()
                      if torch.is_tensor(v)}, "partner": _partner(qm)}


def _llama_run(hybrid, rank, world, ckpt, resume):
    """Manual loop (shard_prepared + dcp): ``LLAMA_STEPS`` steps, a DCP save after ``LLAMA_K`` (unless resuming)."""
    qm = _llama(hybrid)
    shard_prepared(qm)
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=3e-3)
    start, losses = 0, []
    if resume:
        start = load_sharded(ckpt, qm, opt)["step"]
    ids = _llama_ids()
    partner0 = _partner(qm)
    for step in range(start, LLAMA_STEPS):
        batch = ids[step * B:(step + 1) * B][rank::world]
        out = qm(batch[:, :-1])
        loss, _ = fxqat.hybrid_loss(out, batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step + 1 == LLAMA_K and not resume and ckpt is not None:
            save_sharded(ckpt, qm, opt, step=step + 1, extra={"step": step + 1})
    return {**_record(qm, opt, losses), "partner0": partner0}


def _worker(rank, world, port, phase, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    try:
        x, y = _mlp_data()
        for case in ("mlp", "mlp_hybrid"):
            hybrid = case.endswith("hybrid")
            runs = [("full", None, False)] if phase == "first" else []
            runs += [("resumed", K, False)] if phase == "first" else [("resumed", None, True)]
            for name, stop, resume in runs:
                qm = _mlp(hybrid)
                partner0 = _partner(qm)
                d = Path(out) / f"{case}_{name}"
                h = fit(qm, _Loader(x, y, rank, world), _mlp_cfg(hybrid), out_dir=d, stop_after=stop, resume=resume,
                        params=list(fxqat.trainable_parameters(qm)), fsdp=True, desc=case)
                res[f"{case}_{name}"] = {"status": h["status"], "losses": [s["loss"] for s in h["steps"]],
                                         "model": {k: v.clone() for k, v in full_state_dict(qm).items()},
                                         "partner": _partner(qm), "partner0": partner0}
        for case in ("llama", "llama_hybrid"):
            hybrid = case.endswith("hybrid")
            ckpt = Path(out) / f"{case}_dcp"
            if phase == "first":
                res[f"{case}_full"] = _llama_run(hybrid, rank, world, ckpt, False)  # saves at LLAMA_K, goes on
            else:
                res[f"{case}_resumed"] = _llama_run(hybrid, rank, world, ckpt, True)
        torch.save(res, Path(out) / f"{phase}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("transformers")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    out = tmp_path_factory.mktemp("fsdp")
    for phase in ("first", "second"):
        mp.spawn(_worker, args=(2, _free_port(), phase, str(out)), nprocs=2, join=True)
    res = [{**torch.load(out / f"first-rank{r}.pt"), **torch.load(out / f"second-rank{r}.pt")} for r in range(2)]
    return out, res


def _single_process_losses(case):
    """The reference: the same global batches of B in one process, no FSDP."""
    hybrid = case.endswith("hybrid")
    if case.startswith("mlp"):
        qm = _mlp(hybrid)
        x, y = _mlp_data()
        h = fit(qm, _Loader(x, y), _mlp_cfg(hybrid), params=list(fxqat.trainable_parameters(qm)), desc=case)
        return [s["loss"] for s in h["steps"]]
    qm = _llama(hybrid)
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=3e-3)
    ids, losses = _llama_ids(), []
    for step in range(LLAMA_STEPS):
        batch = ids[step * B:(step + 1) * B]
        loss, _ = fxqat.hybrid_loss(qm(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("case", CASES)
def test_fsdp_gathered_parameters_identical_across_ranks_and_trained(runs, case):
    _, (r0, r1) = runs
    full0, full1 = r0[f"{case}_full"]["model"], r1[f"{case}_full"]["model"]
    assert full0.keys() == full1.keys() and len(full0) > 10
    assert all(torch.equal(full0[k], full1[k]) for k in full0)
    start = (_mlp if case.startswith("mlp") else _llama)(case.endswith("hybrid")).state_dict()
    moved = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, full0[k])]
    assert any("fxqat_quant" in k or "quantizer" in k for k in moved), moved[:5]  # quantizer scales trained too
    assert len(moved) >= 5


@pytest.mark.parametrize("case", CASES)
def test_fsdp_loss_curve_matches_single_process(runs, case):
    _, (r0, r1) = runs
    fsdp = [(a + b) / 2 for a, b in zip(r0[f"{case}_full"]["losses"], r1[f"{case}_full"]["losses"])]
    ref = _single_process_losses(case)
    assert len(fsdp) == len(ref) >= 4
    assert r0[f"{case}_full"]["losses"] != r1[f"{case}_full"]["losses"]  # each rank saw its own half
    rel = max(abs(a - b) / abs(b) for a, b in zip(fsdp, ref))
    print(f"fsdp vs single process, {case}: max relative loss difference {rel:.1e}")
    assert rel <= RTOL, (case, rel, fsdp, ref)


@pytest.mark.parametrize("case", ["mlp_hybrid", "llama_hybrid"])
def test_fsdp_frozen_partner_never_changes(runs, case):
    _, (r0, r1) = runs
    for r in (r0, r1):
        for run in ("full", "resumed"):
            before, after = r[f"{case}_{run}"]["partner0"], r[f"{case}_{run}"]["partner"]
            assert before and before.keys() == after.keys() and any(k.endswith("weight") for k in before)
            assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", CASES)
def test_fsdp_dcp_resume_is_bit_exact(runs, case):
    out, (r0, r1) = runs
    for r in (r0, r1):
        full, resumed = r[f"{case}_full"], r[f"{case}_resumed"]
        assert full["model"].keys() == resumed["model"].keys()
        assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"]), \
            [k for k in full["model"] if not torch.equal(full["model"][k], resumed["model"][k])][:5]
        n = STEPS if case.startswith("mlp") else LLAMA_STEPS
        assert full["losses"][-(n - (K if case.startswith("mlp") else LLAMA_K)):] == resumed["losses"][-(
            n - (K if case.startswith("mlp") else LLAMA_K)):]
        if "optim" in full:
            assert full["optim"].keys() == resumed["optim"].keys() and full["optim"]
            assert all(torch.equal(full["optim"][k], resumed["optim"][k]) for k in full["optim"])
    if case.startswith("mlp"):  # the final DCP folders: optimizer state, read back in one process (world 2 -> 1)
        hybrid = case.endswith("hybrid")
        states = []
        for run in ("full", "resumed"):
            qm = _mlp(hybrid)
            opt = torch.optim.Adam(fxqat.trainable_parameters(qm)) if hybrid else \
                torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.1, momentum=0.9)
            extra = load_sharded(out / f"{case}_{run}" / "dcp", qm, opt, restore_rng=False)
            assert extra["pos"]["step"] == STEPS
            states.append((qm.state_dict(), opt.state_dict()))
        (m_a, o_a), (m_b, o_b) = states
        assert all(torch.equal(m_a[k], m_b[k]) for k in m_a)
        assert all(torch.equal(v, o_b["state"][i][k]) for i, st in o_a["state"].items() for k, v in st.items())
        assert len(o_a["state"]) == len(list(fxqat.trainable_parameters(qm)))
        assert all(torch.equal(m_a[k], r0[f"{case}_full"]["model"][k]) for k in m_a)


def test_fsdp_half_written_checkpoint_is_refused(runs, tmp_path):
    out, _ = runs
    good = latest_sharded(out / "mlp_full" / "dcp")
    assert good is not None and good.name == f"step-{STEPS:08d}"
    assert verify_sharded(good)["world_size"] == 2
    qm = _mlp(False)
    opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in qm.state_dict().items()}
    # no completion marker: a save that was interrupted (its temporary folder, renamed by hand)
    half = tmp_path / "step-00000009"
    shutil.copytree(good, half)
    (half / MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete.*interrupted"):
        load_sharded(half, qm, opt)
    assert latest_sharded(tmp_path) is None  # never taken for the newest checkpoint either
    # a truncated shard
    cut = tmp_path / "cut" / "step-00000006"
    shutil.copytree(good, cut)
    shard = next(p for p in cut.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated \(\d+ of \d+ bytes\)"):
        load_sharded(cut.parent, qm, opt)
    assert all(torch.equal(v, qm.state_dict()[k]) for k, v in before.items())  # nothing was loaded


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fxqat_fsdp_pwned",))


def test_fsdp_metadata_needing_arbitrary_unpickling_is_refused(runs, tmp_path):
    out, _ = runs
    bad = tmp_path / "step-00000006"
    shutil.copytree(latest_sharded(out / "mlp_full" / "dcp"), bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_Boom()))
    # a forger could rewrite the marker too: then only the restricted unpickler stands in the way
    marker = load_checkpoint(bad / MARKER)
    forged = (bad / ".metadata").read_bytes()
    marker["files"][".metadata"] = {"size": len(forged), "sha256": hashlib.sha256(forged).hexdigest()}
    atomic_save(marker, bad / MARKER)
    Path("/tmp/fxqat_fsdp_pwned").unlink(missing_ok=True)
    qm = _mlp(False)
    with pytest.raises(CheckpointError, match="metadata was refused"):
        load_sharded(bad, qm, torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.1))
    assert not Path("/tmp/fxqat_fsdp_pwned").exists()


def test_fsdp_cli_train_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m fxqat train --fsdp``: complete run, sharded checkpoint, gathered model.pt."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "fxqat", "-q", "train", "--model", "mlp", "--data", "digits", "--bits", "4/4", "--fp-steps", "0",
           "--steps", "6", "--batch-size", "32", "--train-subset", "256", "--test-subset", "64", "--checkpoint-every",
           "3", "--no-progress", "--threads", "1", "--fsdp", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    hist = json.loads((out / "metrics.json").read_text())
    assert hist["status"] == "complete" and [s["step"] for s in hist["steps"]] == list(range(1, 7))
    assert hist["final"]["test_top1"] is not None and hist["run"]["world_size"] == 2
    ckpts = sorted(p.name for p in (out / "dcp").iterdir())
    assert ckpts == ["step-00000006"]  # step 3 was replaced once step 6 was complete; no temporary folder left
    model = load_checkpoint(out / "model.pt")["model"]
    assert not any(type(v).__name__ == "DTensor" for v in model.values())
    torch.manual_seed(0)
    qm = fxqat.prepare_qat(get_model("mlp", in_shape=(1, 8, 8)), (torch.randn(2, 1, 8, 8),),
                           fxqat.QATConfig(w_bits=4, a_bits=4, first_last=8))
    fxqat.calibrate(qm, [torch.randn(4, 1, 8, 8)])
    assert qm.load_state_dict(model, strict=True) is not None  # the gathered state of the unsharded model
    extra = load_sharded(out / "dcp", qm, None, restore_rng=False)
    assert extra["pos"]["step"] == 6
    assert all(torch.equal(v, model[k]) for k, v in qm.state_dict().items())  # model.pt == the last DCP checkpoint
