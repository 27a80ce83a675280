"""Slow: every zoo method fine-tunes a CIFAR-10 ResNet-20 from its FP checkpoint to W4A4 within 5 points of FP.

The FP model trains 150 SGD steps (cached by ``train_fp`` under ``~/.cache/fxqat/ckpt``); each method then trains
40 steps (SGD + Nesterov, lr 0.01, cosine) with first/last layers at 8 bits: a CI-sized budget (about 30 s per
method on 2 cores; measured: FP 45.90 %, qil 44.60, ewgs 45.80, noise_temper 46.00). ``FXQAT_FP_STEPS`` and
``FXQAT_QAT_STEPS`` set longer runs (400 / 100 gave FP 57.6 % and every method within 2.2 points). Accuracy is measured
on the first 2,000 test images (the JPEG CIFAR-10 of ``../shared/data``).

Per-method options that differ from the defaults are listed in ``OPTIONS`` with the reason.
"""

import copy
import os

import pytest
import torch

import fxqat
from fxqat import data as fdata
from fxqat.models import get_model
from fxqat.training.loop import TrainConfig
from fxqat.training.recipes import train_fp, train_qat

# CI budget (make test < 25 min on 2 cores): the methods with learned ranges and schedules, whose short-run accuracy
# is the least obvious, run here; lsq_plus (LSQ with a learned offset), pact, dorefa and dsq (60-90 s each) run with
# FXQAT_ALL_METHODS=1. Their prepare / train-step / block-replacement behaviour stays covered by
# tests/integration/test_zoo_prepare.py.
METHODS = ["qil", "ewgs", "noise_temper"]
if os.environ.get("FXQAT_ALL_METHODS"):
    METHODS += ["lsq_plus", "pact", "dorefa", "dsq"]
OPTIONS = {
    # DoReFa's paper clip(x, 0, 1) throws away most of a BN+ReLU activation range of an FP network: take the range
    # from the first batch instead (the documented "std" option).
    "dorefa": {"a_options": {"act_clip": "std"}},
    # a short run: temper over the first ~30 steps so that the end trains on hard quantization.
    "noise_temper": {"w_options": {"tau": 8.0}, "a_options": {"tau": 8.0}},
}
# Per-method training settings that differ from the shared ones, with the reason.
TRAIN = {
    # EWGS trains its interval bounds with lr 1e-5 (the paper's Adam setting, methods.md §6); at the weights' lr
    # (0.01) the [l, u] bounds diverge within 100 steps (measured: 14.6 % top-1; with 1e-5: 58.0 %).
    "ewgs": {"quant_lr": 1e-5},
}
MARGIN = 5.0  # percentage points below FP
FP_STEPS, QAT_STEPS = int(os.environ.get("FXQAT_FP_STEPS", 150)), int(os.environ.get("FXQAT_QAT_STEPS", 40))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cifar_fp():
    if not fdata.data_available("cifar10"):
        pytest.skip("CIFAR-10 not found (see ../shared/data/README.md or set $FXQAT_DATA)")
    tr, te = fdata.load("cifar10", train=True), fdata.load("cifar10", train=False).subset(2000)
    loader = fdata.BatchLoader(tr, 128, train=True, seed=0, rank=0, world_size=1)
    test = fdata.BatchLoader(te, 500, train=False, rank=0, world_size=1)
    torch.manual_seed(0)
    fp = get_model("resnet20", num_classes=tr.num_classes, in_shape=tr.input_shape)
    fp_cfg = TrainConfig(steps=FP_STEPS, lr=0.1, seed=0, progress=False, plot=False, warmup_steps=30)
    key = {"model": "resnet20", "data": "cifar10", "batch_size": 128, "source": tr.source, "n_test": len(te)}
    fp, info = train_fp(fp, loader, fp_cfg, key=key, test_loader=test, desc="FP")
    x0 = tr[0][0].unsqueeze(0).repeat(2, 1, 1, 1)
    return fp, info["top1"], loader, test, x0


@pytest.mark.parametrize("method", METHODS)
def test_w4a4_from_fp_is_within_five_points(cifar_fp, method):
    fp, fp_top1, loader, test, x0 = cifar_fp
    assert fp_top1 > 40.0  # the FP reference itself trained
    cfg = fxqat.QATConfig(w_bits=4, a_bits=4, method=method, **OPTIONS.get(method, {}))
    qm = fxqat.prepare_qat(copy.deepcopy(fp), (x0,), cfg)
    hist = train_qat(qm, loader, TrainConfig(steps=QAT_STEPS, lr=0.01, seed=0, progress=False, plot=False,
                                                   **TRAIN.get(method, {})),
                     test_loader=test, desc=method)
    top1 = hist["final"]["test_top1"]
    print(f"{method}: W4A4 top-1 {top1:.2f} % vs FP {fp_top1:.2f} %")
    assert top1 >= fp_top1 - MARGIN, (method, top1, fp_top1)
