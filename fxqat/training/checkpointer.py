"""The checkpoint of one training run: save and resume model, optimizer, scheduler, RNG states, the loop's position
and history (and any extra state a loop adds, such as a batch generator's).

One file ``out_dir/checkpoint.pt`` written atomically with a digest (:func:`fxqat.training.checkpoint.atomic_save`,
checked by :func:`~fxqat.training.checkpoint.load_checkpoint` on resume), from rank 0 only; with ``fsdp`` sharded
DCP folders ``out_dir/dcp/step-*`` (:mod:`fxqat.training.dcp`) written by every rank. A state whose trained
parameters are not finite is never saved, so the newest checkpoint is always a good one.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> m = nn.Linear(2, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> ck = Checkpointer(tempfile.mkdtemp(), m, opt)
    >>> ck.save({"step": 3}, {"status": "running"}, extra={"note": "hi"})
    True
    >>> state = Checkpointer(ck.out, m, opt).load()
    >>> state["pos"], state["note"], ck.last_saved
    ({'step': 3}, 'hi', 3)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fxqat.training import distributed as ddp
from fxqat.training.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write_text,
    load_checkpoint,
    rng_state,
    set_rng_state,
    to_json,
)
from fxqat.training.dcp import latest_sharded, load_sharded, save_sharded

__all__ = ["Checkpointer", "REQUIRED"]

log = logging.getLogger(__name__)
#: the keys every ``checkpoint.pt`` of a training run holds
REQUIRED = ("model", "optimizer", "scheduler", "rng", "pos", "history")


class Checkpointer:
    """Save and resume one run's state under ``out_dir`` (None: nothing is written, :meth:`load` finds nothing).

    Args:
        out_dir: the run folder.
        model: the (unwrapped or DDP-wrapped) model.
        optimizer, scheduler: saved and restored with it (``scheduler`` may be None).
        fsdp: sharded DCP folders instead of ``checkpoint.pt``.
        trusted: load ``checkpoint.pt`` with arbitrary unpickling (only for files you trust).
        params: the trained parameters whose finiteness :meth:`save` checks (default: the optimizer's).
    """

    def __init__(self, out_dir, model: nn.Module, optimizer, scheduler=None, *, fsdp: bool = False,
                 trusted: bool = False, params: Optional[Iterable[torch.Tensor]] = None) -> None:
        self.out = Path(out_dir) if out_dir is not None else None
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.fsdp, self.trusted = fsdp, trusted
        self.params = list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
        self.path: Optional[Path] = (self.out / "dcp" if fsdp else self.out / "checkpoint.pt") if self.out else None
        self.last_saved: Optional[int] = None  # the step of the newest complete checkpoint
        self.writes = self.out is not None and (ddp.is_main() or fsdp)

    def exists(self) -> bool:
        """Whether there is a checkpoint to resume from."""
        if self.path is None:
            return False
        return latest_sharded(self.path) is not None if self.fsdp else self.path.exists()

    def load(self) -> Optional[Dict[str, Any]]:
        """Restore model, optimizer, scheduler and RNG states from the checkpoint; returns the rest (``pos``,
        ``history``, extras), or None when there is no checkpoint.

        Raises:
            CheckpointError: a corrupt checkpoint, or one that does not match this model / optimizer.
        """
        if not self.exists():
            return None
        if self.fsdp:
            ck = load_sharded(self.path, self.model, self.optimizer)  # model, optimizer and RNG; the plain rest is ck
            if self.scheduler is not None:
                self.scheduler.load_state_dict(ck["scheduler"])
        else:
            ck = load_checkpoint(self.path, required=REQUIRED, trusted=self.trusted)
            try:
                ddp.unwrap(self.model).load_state_dict(ck["model"])
                self.optimizer.load_state_dict(ck["optimizer"])
                if self.scheduler is not None:
                    self.scheduler.load_state_dict(ck["scheduler"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(f"checkpoint {self.path} does not match this model/optimizer: {e}") from e
            set_rng_state(ck["rng"])
        self.last_saved = ck["pos"]["step"] or None
        return ck

    def finite(self) -> bool:
        """Whether every trained parameter is finite (agreed across ranks under FSDP)."""
        ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in self.params)
        return ddp.all_ranks(ok) if self.fsdp else ok

    def save(self, pos: Dict[str, Any], history: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> bool:
        """Write the checkpoint (and ``metrics.json``, the history, on rank 0) at position ``pos`` (its ``step``
        is the step count); False, with nothing written, when a trained parameter is not finite."""
        if not self.writes:
            return True
        if not self.finite():
            return False
        sched = self.scheduler.state_dict() if self.scheduler is not None else {}
        if self.fsdp:
            save_sharded(self.path, self.model, self.optimizer, step=pos["step"],
                         extra={"scheduler": sched, "pos": pos, "history": history, **(extra or {})})
        else:
            atomic_save({"model": ddp.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": sched, "rng": rng_state(), "pos": pos, "history": history, **(extra or {})},
                        self.path)
        self.last_saved = pos["step"]
        self.write_metrics(history)
        return True

    def write_metrics(self, history: Dict[str, Any]) -> None:
        """``metrics.json`` (rank 0 only)."""
        if self.out is not None and ddp.is_main():
            atomic_write_text(to_json(history), self.out / "metrics.json")

    def kept(self) -> str:
        """What a diverged run leaves on disk (the end of its error message)."""
        if self.out is None or not ddp.is_main():
            return ""
        if self.last_saved is None:
            return f" No checkpoint was written before ({self.path} does not exist)."
        return f" The last good checkpoint, {self.path} (step {self.last_saved}), is kept; --resume continues from it."

    def advice(self) -> str:
        """What is on disk after a lost peer, and how to continue (the end of the PeerLost message)."""
        if self.out is None:
            return ""
        if not ddp.is_main():
            saved = (f"{'every' if self.fsdp else 'rank 0 writes each'} checkpoint atomically, so the newest one is "
                     "complete")
        elif self.last_saved is None:
            saved = f"no checkpoint was completed yet ({self.path} does not exist)"
        else:
            saved = f"{self.path} (step {self.last_saved}) is complete"
        return f"{saved}: relaunch the same command with --resume"
