"""FSDP2 for prepared models: ``torch.distributed.fsdp.fully_shard`` with one shard unit per block.

:func:`shard_prepared` shards a model returned by ``fxqat.prepare_qat`` (plain or block replacement) in place:

* **units**: one per block (``fxqat.find_blocks``). An eager-root model (a Hugging Face ``...ForCausalLM``) shards
  each block module (its decoder layers) as it is; a traced model gets identity gates around each block
  (:mod:`fxqat.passes.shard_units`), since its blocks are no modules that run. The root takes what is left
  (embeddings, final norm, head);
* **quantizer parameters** (scales, clip values) are sharded with the block whose layers they quantize, like the
  weights: dim-0 ``Shard`` DTensors, all-gathered for the forward (a per-tensor scale of shape ``[1]`` lives on rank
  0, an empty shard on the others) and reduce-scattered in the backward;
* **the frozen FP partner** of a hybrid model is sharded per block too (its decoder layers, or gates on its graph):
  ``requires_grad=False`` parameters are all-gathered when a path runs and never get a gradient, so nothing updates
  them. ``partner="shared"`` is refused (its FP passes read detached copies of the LP weights, which FSDP replaces);
* **mixed precision** (``mp_policy``, FSDP2's ``MixedPrecisionPolicy``): the blocks and the root compute with the
  policy's ``param_dtype``, except quantizer parameters: with a narrow ``param_dtype`` (bfloat16, float16) FSDP would
  hand them to the forward rounded to it (another grid than the one ``fxqat.convert`` and the exports use), so
  they are left out of FSDP (``ignored_params``): replicated float32 tensors, equal on every rank, whose gradients a
  hook averages over the ranks (one small all-reduce per quantizer parameter in the backward). FSDP2 cannot give
  them a unit of their own: it cannot swap its class into a quantizer (torch.ao's ``FakeQuantizeBase`` derives from
  ``ABC``, whose object layout its class swap refuses);
* **buffers** (BatchNorm statistics, quantizer flags, the hybrid step counter) are not sharded: like DDP's
  ``broadcast_buffers``, rank 0's are broadcast to every rank before each forward (:func:`sync_buffers`).

Quantizers initialise from the first batch they see; that must happen *before* sharding (:func:`fxqat.calibrate`,
``fxqat.training.loop.calibrate``): some change the shape of their parameters when they initialise, and an
initialisation written into the unsharded parameters of a forward would be lost. ``shard_prepared`` refuses a model
with uninitialised quantizers. The Python-side mirrors of their flags (``_init_done``, ``_signed``) stay as they are.

Example (two processes; see tests/integration/test_fsdp.py and docs/fsdp.md)::

    qm = fxqat.prepare_qat(model, (x,), fxqat.QATConfig.preset("int4_weight_only"))
    fxqat.calibrate(qm, [x])
    shard_prepared(qm)                       # every rank, after init_process_group
    opt = torch.optim.AdamW(fxqat.trainable_parameters(qm), lr=1e-3)
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Set

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from fxqat.api import find_blocks
from fxqat.capture.eager_model import is_eager_model
from fxqat.passes.build_hybrid import HybridGraphModule
from fxqat.passes.shard_units import GateUnit, insert_gates
from fxqat.quantizers.base import Quantizer, all_reduce_, is_narrow_float
from fxqat.quantizers.control import named_quantizers

__all__ = ["shard_prepared", "fp32_quantizer_params", "is_sharded", "shard_units", "sync_buffers", "full_state_dict", "FSDP_ATTR"]

log = logging.getLogger(__name__)
FSDP_ATTR = "fxqat_fsdp_units"  # model.__dict__ key: names of the shard units, set by shard_prepared


def is_sharded(model: nn.Module) -> bool:
    """True for a model :func:`shard_prepared` has sharded."""
    return FSDP_ATTR in model.__dict__


def shard_units(model: nn.Module) -> List[str]:
    """Names of the shard units of a sharded model, in forward order (the root last, as ``"<root>"``)."""
    return list(model.__dict__.get(FSDP_ATTR, ()))


def _check_ready(qm: nn.Module) -> None:
    pending = [n for n, q in named_quantizers(qm).items() if q.kind != "grad" and not q.is_initialized]
    if pending:
        raise ValueError(
            f"shard_prepared: {len(pending)} quantizer(s) are not initialised yet ({pending[:3]}...). Run "
            f"fxqat.calibrate(qm, [batch]) on every rank before sharding: initialisation can change a quantizer's "
            f"parameter shapes, which FSDP fixes when it shards.")
    hybrid = getattr(qm, "fxqat_hybrid", None)
    if hybrid is not None and hybrid.partner == "shared":
        raise ValueError(
            "shard_prepared: HybridConfig(partner='shared') runs its FP passes on detached copies of the LP weights, "
            "which FSDP replaces by sharded ones; use partner='frozen' (the default) under FSDP.")


def fp32_quantizer_params(qm: nn.Module, mp_policy: Optional[MixedPrecisionPolicy]) -> Set[nn.Parameter]:
    """Under a narrow ``param_dtype`` (bfloat16, float16), the quantizer parameters FSDP must leave alone: they stay
    float32 and replicated, their gradients averaged over ranks by a hook (see the module docstring). Empty otherwise."""
    if mp_policy is None or mp_policy.param_dtype is None or not is_narrow_float(mp_policy.param_dtype):
        return set()
    return {p for q in qm.modules() if isinstance(q, Quantizer) for p in q.parameters() if not isinstance(p, DTensor)}


def _average_grad(p: torch.Tensor) -> None:
    if p.grad is not None:
        all_reduce_(p.grad, "mean")


def _shard_gate_unit(owner: nn.Module, unit: GateUnit, mesh, reshard: bool,
                     mp_policy: Optional[MixedPrecisionPolicy] = None, keep: Optional[Set] = None) -> bool:
    """``fully_shard([enter, exit])`` managing exactly ``unit.params`` but those in ``keep`` (their holders are the
    enter gate's children only while FSDP collects them, so ``state_dict`` keys do not change). False when the unit
    has no parameter."""
    keep = keep or set()
    names = [n for n in unit.params if owner.get_parameter(n) not in keep]
    if not names:
        return False
    enter, exit_ = owner.get_submodule(unit.enter), owner.get_submodule(unit.exit)
    wanted = {id(owner.get_parameter(n)) for n in names}
    holders: Dict[int, nn.Module] = {}
    for name in names:
        mod = owner.get_submodule(name.rpartition(".")[0])
        holders.setdefault(id(mod), mod)
    ignored = {p for h in holders.values() for p in h.parameters() if id(p) not in wanted}
    keys = [f"fxqat_holder{i}" for i in range(len(holders))]
    enter._modules.update(zip(keys, holders.values()))
    try:
        fully_shard([enter, exit_], mesh=mesh, reshard_after_forward=reshard, ignored_params=ignored or None,
                    **_mp(mp_policy))
    finally:
        for k in keys:
            del enter._modules[k]
    return True


def _mp(mp_policy: Optional[MixedPrecisionPolicy]) -> Dict[str, MixedPrecisionPolicy]:
    """``fully_shard``'s ``mp_policy`` keyword, or nothing (FSDP2's default policy)."""
    return {} if mp_policy is None else {"mp_policy": mp_policy}


def _shard_graph(qm: fx.GraphModule, mesh, reshard: bool, mp_policy=None, keep=None) -> List[str]:
    blocks = find_blocks(qm, None)
    cuts, names = [b.exit for b in blocks[:-1]], [b.name for b in blocks]
    done = []
    units = insert_gates(qm, qm.graph, cuts, names)
    qm.recompile()
    partner_units: List[GateUnit] = []
    if isinstance(qm, HybridGraphModule):
        if qm.fxqat_partner is not None:
            partner_units = insert_gates(qm.fxqat_partner, qm.fp_graph, cuts, names)
        qm.rebuild_views()
    for u in units:
        if _shard_gate_unit(qm, u, mesh, reshard, mp_policy, keep):
            done.append(u.name)
    for u in partner_units:
        if _shard_gate_unit(qm.fxqat_partner, u, mesh, reshard, mp_policy, keep):
            done.append(f"fxqat_partner:{u.name}")
    return done


def _shard_eager(qm: nn.Module, mesh, reshard: bool, mp_policy=None, keep=None) -> List[str]:
    done = []
    for b in find_blocks(qm, None):
        try:
            mod = qm.get_submodule(b.name)
        except AttributeError:
            log.warning("fxqat: block %r is no submodule; its parameters join the root unit", b.name)
            continue
        fully_shard(mod, mesh=mesh, reshard_after_forward=reshard, ignored_params=keep or None, **_mp(mp_policy))
        done.append(b.name)
    ctrl = qm.__dict__.get("fxqat_hybrid_ctrl")
    partner = getattr(qm, "fxqat_partner", None)
    if ctrl is not None and partner is not None:
        for name in ctrl.layers:
            fully_shard(partner.get_submodule(name), mesh=mesh, reshard_after_forward=reshard, **_mp(mp_policy))
            done.append(f"fxqat_partner.{name}")
        fully_shard(partner, mesh=mesh, reshard_after_forward=reshard, **_mp(mp_policy))
        done.append("fxqat_partner")
    return done


def shard_prepared(qm: nn.Module, mesh=None, *, reshard_after_forward: bool = True,
                   broadcast_buffers: bool = True, sync_module_states: bool = True,
                   mp_policy: Optional[MixedPrecisionPolicy] = None) -> nn.Module:
    """Shard a prepared, calibrated model with FSDP2 in place (see the module docstring); returns ``qm``.

    Call it on every rank after ``torch.distributed.init_process_group``, then build the optimizer from
    ``fxqat.trainable_parameters(qm)`` (the sharded parameters).

    Args:
        qm: a model from ``fxqat.prepare_qat`` whose quantizers are initialised.
        mesh: a 1-D ``DeviceMesh`` (None: all ranks of the default process group, on the default device type).
        reshard_after_forward: free each block's gathered parameters after its forward (re-gathered for backward).
        broadcast_buffers: broadcast rank 0's buffers before every forward (DDP's default behaviour).
        sync_module_states: first broadcast rank 0's parameters and buffers (as DDP does when it wraps), so that
            ranks that calibrated on different batches shard one and the same model.
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` for every unit (None: FSDP2's default, no casting); with a
            narrow ``param_dtype`` quantizer parameters stay float32 (see the module docstring).

    Raises:
        RuntimeError: no process group.
        ValueError: uninitialised quantizers, a shared hybrid partner, or a parameter read in two blocks.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_prepared: call torch.distributed.init_process_group first (e.g. run under torchrun).")
    if is_sharded(qm):
        return qm
    _check_ready(qm)
    keep = fp32_quantizer_params(qm, mp_policy)
    if sync_module_states:
        _broadcast([p.detach() for p in qm.parameters()] + list(qm.buffers()))
    if is_eager_model(qm):
        units = _shard_eager(qm, mesh, reshard_after_forward, mp_policy, keep)
    elif isinstance(qm, fx.GraphModule):
        units = _shard_graph(qm, mesh, reshard_after_forward, mp_policy, keep)
    else:
        raise TypeError(f"shard_prepared expects a model from fxqat.prepare_qat, got {type(qm).__name__}.")
    already = {p for p in qm.parameters() if isinstance(p, DTensor)} | keep
    fully_shard(qm, mesh=mesh, ignored_params=already or None, **_mp(mp_policy))
    for p in keep:
        p.register_post_accumulate_grad_hook(_average_grad)
    if broadcast_buffers:
        qm.register_forward_pre_hook(lambda mod, _args: sync_buffers(mod))
    qm.__dict__[FSDP_ATTR] = tuple(units) + ("<root>",)
    log.info("fxqat: FSDP over %d ranks, %d shard units", dist.get_world_size(), len(units) + 1)
    return qm


@torch.no_grad()
def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Broadcast ``src``'s buffers to every rank (one collective per dtype); a no-op outside a process group."""
    _broadcast(list(model.buffers()), src)


@torch.no_grad()
def _broadcast(tensors: List[torch.Tensor], src: int = 0) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = {}
    for b in tensors:
        if b.numel():
            by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def full_state_dict(model: nn.Module, rank0_only: bool = False) -> Dict[str, torch.Tensor]:
    """The unsharded ``state_dict`` of a sharded model (a collective: call it on every rank), with the keys of the
    unsharded model; with ``rank0_only`` the other ranks get ``{}`` and rank 0 gets CPU tensors. A model that is not
    sharded returns its own ``state_dict()``."""
    if not is_sharded(model):
        return model.state_dict()
    sync_buffers(model)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=rank0_only)
    return get_model_state_dict(model, options=opts)
