"""DDP helpers for runs launched with ``torchrun`` (gloo on CPU, nccl on GPU). Only rank 0 writes files.

Example:
    >>> rank, world = init_distributed()   # (0, 1) outside torchrun: a no-op
    >>> is_main()
    True
"""

from __future__ import annotations

import logging
import os
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_distributed", "is_distributed", "is_main", "rank_world", "barrier", "unwrap", "wrap_ddp", "cleanup"]

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    """True on rank 0 (and outside DDP)."""
    return rank_world()[0] == 0


def init_distributed() -> Tuple[int, int]:
    """Initialise the process group when torchrun set ``WORLD_SIZE`` > 1; returns ``(rank, world_size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        log.info("fxqat: DDP rank %d/%d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return rank_world()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_ddp(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` when a process group is up (parameters broadcast from rank 0)."""
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
