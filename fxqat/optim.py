"""Public optimizers of fxqat: transition-rate scheduling (``fxqat.optim.TransitionRateScheduler``, SGDT/AdamT/AdamWT).

The implementation lives in :mod:`fxqat.training.optim`; see its docstring for the equations and the [R] choices.

Example:
    >>> import torch, torch.nn as nn, fxqat, fxqat.optim
    >>> qm = fxqat.prepare_qat(nn.Sequential(nn.Linear(4, 4)), (torch.randn(2, 4),), fxqat.QATConfig())
    >>> opt = fxqat.optim.SGDT(qm, total_steps=10, lr=0.01)
    >>> type(opt).__name__, opt.momentum
    ('TransitionRateScheduler', 0.99)
"""

from fxqat.training.optim import SGDT, AdamT, AdamWT, TransitionRateScheduler, transition_codes

__all__ = ["TransitionRateScheduler", "SGDT", "AdamT", "AdamWT", "transition_codes"]
