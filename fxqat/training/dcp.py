"""Sharded checkpoints of an FSDP2 model (:mod:`fxqat.training.fsdp`) with ``torch.distributed.checkpoint`` (DCP).

:func:`save_sharded` writes one folder per save, ``ROOT/step-00000012/``, from every rank at once (a collective):

* ``__<rank>_0.distcp`` + ``.metadata`` (DCP): every **tensor** of the model state (sharded parameters as each
  rank's shard, quantizer scales / zero points / init flags / step counters, buffers, the frozen partner) and of the
  optimizer state (``get_state_dict`` with the optimizer: momentum, Adam moments and step counts, keyed by
  parameter name, so a resume may even use another world size);
* ``train.pt`` (rank 0, :func:`fxqat.training.checkpoint.atomic_save`): the plain part, i.e. the optimizer's
  ``param_groups``, any non-tensor state and the caller's ``extra`` (fxqat's loop: scheduler, position, history);
* ``rng-rank<r>.pt``: each rank's RNG states (:func:`fxqat.training.checkpoint.rng_state`);
* ``fxqat-complete.pt``, written **last**: the size and SHA-256 of every other file.

**Atomicity.** Everything is written under a temporary name (``ROOT/.step-00000012.tmp``); only once every rank has
finished, rank 0 writes the completion marker and renames the folder to ``step-00000012`` (``os.rename`` of a folder
is atomic on POSIX). :func:`latest_sharded` only sees folders named ``step-*`` that hold the marker, and
:func:`load_sharded` refuses a folder without it, or whose files' sizes or digests differ from the marker's (a
truncated or damaged shard), with :class:`~fxqat.training.checkpoint.CheckpointError`. Older complete folders are
removed after a new one is complete (``keep``).

**Safety.** Nothing is unpickled freely: the marker, ``train.pt`` and the RNG files load with
``torch.load(weights_only=True)`` (:func:`~fxqat.training.checkpoint.load_checkpoint`); DCP's ``.metadata`` (a pickle)
is read with an unpickler that only builds DCP's metadata classes, ``torch.Size``, dtypes and plain containers; only
tensor entries are written and read, so DCP never calls ``torch.load(weights_only=False)`` on a byte entry.

Example (every rank of a sharded run; see tests/integration/test_fsdp.py)::

    save_sharded(out / "dcp", qm, opt, step=100, extra={"step": 100})
    extra = load_sharded(out / "dcp", qm, opt)       # the newest complete step-* folder
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from fxqat.training.checkpoint import CheckpointError, atomic_save, load_checkpoint, rng_state, set_rng_state

__all__ = ["save_sharded", "load_sharded", "latest_sharded", "verify_sharded", "MARKER", "PREFIX"]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
MARKER = "fxqat-complete.pt"  # written last: the folder is complete once it exists (and has been renamed)
PREFIX = "step-"
_SEP = "|"  # flat DCP keys: "m|<fqn>" (model), "o|<fqn>|<key>" (optimizer state)
# what DCP's .metadata pickle may name (module -> classes); anything else is refused
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "TensorProperties", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},  # a torch.layout by name (a dictionary look-up)
    "torch": {"Size", "device", "strided", "sparse_coo", "contiguous_format", "preserve_format"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
    "pathlib": {"PosixPath", "Path"},
}


def _rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _split(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """The model + optimizer state as flat DCP tensors and a plain remainder."""
    if optimizer is None:
        msd, osd = get_model_state_dict(model), {}
    else:
        msd, osd = get_state_dict(model, optimizer)
    tensors: Dict[str, torch.Tensor] = {}
    plain: Dict[str, Any] = {"model": {}, "optim_state": {}, "param_groups": osd.get("param_groups")}
    for k, v in msd.items():
        if torch.is_tensor(v):
            tensors[f"m{_SEP}{k}"] = v
        else:
            plain["model"][k] = v
    for fqn, st in osd.get("state", {}).items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"o{_SEP}{fqn}{_SEP}{k}"] = v
            else:
                plain["optim_state"][f"{fqn}{_SEP}{k}"] = v
    return tensors, plain


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_sharded(root: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *, step: int,
                 extra: Optional[Dict[str, Any]] = None, keep: int = 1) -> Path:
    """Write a complete, atomic sharded checkpoint ``root/step-<step>`` (a collective: call it on every rank).

    Args:
        root: the checkpoint folder (created).
        model: a model sharded by :func:`fxqat.training.fsdp.shard_prepared` (an unsharded one works too).
        optimizer: its optimizer (None: model state only).
        step: names the folder (``step-00000012``); saving the same step again replaces it.
        extra: plain data for rank 0's ``train.pt`` (tensors and containers that ``weights_only`` loads).
        keep: how many complete folders to keep (the newest ones).

    Returns:
        The final folder.
    """
    rank, world = _rank_world()
    root = Path(root)
    final, tmp = root / f"{PREFIX}{step:08d}", root / f".{PREFIX}{step:08d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save of the same step
        tmp.mkdir()
    _barrier()
    tensors, plain = _split(model, optimizer)
    dcp.save(tensors, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True))
    atomic_save({"rng": rng_state()}, tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        atomic_save({"state": plain, "extra": extra or {}, "world_size": world, "step": step}, tmp / "train.pt")
    _barrier()
    if rank == 0:
        files = {p.name: {"size": p.stat().st_size, "sha256": _digest(p)} for p in sorted(tmp.iterdir())
                 if p.is_file() and not p.name.startswith(".")}
        atomic_save({"files": files, "step": step, "world_size": world, "format": 1}, tmp / MARKER)
        old = root / f".{PREFIX}{step:08d}.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in sorted(p for p in root.glob(f"{PREFIX}*") if (p / MARKER).is_file())[:-keep or None]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)
        log.info("fxqat: sharded checkpoint %s (%d files, %d ranks)", final, len(files), world)
    _barrier()
    return final


def latest_sharded(root: PathLike) -> Optional[Path]:
    """The newest complete ``step-*`` folder under ``root`` (None when there is none)."""
    root = Path(root)
    done = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (p / MARKER).is_file())
    return done[-1] if done else None


def verify_sharded(path: PathLike) -> Dict[str, Any]:
    """Check a checkpoint folder against its completion marker; returns the marker.

    Raises:
        CheckpointError: no such folder, no marker (an interrupted save), or a file missing, truncated or damaged.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"sharded checkpoint {path} does not exist (expected a folder written by save_sharded).")
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"sharded checkpoint {path} is incomplete: it has no {MARKER}, which save_sharded writes last, so its "
            f"save was interrupted. Delete it and resume from an older step-* folder, or start again without --resume.")
    marker = load_checkpoint(path / MARKER, required=("files", "step", "world_size"))
    for name, want in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {path} lacks {name}; delete the folder and resume from an "
                                  f"older one or start again.")
        size = f.stat().st_size
        if size != want["size"] or _digest(f) != want["sha256"]:
            what = f"truncated ({size} of {want['size']} bytes)" if size < want["size"] else "damaged"
            raise CheckpointError(f"sharded checkpoint {path}: {name} is {what}, it does not match {MARKER}. Delete "
                                  f"the folder and resume from an older one or start again without --resume.")
    return marker


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in DCP metadata")


class _SafeReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for ``.metadata`` (tensor entries only)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        try:
            meta = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise CheckpointError(f"sharded checkpoint {self.path}: .metadata was refused ({e}); fxqat only reads "
                                  f"metadata of tensor entries, which never needs arbitrary unpickling.") from e
        bad = [k for k, v in meta.state_dict_metadata.items() if type(v).__name__ != "TensorStorageMetadata"]
        if bad:
            raise CheckpointError(f"sharded checkpoint {self.path} has non-tensor entries {bad[:3]}, which DCP would "
                                  f"unpickle freely; fxqat never writes them, so the folder is refused.")
        if getattr(meta, "storage_meta", None) is not None:
            meta.storage_meta.load_id = self.load_id
        return meta


def load_sharded(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                 restore_rng: bool = True) -> Dict[str, Any]:
    """Load a checkpoint of :func:`save_sharded` into ``model`` (and ``optimizer``) in place (a collective).

    Args:
        path: a ``step-*`` folder, or the root holding them (then the newest complete one).
        model: the same model, prepared, calibrated and sharded as when it was saved.
        optimizer: its optimizer, built as when it was saved (its state is replaced).
        restore_rng: restore this rank's RNG states (rank 0's when the world size changed).

    Returns:
        The ``extra`` dict given to :func:`save_sharded`.

    Raises:
        CheckpointError: an incomplete, truncated, damaged or unsafe folder, or one of another model / optimizer.
    """
    path = Path(path)
    if path.is_dir() and not path.name.startswith(PREFIX) and latest_sharded(path) is not None:
        path = latest_sharded(path)
    marker = verify_sharded(path)
    rank, world = _rank_world()
    train = load_checkpoint(path / "train.pt", required=("state", "extra"))
    tensors, _ = _split(model, optimizer)
    meta_keys = set(_SafeReader(path).read_metadata().state_dict_metadata)
    want_model = {k for k in tensors if k.startswith(f"m{_SEP}")}
    missing = sorted(want_model - meta_keys)
    unknown = sorted(k for k in meta_keys - set(tensors) if k.startswith(f"m{_SEP}") or optimizer is not None)
    if missing or unknown:
        raise CheckpointError(f"sharded checkpoint {path} does not match this model/optimizer: missing "
                              f"{[k.replace(_SEP, ' ') for k in missing[:3]]}, unexpected "
                              f"{[k.replace(_SEP, ' ') for k in unknown[:3]]}.")
    tensors = {k: v for k, v in tensors.items() if k in meta_keys}  # optimizer state of never-updated params
    try:
        dcp.load(tensors, storage_reader=_SafeReader(path))
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps rank failures in CheckpointException
        raise CheckpointError(f"sharded checkpoint {path} could not be loaded: {str(e)[:500]}") from e
    plain = train["state"]
    msd = {k.split(_SEP, 1)[1]: v for k, v in tensors.items() if k.startswith(f"m{_SEP}")}
    msd.update(plain["model"])
    if optimizer is None:
        set_model_state_dict(model, msd)
    else:
        state: Dict[str, Dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith(f"o{_SEP}"):
                fqn, key = k[2:].rsplit(_SEP, 1)
                state.setdefault(fqn, {})[key] = v
        for k, v in plain["optim_state"].items():
            fqn, key = k.rsplit(_SEP, 1)
            state.setdefault(fqn, {})[key] = v
        set_state_dict(model, optimizer, model_state_dict=msd,
                       optim_state_dict={"state": state, "param_groups": plain["param_groups"]})
    if restore_rng:
        own = path / f"rng-rank{rank}.pt"
        if marker["world_size"] != world or not own.is_file():
            log.warning("fxqat: %s was written by %d ranks, this run has %d: every rank takes rank 0's RNG state",
                        path, marker["world_size"], world)
            own = path / "rng-rank0.pt"
        set_rng_state(load_checkpoint(own, required=("rng",))["rng"])
    log.info("fxqat: loaded sharded checkpoint %s (step %d)", path, marker["step"])
    return train["extra"]
