"""Git Re-Basin's straight-through estimator (STE; Ainsworth et al. 2023, Algorithm 3).

Free parameters θ̃ start at θ_A. At every step B is weight-matched onto θ̃ (π = weight_matching(θ̃,
θ_B)), and the training loss of the midpoint ½(θ_A + θ̂) is minimised with respect to θ̃, where

    θ̂ = stop_grad(π(θ_B)) + (θ̃ − stop_grad(θ̃))

has the *value* of π(θ_B) and the *gradient* of θ̃ (the straight-through trick). The permutation
with the lowest midpoint batch loss is kept. Expensive: one weight matching per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from llfc.errors import ConfigError
from llfc.permutation.apply import apply_permutation
from llfc.permutation.spec import PermutationSpec, untie_state
from llfc.permutation.weight_matching import weight_matching


@dataclass
class SteReport:
    """What :func:`ste_matching` did: midpoint loss per step, the best step, time (s)."""

    losses: list[float] = field(default_factory=list)
    best_step: int = -1
    best_loss: float = float("inf")
    steps: int = 0
    time_s: float = 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "losses": self.losses,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "steps": self.steps,
            "time_s": self.time_s,
        }


def ste_matching(
    model: nn.Module,
    spec: PermutationSpec,
    sd_a: Mapping[str, torch.Tensor],
    sd_b: Mapping[str, torch.Tensor],
    loader: Iterable,
    *,
    epochs: int = 1,
    lr: float = 1e-2,
    momentum: float = 0.9,
    max_steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], SteReport]:
    """Learn a permutation of B that lowers the loss at the midpoint ½(θ_A + π(θ_B)).

    Args:
        model: the architecture (evaluated with ``torch.func.functional_call`` in eval mode, so
            BatchNorm uses the running statistics of the midpoint).
        spec: permutation spec of the architecture.
        sd_a, sd_b: state dicts of A and B (not modified).
        loader: training batches (x, y), x float (N, ...), y int64 (N,); or a language model's
            token windows x (N, T) and next tokens y (N, T) (mean per-token cross-entropy).
        epochs: passes over ``loader``; ``max_steps`` caps the number of steps.
        lr, momentum: SGD on θ̃ (Git Re-Basin's MNIST MLP: lr 1e-2 (as here), momentum 0.9).
        seed: seed of each step's weight matching.

    Returns:
        (perms, report): the permutations of the best step (``perms[g][i]`` = index in B of the
        unit at position i) and a :class:`SteReport`.

    Raises:
        ConfigError: the loader yields no batch, or epochs < 1.
    """
    if epochs < 1:
        raise ConfigError(f"ste_matching: epochs must be >= 1, got {epochs}")
    t0 = time.perf_counter()
    dev = torch.device(device)
    model = model.to(dev).eval()
    a = {k: v.to(dev) for k, v in sd_a.items()}
    b = {k: v.to(dev) for k, v in sd_b.items()}
    first: dict[int, str] = {}  # tied parameters (GPT's head.weight = tok_emb.weight) share one free tensor
    alias = {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}
    free: dict[str, torch.Tensor] = {}
    for k, v in a.items():
        if v.is_floating_point():
            src = alias.get(k, k)
            free[k] = free[src] if src in free else v.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD(list({id(t): t for t in free.values()}.values()), lr=lr, momentum=momentum)
    report, best = SteReport(), None
    step = 0
    for _ in range(epochs):
        for x, y in loader:
            if max_steps is not None and step >= max_steps:
                break
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                perms, _ = weight_matching(spec, {k: v.detach() for k, v in free.items()}, b, seed=seed)
                pb = apply_permutation(spec, perms, b)
            mid = {k: 0.5 * (a[k] + (pb[k] + free[k] - free[k].detach())) if k in free else a[k] for k in a}
            logits = functional_call(model, untie_state(model, mid), (x,))
            if logits.dim() == y.dim() + 1 and logits.dim() > 2:  # (B, T, V) language-model logits
                logits, y = logits.flatten(0, -2), y.flatten()
            loss = F.cross_entropy(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            value = float(loss.detach())
            report.losses.append(value)
            if value < report.best_loss:
                report.best_loss, report.best_step, best = value, step, perms
            step += 1
    if best is None:
        raise ConfigError("ste_matching: the loader yielded no batch.")
    report.steps, report.time_s = step, time.perf_counter() - t0
    return {g: p.cpu() for g, p in best.items()}, report
