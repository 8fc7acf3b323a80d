"""Weight matching, activation matching and align(): planted permutations, exact formulas, streaming stats."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from llfc.errors import IncompatibleModelsError
from llfc.permutation import (
    CrossMoments,
    NodeOutputs,
    activation_matching,
    align,
    apply_permutation,
    derive_spec,
    invert,
    random_permutation,
    weight_matching,
)
from llfc.permutation.activation_matching import accumulate_moments
from llfc.permutation.spec import PermutationSpec, relative_output_change
from test_permutation_models import make, randomize_norm_stats

torch.set_num_threads(1)


def mlp(seed, widths=(48, 40, 32)):
    torch.manual_seed(seed)
    m = make("mlp", input_shape=(1, 8, 8), widths=widths).eval()
    with torch.no_grad():  # keep every ReLU alive on random inputs (dead units have no identity to recover)
        for layer in m.layers:
            if isinstance(layer, nn.Linear):
                layer.bias.add_(0.5)
    return m


def planted(model, spec, seed=3):
    p = random_permutation(spec, torch.Generator().manual_seed(seed), derange=True)
    return p, apply_permutation(spec, p, model.state_dict())


def test_weight_matching_recovers_planted_mlp():
    a = mlp(0)
    spec = derive_spec(a, torch.randn(2, 1, 8, 8))
    p, sd_b = planted(a, spec)
    perms, rep = weight_matching(spec, a.state_dict(), sd_b)
    assert all(torch.equal(perms[g], invert(p)[g]) for g in spec.groups)
    rec = apply_permutation(spec, perms, sd_b)
    assert all(torch.equal(rec[k], v) for k, v in a.state_dict().items())
    assert rep.converged and rep.objective_per_sweep[-1] == rep.objective
    assert all(d == 0.0 for d in rep.distance_after.values())
    assert rep.moved_fraction == {g: float((p[g] != torch.arange(len(p[g]))).double().mean()) for g in p}


def test_weight_matching_recovers_planted_vgg16_bn():
    torch.manual_seed(0)
    a = randomize_norm_stats(make("vgg16_bn", width=0.125), 0, (3, 32, 32))
    spec = derive_spec(a, torch.randn(2, 3, 32, 32))
    p, sd_b = planted(a, spec)
    perms, rep = weight_matching(spec, a.state_dict(), sd_b)
    rec = apply_permutation(spec, perms, sd_b)
    assert all(torch.equal(rec[k], v) for k, v in a.state_dict().items())
    # J is over the weights: the running statistics are permuted (recovered above) but not matched
    assert spec.buffers == {k for k in spec.keys() if k.endswith(("running_mean", "running_var"))} != set()
    assert rep.objective == pytest.approx(sum(float((v.double() ** 2).sum()) for k, v in a.state_dict().items()
                                              if k in spec.keys() and k not in spec.buffers), rel=1e-12)


def test_running_statistics_do_not_steer_weight_matching():
    """Large BatchNorm running statistics that disagree between A and B: the weights alone hold the
    planted permutation. With the statistics in J (before) the matching followed them and missed it."""
    torch.manual_seed(0)
    a = randomize_norm_stats(make("vgg16_bn", width=0.125), 0, (3, 32, 32))
    spec = derive_spec(a, torch.randn(2, 3, 32, 32))
    _, sd_b = planted(a, spec)
    g = torch.Generator().manual_seed(1)
    stats = [k for k in spec.keys() if k.endswith(("running_mean", "running_var"))]
    for k in stats:  # B's statistics: large and unrelated to A's
        sd_b[k] = 100 * torch.rand(sd_b[k].shape, generator=g)
    perms, _ = weight_matching(spec, a.state_dict(), sd_b)
    rec = apply_permutation(spec, perms, sd_b)
    assert all(torch.equal(rec[k], v) for k, v in a.state_dict().items() if k not in stats)


def test_weight_matching_objective_identities_on_independent_models():
    a, b = mlp(0), mlp(1)
    spec = derive_spec(a, torch.randn(2, 1, 8, 8))
    sa, sb = a.state_dict(), b.state_dict()
    perms, rep = weight_matching(spec, sa, sb, restarts=3, seed=0, dtype=torch.float64)
    # coordinate descent only accepts improvements: monotone sweeps, better than no alignment
    h = rep.objective_per_sweep
    assert all(y >= x - 1e-9 for x, y in zip(h, h[1:]))
    assert rep.objective > rep.objective_identity
    assert len(rep.restart_objectives) == 3 and rep.objective == max(rep.restart_objectives)
    # Σ_k ‖A − π(B)‖² = Σ‖A‖² + Σ‖B‖² − 2 J (independent formula for the reported numbers)
    keys = spec.keys()
    na = sum(float((sa[k].double() ** 2).sum()) for k in keys)
    nb = sum(float((sb[k].double() ** 2).sum()) for k in keys)
    after = sum(d ** 2 for d in rep.distance_after.values())
    before = sum(d ** 2 for d in rep.distance_before.values())
    assert after == pytest.approx(na + nb - 2 * rep.objective, rel=1e-9)
    assert before == pytest.approx(na + nb - 2 * rep.objective_identity, rel=1e-9)
    assert after < before
    # the aligned B computes B's function
    x = torch.randn(5, 1, 8, 8)
    assert relative_output_change(b, sb, apply_permutation(spec, perms, sb), x) < 1e-5


def test_weight_matching_single_group_equals_brute_force():
    """One hidden layer = one group: the optimum over all 5! permutations, found by enumeration."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    b = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = derive_spec(a, torch.randn(2, 3))
    (g,) = spec.groups
    sa, sb = a.state_dict(), b.state_dict()

    def J(p):
        return (sa["0.weight"].double() * sb["0.weight"].double()[p]).sum() + \
            (sa["0.bias"].double() * sb["0.bias"].double()[p]).sum() + \
            (sa["2.weight"].double() * sb["2.weight"].double()[:, p]).sum()

    best = max(itertools.permutations(range(5)), key=lambda p: float(J(list(p))))
    perms, rep = weight_matching(spec, sa, sb, dtype=torch.float64)
    assert perms[g].tolist() == list(best)
    const = sum(float((sa[k].double() * sb[k].double()).sum()) for k in ["2.bias"])  # not in the spec
    assert rep.objective == pytest.approx(float(J(list(best))), rel=1e-12)
    assert "2.bias" not in spec.keys() and const != 0


def test_activation_matching_recovers_planted_mlp():
    a = mlp(0)
    spec = derive_spec(a, torch.randn(2, 1, 8, 8))
    p, sd_b = planted(a, spec)
    b = mlp(5)
    b.load_state_dict(sd_b)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(64, 1, 8, 8, generator=g), torch.zeros(64)) for _ in range(3)]
    for corr in (False, True):
        perms, rep = activation_matching(a, b, spec, loader, correlation=corr)
        assert all(torch.equal(perms[k], invert(p)[k]) for k in spec.groups)
        assert rep.n_inputs == 192 and set(rep.n_samples.values()) == {192}
    assert rep.statistic == "correlation"
    # each unit's correlation with its own copy is 1 (0 for a unit that is constant on the data)
    stats, _ = accumulate_moments(a, b, spec, loader)
    for k, v in rep.objective.items():
        alive = float((stats[k].m_aa > 0).double().mean())
        assert v == pytest.approx(alive, abs=1e-9)


def test_cross_moments_match_in_memory_formulas():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, 6, generator=g, dtype=torch.float64) * 3 + 5
    b = a[:, [2, 0, 1, 5, 3, 4]] * 0.5 + torch.randn(1000, 6, generator=g, dtype=torch.float64) + 2
    st = CrossMoments(6, 6)
    for lo, hi in [(0, 1), (1, 300), (300, 301), (301, 1000)]:  # uneven batches, incl. single samples
        st.update(a[lo:hi], b[lo:hi])
    assert st.count == 1000
    torch.testing.assert_close(st.cross(), a.T @ b / 1000, rtol=1e-12, atol=1e-12)
    corr = np.corrcoef(a.numpy().T, b.numpy().T)[:6, 6:]
    torch.testing.assert_close(st.correlation(), torch.from_numpy(corr), rtol=1e-10, atol=1e-12)


def test_streaming_conv_features_equal_all_in_memory():
    torch.manual_seed(0)
    a = randomize_norm_stats(make("resnet20", width=1), 0, (3, 16, 16))
    torch.manual_seed(1)
    b = randomize_norm_stats(make("resnet20", width=1), 1, (3, 16, 16))
    spec = derive_spec(a, torch.randn(2, 3, 16, 16))
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 3, 16, 16, generator=g) for n in (7, 16, 1, 9)]
    stats, seen = accumulate_moments(a, b, spec, xs)
    assert seen == 33
    nodes = {grp: spec.feature_nodes(grp)[0] for grp in spec.groups}
    fa = NodeOutputs(a, [r.node for r in nodes.values()]).eval()
    fb = NodeOutputs(b, [r.node for r in nodes.values()]).eval()
    with torch.no_grad():  # same batches as the streaming pass (float32 convs depend on the batch size)
        outs_a, outs_b = [fa(x) for x in xs], [fb(x) for x in xs]
    full_a = {k: torch.cat([o[k] for o in outs_a]) for k in outs_a[0]}
    full_b = {k: torch.cat([o[k] for o in outs_b]) for k in outs_b[0]}
    for grp, r in nodes.items():
        n = spec.sizes[grp]
        ma = full_a[r.node].double().movedim(1, -1).reshape(-1, n)  # every spatial position is a sample
        mb = full_b[r.node].double().movedim(1, -1).reshape(-1, n)
        assert stats[grp].count == ma.shape[0]
        torch.testing.assert_close(stats[grp].cross(), ma.T @ mb / ma.shape[0], rtol=1e-10, atol=1e-12)
        corr = torch.from_numpy(np.corrcoef(ma.numpy().T, mb.numpy().T)[:n, n:])
        ok = (ma.std(0) > 0)[:, None] & (mb.std(0) > 0)[None, :]
        torch.testing.assert_close(stats[grp].correlation()[ok], corr[ok], rtol=1e-8, atol=1e-10)


def test_align_weight_and_activation_with_prefix_and_report():
    a, b = mlp(0), mlp(1)
    x = torch.randn(4, 1, 8, 8)
    prefixed = {"module." + k: v for k, v in b.state_dict().items()}
    res = align(a, prefixed, x, method="weight", seed=0)
    json.dumps(res.report)
    assert res.report["method"] == "weight" and res.report["function_check"]["relative_change"] < 1e-4
    assert set(res.state_dict) == set(a.state_dict())
    assert relative_output_change(b, b.state_dict(), res.state_dict, torch.randn(6, 1, 8, 8)) < 1e-5
    assert sum(res.report["distance_after"].values()) < sum(res.report["distance_before"].values())
    loader = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    res2 = align(a, b, x, method="activation", loader=loader)
    json.dumps(res2.report)
    assert res2.report["method"] == "activation"
    assert relative_output_change(b, b.state_dict(), res2.state_dict, x) < 1e-5


def test_align_refuses_different_architectures():
    a = mlp(0, widths=(48, 40, 32))
    b = mlp(1, widths=(48, 41, 32))
    with pytest.raises(IncompatibleModelsError, match=r"layers\.2\.weight"):
        align(a, b, torch.randn(2, 1, 8, 8))


def test_ste_lowers_the_midpoint_loss_of_an_independent_pair():
    """STE (Git Re-Basin Alg. 3) must find a permutation whose midpoint loss is lower than the
    unpermuted pair's, and the permuted B must compute B's function."""
    import torch.nn.functional as F
    from torch.func import functional_call

    from llfc.models import create_model
    from llfc.permutation import align, apply_permutation, derive_spec, ste_matching

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 6, 6, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1))  # a learnable rule
    kw = dict(input_shape=[1, 6, 6], num_classes=4, widths=[24, 24])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = create_model("mlp", **kw)
        opt = torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        models.append(m.eval())
    sd_a, sd_b = models[0].state_dict(), models[1].state_dict()
    spec = derive_spec(models[0], x[:4])
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    perms, rep = ste_matching(models[0], spec, sd_a, sd_b, batches, epochs=3, lr=0.05)
    mid = lambda sd: F.cross_entropy(functional_call(models[0], {k: 0.5 * (sd_a[k] + sd[k]) for k in sd_a}, (x,)), y)
    assert mid(apply_permutation(spec, perms, sd_b)) < mid(sd_b)
    assert rep.steps == 12 and len(rep.losses) == 12
    res = align(models[0], models[1], x[:8], method="ste", loader=batches, epochs=1)
    assert res.report["method"] == "ste"


def test_weight_matching_on_a_residual_stream_returns_its_best_state_and_stops():
    """A conv inside a residual stream is permuted on both axes by one group (W[P, P]), so a
    coordinate step is a linearisation that may lower the objective; the descent must not cycle
    for max_iter sweeps and must return the best objective it saw."""
    import torch.nn as nn
    import torch.nn.functional as F

    from llfc.permutation import align

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            h = F.relu(self.bn(self.c1(x)))
            h = h + self.act(self.c2(h))
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    a = Res().eval()
    torch.manual_seed(1)
    b = Res().eval()
    rep = align(a, b, torch.randn(4, 3, 8, 8), method="weight", max_iter=50).report["details"]
    hist = rep["objective_per_sweep"]
    assert rep["n_sweeps"] < 50
    assert rep["objective"] == max(hist) >= rep["objective_identity"]


def _low_rank_vs_full(spec, sa, sb, **kw):
    full_p, full = weight_matching(spec, sa, sb, low_rank_max_share=0.0, **kw)
    lr_p, lr = weight_matching(spec, sa, sb, low_rank_max_share=1.0, **kw)
    assert full.products_low_rank == 0 and full.products_full > 0
    assert lr.products_low_rank >= 5  # the incremental path really ran, several times
    assert lr.products_full + lr.products_low_rank == full.products_full  # the same terms were formed
    assert all(torch.equal(lr_p[g], full_p[g]) for g in spec.groups)
    assert lr.objective_per_sweep == pytest.approx(full.objective_per_sweep, rel=1e-12)
    return lr


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_similarity_updates_equal_full_recomputation_mlp(dtype):
    """Updating a cached similarity term by the moved slices (low_rank_max_share=1: whenever one
    was cached) gives the same permutations and objectives as recomputing every term in full
    (low_rank_max_share=0), on independent MLPs whose coupled hidden layers alternate for a few sweeps."""
    a, b = mlp(0, widths=(96, 80, 64)), mlp(1, widths=(96, 80, 64))
    spec = derive_spec(a, torch.randn(2, 1, 8, 8))
    rep = _low_rank_vs_full(spec, a.state_dict(), b.state_dict(), restarts=2, dtype=dtype)
    assert rep.n_sweeps >= 4


def test_low_rank_similarity_updates_equal_full_recomputation_three_axes():
    """One weight permuted on three axes by three groups: a term's two other axes can both move
    between two assignments (the telescoping sum over axes); the float64 updates keep the terms at
    1e-12 of the full products, so the descent is the same."""
    g = torch.Generator().manual_seed(0)
    shape = (12, 10, 8)
    sa = {"t": torch.randn(*shape, generator=g), "u": torch.randn(10, 8, generator=g)}
    sb = {"t": torch.randn(*shape, generator=g), "u": torch.randn(10, 8, generator=g)}
    spec = PermutationSpec.from_groups({"p": [("t", 0)], "q": [("t", 1), ("u", 0)], "r": [("t", 2), ("u", 1)]}, sa)
    rep = _low_rank_vs_full(spec, sa, sb, dtype=torch.float64, restarts=3, max_iter=50)
    assert rep.objective > rep.objective_identity
