"""Principal angles between the top-k singular subspaces of two networks' weights.

Source: the official LLFC code, ``scripts/principal_angle.py`` (paper-digest §4.8): each Conv2d /
Linear weight is reshaped from (O, I, kh, kw) to (O, I·kh·kw); the principal angles (degrees,
descending, ``scipy.linalg.subspace_angles``) are taken between the spans of the top-k left
singular vectors U_A[:, :k] and U_B[:, :k] (subspaces of R^O, the output / neuron space) and
between the spans of the top-k right singular vectors V_A[:, :k] and V_B[:, :k] (subspaces of
R^(I·kh·kw), the input space). Default k = 5. Computed in float64 with NumPy / SciPy.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from scipy.linalg import subspace_angles

from llfc.errors import ConfigError, IncompatibleModelsError, NonFiniteWeightsError


def _matrix(w: torch.Tensor, what: str) -> np.ndarray:
    if w.ndim < 2:
        raise ConfigError(
            f"principal angles need a weight with ≥ 2 dimensions, {what} has shape "
            f"{tuple(w.shape)}; skip biases and normalisation parameters."
        )
    m = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1).numpy()
    if not np.isfinite(m).all():
        raise NonFiniteWeightsError(
            f"{what} holds NaN or Inf values; principal angles are undefined. Check the "
            f"checkpoint (training may have diverged)."
        )
    return m


def principal_angles(w_a: torch.Tensor, w_b: torch.Tensor, k: int = 5) -> dict:
    """Principal angles between the top-k singular subspaces of two weights of one layer.

    Args:
        w_a, w_b: weights of the same shape (O, I) or (O, I, kh, kw) (any dtype/device;
            reshaped to (O, I·kh·kw) and computed in float64).
        k: number of leading singular vectors; clipped to k' = min(k, O, I·kh·kw). Singular
            vectors beyond a matrix's rank (zero singular values) are arbitrary, and so are
            angles involving them.

    Returns:
        dict with
          - ``"left"``: float64 tensor (k',), degrees in [0, 90], descending: angles between
            span U_A[:, :k'] and span U_B[:, :k'] (output space R^O);
          - ``"right"``: float64 tensor (k',), degrees, descending: angles between the spans of
            the top-k' right singular vectors (input space R^(I·kh·kw));
          - ``"sv_a"``, ``"sv_b"``: float64 tensors (k',), the top-k' singular values;
          - ``"k"``: k'.

    Raises:
        IncompatibleModelsError: different shapes.
        ConfigError: a weight with fewer than 2 dimensions, or k < 1.
        NonFiniteWeightsError: NaN/Inf in a weight.

    Source: official LLFC ``scripts/principal_angle.py`` (paper-digest §4.8);
    ``scipy.linalg.subspace_angles`` (Knyazev & Argentati 2002).
    """
    if tuple(w_a.shape) != tuple(w_b.shape):
        raise IncompatibleModelsError(
            f"principal angles need weights of one shape, got {tuple(w_a.shape)} and "
            f"{tuple(w_b.shape)}; pair layers of the same architecture."
        )
    if int(k) < 1:
        raise ConfigError(f"k (number of singular vectors) must be ≥ 1, got {k!r}.")
    a, b = _matrix(w_a, "w_a"), _matrix(w_b, "w_b")
    kk = min(int(k), a.shape[0], a.shape[1])
    ua, sa, vha = np.linalg.svd(a, full_matrices=False)
    ub, sb, vhb = np.linalg.svd(b, full_matrices=False)
    left = np.degrees(subspace_angles(ua[:, :kk], ub[:, :kk]))
    right = np.degrees(subspace_angles(vha[:kk].T, vhb[:kk].T))
    return {
        "left": torch.from_numpy(np.sort(left)[::-1].copy()),
        "right": torch.from_numpy(np.sort(right)[::-1].copy()),
        "sv_a": torch.from_numpy(sa[:kk].copy()),
        "sv_b": torch.from_numpy(sb[:kk].copy()),
        "k": kk,
    }


def principal_angles_per_layer(
    sd_a: Mapping[str, torch.Tensor], sd_b: Mapping[str, torch.Tensor], k: int = 5
) -> dict[str, dict]:
    """:func:`principal_angles` for every floating-point tensor with ≥ 2 dimensions.

    Args:
        sd_a, sd_b: state dicts of two models of one architecture. 1-D and 0-D entries (biases,
            normalisation parameters, running statistics, ``num_batches_tracked``) and integer
            tensors are skipped; every Conv/Linear weight (and any other ≥ 2-D float tensor) is
            included, in ``sd_a``'s order.
        k: number of leading singular vectors (default 5, as the official code).

    Returns:
        {state-dict key: result of :func:`principal_angles`}.

    Raises:
        IncompatibleModelsError: a ≥ 2-D key present in only one state dict, or shapes differ.
    """

    def keys(sd):
        return [n for n, t in sd.items() if t.ndim >= 2 and torch.is_floating_point(t)]

    ka, kb = keys(sd_a), keys(sd_b)
    if set(ka) != set(kb):
        only_a = sorted(set(ka) - set(kb))[:5]
        only_b = sorted(set(kb) - set(ka))[:5]
        raise IncompatibleModelsError(
            f"the two state dicts hold different weight matrices (only in A: {only_a}, only in "
            f"B: {only_b}); compare two models of the same architecture."
        )
    out: dict[str, dict] = {}
    for n in ka:
        if tuple(sd_a[n].shape) != tuple(sd_b[n].shape):
            raise IncompatibleModelsError(
                f"weight {n!r} has shape {tuple(sd_a[n].shape)} in A but "
                f"{tuple(sd_b[n].shape)} in B; compare two models of the same architecture."
            )
        out[n] = principal_angles(sd_a[n], sd_b[n], k)
    return out
