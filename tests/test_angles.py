"""Principal angles between top-k singular subspaces (official principal_angle.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llfc.errors import ConfigError, IncompatibleModelsError, NonFiniteWeightsError
from llfc.metrics.angles import principal_angles, principal_angles_per_layer
from llfc.models import create_model


def test_identical_weights_give_zero_angles():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3)
    r = principal_angles(w, w.clone(), k=5)
    assert r["k"] == 5 and r["left"].shape == (5,) and r["right"].shape == (5,)
    assert r["left"].dtype == torch.float64
    assert r["left"].abs().max() < 1e-5 and r["right"].abs().max() < 1e-5
    torch.testing.assert_close(r["sv_a"], r["sv_b"])


def test_known_angle_in_the_plane():
    """span{e1} vs span{cos t e1 + sin t e2}: the angle is t (rank-1 matrices, k = 1)."""
    t = 0.3
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    u = torch.tensor([math.cos(t), math.sin(t), 0.0, 0.0], dtype=torch.float64)
    w_a = torch.outer(e1, v)
    w_b = 2.5 * torch.outer(u, v)
    r = principal_angles(w_a, w_b, k=1)
    assert r["left"].item() == pytest.approx(math.degrees(t), abs=1e-8)
    assert r["right"].item() == pytest.approx(0.0, abs=1e-6)
    assert r["sv_b"].item() == pytest.approx(2.5 * v.norm().item())


def test_two_dimensional_angles_known():
    """k = 2 with angles 20° and 70° between planes of R^4 built by hand."""
    a1, a2 = math.radians(20), math.radians(70)
    e = np.eye(4)
    ua = e[:, :2]
    ub = np.stack([math.cos(a1) * e[0] + math.sin(a1) * e[2],
                   math.cos(a2) * e[1] + math.sin(a2) * e[3]], axis=1)
    v = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 2)))[0]
    s = np.diag([3.0, 1.0])
    w_a = torch.from_numpy(ua @ s @ v.T)
    w_b = torch.from_numpy(ub @ s @ v.T)
    r = principal_angles(w_a, w_b, k=2)
    torch.testing.assert_close(r["left"], torch.tensor([70.0, 20.0], dtype=torch.float64))
    torch.testing.assert_close(r["right"], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_rotation_onto_orthogonal_subspace_gives_90_degrees():
    """W_B = Q W_A with Q an orthogonal map sending span U_A[:, :k] to its orthogonal
    complement: left angles are 90°, and the row space (right subspace) is unchanged."""
    rng = np.random.default_rng(1)
    k = 2
    w_a = rng.normal(size=(6, 4)) @ np.diag([5.0, 4.0, 1.0, 0.5]) @ np.linalg.qr(rng.normal(size=(4, 4)))[0]
    u, _, _ = np.linalg.svd(w_a)  # full 6×6 U
    perm = [2, 3, 0, 1, 4, 5]  # swap the first two columns with the next two
    q = u[:, perm] @ u.T  # orthogonal; maps u_0, u_1 to u_2, u_3
    w_b = q @ w_a
    r = principal_angles(torch.from_numpy(w_a), torch.from_numpy(w_b), k=k)
    torch.testing.assert_close(r["left"], torch.full((k,), 90.0, dtype=torch.float64))
    torch.testing.assert_close(r["right"], torch.zeros(k, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(r["sv_a"], r["sv_b"])


def test_row_permutation_leaves_right_subspace():
    torch.manual_seed(0)
    w = torch.randn(10, 4, 3, 3)
    p = torch.randperm(10)
    r = principal_angles(w, w[p], k=5)
    assert r["right"].abs().max() < 1e-5
    assert r["left"].max() > 1.0  # left singular vectors are permuted, not the same subspace


def test_k_is_clipped():
    w = torch.randn(3, 7)
    assert principal_angles(w, torch.randn(3, 7), k=5)["k"] == 3


def test_errors():
    with pytest.raises(IncompatibleModelsError):
        principal_angles(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(ConfigError):
        principal_angles(torch.randn(3), torch.randn(3))
    with pytest.raises(ConfigError):
        principal_angles(torch.randn(3, 3), torch.randn(3, 3), k=0)
    bad = torch.randn(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError):
        principal_angles(bad, torch.randn(3, 3))


def test_per_layer_on_resnet():
    torch.manual_seed(0)
    a = create_model("resnet20", width=0.25).state_dict()
    b = create_model("resnet20", width=0.25).state_dict()
    res = principal_angles_per_layer(a, b, k=3)
    expected = [n for n, t in a.items() if t.ndim >= 2]
    assert list(res) == expected
    assert "conv1.weight" in res and "linear.weight" in res
    assert not any(n.endswith(("bias", "running_mean", "num_batches_tracked")) for n in res)
    assert all(r["k"] == 3 for r in res.values())
    # identical networks: all zero
    same = principal_angles_per_layer(a, a, k=3)
    assert max(r["left"].max().item() for r in same.values()) < 1e-5
    b.pop("linear.weight")
    with pytest.raises(IncompatibleModelsError, match="linear.weight"):
        principal_angles_per_layer(a, b)
