"""The streaming engine against a straightforward all-in-memory computation, and properties."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.engine import measure_pair
from llfc.interpolate import lerp_state_dict
from llfc.metrics import cosine_distance, scale_coef, sign_agreement, weak_additivity_distance
from llfc.metrics.cosine import normalized_distance, whole_cosine_distance
from llfc.models import create_model
from llfc.probe import FeatureExtractor

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _pair(seed=0, widths=(24, 16)):
    torch.manual_seed(seed)
    m = create_model("mlp", input_shape=(1, 6, 6), num_classes=5, widths=widths)
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(seed + 1)
    sd_b = create_model("mlp", input_shape=(1, 6, 6), num_classes=5, widths=widths).state_dict()
    return m, sd_a, sd_b


def _data(n=73, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _batches(x, y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((x[i:i + s], y[i:i + s]))
        i += s
    assert i == len(x)
    return out


def test_streaming_equals_all_in_memory():
    # float64 model: batched and unbatched forward passes then agree to rounding, so any
    # difference would come from the streaming reduction itself
    m, sd_a, sd_b = _pair()
    m = m.double()
    sd_a = {k: v.double() for k, v in sd_a.items()}
    sd_b = {k: v.double() for k, v in sd_b.items()}
    x, y = _data()
    x = x.double()
    res = measure_pair(m, sd_a, sd_b, _batches(x, y, [10, 1, 30, 32]), ALPHAS)

    # all in memory: every feature of every sample at once
    fe = FeatureExtractor(m)
    fa, fb = fe(sd_a, x), fe(sd_b, x)
    fal = [fe(lerp_state_dict(sd_a, sd_b, a), x) for a in ALPHAS]
    for k, a in enumerate(ALPHAS):
        logits = fal[k][fe.probes[-1].node].double()
        assert res["lmc"]["loss"][k] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-9)
        assert res["lmc"]["error"][k] == pytest.approx((logits.argmax(1) != y).double().mean().item())
    by_name = {p.name: p for p in fe.probes}
    for layer in res["llfc"]:
        node = by_name[layer["name"]].node
        base = cosine_distance(fa[node], fb[node])
        assert layer["baseline"]["mean"] == pytest.approx(base.mean().item(), abs=1e-12)
        assert layer["baseline"]["std"] == pytest.approx(base.std(unbiased=True).item(), abs=1e-12)  # ÷(N−1), official
        for k, a in enumerate(ALPHAS):
            f_int = a * fa[node].double() + (1 - a) * fb[node].double()
            d = cosine_distance(fal[k][node], f_int)
            assert layer["distance"]["mean"][k] == pytest.approx(d.mean().item(), abs=1e-10)
            assert layer["distance"]["std"][k] == pytest.approx(d.std(unbiased=True).item(), abs=1e-10)
            assert layer["distance"]["whole"][k] == pytest.approx(
                whole_cosine_distance(fal[k][node], f_int).item(), abs=1e-10)
            s = scale_coef(fal[k][node], f_int)
            assert layer["coef"]["mean"][k] == pytest.approx(s.mean().item(), abs=1e-9)
    for wa in res["weak_additivity"]:
        p = by_name[wa["name"]]
        ga, gb = fa[p.input_node], fb[p.input_node]
        assert wa["sign_agreement"]["mean"] == pytest.approx(sign_agreement(ga, gb).mean().item(), abs=1e-12)
        for k, a in enumerate(ALPHAS):
            d = weak_additivity_distance(ga, gb, a)
            assert wa["distance"]["mean"][k] == pytest.approx(d.mean().item(), abs=1e-10)
    # the pre-activation is named as the probes are (module path), not by its fx node (layers_0)
    assert [(wa["name"], wa["pre_activation"]) for wa in res["weak_additivity"]] == [
        ("layers.1", "layers.0"), ("layers.3", "layers.2")]
    # commutativity with explicit matrices: layer l of the MLP is h @ W.T
    names = [c["name"] for c in res["commutativity"]]
    assert names == ["layers.2", "logits"]  # layer 1 sees the shared input: trivial, skipped
    for c in res["commutativity"]:
        p = by_name[c["name"]]
        wa_, wb_ = sd_a[p.module + ".weight"].double(), sd_b[p.module + ".weight"].double()
        ha, hb = fa[p.input_node].double(), fb[p.input_node].double()
        left, right = ha @ wa_.T + hb @ wb_.T, hb @ wa_.T + ha @ wb_.T
        assert c["dist_com"] == pytest.approx(normalized_distance(left, right).item(), rel=1e-6)
        assert c["dist_W"] == pytest.approx(normalized_distance(wa_, wb_).item(), rel=1e-9)
        assert c["dist_H"] == pytest.approx(normalized_distance(ha, hb).item(), rel=1e-6)


def test_identical_models_give_zero_distance_and_unit_scale():
    m, sd_a, _ = _pair()
    x, y = _data(40)
    res = measure_pair(m, sd_a, sd_a, _batches(x, y, [40]), ALPHAS)
    for layer in res["llfc"]:
        assert max(layer["distance"]["mean"]) < 1e-12
        assert layer["baseline"]["mean"] < 1e-12
        assert layer["c_whole"] == pytest.approx([1.0] * len(ALPHAS), abs=1e-6)
    assert res["lmc"]["barriers"]["error_barrier_frankle"] == 0.0
    for wa in res["weak_additivity"]:
        assert wa["sign_agreement"]["mean"] == 1.0


def test_first_layer_is_exactly_linear_in_the_weights():
    # f1(theta_alpha) = W_alpha x + b_alpha = alpha f1(A) + (1-alpha) f1(B): LLFC holds exactly
    m, sd_a, sd_b = _pair(5)
    x, y = _data(50)
    res = measure_pair(m, sd_a, sd_b, _batches(x, y, [50]), ALPHAS)
    first = res["llfc"][0]
    assert first["name"] == "layers.0"
    assert max(first["distance"]["mean"]) < 1e-10
    assert first["baseline"]["mean"] > 0.3  # while A and B themselves differ a lot


def test_exact_layer_identity_on_random_mlp():
    """W_a H_a = a W_A H_A + (1-a) W_B H_B - a(1-a)(W_A-W_B)(H_A-H_B), H_a := a H_A + (1-a) H_B."""
    m, sd_a, sd_b = _pair(7, widths=(20, 20))
    x, _ = _data(30)
    fe = FeatureExtractor(m)
    fa, fb = fe(sd_a, x), fe(sd_b, x)
    for p in fe.probes:
        if p.kind not in ("pre", "logits") or p.from_input:
            continue
        wa, wb = sd_a[p.module + ".weight"].double(), sd_b[p.module + ".weight"].double()
        ha, hb = fa[p.input_node].double().T, fb[p.input_node].double().T  # (in, N)
        for a in (0.3, 0.5):
            wal, hal = a * wa + (1 - a) * wb, a * ha + (1 - a) * hb
            rhs = a * wa @ ha + (1 - a) * wb @ hb - a * (1 - a) * (wa - wb) @ (ha - hb)
            assert torch.allclose(wal @ hal, rhs, atol=1e-10)


class _FunctionalConvNet(nn.Module):
    """ReLU as functions, in place, and a residual addition."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x), inplace=True)
        out = self.conv2(h)
        out = self.act(out)
        out = out + h
        return self.fc(torch.flatten(out, 1))


def test_probes_capture_functional_and_inplace_relu():
    torch.manual_seed(0)
    m = _FunctionalConvNet().eval()
    x = torch.randn(3, 1, 6, 6)
    fe = FeatureExtractor(m)
    names = [(p.name, p.kind) for p in fe.probes]
    assert names == [("conv1", "pre"), ("relu", "post"), ("conv2", "pre"), ("act", "post"),
                     ("add", "residual"), ("logits", "logits")]
    f = fe(m.state_dict(), x)
    by = {p.name: p.node for p in fe.probes}
    # hand-written forward: the in-place ReLUs must not have overwritten the pre-activations
    c1 = m.conv1(x)
    h = torch.relu(c1)
    c2 = m.conv2(h)
    assert torch.allclose(f[by["conv1"]], c1)
    assert (f[by["conv1"]] < 0).any()
    assert torch.allclose(f[by["relu"]], h)
    assert torch.allclose(f[by["conv2"]], c2)
    assert (f[by["conv2"]] < 0).any()
    assert torch.allclose(f[by["add"]], torch.relu(c2) + h)
    assert torch.allclose(f[by["logits"]], m(x.clone()))


def test_conv_commutativity_matches_explicit_convolutions():
    torch.manual_seed(0)
    m = _FunctionalConvNet().eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = _FunctionalConvNet().state_dict()
    x = torch.randn(9, 1, 6, 6)
    y = torch.randint(0, 5, (9,))
    res = measure_pair(m, sd_a, sd_b, [(x[:4], y[:4]), (x[4:], y[4:])], ALPHAS)
    c = {r["name"]: r for r in res["commutativity"]}["conv2"]
    fe = FeatureExtractor(m)
    fa, fb = fe(sd_a, x), fe(sd_b, x)
    inp = next(p for p in fe.probes if p.name == "conv2").input_node
    ha, hb = fa[inp], fb[inp]
    wa, wb = sd_a["conv2.weight"], sd_b["conv2.weight"]
    conv = lambda h, w: F.conv2d(h, w, None, padding=1)
    left, right = conv(ha, wa) + conv(hb, wb), conv(hb, wa) + conv(ha, wb)
    assert c["dist_com"] == pytest.approx(normalized_distance(left, right).item(), rel=1e-5)


def test_api_refuses_bad_input():
    from llfc.errors import ConfigError, NonFiniteWeightsError

    m, sd_a, sd_b = _pair()
    x, y = _data(8)
    bad = {k: v.clone() for k, v in sd_b.items()}
    bad["layers.2.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="layers.2.weight"):
        measure_pair(m, sd_a, bad, [(x, y)], ALPHAS)
    with pytest.raises(ConfigError, match="allow-extrapolation"):
        measure_pair(m, sd_a, sd_b, [(x, y)], [0.0, 0.5, 1.0, 1.5])
    res = measure_pair(m, sd_a, sd_b, [(x, y)], [0.0, 1.5], allow_extrapolation=True)
    assert res["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    with pytest.raises(ConfigError, match="no batch"):
        measure_pair(m, sd_a, sd_b, [], ALPHAS)


class _NameClash(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.relu(F.relu(self.fc(x)) + 1))


def test_module_probes_keep_their_module_names():
    names = [(p.name, p.op) for p in FeatureExtractor(_NameClash()).probes]
    assert ("relu", "ReLU") in names  # the module keeps its path...
    assert ("relu_1", "relu") in names  # ...and the function that would clash is renamed


def test_empty_batch_adds_nothing():
    # an iterable of batches may hold an empty one (a slice past the end, a filtered batch): it
    # contributes no samples, so the results are those without it
    m, sd_a, sd_b = _pair()
    x, y = _data(n=9)
    want = measure_pair(m, sd_a, sd_b, [(x[:5], y[:5]), (x[5:], y[5:])], ALPHAS)
    got = measure_pair(m, sd_a, sd_b, [(x[:5], y[:5]), (x[:0], y[:0]), (x[5:], y[5:])], ALPHAS)
    assert got == want
