"""Plots of training runs (matplotlib, Agg backend: no display needed), written atomically.

Example:
    >>> import tempfile, os
    >>> hist = {"steps": [{"step": i, "loss": 2.0 / (i + 1)} for i in range(10)],
    ...         "epochs": [{"epoch": 0, "test_top1": 50.0}]}
    >>> p = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> plot_run(hist, p); os.path.getsize(p) > 0
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Sequence, Union

__all__ = ["plot_run", "plot_arms", "plot_blocks", "smooth"]

PathLike = Union[str, os.PathLike]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int = 0) -> List[float]:
    """Running mean over ``window`` values (default: about 1/20 of the series)."""
    window = window or max(1, len(values) // 20)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _save(fig, path: PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def plot_run(history: Dict, path: PathLike, title: str = "") -> None:
    """Training loss per step (raw and smoothed) and test top-1 per epoch of one run."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [s["step"] for s in history.get("steps", [])]
    loss = [s["loss"] for s in history.get("steps", [])]
    a.plot(steps, loss, alpha=0.3, lw=0.8, label="loss")
    a.plot(steps, smooth(loss), lw=1.5, label="smoothed")
    a.set_xlabel("step"), a.set_ylabel("training loss"), a.legend()
    ep = [e for e in history.get("epochs", []) if e.get("test_top1") is not None]
    b.plot([e["epoch"] + 1 for e in ep], [e["test_top1"] for e in ep], "o-")
    b.set_xlabel("epoch"), b.set_ylabel("test top-1 (%)")
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_arms(arms: Dict[str, Dict], path: PathLike, title: str = "", reference: Dict[str, float] = None) -> None:
    """Several runs side by side: final top-1 per arm (bars) and smoothed loss curves.

    Args:
        arms: ``{arm name: {"top1": float, "steps": [{"step", "loss"}, ...]}}``.
        reference: horizontal lines on the bar chart, e.g. ``{"FP": 88.1}``.
    """
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    names = list(arms)
    bars = a.bar(range(len(names)), [arms[n]["top1"] for n in names], color=["C0", "C1", "C2", "C3"][: len(names)])
    for r, n in zip(bars, names):
        a.text(r.get_x() + r.get_width() / 2, r.get_height(), f"{arms[n]['top1']:.1f}", ha="center", va="bottom")
    for k, v in (reference or {}).items():
        a.axhline(v, ls="--", color="gray")
        a.text(len(names) - 0.5, v, k, va="bottom", ha="right", color="gray")
    a.set_xticks(range(len(names)), names, rotation=10), a.set_ylabel("test top-1 (%)")
    for n in names:
        st = arms[n].get("steps", [])
        b.plot([s["step"] for s in st], smooth([s["loss"] for s in st]), label=n)
    b.set_xlabel("step"), b.set_ylabel("task loss: CE of the LP output (smoothed)"), b.legend()
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_blocks(title: str, blocks: Sequence, path: PathLike) -> None:
    """The block partition of a model: one row per block with its modules (as returned by ``fxqat.find_blocks``)."""
    plt = _plt()
    rows = [(str(getattr(b, "name", i)), list(getattr(b, "modules", []))) for i, b in enumerate(blocks)]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(len(rows), 1) + 1.2))
    for k, (name, mods) in enumerate(rows):
        ax.barh(k, max(len(mods), 0.3), color=f"C{k % 10}", alpha=0.7)
        text = ", ".join(mods[:6]) + (f", ... (+{len(mods) - 6})" if len(mods) > 6 else "")
        ax.text(0.1, k, f"{name}: {text}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("modules in block")
    ax.set_title(f"{title}: {len(rows)} blocks")
    _save(fig, path)
    plt.close(fig)
