"""Every formula against a hand-computed value or an independent formula."""

import math

import pytest
import torch

from llfc.metrics import (
    RunningMoments,
    RunningSum,
    barriers,
    cosine_distance,
    entezari_barrier,
    frankle_error_barrier,
    normalized_distance,
    scale_coef,
    sign_agreement,
    weak_additivity_distance,
    whole_cosine_distance,
)
from llfc.metrics.conditions import dist_com, linearity_defect


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_cosine_distance_hand_values():
    a = t([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    b = t([[1.0, 1.0], [-1.0, 0.0], [5.0, 0.0]])
    d = cosine_distance(a, b)
    assert d.tolist() == pytest.approx([1 - 1 / math.sqrt(2), 2.0, 0.0], abs=1e-15)
    # the official code's 1 - |cos|: anti-aligned vectors count as identical
    assert cosine_distance(a, b, absolute=True).tolist() == pytest.approx(
        [1 - 1 / math.sqrt(2), 0.0, 0.0], abs=1e-15)


def test_cosine_distance_zero_vectors_are_defined():
    a = t([[0.0, 0.0], [0.0, 0.0]])
    b = t([[0.0, 0.0], [3.0, 4.0]])
    d = cosine_distance(a, b)
    assert not torch.isnan(d).any()
    assert d.tolist() == [0.0, 1.0]


def test_cosine_distance_flattens_feature_maps():
    a = torch.randn(4, 3, 5, 5)
    b = torch.randn(4, 3, 5, 5)
    ref = 1 - torch.nn.functional.cosine_similarity(a.reshape(4, -1).double(), b.reshape(4, -1).double())
    assert torch.allclose(cosine_distance(a, b), ref, atol=1e-12)


def test_whole_cosine_distance_hand_value():
    a = t([[1.0, 0.0], [0.0, 1.0]])
    b = t([[1.0, 0.0], [1.0, 0.0]])
    # <A,B>_F = 1, |A|_F = sqrt(2), |B|_F = sqrt(2) -> cos = 1/2
    assert float(whole_cosine_distance(a, b)) == pytest.approx(0.5, abs=1e-15)


def test_scale_coef_recovers_the_scale():
    f_int = torch.randn(6, 10, dtype=torch.float64)
    s = scale_coef(2.5 * f_int, f_int)
    assert torch.allclose(s, torch.full((6,), 2.5, dtype=torch.float64))


def test_normalized_distance_hand_value():
    # |x - y|^2 = 9 + 1 = 10, |x| = |y| = 5
    assert float(normalized_distance(t([3.0, 4.0]), t([0.0, 5.0]))) == pytest.approx(0.4)
    assert float(normalized_distance(t([0.0]), t([0.0]))) == 0.0


def test_barriers_hand_values():
    alphas, err = [0.0, 0.25, 1.0], [0.1, 0.3, 0.2]
    # Frankle: max - mean(endpoints) = 0.3 - 0.15
    assert frankle_error_barrier(alphas, err) == pytest.approx(0.15)
    # Entezari: at alpha=.25 the linear reference is .25*Err(A) + .75*Err(B) = .125
    assert entezari_barrier(alphas, err) == pytest.approx(0.175)
    b = barriers(alphas, [1.0, 0.5, 1.0], err)
    assert b["loss_barrier_entezari"] == pytest.approx(0.0)  # convex dip: no barrier
    assert b["error_barrier_interior"] == pytest.approx(0.15)  # the peak is interior here
    # a path that never rises above the worse endpoint: Frankle's barrier is half the endpoints'
    # difference, the interior barrier is negative
    e2 = [0.1, 0.12, 0.2]
    assert barriers(alphas, [1.0, 1.0, 1.0], e2)["error_barrier_frankle"] == pytest.approx(0.05)
    assert barriers(alphas, [1.0, 1.0, 1.0], e2)["error_barrier_interior"] == pytest.approx(-0.03)
    with pytest.raises(ValueError):
        frankle_error_barrier([0.0, 0.5], [0.1, 0.2])
    # an extrapolated grid: the points beyond the two models are on the curve, not in the barriers
    ext_a, ext_e = [-0.2, 0.0, 0.25, 1.0, 1.2], [0.9, 0.1, 0.3, 0.2, 0.8]
    b = barriers(ext_a, [5.0, 1.0, 0.5, 1.0, 5.0], ext_e)
    assert b["error_barrier_frankle"] == pytest.approx(0.15) and b["error_barrier_entezari"] == pytest.approx(0.175)
    assert b["loss_barrier_entezari"] == pytest.approx(0.0) and b["error_barrier_interior"] == pytest.approx(0.15)


def test_weak_additivity_hand_value():
    g_a, g_b = t([[1.0, -1.0]]), t([[1.0, 1.0]])
    # u = relu([1, 0]) = [1, 0]; v = .5*[1, 0] + .5*[1, 1] = [1, .5]; cos = 1/sqrt(1.25)
    d = weak_additivity_distance(g_a, g_b, 0.5)
    assert float(d[0]) == pytest.approx(1 - 1 / math.sqrt(1.25), abs=1e-15)
    assert sign_agreement(g_a, g_b).tolist() == [0.5]


@pytest.mark.parametrize("a,b", [(1.0, 2.0), (-1.0, -3.0), (0.0, -2.0), (1.0, -1.0), (-2.0, 0.5)])
def test_scalar_weak_additivity_iff_same_sign(a, b):
    holds = all(
        abs(max(al * a + (1 - al) * b, 0) - (al * max(a, 0) + (1 - al) * max(b, 0))) < 1e-12
        for al in [i / 20 for i in range(21)]
    )
    assert holds == (a * b >= 0)


def test_linearity_defect_identity():
    g = torch.Generator().manual_seed(0)
    wa, wb = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ha, hb = torch.randn(7, 11, generator=g), torch.randn(7, 11, generator=g)
    for alpha in (0.25, 0.5, 0.9):
        expected = -alpha * (1 - alpha) * (wa - wb).double() @ (ha - hb).double()
        assert torch.allclose(linearity_defect(wa, wb, ha, hb, alpha), expected, atol=1e-12)


def test_dist_com_numerator_is_the_residual():
    g = torch.Generator().manual_seed(1)
    wa, wb = torch.randn(4, 6, generator=g).double(), torch.randn(4, 6, generator=g).double()
    ha, hb = torch.randn(6, 9, generator=g).double(), torch.randn(6, 9, generator=g).double()
    left, right = wa @ ha + wb @ hb, wa @ hb + wb @ ha
    expected = ((wa - wb) @ (ha - hb)).pow(2).sum() / (left.norm() * right.norm())
    assert float(dist_com(wa @ ha, wb @ hb, wa @ hb, wb @ ha)) == pytest.approx(float(expected), rel=1e-12)


def test_running_moments_equal_all_in_memory():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(103, 3, generator=g) * 5 + 100  # offset: naive sum-of-squares would lose digits
    rm = RunningMoments()
    for chunk in x.split([1, 50, 7, 45]):
        rm.update(chunk)
    mean, std = rm.compute()
    assert torch.allclose(mean, x.double().mean(0), atol=1e-12)
    assert torch.allclose(std, x.double().std(0, unbiased=True), atol=1e-12)  # ÷(N−1), as the official code
    pop = RunningMoments(ddof=0)
    pop.update(x)
    assert torch.allclose(pop.compute()[1], x.double().std(0, unbiased=False), atol=1e-12)
    one = RunningMoments()
    one.update(x[:1])
    assert torch.isnan(one.compute()[1]).all()  # undefined for one sample (null in results.json)
    rs = RunningSum()
    for chunk in x.split(10):
        rs.update(chunk)
    assert torch.allclose(rs.compute(), x.double().sum(0), atol=1e-9)
    with pytest.raises(RuntimeError):
        RunningMoments().compute()


def test_stable_cosine_distance_matches_definition_and_keeps_small_distances_precise():
    from llfc.metrics.cosine import coef_from_sq, cosine_distance_from_sq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 300, generator=g, dtype=torch.float64)
    y = torch.randn(50, 300, generator=g, dtype=torch.float64) + 0.5 * x
    sq = lambda t: (t * t).sum(1)
    d = cosine_distance_from_sq(sq(x), sq(y), sq(x - y))
    assert torch.allclose(d, cosine_distance(x, y), atol=1e-12)
    assert torch.allclose(coef_from_sq(sq(x), sq(y), sq(x - y)), scale_coef(x, y), atol=1e-12)
    # nearly identical float32 vectors: the float64 truth is ~1e-9, far below float32's resolution
    # of cos itself; the law-of-cosines form from float32 sums keeps it to 1%
    x32 = x.float()
    sq32 = lambda t: (t * t).sum(1).double()
    truth = lambda y32: cosine_distance(x32.double(), y32.double())
    y32 = x32 + 1e-4 * torch.randn(50, 300, generator=g)
    stable = cosine_distance_from_sq(sq32(x32), sq32(y32), sq32(x32 - y32))
    assert torch.allclose(stable, truth(y32), rtol=1e-2, atol=0)
    # with a 30% scale mismatch the error grows to ~eps32·(1 − s)², still below 1e-7
    y32 = 1.3 * x32 + 1e-4 * torch.randn(50, 300, generator=g)
    stable = cosine_distance_from_sq(sq32(x32), sq32(y32), sq32(x32 - y32))
    assert torch.allclose(stable, truth(y32), rtol=0, atol=1e-7)
    assert cosine_distance_from_sq(t([0.0]), t([0.0]), t([0.0])).item() == 0.0
    assert cosine_distance_from_sq(t([0.0]), t([4.0]), t([4.0])).item() == 1.0
    # anti-parallel: 1 − cos = 2, and 0 with the official |cos|
    assert cosine_distance_from_sq(t([1.0]), t([1.0]), t([4.0]), absolute=True).item() == pytest.approx(0.0)
