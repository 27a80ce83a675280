"""Running averages of the path losses block replacement computes anyway: a per-block sensitivity at no extra cost.

A block-replacement model (``lp_prefix`` mode) evaluates, every step, the FP output, the mixed-precision paths
"LP blocks 1..i, FP blocks after" and the LP output. :func:`fxqat.hybrid_loss` hands each step's task losses
(cross-entropy; for the FP output one extra cross-entropy on logits it already has) to the model's
:class:`PathLossAverages`, which keeps a bias-corrected exponential moving average per output. The difference of
consecutive averages, ``L_i − L_{i−1}``, is what quantizing block i adds (the quantity ``fxqat.sensitivity``'s
``"paths"`` method measures with extra forward passes); :func:`fxqat.running_sensitivity` reads it as a table.
Where both outputs of a block ran in the same step (always with ``paths="all"``), the per-step difference itself is
averaged as well (:meth:`PathLossAverages.block_differences`): paired, so the batch-to-batch variation of the loss,
common to both outputs, cancels from its spread.

Updates are tensor operations on the losses' device (no host synchronisation). The averages are not part of the
model's ``state_dict``: a resumed run starts them afresh.

Example:
    >>> import torch
    >>> avg = PathLossAverages(n_paths=2, decay=0.5)
    >>> avg.update(torch.tensor(1.0), {0: torch.tensor(1.5), 1: torch.tensor(2.5)}, torch.tensor(3.0))
    >>> avg.means().tolist()
    [1.0, 1.5, 2.5, 3.0]
    >>> avg.update(torch.tensor(1.0), {1: torch.tensor(3.5)}, torch.tensor(3.0))
    >>> avg.means().tolist(), avg.counts().tolist()
    ([1.0, 1.5, 3.1666666666666665, 3.0], [2, 1, 2, 2])
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

__all__ = ["PathLossAverages"]


class PathLossAverages:
    """Bias-corrected moving averages of the task loss of ``[fp, path 0, ..., path n-1, lp]``.

    Args:
        n_paths: number of mixed-precision paths (cuts) of the model.
        decay: weight of the previous average per update (0.98: about the last 50 updates of each output count).
    """

    def __init__(self, n_paths: int, decay: float = 0.98) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"PathLossAverages: decay={decay}; use a value in [0, 1), e.g. 0.98.")
        self.n_paths, self.decay = int(n_paths), float(decay)
        self.reset()

    def reset(self) -> None:
        """Forget every average (e.g. after changing the model's bit-widths)."""
        self._sum: Optional[torch.Tensor] = None  # decayed sums, float64, on the losses' device
        self._sq: Optional[torch.Tensor] = None  # decayed sums of squares
        self._n: Optional[torch.Tensor] = None  # updates per output
        self._dsum: Optional[torch.Tensor] = None  # decayed sums of per-step block differences L_{k+1} - L_k
        self._dsq: Optional[torch.Tensor] = None
        self._dn: Optional[torch.Tensor] = None

    def _ensure(self, like: torch.Tensor) -> None:
        if self._sum is None or self._sum.device != like.device:
            size = self.n_paths + 2
            self._sum = torch.zeros(size, dtype=torch.float64, device=like.device)
            self._sq = torch.zeros_like(self._sum)
            self._n = torch.zeros(size, dtype=torch.long, device=like.device)
            self._dsum = torch.zeros(size - 1, dtype=torch.float64, device=like.device)
            self._dsq = torch.zeros_like(self._dsum)
            self._dn = torch.zeros(size - 1, dtype=torch.long, device=like.device)

    @torch.no_grad()
    def update(self, fp: torch.Tensor, paths: Mapping[int, torch.Tensor], lp: torch.Tensor) -> None:
        """Fold one step's losses in: the FP output's, the executed paths' (by path id) and the LP output's."""
        self._ensure(lp)
        order = sorted(int(i) for i in paths)
        pos = [0, *(1 + i for i in order), self.n_paths + 1]
        idx = torch.tensor(pos, device=lp.device)
        vals = torch.stack([fp.detach(), *(paths[i].detach() for i in order), lp.detach()]).to(torch.float64)
        d = self.decay
        self._sum[idx] = d * self._sum[idx] + (1.0 - d) * vals
        self._sq[idx] = d * self._sq[idx] + (1.0 - d) * vals * vals
        self._n[idx] += 1
        adjacent = [j for j in range(len(pos) - 1) if pos[j + 1] == pos[j] + 1]  # both outputs of block pos[j] ran
        if adjacent:
            b = torch.tensor([pos[j] for j in adjacent], device=lp.device)
            j = torch.tensor(adjacent, device=lp.device)
            diff = vals[j + 1] - vals[j]
            self._dsum[b] = d * self._dsum[b] + (1.0 - d) * diff
            self._dsq[b] = d * self._dsq[b] + (1.0 - d) * diff * diff
            self._dn[b] += 1

    def counts(self) -> torch.Tensor:
        """Updates per output ``[fp, path 0..n-1, lp]`` (a sampled path counts only the steps it ran)."""
        return self._n.to("cpu", copy=True) if self._n is not None else torch.zeros(self.n_paths + 2, dtype=torch.long)

    def means(self) -> torch.Tensor:
        """Average loss per output ``[fp, path 0..n-1, lp]`` (NaN for an output never run), float64 on the CPU."""
        if self._n is None:
            return torch.full((self.n_paths + 2,), float("nan"), dtype=torch.float64)
        norm = 1.0 - self.decay ** self._n.to(torch.float64)
        return torch.where(self._n > 0, self._sum / norm, torch.nan).cpu()

    def variances(self) -> torch.Tensor:
        """Moving variance of each output's per-step loss (0 where it ran once, NaN where never)."""
        if self._n is None:
            return torch.full((self.n_paths + 2,), float("nan"), dtype=torch.float64)
        norm = 1.0 - self.decay ** self._n.to(torch.float64)
        mean = self._sum / norm
        var = (self._sq / norm - mean * mean).clamp_min(0.0)
        return torch.where(self._n > 0, var, torch.nan).cpu()

    def block_differences(self):
        """Per block k (``n_paths + 1`` of them): ``(mean, std, paired)`` of ``L_{k+1} − L_k``, float64 on the CPU.

        Where block k's two outputs ran in the same step at least once (``paired``), the moving average and standard
        deviation of the per-step difference; elsewhere (sampled paths never run side by side) the difference of the
        outputs' averages, with ``sqrt(var L_{k+1} + var L_k)`` (an upper bound where they correlate positively).
        """
        means, var = self.means(), self.variances()
        mean, std = means[1:] - means[:-1], (var[1:] + var[:-1]).sqrt()
        if self._dn is None:
            return mean, std, torch.zeros_like(mean, dtype=torch.bool)
        paired = (self._dn > 0).cpu()
        norm = 1.0 - self.decay ** self._dn.to(torch.float64)
        dmean = (self._dsum / norm).cpu()
        dstd = ((self._dsq / norm).cpu() - dmean * dmean).clamp_min(0.0).sqrt()
        return torch.where(paired, dmean, mean), torch.where(paired, dstd, std), paired
