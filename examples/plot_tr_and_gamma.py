"""Plot target vs measured transition rate, and the gradient clipping factor γ per layer, over a short MNIST run.

One run of a small CNN (LSQ W4A4, 4-bit gradients, SGDT) on MNIST from ``../shared/data``; writes
``docs/img/tr_target_vs_measured.png`` and ``docs/img/gamma_per_layer.png``. Reads top to bottom:

    python examples/plot_tr_and_gamma.py            # about a minute on one CPU core
"""

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxqat  # noqa: E402
from fxqat import data  # noqa: E402
from fxqat.models import get_model  # noqa: E402
from fxqat.optim import SGDT  # noqa: E402
from fxqat.training.grad_quant import gammas  # noqa: E402


@dataclass
class Config:
    steps: int = 800  # optimizer steps (= total_steps of the cosine target schedule)
    batch_size: int = 128  # MNIST images per step
    width: int = 16  # SmallCNN base width (layers: w, 2w, 2w, 4w channels)
    lr: float = 0.02  # U_0 of the quantized weights and the lr of everything else
    lam: float = 5e-3  # TR factor λ: R_0 = λ·√b
    momentum: float = 0.95  # running-TR momentum m (paper 0.99; faster here because the run is short)
    eta_factor: float = 20.0  # η = eta_factor·U_0 (paper: η = U_0; faster here because the run is short)
    g_bits: int = 4  # gradient bits (LBT)
    seed: int = 0
    out_dir: str = str(Path(__file__).resolve().parent.parent / "docs" / "img")


cfg = Config()
torch.set_num_threads(1)
torch.manual_seed(cfg.seed)

# ---- data and model
train = data.mnist(train=True)
loader = data.BatchLoader(train, batch_size=cfg.batch_size, train=True, seed=cfg.seed)
x0, _ = next(iter(loader))
model = get_model("cnn", width=cfg.width, in_shape=(1, 28, 28))
qcfg = fxqat.QATConfig(w_bits=4, a_bits=4, g_bits=cfg.g_bits, first_last=None)  # first/last layer FP, as both papers
qm = fxqat.prepare_qat(model, (x0[:2],), qcfg)
qm.train()
opt = SGDT(qm, total_steps=cfg.steps, lr=cfg.lr, momentum=0.9, tr_momentum=cfg.momentum, lam=cfg.lam,
           eta=cfg.eta_factor * cfg.lr)

# ---- train, recording target, measured and running TR, TALR and γ
hist = {"target": [], "k": [], "K": [], "U": [], "gamma": [], "loss": []}
step, epoch = 0, 0
while step < cfg.steps:
    loader.set_epoch(epoch)
    for x, y in loader:
        if step == cfg.steps:
            break
        hist["target"].append(opt.target(step, opt.layers[0].name))
        opt.zero_grad()
        loss = F.cross_entropy(qm(x), y)
        loss.backward()
        opt.step()
        hist["k"].append(opt.rates())
        hist["K"].append(opt.running_rates())
        hist["U"].append(opt.talr())
        hist["gamma"].append(gammas(qm))
        hist["loss"].append(float(loss.detach()))
        step += 1
    epoch += 1
print(f"final loss {hist['loss'][-1]:.3f}")

# ---- plot 1: target vs measured TR
out = Path(cfg.out_dir)
out.mkdir(parents=True, exist_ok=True)
short = lambda n: n.replace("fxqat_quant.", "").replace("w_", "").replace("g_", "")  # noqa: E731
t = range(cfg.steps)
fig, (ax, ax_u) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
for name in hist["K"][0]:
    ax.plot(t, [h[name] for h in hist["K"]], lw=1.2, label=f"running TR K ({short(name)})")
mean_k = [sum(h.values()) / len(h) for h in hist["k"]]
ax.plot(t, mean_k, color="0.75", lw=0.6, zorder=0, label="measured TR k (layer mean, per step)")
ax.plot(t, hist["target"], "k--", lw=1.5, label="target R_t (cosine from λ·√4)")
ax.set_ylabel("transition rate")
ax.set_ylim(0, 2.5 * hist["target"][0])
ax.legend(fontsize=7, loc="upper right")
ax.set_title(f"SGDT on MNIST, SmallCNN W4A4 G{cfg.g_bits} (m={cfg.momentum}, η={cfg.eta_factor:g}·U_0)", fontsize=9)
for name in hist["U"][0]:
    ax_u.plot(t, [h[name] for h in hist["U"]], lw=1.0, label=short(name))
ax_u.set_ylabel("TALR U")
ax_u.set_xlabel("step")
ax_u.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "tr_target_vs_measured.png", dpi=110)

# ---- plot 2: γ per layer
fig, ax = plt.subplots(figsize=(7, 3.5))
for name in hist["gamma"][0]:
    ax.plot(t, [h[name] for h in hist["gamma"]], lw=1.2, label=short(name))
ax.set_xlabel("step")
ax.set_ylabel("clipping factor γ")
ax.set_title(f"LBT gradient interval γ per layer (g_bits={cfg.g_bits}, α=1e-3, ε=1e-3, EMA-search init)", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "gamma_per_layer.png", dpi=110)
print(f"wrote {out / 'tr_target_vs_measured.png'} and {out / 'gamma_per_layer.png'}")
