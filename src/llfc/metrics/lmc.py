"""Linear mode connectivity barriers (definitions and sources: docs/results.md).

The curve is given on an α grid with α weighting model A (θ_α = α·θ_A + (1−α)·θ_B): the value
at α = 1 is model A's, at α = 0 model B's; both endpoints must be on the grid. A barrier is a
property of the path between the two models: points of an extrapolated grid (α < 0 or α > 1,
``allow_extrapolation``) are part of the reported curve but not of any barrier.
"""

from __future__ import annotations

from typing import Sequence


def _endpoints(alphas: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    if len(alphas) != len(values):
        raise ValueError(f"{len(alphas)} alphas but {len(values)} values")
    try:
        i_a, i_b = list(alphas).index(1.0), list(alphas).index(0.0)
    except ValueError:
        raise ValueError("the α grid must contain both endpoints 0 and 1") from None
    return float(values[i_a]), float(values[i_b])


def frankle_error_barrier(alphas: Sequence[float], errors: Sequence[float]) -> float:
    """Frankle et al. (2020) instability: max_{0≤α≤1} Err(θ_α) − ½(Err(θ_A) + Err(θ_B)).

    Units follow ``errors`` (fractions in [0, 1] in llfc's results). Frankle et al. call a pair
    linearly connected when this is ≲ 2 percentage points.
    """
    e_a, e_b = _endpoints(alphas, errors)
    return max(float(e) for a, e in zip(alphas, errors) if 0.0 <= a <= 1.0) - 0.5 * (e_a + e_b)


def interior_error_barrier(alphas: Sequence[float], errors: Sequence[float]) -> float:
    """Frankle's barrier over the interior of the path only: max_{0<α<1} Err(θ_α) − ½(Err_A + Err_B).

    Frankle's maximum includes the endpoints, so two endpoints of unequal error give a positive
    barrier (half their difference) on a path that never rises above the worse endpoint; this
    version reports only what the path between them adds (negative when every interior point
    is better than the endpoints' mean). NaN when the grid has no interior point.
    """
    e_a, e_b = _endpoints(alphas, errors)
    inner = [float(e) for a, e in zip(alphas, errors) if 0.0 < a < 1.0]
    return (max(inner) - 0.5 * (e_a + e_b)) if inner else float("nan")


def entezari_barrier(alphas: Sequence[float], values: Sequence[float]) -> float:
    """Entezari et al. (2022) barrier: max_{0≤α≤1} [v(θ_α) − (α·v(θ_A) + (1−α)·v(θ_B))].

    Used for both loss (the "loss barrier") and error. Non-negative on any grid that contains the
    endpoints (the term is 0 there).
    """
    v_a, v_b = _endpoints(alphas, values)
    return max(float(v) - (a * v_a + (1 - a) * v_b) for a, v in zip(alphas, values) if 0.0 <= a <= 1.0)


def barriers(alphas: Sequence[float], losses: Sequence[float], errors: Sequence[float]) -> dict:
    """All the barriers of one curve, named for what they are."""
    return {
        "error_barrier_frankle": frankle_error_barrier(alphas, errors),
        "error_barrier_interior": interior_error_barrier(alphas, errors),
        "error_barrier_entezari": entezari_barrier(alphas, errors),
        "loss_barrier_entezari": entezari_barrier(alphas, losses),
    }


def as_classification(logits, y):
    """Logits and targets as one classification per row, for the loss and error of LMC.

    An image classifier's logits (N, C) with labels (N,) are returned unchanged. A language
    model's next-token logits (N, T, V) with targets (N, T) become (N·T, V) and (N·T,): every token
    is one prediction, so the mean cross-entropy is the mean per-token loss (nats/token) and the
    error the per-token next-token error (as reported by nanoGPT and GLMC for Tiny Shakespeare).
    Logits already given as token rows (N·T, V) with targets (N, T) are accepted too.

    Raises:
        ValueError: the logits and targets do not fit either layout.
    """
    if logits.ndim == 2 and y.ndim == 2 and logits.shape[0] == y.numel():  # token rows already
        return logits, y.reshape(-1)
    if logits.ndim == y.ndim + 1 and tuple(logits.shape[:-1]) == tuple(y.shape):
        if y.ndim == 1:
            return logits, y
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
    raise ValueError(
        f"logits of shape {tuple(logits.shape)} do not fit targets of shape "
        f"{tuple(y.shape)}: expected (N, C) with (N,) or (N, T, V) with (N, T)"
    )
