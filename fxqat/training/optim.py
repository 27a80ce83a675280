"""Transition-rate (TR) scheduling: SGDT / AdamT / AdamWT (Lee et al., ICCV 2025; methods.md §4).

Instead of scheduling a learning rate, schedule the *fraction of quantized weights that change level per step* and let
a per-layer transition-adaptive learning rate (TALR) U follow it. Per quantized layer ℓ, at every :meth:`step`:

    w ← w − U_ℓ·d                      d = the wrapped optimizer's update direction (see below)
    k = mean(w_d,new ≠ w_d,old)        the transition rate of the discrete weights (``q.integer_repr``)
    K_ℓ ← m·K_ℓ + (1 − m)·k            running TR (momentum m = 0.99)
    U_ℓ ← max(0, U_ℓ + η_ℓ·(R_t − K_ℓ))  R_t = target TR of this step

so U grows while the layer changes less than the target and shrinks while it changes more; it is never negative.

**How w ← w − U·d is applied (exact for every torch optimizer).** Each quantized weight is moved into a parameter
group of its own (a copy of its original group's hyper-parameters) and that group's ``lr`` is set to U_ℓ for the
duration of the wrapped ``optimizer.step()``. Every torch optimizer updates ``w ← w − lr·d`` with ``d`` independent of
``lr`` in its state (SGD: the momentum buffer, weight decay included, or ``g + μ·buf`` with Nesterov; Adam:
``m̂/(√v̂ + ε)``; AdamW: ``m̂/(√v̂ + ε) + λ·w``), so the update is the optimizer's own arithmetic with ``lr = U``, bit
for bit, with no copies and no second step. The group's ``lr`` is restored afterwards, so LR schedulers attached to
the optimizer keep working for everything else; for TALR groups their value is ignored. Non-quantized parameters (BN,
biases, activation-quantizer parameters) keep their groups and the normal ``lr`` update.

**Weight-quantizer scales are frozen** (``requires_grad=False``, re-applied every step) while the scheduler is used,
as the paper does: otherwise a scale change would flip levels without any latent update. Activation quantizers still
learn. Pass ``freeze_weight_scales=False`` to keep them trainable.

Defaults and what is reconstructed: m = 0.99 [S]; η = U_0 [S]; U_0 = the lr of the weight's parameter group [R];
R_0 = λ·√b with λ = 5e-3 and b the layer's weight bits (per layer, so 8-bit first/last layers get their own target;
equal bits give one shared target) [S]/[R]; cosine decay of R_t to 0 at ``total_steps`` [S] or step decay (×``decay``
at the fractions ``milestones`` of ``total_steps``) [R]; K_0 = R_0 (``k0="target"``: the controller starts "on target"
instead of integrating a large initial error) [R], ``k0=0.0`` starts from zero. The TR of step t is measured on the
update made with U_t, then K and U are updated for step t + 1 with R_t [R].

Resuming: build the optimizer and the scheduler exactly as before, then ``optimizer.load_state_dict(...)`` and
``scheduler.load_state_dict(...)`` (the optimizer's groups are restructured by the scheduler's constructor, so the
optimizer's state dict must be saved and loaded *after* wrapping).

Example:
    >>> import torch, torch.nn as nn, fxqat
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> qm = fxqat.prepare_qat(net, (torch.randn(2, 8),), fxqat.QATConfig(w_bits=4, a_bits=4))
    >>> opt = TransitionRateScheduler(torch.optim.SGD(qm.parameters(), lr=0.1, momentum=0.9), qm, total_steps=100)
    >>> qm(torch.randn(16, 8)).square().mean().backward()
    >>> _ = opt.step()
    >>> sorted(opt.rates())
    ['fxqat_quant.w_0', 'fxqat_quant.w_2']
    >>> round(opt.target(0, "fxqat_quant.w_0"), 6)  # R_0 = λ·√8 for the 8-bit first layer
    0.014142
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from fxqat.quantizers.base import NotAffineError, Quantizer
from fxqat.quantizers.control import trainable_parameters

__all__ = ["TransitionRateScheduler", "SGDT", "AdamT", "AdamWT", "transition_codes"]

log = logging.getLogger(__name__)
Target = Union[None, float, Callable[[int], float]]


@torch.no_grad()
def transition_codes(q: Quantizer, w: torch.Tensor) -> torch.Tensor:
    """The discrete level of every element of ``w`` under ``q`` (compared before/after a step to count transitions).

    ``q.integer_repr(w)`` when ``q`` has an affine grid; quantizers that are affine only in eval mode (DSQ's soft
    training mode, ...) are asked in eval mode; otherwise the eval-mode quantized values themselves serve as codes.
    """
    try:
        return q.integer_repr(w)
    except NotAffineError:
        pass
    was = q.training
    q.eval()
    try:
        try:
            return q.integer_repr(w)
        except NotAffineError:
            return q(w).detach().clone()
    finally:
        q.train(was)


@dataclass
class _Layer:
    name: str
    quantizer: Quantizer
    param: nn.Parameter
    bits: int
    r0: float
    u: float
    eta: float
    k_run: float
    k: float = 0.0


class TransitionRateScheduler:
    """Wrap ``optimizer`` so that every quantized weight of ``qm`` follows a target transition rate.

    Args:
        optimizer: any ``torch.optim`` optimizer already holding ``qm``'s parameters (SGD → SGDT, Adam → AdamT, ...).
        qm: the prepared model (its weight quantizers carry ``weight_target``, the name of the weight they quantize).
        total_steps: optimizer steps of the whole run (the length of the target schedule).
        target: ``None`` (the ``schedule`` from R_0 = ``lam``·√b), a constant TR, or a callable ``step -> TR``.
        lam: the TR factor λ.
        momentum: m of the running TR.
        eta: TALR step η (``None``: U_0 of each layer).
        u0: initial TALR (``None``: the lr of the weight's parameter group).
        schedule: ``"cosine"`` (to 0 at ``total_steps``) or ``"step"``.
        milestones, decay: for ``schedule="step"``: R_t = R_0·decay^(number of milestones·total_steps passed).
        k0: initial running TR: ``"target"`` (R_0) or a float.
        freeze_weight_scales: set ``requires_grad=False`` on weight-quantizer parameters (the paper's setting).
        layers: optional filter ``name -> bool`` on weight-quantizer names (default: every weight quantizer).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, qm: nn.Module, total_steps: int, target: Target = None,
        lam: float = 5e-3, momentum: float = 0.99, eta: Optional[float] = None, u0: Optional[float] = None,
        schedule: str = "cosine", milestones: Sequence[float] = (0.5, 0.75), decay: float = 0.1,
        k0: Union[str, float] = "target", freeze_weight_scales: bool = True,
        layers: Optional[Callable[[str], bool]] = None,
    ) -> None:
        if schedule not in ("cosine", "step"):
            raise ValueError(f"TransitionRateScheduler: schedule={schedule!r}; use 'cosine' or 'step'.")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"TransitionRateScheduler: total_steps={total_steps!r}; give the run's number of steps.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"TransitionRateScheduler: momentum={momentum!r} must be in [0, 1).")
        if k0 != "target" and not isinstance(k0, (int, float)):
            raise ValueError(f"TransitionRateScheduler: k0={k0!r}; use 'target' or a float such as 0.0.")
        self.optimizer, self.qm, self.total_steps = optimizer, qm, total_steps
        self.target_spec, self.lam, self.momentum = target, lam, momentum
        self.schedule, self.milestones, self.decay = schedule, tuple(milestones), decay
        self.freeze_weight_scales = freeze_weight_scales
        self.step_count = 0
        self.layers: List[_Layer] = []
        self._collect(layers, eta, u0, k0)
        self._freeze()

    # ------------------------------------------------------------------------------------------- set-up
    def _collect(self, keep, eta, u0, k0) -> None:
        owner = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        seen = set()
        for name, q in self.qm.named_modules():
            if not isinstance(q, Quantizer) or q.kind != "weight" or not getattr(q, "weight_target", None):
                continue
            if keep is not None and not keep(name):
                continue
            p = self.qm.get_parameter(q.weight_target)
            if id(p) in seen or not p.requires_grad:
                continue
            if id(p) not in owner:
                raise ValueError(
                    f"TransitionRateScheduler: the weight {q.weight_target!r} of quantizer {name!r} is not in the "
                    "optimizer; build the optimizer over fxqat.trainable_parameters(qm) (or qm.parameters())."
                )
            seen.add(id(p))
            old = owner[id(p)]
            old["params"] = [x for x in old["params"] if x is not p]
            group = {k: v for k, v in old.items() if k != "params"}
            group.update(params=[p], fxqat_talr=name)
            self.optimizer.add_param_group(group)
            u = float(group["lr"] if u0 is None else u0)
            r0 = self.lam * math.sqrt(q.bits)
            self.layers.append(_Layer(name, q, p, q.bits, r0, u, float(u if eta is None else eta),
                                      r0 if k0 == "target" else float(k0)))
        if not self.layers:
            log.warning("TransitionRateScheduler: %s has no weight quantizer; it behaves as the plain optimizer.",
                        type(self.qm).__name__)

    def _groups(self) -> List[Dict[str, Any]]:
        """The TALR parameter group of each layer (looked up every step: ``optimizer.load_state_dict`` replaces the
        group dicts)."""
        by_name = {g["fxqat_talr"]: g for g in self.optimizer.param_groups if "fxqat_talr" in g}
        try:
            return [by_name[l.name] for l in self.layers]
        except KeyError as e:
            raise RuntimeError(
                f"TransitionRateScheduler: the optimizer lost the parameter group of {e.args[0]!r}; load optimizer "
                "state dicts saved after wrapping (the scheduler restructures the groups)."
            ) from None

    def _freeze(self) -> None:
        if not self.freeze_weight_scales:
            return
        for layer in self.layers:
            for p in layer.quantizer.parameters():
                p.requires_grad_(False)
                p.grad = None

    # ------------------------------------------------------------------------------------------- schedule
    def target(self, step: int, name: Optional[str] = None) -> float:
        """The target TR R_t at ``step`` for layer ``name`` (R_0 = λ·√b depends on the layer's bits)."""
        if callable(self.target_spec):
            return float(self.target_spec(step))
        if self.target_spec is not None:
            return float(self.target_spec)
        r0 = next(l.r0 for l in self.layers if l.name == name) if name else self.lam * math.sqrt(self.layers[0].bits)
        frac = min(step, self.total_steps) / self.total_steps
        if self.schedule == "cosine":
            return r0 * 0.5 * (1.0 + math.cos(math.pi * frac))
        return r0 * self.decay ** sum(frac >= m for m in self.milestones)

    # ------------------------------------------------------------------------------------------- optimizer API
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One wrapped optimizer step with lr = U per quantized layer, then the TR measurement and TALR update."""
        self._freeze()
        before = [transition_codes(l.quantizer, l.param) for l in self.layers]
        groups = self._groups()
        saved = [g["lr"] for g in groups]
        for l, g in zip(self.layers, groups):
            g["lr"] = l.u
        try:
            loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        finally:
            for g, lr in zip(groups, saved):
                g["lr"] = lr
        m, t = self.momentum, self.step_count
        for l, old in zip(self.layers, before):
            new = transition_codes(l.quantizer, l.param)
            l.k = float(torch.count_nonzero(new != old)) / max(new.numel(), 1)
            l.k_run = m * l.k_run + (1.0 - m) * l.k
            l.u = max(0.0, l.u + l.eta * (self.target(t, l.name) - l.k_run))
        self.step_count += 1
        return loss

    # ------------------------------------------------------------------------------------------- read-outs
    def rates(self) -> Dict[str, float]:
        """Per layer, the transition rate k measured at the last step."""
        return {l.name: l.k for l in self.layers}

    def running_rates(self) -> Dict[str, float]:
        """Per layer, the running TR K."""
        return {l.name: l.k_run for l in self.layers}

    def talr(self) -> Dict[str, float]:
        """Per layer, the TALR U used at the next step."""
        return {l.name: l.u for l in self.layers}

    def targets(self) -> Dict[str, float]:
        """Per layer, the target TR of the next step."""
        return {l.name: self.target(self.step_count, l.name) for l in self.layers}

    # ------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Scheduler state (step, and per layer U, K, η, last k); the optimizer's state is saved separately."""
        return {
            "step": self.step_count, "total_steps": self.total_steps,
            "layers": {l.name: {"u": l.u, "k_run": l.k_run, "k": l.k, "eta": l.eta} for l in self.layers},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        names = {l.name for l in self.layers}
        if set(state["layers"]) != names:
            raise ValueError(
                "TransitionRateScheduler.load_state_dict: the checkpoint's layers "
                f"{sorted(set(state['layers']) ^ names)} do not match this model; prepare the model with the same "
                "QATConfig before loading."
            )
        self.step_count = int(state["step"])
        for l in self.layers:
            s = state["layers"][l.name]
            l.u, l.k_run, l.k, l.eta = float(s["u"]), float(s["k_run"]), float(s["k"]), float(s["eta"])

    def __repr__(self) -> str:
        return (f"TransitionRateScheduler({type(self.optimizer).__name__}, layers={len(self.layers)}, "
                f"step={self.step_count}/{self.total_steps}, schedule={self.schedule})")


def _params(qm: nn.Module, params: Optional[Iterable]) -> List:
    if params is not None:
        return list(params)
    return list(trainable_parameters(qm))


def SGDT(qm: nn.Module, total_steps: int, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
         nesterov: bool = False, params: Optional[Iterable] = None, tr_momentum: float = 0.99,
         **talr: Any) -> TransitionRateScheduler:
    """``torch.optim.SGD`` over ``qm``'s trainable parameters wrapped in a :class:`TransitionRateScheduler`.

    ``lr`` is U_0 of the quantized weights and the lr of everything else; ``momentum`` is SGD's, ``tr_momentum`` the
    running-TR momentum m; other keywords go to :class:`TransitionRateScheduler`.
    """
    opt = torch.optim.SGD(_params(qm, params), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return TransitionRateScheduler(opt, qm, total_steps, momentum=tr_momentum, **talr)


def AdamT(qm: nn.Module, total_steps: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0, params: Optional[Iterable] = None, tr_momentum: float = 0.99,
          **talr: Any) -> TransitionRateScheduler:
    """``torch.optim.Adam`` wrapped in a :class:`TransitionRateScheduler` (keywords as :func:`SGDT`)."""
    opt = torch.optim.Adam(_params(qm, params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return TransitionRateScheduler(opt, qm, total_steps, momentum=tr_momentum, **talr)


def AdamWT(qm: nn.Module, total_steps: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
           weight_decay: float = 1e-2, params: Optional[Iterable] = None, tr_momentum: float = 0.99,
           **talr: Any) -> TransitionRateScheduler:
    """``torch.optim.AdamW`` wrapped in a :class:`TransitionRateScheduler` (decoupled decay is part of d)."""
    opt = torch.optim.AdamW(_params(qm, params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return TransitionRateScheduler(opt, qm, total_steps, momentum=tr_momentum, **talr)
