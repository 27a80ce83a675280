"""Atomic, verified, safely loaded checkpoints: model, optimizer, scheduler, RNG states and the loop position.

Three guarantees (docs/reliability.md):

* **Atomic**: every file is written to a temporary name in the same folder, fsynced and renamed into place
  (``os.replace`` is atomic on POSIX), so a crash never leaves a truncated file under the real name. Temporary
  files left by a killed writer (``.NAME.<pid>.tmp`` of a process that no longer runs) are removed by the next save
  and never read.
* **Verified**: a dict checkpoint carries ``fxqat_digest``, a SHA-256 over its tensors' bytes and its other leaves;
  :func:`load_checkpoint` recomputes it, so a file damaged after it was written is refused, not resumed from.
* **Safe**: files are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers;
  a file that needs arbitrary unpickling (it could run code) is refused with :class:`CheckpointError` unless the
  caller passes ``trusted=True`` (CLI: ``--trust-checkpoint``). fxqat writes only tensors and plain containers
  (the RNG states included, see :func:`rng_state`), so its own files never need the opt-in.

Test hook: when ``FXQAT_FAULT_SLEEP_IN_SAVE`` is set to a number of seconds, :func:`atomic_save` sleeps that long
after writing the temporary file and before the rename, so fault-injection tests can kill a process mid-write.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> p = Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> atomic_save({"step": 3, "rng": rng_state()}, p)
    >>> ck = load_checkpoint(p)
    >>> ck["step"], "fxqat_digest" in ck
    (3, False)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import time
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

__all__ = [
    "CheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint", "rng_state", "set_rng_state", "seed_rng",
    "to_json",
    "state_digest", "clean_stale_tmp", "DIGEST_KEY", "FAULT_SLEEP_ENV",
]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
DIGEST_KEY = "fxqat_digest"
FAULT_SLEEP_ENV = "FXQAT_FAULT_SLEEP_IN_SAVE"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, damaged, incomplete or needs unsafe unpickling."""


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_tmp(path: PathLike) -> int:
    """Remove the temporary files of ``path`` left by writers that no longer run; returns how many.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / ".c.pt.999999999.tmp").write_bytes(b"half")
        4
        >>> clean_stale_tmp(d / "c.pt")
        1
    """
    path = Path(path)
    n = 0
    for t in path.parent.glob(f".{path.name}.*.tmp"):
        pid = t.name[len(path.name) + 2:-4]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            t.unlink(missing_ok=True)
            log.info("fxqat: removed %s, left by an interrupted save", t)
            n += 1
    return n


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        keys = sorted((k for k in obj if k != DIGEST_KEY), key=repr)
        h.update(b"D%d" % len(keys))
        for k in keys:
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def state_digest(obj: Any) -> str:
    """SHA-256 (hex) of a nested structure of tensors and plain values (``fxqat_digest`` keys excluded).

    Example:
        >>> state_digest({"w": torch.ones(2)}) == state_digest({"w": torch.ones(2)}) != state_digest({"w": torch.zeros(2)})
        True
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def atomic_save(obj: Any, path: PathLike, digest: bool = True) -> None:
    """``torch.save`` to a temporary file, fsync, then rename onto ``path``.

    Args:
        obj: what to save; a dict gets a ``fxqat_digest`` entry (when ``digest``) that :func:`load_checkpoint`
            checks. The caller's dict is not modified.
        path: the final file name.
        digest: add the integrity digest (dicts only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    if digest and isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: state_digest(obj)}
    tmp = _tmp(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get(FAULT_SLEEP_ENV, "0") or 0)
        if pause > 0:  # test hook, see the module docstring
            time.sleep(pause)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(path)
    tmp = _tmp(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


_GLOBAL = re.compile(r"GLOBAL (\S+?)(?: was not| whose|\.?$)")


def _unsafe_message(path: Path, err: Exception) -> str:
    """The refusal of a file that the weights-only unpickler will not load (without torch's allow-list advice)."""
    text = str(err)
    m = _GLOBAL.search(text)
    if m:
        why = f"it calls {m.group(1)} while unpickling, which can run code from the file"
        what = "fxqat's own checkpoints never need that; if"
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
        why = (f"it is corrupt, or not a plain torch file of tensors and containers ({detail}) but a pickle that "
               f"needs arbitrary unpickling, which can run code from the file")
        what = ("if it is damaged, delete it and start again without --resume (or use another --out); fxqat's own "
                "checkpoints never need arbitrary unpickling; if")
    return (f"checkpoint {path} was refused: {why}. {what} you wrote or trust this file, load it with "
            f"load_checkpoint(path, trusted=True) or pass --trust-checkpoint to fxqat train / inspect.")


def load_checkpoint(path: PathLike, required: tuple = (), trusted: bool = False) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`atomic_save`.

    Args:
        path: the file.
        required: keys the checkpoint must have.
        trusted: allow arbitrary unpickling (``weights_only=False``). Only for files you wrote or trust: unpickling
            can execute code.

    Raises:
        CheckpointError: missing, corrupt, damaged (digest mismatch), incomplete, or (unless ``trusted``) a file that
            needs globals outside torch's weights-only allow-list; the message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if not trusted and "weights only load failed" in str(e).lower():
            raise CheckpointError(_unsafe_message(path, e)) from e
        raise CheckpointError(_corrupt_message(path, e)) from e
    except Exception as e:
        raise CheckpointError(_corrupt_message(path, e)) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict written by fxqat.")
    if DIGEST_KEY in obj:
        stored = obj.pop(DIGEST_KEY)
        if stored != state_digest(obj):
            raise CheckpointError(
                f"checkpoint {path} is damaged: its content does not match the digest written with it. Delete it "
                f"and start again without --resume, or point --out to another folder.")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by this version of fxqat.")
    return obj


def _corrupt_message(path: Path, e: Exception) -> str:
    return (f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}: {str(e)[:300]}). Delete it and "
            f"start again without --resume, or point --out to another folder.")


def rng_state() -> Dict[str, Any]:
    """The states of Python's, NumPy's and torch's global generators as tensors and plain values.

    Everything in it loads with ``torch.load(weights_only=True)``.

    Example:
        >>> s = rng_state(); a = (random.random(), np.random.rand(), torch.rand(1)); set_rng_state(s)
        >>> (random.random(), np.random.rand(), torch.rand(1)) == a
        True
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss},
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }


def seed_rng(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (the three :func:`rng_state` saves), so that a fresh
    run's whole RNG state, not only torch's, is a function of its seed.

    Example:
        >>> seed_rng(3); a = rng_state(); seed_rng(3)
        >>> state_digest(rng_state()) == state_digest(a)
        True
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the tuple format of fxqat < 0.2, loaded with ``trusted``)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"])
    random.setstate(py)
    if isinstance(npy, dict):
        npy = (npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])


def to_json(obj: Any) -> str:
    """Pretty JSON (used for the metrics log)."""
    return json.dumps(obj, indent=1, default=str)
