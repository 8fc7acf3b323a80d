"""The LLFC feature-map distances (Zhou et al. 2023 §3, Figs. 2–4; definitions in docs/results.md).

All functions are pure and take features flattened to (N, D) (N samples, D = C·H·W); they
compute in float64 whatever the input dtype.

Zero vectors: a sample whose feature vector is all zero (e.g. every ReLU unit dead) has no
direction. We define cos(0, 0) = 1 (two zero vectors are identical: distance 0) and
cos(0, v) = 0 for v ≠ 0 (distance 1): never NaN. The official code divides by zero instead.
"""

from __future__ import annotations

import torch


def flatten_features(f: torch.Tensor) -> torch.Tensor:
    """(N, *) → (N, D) float64 view of a feature map, D = prod(*)."""
    return f.reshape(f.shape[0], -1).to(torch.float64)


def cos_from_inner(inner: torch.Tensor, sq_a: torch.Tensor, sq_b: torch.Tensor) -> torch.Tensor:
    """cos = ⟨a,b⟩ / (‖a‖‖b‖) from precomputed ⟨a,b⟩, ‖a‖², ‖b‖² (any broadcastable shapes).

    Zero-vector convention of this module: both zero → 1, one zero → 0. Result clamped to [−1, 1].
    """
    denom = (sq_a * sq_b).sqrt()
    both_zero = (sq_a == 0) & (sq_b == 0)
    c = torch.where(denom > 0, inner / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(inner))
    c = torch.where(both_zero, torch.ones_like(c), c)
    return c.clamp(-1.0, 1.0)


def cosine_distance(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """Per-sample cosine distance 1 − cos(a_i, b_i), shape (N,), float64.

    LLFC paper §3: d_α(x) = 1 − cos(f(θ_α; x), α f(θ_A; x) + (1−α) f(θ_B; x)); with
    ``absolute=True`` it is the official code's 1 − |cos| (``src/utils/dissimilarity.py``).

    Args:
        a, b: (N, *) feature maps of the same shape.
    """
    a, b = flatten_features(a), flatten_features(b)
    c = cos_from_inner((a * b).sum(1), (a * a).sum(1), (b * b).sum(1))
    return 1.0 - (c.abs() if absolute else c)


def whole_cosine_distance(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = False) -> torch.Tensor:
    """Whole-tensor cosine distance 1 − ⟨A,B⟩_F/(‖A‖_F‖B‖_F), a float64 scalar (official code's
    ``DissimilarityMetric("cosine")``)."""
    a, b = flatten_features(a), flatten_features(b)
    c = cos_from_inner((a * b).sum(), (a * a).sum(), (b * b).sum())
    return 1.0 - (c.abs() if absolute else c)


def scale_coef(f_alpha: torch.Tensor, f_int: torch.Tensor) -> torch.Tensor:
    """Per-sample least-squares scale s_i = ⟨f_α,i, f_int,i⟩ / ‖f_int,i‖², shape (N,), float64.

    s is the official code's ``coef``; Definition 2's c equals 1/s under exact proportionality
    (paper App. B.2; paper-digest §4.4). A zero f_int gives s = 1 if f_α is zero too, else NaN
    is avoided by returning 0.
    """
    a, b = flatten_features(f_alpha), flatten_features(f_int)
    return coef_from_inner((a * b).sum(1), (b * b).sum(1), (a * a).sum(1))


def coef_from_inner(inner: torch.Tensor, sq_int: torch.Tensor, sq_alpha: torch.Tensor) -> torch.Tensor:
    """s = ⟨f_α, f_int⟩ / ‖f_int‖² from sums; 1 when both vectors are zero, 0 when only f_int is."""
    s = torch.where(
        sq_int > 0, inner / torch.where(sq_int > 0, sq_int, torch.ones_like(sq_int)), torch.zeros_like(inner)
    )
    return torch.where((sq_int == 0) & (sq_alpha == 0), torch.ones_like(s), s)


def normalized_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dist(X, Y) = ‖X − Y‖²_F / (‖X‖_F ‖Y‖_F), a float64 scalar.

    The official code's "vanilla" metric, used for Dist_com, Dist_W and Dist_H (paper Fig. 7;
    docs/results.md). Both zero → 0; one zero → +inf.
    """
    x, y = x.to(torch.float64).reshape(-1), y.to(torch.float64).reshape(-1)
    return dist_from_sums(((x - y) ** 2).sum(), (x * x).sum(), (y * y).sum())


def dist_from_sums(sq_diff: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor) -> torch.Tensor:
    """‖X−Y‖² / (‖X‖‖Y‖) from the three sums (see :func:`normalized_distance`)."""
    denom = (sq_x * sq_y).sqrt()
    if float(denom) > 0:
        return sq_diff / denom
    return torch.zeros_like(sq_diff) if float(sq_diff) == 0 else torch.full_like(sq_diff, float("inf"))


def cosine_distance_from_sq(
    sq_x: torch.Tensor, sq_y: torch.Tensor, sq_diff: torch.Tensor, *, absolute: bool = False
) -> torch.Tensor:
    """1 − cos(x, y) from ‖x‖², ‖y‖² and ‖x − y‖², without the cancellation of 1 − ⟨x,y⟩/(‖x‖‖y‖).

    By the law of cosines ‖x−y‖² = (‖x‖ − ‖y‖)² + 2‖x‖‖y‖(1 − cos), so

        1 − cos = (‖x − y‖² − (‖x‖ − ‖y‖)²) / (2‖x‖‖y‖).

    When x ≈ y the difference x − y is formed elementwise (exactly 0 for x = y), so small
    distances keep their relative precision even when ‖x−y‖² comes from float32 arithmetic
    (the streaming engine relies on this). Same zero-vector convention as
    :func:`cos_from_inner`; result clamped to [0, 2]; ``absolute`` gives 1 − |cos|.
    """
    nx, ny = sq_x.sqrt(), sq_y.sqrt()
    denom = 2 * nx * ny
    d = torch.where(
        denom > 0,
        (sq_diff - (nx - ny) ** 2) / torch.where(denom > 0, denom, torch.ones_like(denom)),
        torch.ones_like(sq_diff),
    )
    d = torch.where((sq_x == 0) & (sq_y == 0), torch.zeros_like(d), d).clamp(0.0, 2.0)
    return torch.where(d > 1, 2 - d, d) if absolute else d


def coef_from_sq(sq_x: torch.Tensor, sq_y: torch.Tensor, sq_diff: torch.Tensor) -> torch.Tensor:
    """s = ⟨x, y⟩ / ‖y‖² from ‖x‖², ‖y‖², ‖x − y‖² (⟨x,y⟩ = (‖x‖² + ‖y‖² − ‖x−y‖²)/2); the scale
    of :func:`scale_coef` with x = f_α, y = f_int."""
    return coef_from_inner((sq_x + sq_y - sq_diff) / 2, sq_y, sq_x)
