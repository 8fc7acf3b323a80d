"""Cross-Task Linearity (llfc.metrics.ctl, llfc.task_vectors, llfc.finetune): metrics against
hand-computed values, task-vector algebra, the α + β ≠ 1 case, bad input, a tiny finetune pair end to end."""

import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

from llfc.config import ExperimentConfig
from llfc.errors import ConfigError, IncompatibleModelsError
from llfc.experiment import run_experiment
from llfc.metrics.cosine import cosine_distance
from llfc.metrics.ctl import CTLMeter, PairStats, check_points, pair_sums
from llfc.probe import FeatureExtractor
from llfc.task_vectors import (apply_task_vectors, check_ancestry, combine, fingerprint, split_head,
                               task_vector)


def _mlp(seed, widths=(6, 5)):
    torch.manual_seed(seed)
    layers, d = [], 4
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    return nn.Sequential(*layers, nn.Linear(d, 3))


def _sd(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------------------------- metrics
def test_pair_stats_hand_computed():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    s = PairStats()
    s.update(pair_sums(x[:1], y[:1]))  # two batches: streaming must equal the whole
    s.update(pair_sums(x[1:], y[1:]))
    r = s.compute()
    # per sample: cos = 0 and 1 → distances 1 and 0; coefficients ⟨x,y⟩/‖y‖² = 0/1 and 4/8
    # std ÷(N−1), as the official code reports (docs/results.md): sqrt(((1−½)² + (0−½)²) / 1)
    assert r["distance"]["mean"] == pytest.approx(0.5) and r["distance"]["std"] == pytest.approx(0.5 ** 0.5)
    assert r["coef"]["mean"] == pytest.approx(0.25) and r["coef"]["std"] == pytest.approx(0.25 * 2 ** 0.5)
    # whole tensor: ⟨X,Y⟩ = 4, ‖X‖² = 3, ‖Y‖² = 9
    assert r["distance"]["whole"] == pytest.approx(1 - 4 / math.sqrt(27))
    assert r["coef"]["whole"] == pytest.approx(4 / 9)


def test_ctl_exact_for_a_linear_model_with_free_alpha_beta():
    """f is linear in θ for a single Linear layer, so f(αθ_A + βθ_B) = αf_A + βf_B for any α, β
    (α + β ≠ 1 included): distance 0 and coefficient 1 (CTL paper Eq. 1)."""
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    ex = FeatureExtractor(a)
    x = torch.randn(16, 4)
    pts = [(1.0, 1.0), (2.0, -1.0), (0.3, 0.4)]
    m = CTLMeter(ex, _sd(a), _sd(b), pts)
    m.update(x)
    (ly,) = m.compute()
    assert max(ly["target"]["distance"]["mean"]) < 1e-6
    assert ly["target"]["coef"]["whole"] == pytest.approx([1.0] * 3, abs=1e-6)
    # distances to the endpoints: an independent formula on the same features
    with torch.no_grad():
        fa, fb = a(x), b(x)
    for i, (al, be) in enumerate(pts):
        fm = al * fa + be * fb
        assert ly["A"]["distance"]["mean"][i] == pytest.approx(float(cosine_distance(fm, fa).mean()), abs=1e-6)
        assert ly["B"]["distance"]["mean"][i] == pytest.approx(float(cosine_distance(fm, fb).mean()), abs=1e-6)
    assert ly["baseline"]["distance"]["mean"] == pytest.approx(float(cosine_distance(fa, fb).mean()), abs=1e-6)


def test_ctl_meter_relu_net_alpha_beta_not_summing_to_one():
    """ReLU MLP at (α, β) = (0.7, 0.6): every statistic equals the one computed from the merged
    network's own forward pass (no shortcut through the meter's algebra)."""
    A, B = _mlp(0), _mlp(1)
    ex = FeatureExtractor(A)
    x = torch.randn(32, 4)
    m = CTLMeter(ex, _sd(A), _sd(B), [(0.7, 0.6)])
    for xb in x.split(10):
        m.update(xb)
    res = {ly["name"]: ly for ly in m.compute()}
    M = _mlp(2)
    M.load_state_dict({k: 0.7 * _sd(A)[k] + 0.6 * _sd(B)[k] for k in _sd(A)})
    with torch.no_grad():
        hid = M[1](M[0](x))  # first post-ReLU features of the merged model
        ha, hb = A[1](A[0](x)), B[1](B[0](x))
    d = cosine_distance(hid, 0.7 * ha + 0.6 * hb)
    ly = res["1"]
    assert ly["target"]["distance"]["mean"][0] == pytest.approx(float(d.mean()), abs=1e-6)
    assert ly["target"]["distance"]["std"][0] == pytest.approx(float(d.std(unbiased=True)), abs=1e-6)
    assert res["0"]["target"]["distance"]["mean"][0] < 1e-6  # first layer is linear in θ
    assert res["1"]["target"]["distance"]["mean"][0] > 1e-4  # ReLU breaks it


def test_bad_grids():
    for bad in ([[0.5, float("nan")]], [[float("inf"), 0.0]], [[0.5]], []):
        with pytest.raises(ConfigError):
            check_points(bad)
    with pytest.raises(ConfigError, match="finite"):
        apply_task_vectors(_sd(_mlp(0)), [task_vector(_sd(_mlp(1)), _sd(_mlp(0)))], [float("nan")])


# ---------------------------------------------------------------------------------- task vectors
def test_task_vector_algebra():
    t0, ta, tb = _sd(_mlp(0).double()), _sd(_mlp(1).double()), _sd(_mlp(2).double())
    tau_a, tau_b = task_vector(ta, t0), task_vector(tb, t0)
    back = apply_task_vectors(t0, [tau_a], [1.0])
    assert all(torch.allclose(back[k], ta[k], atol=1e-12, rtol=0) for k in ta)  # θ_0 + τ_A = θ_A
    neg = apply_task_vectors(t0, [tau_a], [-0.5])                               # negation
    assert all(torch.allclose(neg[k], 1.5 * t0[k] - 0.5 * ta[k], atol=1e-12) for k in ta)
    both = apply_task_vectors(t0, [tau_a, tau_b], [0.3, -0.2])
    assert all(torch.allclose(both[k], t0[k] + 0.3 * (ta[k] - t0[k]) - 0.2 * (tb[k] - t0[k]), atol=1e-12) for k in ta)
    # free (α, β): α θ_A + β θ_B = (α + β) θ_0 + α τ_A + β τ_B
    m = combine([ta, tb], [0.75, 0.75])
    ref = apply_task_vectors({k: 1.5 * v for k, v in t0.items()}, [tau_a, tau_b], [0.75, 0.75])
    assert all(torch.allclose(m[k], ref[k], atol=1e-12) for k in ta)
    assert combine([ta, tb], [1.0, 0.0]) == ta  # endpoints returned as they are


def test_integer_buffers_and_heads():
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    s0 = _sd(bn)
    s1 = {k: (v + 1 if v.is_floating_point() else v + 5) for k, v in s0.items()}
    tau = task_vector(s1, s0)
    assert "1.num_batches_tracked" not in tau
    assert combine([s0, s1], [0.5, 0.5])["1.num_batches_tracked"] == s0["1.num_batches_tracked"]
    body, head = split_head(s0, "2")
    assert set(head) == {"2.weight", "2.bias"} and "2.weight" not in body


def test_backbone_and_ancestry_checks():
    p = _sd(_mlp(0))
    with pytest.raises(IncompatibleModelsError, match="architecture"):
        task_vector(_sd(_mlp(1, widths=(7, 5))), p)
    child = {k: v + 0.01 for k, v in p.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_ancestry(p, {"a": child}) == []                       # a small step: fine
        assert check_ancestry(p, {"a": child}, {"a": fingerprint(p)}) == []
    with pytest.warns(UserWarning, match="may not descend"):
        check_ancestry(p, {"a": _sd(_mlp(5))})                            # unrelated init: heuristic
    with pytest.warns(UserWarning, match="records parent fingerprint"):
        check_ancestry(p, {"a": child}, {"a": fingerprint(child)})        # recorded: exact


def test_invalid_states_are_flagged_not_measured():
    """Task arithmetic can make a BatchNorm running variance negative (var_0 − λ(var_A − var_0)): the
    state is flagged, and a network computing NaN features is an error, never a distance of 1."""
    from llfc.errors import NonFiniteWeightsError
    from llfc.task_vectors import invalid_state

    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).eval()
    s0 = _sd(net)
    s1 = {**s0, "1.running_var": s0["1.running_var"] * 3}       # τ on the variance: +2·var_0
    assert invalid_state(s0) is None
    neg = apply_task_vectors(s0, [task_vector(s1, s0)], [-1.0])  # var_0 − 2·var_0 < 0
    assert "negative BatchNorm running variance" in invalid_state(neg)
    m = CTLMeter(FeatureExtractor(net), s0, s1, [(2.0, -1.0)])    # the same negative variance
    with pytest.raises(NonFiniteWeightsError, match="non-finite features"):
        m.update(torch.randn(5, 4))


# ---------------------------------------------------------------------------------- end to end
def _cfg(**ft):
    base = {
        "pretrain": {"name": "d0-4", "dataset": "digits", "classes": [0, 1, 2, 3, 4]},
        "tasks": [{"name": "d5-9", "dataset": "digits", "classes": [5, 6, 7, 8, 9]},
                  {"name": "rot90", "dataset": "digits", "angle": 90}],
        "pretrain_epochs": 2, "sweep": [0], "train": {"epochs": 1}, "train_samples": 300,
        "test_samples": 100, "lambdas": [0.5, 1.0],
    }
    base.update(ft)
    return ExperimentConfig.from_dict({
        "dataset": "digits", "model": "mlp", "model_args": {"widths": [16, 16]}, "pairs": ["finetune"],
        "train": {"epochs": 2, "batch_size": 50, "optimizer": "adam", "lr": 0.01, "schedule": "constant"},
        "measure": {"batch_size": 128}, "finetune": base})


@pytest.mark.parametrize("bad,match", [
    ({"tasks": [{"name": "d0-4", "dataset": "digits"}, {"name": "x", "dataset": "digits"}]}, "distinct"),
    ({"lambdas": [0.5, float("inf")]}, "finite"),
    ({"points": [[0.5, float("nan")]]}, "finite"),
    ({"tasks": [{"name": "a", "dataset": "digits"}, {"name": "b", "dataset": "mnist"}]}, "shape"),
    ({"heads": "shared"}, "label spaces"),
    ({"tasks": [{"name": "a", "dataset": "digits"}]}, "exactly two"),
])
def test_bad_finetune_config_writes_nothing(bad, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run_experiment(_cfg(**bad), tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="on its own"):
        ExperimentConfig.from_dict({**_cfg().to_dict(), "pairs": ["finetune", "spawn"]}).resolved()


def test_tiny_finetune_pair_end_to_end(tmp_path, monkeypatch):
    """Own heads (different label spaces), pretraining sweep, control; results checked against an
    independent evaluation of the saved checkpoints; a second run resumes without retraining."""
    from llfc.checkpoint import load_checkpoint
    from llfc.finetune import TaskSpec, task_dataset
    from llfc.train import ModelSpec, evaluate

    torch.set_num_threads(1)
    out = tmp_path / "run"
    res = run_experiment(_cfg(), out, progress=False, log=lambda s: None)
    assert set(res["pairs"]) == {"finetune-k0", "finetune-k2", "control"}
    assert res["heads"] == "own" and res["head_module"] == "layers.4"
    pr = res["pairs"]["finetune-k2"]
    assert [ly["name"] for ly in pr["ctl"]] == ["layers.0", "layers.1", "layers.2", "layers.3"]  # no logits
    # the child's reported error equals an independent evaluation of its checkpoint
    sd, meta = load_checkpoint(out / "pairs" / "finetune" / "k2-d5-9" / "final")
    m = ModelSpec("mlp", {"input_shape": [1, 8, 8], "num_classes": 5, "widths": [16, 16]})()
    m.load_state_dict(sd)
    task = TaskSpec("d5-9", "digits", 0.0, (5, 6, 7, 8, 9))
    assert evaluate(m, task_dataset(task, "test", None, 100))[1] == pytest.approx(pr["errors"]["A"]["d5-9"])
    parent = load_checkpoint(out / "pairs" / "finetune" / "parent-main" / "epoch2")[0]
    assert meta["parent_fingerprint"] == fingerprint(split_head(parent, "layers.4")[0])
    # the point (1, 0) would be A itself; (0.5, 0.5) merged errors are fractions; grids have their sizes
    assert len(pr["arithmetic"]) == len(pr["negation"]) == 2 and pr["stitching"][0]["rows"][0]["layer"] == "merged"
    assert all(0 <= e <= 1 for row in pr["errors"]["points"] for e in row.values())
    assert "control" in (out / "summary.txt").read_text()
    html = (out / "report.html").read_text()  # every run folder has its report, a finetune run too
    assert "Cross-Task Linearity" in html and "data:image/png;base64," in html and "control" in html
    for f in ("ctl.csv", "ctl_layers.png", "ctl_negation.png", "ctl_arithmetic.png", "ctl_stitching.png",
              "ctl_sweep.png"):
        assert (out / f).stat().st_size > 0
    # a parent that is not the children's: warned, with how it was detected
    from llfc.finetune import FinetuneConfig, measure_finetune_pair

    ft = FinetuneConfig.from_dict({**_cfg().finetune, "lambdas": [0.5], "stitch_points": []})
    sa, sb = sd, load_checkpoint(out / "pairs" / "finetune" / "k2-rot90" / "final")[0]
    other = load_checkpoint(out / "pairs" / "finetune" / "parent-control" / "epoch2")[0]
    data = {t.name: (None, task_dataset(t, "test", None, 50)) for t in ft.task_specs}

    def spec_for(t):
        return ModelSpec("mlp", {"input_shape": [1, 8, 8], "num_classes": t.num_classes, "widths": [16, 16]})
    with pytest.warns(UserWarning, match="records parent fingerprint"):
        measure_finetune_pair(spec_for, ft.task_specs, data, other, sa, sb, ft, "layers.4",
                              recorded={"d5-9": meta["parent_fingerprint"], "rot90": meta["parent_fingerprint"]})
    # resume: same folder and config → nothing retrained, same numbers
    (out / "results.json").unlink()
    import llfc.report.ctl

    monkeypatch.setattr(llfc.report.ctl, "plot_ctl", lambda *a: [])  # figures checked above
    again = run_experiment(_cfg(), out, progress=False, log=lambda s: None)
    assert json.dumps(again["pairs"]["control"]["ctl"]) == json.dumps(res["pairs"]["control"]["ctl"])
