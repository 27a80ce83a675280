"""Atomic, resumable checkpoints: model, optimizer, scheduler, RNG states and the loop position in one file.

Every file is written to a temporary name in the same folder and renamed into place (``os.replace`` is atomic on
POSIX), so a crash never leaves a truncated file that looks complete. A file that cannot be read raises
:class:`CheckpointError`, which says which file and what to do.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> atomic_save({"step": 3, "rng": rng_state()}, p)
    >>> load_checkpoint(p)["step"]
    3
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state", "to_json",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint is missing required keys, truncated or not a torch file."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: PathLike, required: tuple = ()) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`; :class:`CheckpointError` if unreadable or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}: {e}). Delete it and start again "
            f"without --resume, or point --out to another folder."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict written by fxqat.")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by this version of fxqat.")
    return obj


def rng_state() -> Dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def to_json(obj: Any) -> str:
    """Pretty JSON (used for the metrics log)."""
    return json.dumps(obj, indent=1, default=str)
