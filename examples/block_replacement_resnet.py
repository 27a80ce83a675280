"""Block replacement on a CIFAR ResNet-20 at W2A2, with a plain LSQ baseline, in one readable script.

Reads top to bottom: load data -> FP model (trained once, then cached) -> two QAT arms from the same FP weights on
the same seed and batches -> a table. Everything configurable sits in `Config`.

    python examples/block_replacement_resnet.py            # ~5 min on 2 CPU cores with the defaults
    python examples/block_replacement_resnet.py --steps 50 # smoke run
"""

import argparse
import copy
import time
from dataclasses import dataclass, replace

import torch

import fxqat
from fxqat.data import BatchLoader, cifar10
from fxqat.models import get_model
from fxqat.training.loop import TrainConfig, evaluate
from fxqat.training.recipes import train_fp, train_qat


@dataclass(frozen=True)
class Config:
    bits: int = 2               # weight and activation bits of the QAT arms
    fp_epochs: int = 3          # FP pre-training epochs (cached in ~/.cache/fxqat/ckpt after the first run)
    steps: int = 300            # QAT optimizer steps per arm
    batch_size: int = 128       # examples per step
    lr: float = 0.02            # QAT learning rate (weights); quantizer scales use the same
    paths: object = "all"       # block-replacement paths per step: "all" or an int k
    seed: int = 0               # same seed (init, batch order, augmentation) for every arm
    test_size: int = 2000       # test images used for the final accuracy


def main(cfg: Config) -> None:
    torch.manual_seed(cfg.seed)
    train, test = cifar10(train=True), cifar10(train=False).subset(cfg.test_size)
    train_loader = BatchLoader(train, cfg.batch_size, train=True, seed=cfg.seed)
    test_loader = BatchLoader(test, 500, train=False)

    # 1. the full-precision model (what a user already has)
    fp_cfg = TrainConfig(epochs=cfg.fp_epochs, lr=0.1, seed=cfg.seed, plot=False)
    fp, info = train_fp(get_model("resnet20", 10), train_loader, fp_cfg,
                        key={"model": "resnet20", "data": "cifar10", "bs": cfg.batch_size}, test_loader=test_loader)
    print(f"FP ResNet-20: top-1 {info['top1']:.2f}% ({'cached' if info['cached'] else 'trained'})")

    x0 = torch.randn(2, 3, 32, 32)
    qat_cfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, plot=False)
    rows = {}
    for arm, hybrid in (("LSQ", None), ("LSQ + block replacement", fxqat.HybridConfig(paths=cfg.paths))):
        # 2. one line turns the FP model into a QAT model (with block replacement: a multi-branch graph)
        qm = fxqat.prepare_qat(copy.deepcopy(fp), (x0,),
                               fxqat.QATConfig(w_bits=cfg.bits, a_bits=cfg.bits, method="lsq", hybrid=hybrid))
        # 3. train: the loop uses fxqat.hybrid_loss when the output is a HybridOutput
        t = time.time()
        train_qat(qm, train_loader, qat_cfg, desc=arm)
        # 4. the deployable LP model: no FP partner, no paths, weights pre-quantized
        lp = fxqat.convert(qm)
        rows[arm] = (evaluate(lp, test_loader), time.time() - t)

    print(f"\n| arm (W{cfg.bits}A{cfg.bits}, {cfg.steps} steps) | top-1 % | time s |\n|---|---|---|")
    for arm, (top1, secs) in rows.items():
        print(f"| {arm} | {top1:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--bits", type=int, default=Config.bits)
    args = ap.parse_args()
    main(replace(Config(), steps=args.steps, bits=args.bits))
