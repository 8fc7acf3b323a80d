"""Streaming (update/compute) accumulators in float64, in the style of torchmetrics.

Every LLFC quantity is a sum over samples (paper-digest §7.1), so one pass over the data with
these accumulators reproduces the all-in-memory numbers exactly (up to float64 rounding); memory
does not grow with the number of samples.
"""

from __future__ import annotations

import torch


class RunningMoments:
    """Mean and standard deviation over samples of a tensor-valued statistic.

    ``update(values)`` takes a (B, *shape) tensor (one row per sample); ``compute()`` returns
    ``(mean, std)``, each float64 of shape ``shape``. Batches are merged with Chan et al.'s
    parallel algorithm (Chan, Golub & LeVeque 1979), which is exact for any batching and avoids
    the cancellation of the naive Σx² − n·mean² formula. NaN values are not allowed.

    ``std`` is the sample standard deviation √(Σ(x − mean)² / (N − ddof)) with ``ddof = 1`` by
    default (÷(N−1), Bessel's correction): what the official LLFC code reports (``torch.std``'s
    default) for the error bars of the paper's Figs. 2–4. With N ≤ ``ddof`` it is NaN (undefined;
    written as null in results.json). ``ddof = 0`` gives the population std (÷N).
    """

    def __init__(self, ddof: int = 1) -> None:
        self.ddof = ddof
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        """Fold in a (B, *shape) batch of per-sample values."""
        v = values.detach().to(torch.float64)
        b = v.shape[0]
        if b == 0:
            return
        bmean = v.mean(0)
        bm2 = ((v - bmean) ** 2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = b, bmean, bm2
            return
        assert self.m2 is not None  # set together with self.mean
        n = self.n + b
        delta = bmean - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + bm2 + delta**2 * (self.n * b / n)
        self.n = n

    def merge(self, other: RunningMoments) -> None:
        """Fold in another accumulator's samples (e.g. another rank's; Chan et al.'s pairwise
        update with n_B = other.n, mean_B, M2_B): δ = mean_B − mean, mean += δ·n_B/n,
        M2 += M2_B + δ²·n·n_B/n with n = n + n_B."""
        if other.mean is None:
            return
        assert other.m2 is not None  # set together with other.mean
        if self.mean is None:
            self.n, self.mean, self.m2 = other.n, other.mean.clone(), other.m2.clone()
            return
        assert self.m2 is not None  # set together with self.mean
        b = other.n
        n = self.n + b
        delta = other.mean.to(self.mean.device) - self.mean
        self.mean = self.mean + delta * (b / n)
        self.m2 = self.m2 + other.m2.to(self.m2.device) + delta**2 * (self.n * b / n)
        self.n = n

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over all samples seen.

        Raises:
            RuntimeError: if no sample was seen.
        """
        if self.mean is None or self.m2 is None:
            raise RuntimeError("RunningMoments.compute() before any update()")
        if self.n <= self.ddof:
            return self.mean.clone(), torch.full_like(self.m2, float("nan"))
        return self.mean.clone(), (self.m2 / (self.n - self.ddof)).sqrt()


class RunningSum:
    """A float64 running sum over samples of a tensor-valued statistic: ``update((B, *shape))``."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        """Add the (B, *shape) batch ``values`` summed over dim 0."""
        s = values.detach().to(torch.float64).sum(0)
        self.total = s if self.total is None else self.total + s
        self.n += values.shape[0]

    def merge(self, other: RunningSum) -> None:
        """Add another accumulator's sum and count (e.g. another rank's)."""
        if other.total is None:
            return
        t = other.total.to(self.total.device) if self.total is not None else other.total.clone()
        self.total = t if self.total is None else self.total + t
        self.n += other.n

    def compute(self) -> torch.Tensor:
        """The float64 sum of everything seen (shape ``shape``)."""
        if self.total is None:
            raise RuntimeError("RunningSum.compute() before any update()")
        return self.total.clone()
