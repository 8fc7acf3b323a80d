"""Task vectors and their arithmetic (Ilharco et al., ICLR 2023, "Editing models with task
arithmetic"; used by Zhou et al., ICML 2024, CTL paper §5).

For a pretrained θ_0 and a model θ_i fine-tuned from it on task i, the *task vector* is

    τ_i = θ_i − θ_0                                   (CTL paper §5.2; Ilharco et al. Eq. 1)

and task arithmetic builds θ_0 + Σ_i λ_i τ_i: addition (λ_i > 0, multi-task models) and negation
(λ < 0, forgetting a task). Model averaging, merging and CTL's free (α, β) combinations are linear
combinations Σ_i c_i θ_i of state dicts (:func:`combine`); note α θ_A + β θ_B =
(α + β) θ_0 + α τ_A + β τ_B, so it equals θ_0 + α τ_A + β τ_B only when α + β = 1.

All functions are pure: they take and return ``{name: tensor}`` state dicts. Floating tensors are
combined in their own dtype; integer buffers (BatchNorm's ``num_batches_tracked``) are not
arithmetic quantities: they are taken from the first (or base) state dict.

Head handling: when children were fine-tuned with their own classification heads (different label
spaces), only the shared *backbone* has task vectors; :func:`split_head` separates a state dict into
backbone and head by the key prefix of the head module.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Mapping, Sequence, cast

import torch

from llfc.errors import IncompatibleModelsError

StateDict = dict[str, torch.Tensor]


def check_same_backbone(
    parent: Mapping[str, torch.Tensor],
    child: Mapping[str, torch.Tensor],
    child_name: str = "child",
    parent_name: str = "parent",
) -> None:
    """Raise unless ``child`` has exactly the keys, shapes and dtypes of ``parent``.

    Raises:
        IncompatibleModelsError: names the first differing key (a child whose backbone does not share
            the parent's architecture cannot have a task vector).
    """
    extra = sorted(set(child) - set(parent))
    missing = sorted(set(parent) - set(child))
    if extra or missing:
        k = (missing or extra)[0]
        raise IncompatibleModelsError(
            f"{child_name}'s backbone does not share {parent_name}'s architecture: key {k!r} is "
            f"{'missing from' if missing else 'not in'} {'the ' + child_name if missing else parent_name} "
            f"({len(extra) + len(missing)} keys differ). Fine-tune every child from the parent's "
            f"architecture (only the head may differ, and it is split off first)."
        )
    for k, t in parent.items():
        c = child[k]
        if tuple(c.shape) != tuple(t.shape) or c.dtype != t.dtype:
            raise IncompatibleModelsError(
                f"{child_name}'s backbone does not share {parent_name}'s architecture at {k!r}: "
                f"{tuple(c.shape)} {c.dtype} vs {tuple(t.shape)} {t.dtype}. Fine-tune every child from "
                f"the parent's architecture and arguments (e.g. the same widths)."
            )


def task_vector(theta: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor]) -> StateDict:
    """τ = θ − θ_0 over the floating tensors of θ_0 (CTL paper §5.2; Ilharco et al. 2023).

    Integer buffers are left out (they are not arithmetic). Shapes as in the state dicts.

    Raises:
        IncompatibleModelsError: different keys, shapes or dtypes.
    """
    check_same_backbone(theta0, theta)
    return {k: theta[k] - t for k, t in theta0.items() if t.is_floating_point()}


def apply_task_vectors(
    theta0: Mapping[str, torch.Tensor], taus: Sequence[Mapping[str, torch.Tensor]], lambdas: Sequence[float]
) -> StateDict:
    """θ_0 + Σ_i λ_i τ_i (task arithmetic; CTL paper §5.2, λ < 0 is negation, §5.2 "negation").

    Keys of θ_0 missing from a τ (integer buffers) keep θ_0's value.

    Raises:
        ValueError: ``taus`` and ``lambdas`` differ in length.
        ConfigError: a non-finite λ.
        IncompatibleModelsError: a τ with a key or shape that θ_0 does not have.
    """
    from llfc.metrics.ctl import check_coefficients

    lambdas = check_coefficients(lambdas, "lambdas")
    if len(taus) != len(lambdas):
        raise ValueError(f"{len(taus)} task vectors but {len(lambdas)} coefficients")
    out = {k: v.clone() for k, v in theta0.items()}
    for tau, lam in zip(taus, lambdas):
        for k, d in tau.items():
            if k not in out or out[k].shape != d.shape:
                raise IncompatibleModelsError(f"task vector key {k!r} does not fit θ_0 (missing or another shape).")
            if lam != 0.0:
                out[k].add_(d, alpha=lam)
    return out


def combine(states: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float]) -> StateDict:
    """Σ_i c_i θ_i over floating tensors; integer buffers from ``states[0]``.

    CTL's merged model α θ_A + β θ_B (CTL paper Eq. 1, α and β free) is ``combine([A, B], [α, β])``.
    With coefficients (1, 0) the first state's tensors are returned as they are (not recomputed).

    Raises:
        ConfigError: non-finite coefficients. IncompatibleModelsError: different keys/shapes.
    """
    from llfc.metrics.ctl import check_coefficients

    coeffs = check_coefficients(coeffs, "coefficients")
    if len(states) != len(coeffs) or not states:
        raise ValueError(f"{len(states)} state dicts but {len(coeffs)} coefficients")
    for i, s in enumerate(states[1:], 1):
        check_same_backbone(states[0], s, f"state {i}", "state 0")
    for i, c in enumerate(coeffs):
        if c == 1.0 and all(cj == 0.0 for j, cj in enumerate(coeffs) if j != i):
            return dict(states[i])
    out: StateDict = {}
    for k, t in states[0].items():
        if not t.is_floating_point():
            out[k] = t.clone()
            continue
        acc = torch.zeros_like(t)
        for s, c in zip(states, coeffs):
            if c != 0.0:
                acc.add_(s[k], alpha=c)
        out[k] = acc
    return out


def split_head(state: Mapping[str, torch.Tensor], head: str | None) -> tuple[StateDict, StateDict]:
    """(backbone, head) parts of a state dict: keys under module path ``head`` (``head.weight``,
    ``head.bias``) go to the head; ``head=None`` returns (everything, {})."""
    if head is None:
        return dict(state), {}
    pre = head + "."
    return (
        {k: v for k, v in state.items() if not k.startswith(pre)},
        {k: v for k, v in state.items() if k.startswith(pre)},
    )


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex, first 16 characters) of a state dict's keys, shapes, dtypes and values; recorded
    in a fine-tuned child's metadata to identify its parent (see :func:`check_ancestry`)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{tuple(state[k].shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


#: a child whose task vector is longer than this fraction of ‖θ_0‖ is flagged (see check_ancestry)
MAX_RELATIVE_TASK_VECTOR = 1.0


def check_ancestry(
    theta0: Mapping[str, torch.Tensor],
    children: Mapping[str, Mapping[str, torch.Tensor]],
    recorded: Mapping[str, str | None] | None = None,
) -> list[str]:
    """Warn when θ_0 does not look like the common pretrained ancestor of the children.

    CTL (paper §3) assumes that every child was fine-tuned from θ_0. Two checks, in order:

    1. *Recorded parent* (exact): ``recorded[name]`` is the :func:`fingerprint` of the backbone the
       child started from, written into its checkpoint metadata when llfc fine-tuned it; a
       different fingerprint of θ_0 means another parent.
    2. *Distance* (heuristic, when nothing was recorded): fine-tuning moves a network a small
       fraction of its norm, while two unrelated initialisations of one architecture are about
       √2·‖θ‖ apart; ‖τ_i‖/‖θ_0‖ > :data:`MAX_RELATIVE_TASK_VECTOR` flags the child.

    Returns the warning messages (also issued with :func:`warnings.warn`, category UserWarning);
    an empty list when nothing was flagged.

    Raises:
        IncompatibleModelsError: a child whose backbone does not share θ_0's architecture.
    """
    msgs = []
    fp0 = fingerprint(theta0) if recorded else None
    norm0 = torch.sqrt(
        cast(torch.Tensor, sum((t.double() ** 2).sum() for t in theta0.values() if t.is_floating_point()))
    )
    for name, sd in children.items():
        check_same_backbone(theta0, sd, name, "the parent")
        rec = (recorded or {}).get(name)
        if rec is not None:
            if rec != fp0:
                msgs.append(
                    f"{name} was not fine-tuned from this parent: its checkpoint records parent "
                    f"fingerprint {rec}, the parent's is {fp0} (llfc.task_vectors.fingerprint). "
                    f"CTL assumes one common pretrained point; task vectors against this parent "
                    f"are not the fine-tuning updates."
                )
            continue
        tau = task_vector(sd, theta0)
        rel = float(
            torch.sqrt(cast(torch.Tensor, sum((t.double() ** 2).sum() for t in tau.values())))
            / max(float(norm0), 1e-30)
        )
        if rel > MAX_RELATIVE_TASK_VECTOR:
            msgs.append(
                f"{name} may not descend from this parent: ‖θ − θ_0‖/‖θ_0‖ = {rel:.2f} > "
                f"{MAX_RELATIVE_TASK_VECTOR:g} (fine-tuning moves a network a small fraction of its "
                f"norm). CTL assumes one common pretrained point."
            )
    for m in msgs:
        warnings.warn(m, UserWarning, stacklevel=2)
    return msgs


def invalid_state(state: Mapping[str, torch.Tensor]) -> str | None:
    """Why a constructed state dict is not a valid network, or None when it is.

    Task arithmetic and free (α, β) combine BatchNorm running variances linearly too; with λ < 0 or
    large λ (e.g. θ_0 − λτ, var_0 − λ(var_A − var_0)) a variance can become negative, and the network
    then computes NaN. Such states are reported, never measured (their cosine would read as a
    distance of 1). Checks: non-finite floating tensors, negative ``*running_var`` entries.
    """
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"non-finite values in {k!r}"
        if k.endswith("running_var") and bool((t < 0).any()):
            return f"negative BatchNorm running variance in {k!r} (min {float(t.min()):.3g})"
    return None
