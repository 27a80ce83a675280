"""Block replacement under DistributedDataParallel: 2 CPU processes (gloo), sampled paths, parameters in sync."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fxqat
from fxqat.models import get_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, partner: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial model on every rank
        model = get_model("resnet20", 10)
        x0 = torch.randn(2, 3, 32, 32)
        cfg = fxqat.QATConfig(w_bits=2, a_bits=2, hybrid=fxqat.HybridConfig(paths=2, partner=partner, seed=3))
        qm = fxqat.prepare_qat(model, (x0,), cfg)
        ddp = torch.nn.parallel.DistributedDataParallel(qm)
        opt = torch.optim.SGD(fxqat.trainable_parameters(qm), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        path_ids = []
        for _ in range(3):
            x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
            out = ddp(x)
            path_ids.append(list(out.path_ids))
            loss, _ = fxqat.hybrid_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flat = torch.cat([p.detach().reshape(-1) for p in qm.parameters()])
        torch.save({"flat": flat, "paths": path_ids}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("partner", ["frozen", "shared"])
def test_ddp_two_processes_stay_in_sync(tmp_path, partner):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    mp.spawn(_worker, args=(2, _free_port(), partner, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["paths"] == r1["paths"]  # the path sampler is seeded by step: identical on every rank
    assert torch.equal(r0["flat"], r1["flat"])  # gradients were all-reduced: bit-identical parameters
    torch.manual_seed(0)
    start = torch.cat([p.detach().reshape(-1) for p in get_model("resnet20", 10).parameters()])
    assert not torch.equal(r0["flat"][: start.numel()], start)  # and training did move them
