"""DDP helpers for runs launched with ``torchrun`` (gloo on CPU, nccl on GPU). Only rank 0 writes files.

Failure behaviour (docs/reliability.md): every collective and the rendezvous have a timeout (``timeout_s`` of
:func:`init_distributed`, ``fxqat train --ddp-timeout``, default :data:`DEFAULT_TIMEOUT_S`), so a process whose peer
died or hangs never waits forever. A dead peer is usually noticed at once (its sockets close); a hung one after the
timeout. Either way the error is turned into :class:`PeerLost`, whose message names the rank, the step and what to
do (relaunch with ``--resume``: the last checkpoint is complete, since rank 0 writes it atomically).

Example:
    >>> rank, world = init_distributed()   # (0, 1) outside torchrun: a no-op
    >>> is_main()
    True
    >>> is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4"))
    False
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = [
    "init_distributed", "is_distributed", "is_main", "rank_world", "barrier", "all_ranks", "unwrap", "wrap_ddp", "cleanup",
    "PeerLost", "is_peer_failure", "peer_guard", "DEFAULT_TIMEOUT_S",
]

log = logging.getLogger(__name__)
#: seconds a collective (or the rendezvous) may wait for the other processes before the run stops
DEFAULT_TIMEOUT_S = 600.0
# what gloo / nccl / the TCP store say when a peer process died or stopped answering
_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "gloo", "nccl", "socket")


class PeerLost(RuntimeError):
    """Another process of the DDP run died or stopped answering; this one stops too (see the module docstring)."""


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` (raised inside a DDP run) means that another process is gone or hangs.

    Outside an initialised process group this is always False: a single process has no peer to lose.
    """
    if isinstance(exc, PeerLost):
        return True
    if not is_distributed():
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_SIGNS)


@contextmanager
def peer_guard(where: Callable[[], str], advice: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Re-raise a peer failure inside the block as :class:`PeerLost`: ``where()`` names the place (read when the
    error happens, so it can report the current step), ``advice()`` what to do next."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerLost) or not is_peer_failure(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        first = first.split(" This is typically caused by")[0]  # gloo's generic hint adds nothing here
        rank, world = rank_world()
        tail = advice()
        raise PeerLost(f"{where()} (rank {rank} of {world}): lost contact with another process of the DDP run "
                       f"({first[:300]}). This process stops too{'; ' + tail if tail else ''}.") from e


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> Tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    """True on rank 0 (and outside DDP)."""
    return rank_world()[0] == 0


def init_distributed(timeout_s: Optional[float] = None) -> Tuple[int, int]:
    """Initialise the process group when torchrun set ``WORLD_SIZE`` > 1; returns ``(rank, world_size)``.

    Args:
        timeout_s: how long the rendezvous and each collective may wait for the other processes (None =
            :data:`DEFAULT_TIMEOUT_S`); past it the waiting process raises :class:`PeerLost` instead of hanging.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=float(DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s))
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except RuntimeError as e:
            raise PeerLost(
                f"rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']}: could not join the DDP run at "
                f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} within "
                f"{timeout.total_seconds():g} s ({str(e).strip().splitlines()[0][:300] if str(e).strip() else e!r}); "
                f"check that every process was started.") from e
        log.info("fxqat: DDP rank %d/%d (%s, timeout %g s)", dist.get_rank(), dist.get_world_size(), backend,
                 timeout.total_seconds())
    return rank_world()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` is true on every rank (a collective under a process group; ``flag`` outside one)."""
    if not is_distributed() or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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
