"""Identity model stitching (LLFC paper App. B.4) against independent computations."""

import pytest
import torch
import torch.nn.functional as F

from llfc.errors import IncompatibleModelsError, UnknownNameError
from llfc.models import create_model
from llfc.stitching import STITCH_COLUMNS, stitching_errors


def _mlp_pair(widths=(20, 16), seed=0):
    torch.manual_seed(seed)
    m = create_model("mlp", input_shape=(1, 5, 5), num_classes=4, widths=widths)
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(seed + 1)
    sd_b = {k: v.clone() for k, v in create_model("mlp", input_shape=(1, 5, 5), num_classes=4,
                                                  widths=widths).state_dict().items()}
    return m, sd_a, sd_b


def _data(n, shape, classes, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _batches(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _err_loss(logits, y):
    lg = logits.double()
    return (lg.argmax(1) != y).double().mean().item(), F.cross_entropy(lg, y).item()


def test_mlp_first_layer_matches_hand_forward():
    m, sd_a, sd_b = _mlp_pair()
    x, y = _data(57, (1, 5, 5), 4)
    rows = stitching_errors(m, sd_a, sd_b, _batches(x, y, 16))
    assert all(set(r) == set(STITCH_COLUMNS) for r in rows)
    assert [r["layer"] for r in rows] == ["A", "B", "layers.0", "layers.2"]  # logits layer excluded
    assert all(r["n_samples"] == 57 for r in rows)

    xf = x.flatten(1)

    def lin(sd, i, h):
        return h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]

    def tail_b(h1):  # B's layers after its first Linear, fed with h1
        h = torch.relu(h1)
        h = torch.relu(lin(sd_b, 2, h))
        return lin(sd_b, 4, h)

    def full(sd):
        return lin(sd, 4, torch.relu(lin(sd, 2, torch.relu(lin(sd, 0, xf)))))

    e, l = _err_loss(tail_b(lin(sd_a, 0, xf)), y)          # A's first layer into B
    assert rows[2]["error"] == pytest.approx(e, abs=1e-12)
    assert rows[2]["loss"] == pytest.approx(l, rel=1e-6)
    # stitching at layers.2 replaces its *output* by A's (computed from A's own layer-1 features)
    h2 = lin(sd_a, 2, torch.relu(lin(sd_a, 0, xf)))
    e2, l2 = _err_loss(lin(sd_b, 4, torch.relu(h2)), y)
    assert rows[3]["error"] == pytest.approx(e2, abs=1e-12)
    assert rows[3]["loss"] == pytest.approx(l2, rel=1e-6)
    for row, sd in ((rows[0], sd_a), (rows[1], sd_b)):
        e, l = _err_loss(full(sd), y)
        assert row["error"] == pytest.approx(e, abs=1e-12)
        assert row["loss"] == pytest.approx(l, rel=1e-6)
    # the pair is random: stitching must actually change B's predictions somewhere
    assert rows[2]["loss"] != pytest.approx(rows[1]["loss"], rel=1e-3)


def test_self_stitching_and_logits():
    torch.manual_seed(0)
    m = create_model("resnet20", input_shape=(3, 8, 8), num_classes=5, width=0.25)
    m.eval()
    sd_a = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    sd_b = {k: v.clone() for k, v in create_model("resnet20", input_shape=(3, 8, 8), num_classes=5,
                                                  width=0.25).state_dict().items()}
    x, y = _data(40, (3, 8, 8), 5)
    batches = _batches(x, y, 16)
    same = stitching_errors(m, sd_a, sd_a, batches, points="pre")
    assert len(same) == 2 + 19 + 0  # 19 convs in ResNet-20 with option-A shortcuts
    for r in same:
        assert r["error"] == same[0]["error"]
        assert r["loss"] == pytest.approx(same[0]["loss"], rel=1e-9, abs=1e-12)
    at_logits = stitching_errors(m, sd_a, sd_b, batches, probes=["logits"])
    assert [r["layer"] for r in at_logits] == ["A", "B", "logits"]
    assert at_logits[2]["error"] == at_logits[0]["error"]
    assert at_logits[2]["loss"] == pytest.approx(at_logits[0]["loss"], rel=1e-12)


def test_official_stitch_points_for_resnets():
    # official model_stitching.py on ResNets: conv1, every block's output (post-ReLU), the final Linear
    m = create_model("resnet20", input_shape=(3, 8, 8), num_classes=5, width=0.25).eval()
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = _data(8, (3, 8, 8), 5)
    rows = stitching_errors(m, sd, sd, _batches(x, y, 8))
    blocks = [f"layer{s}.{b}.relu_1" for s in (1, 2, 3) for b in range(3)]
    assert [r["layer"] for r in rows] == ["A", "B", "conv1", *blocks, "logits"]
    # the official hook on a block module overwrites the block's output: the same as the post-ReLU probe
    torch.manual_seed(5)
    sd_b = {k: v.clone() for k, v in create_model("resnet20", input_shape=(3, 8, 8), num_classes=5,
                                                  width=0.25).state_dict().items()}
    mb = create_model("resnet20", input_shape=(3, 8, 8), num_classes=5, width=0.25).eval()
    mb.load_state_dict(sd_b)
    with torch.no_grad():
        feat = {}
        h = m.layer2[1].register_forward_hook(lambda mod, i, o: feat.__setitem__("a", o.clone()))
        m(x)
        h.remove()
        h = mb.layer2[1].register_forward_hook(lambda mod, i, o: feat["a"])
        hooked = torch.nn.functional.cross_entropy(mb(x).double(), y).item()
        h.remove()
    got = stitching_errors(m, sd, sd_b, _batches(x, y, 8))
    row = next(r for r in got if r["layer"] == "layer2.1.relu_1")
    assert row["loss"] == pytest.approx(hooked, rel=1e-6)


def test_matches_hook_implementation_with_residuals_and_batchnorm():
    # the official code's approach: a forward hook on B's module overwrites its output with A's
    torch.manual_seed(2)
    kw = dict(input_shape=(3, 8, 8), num_classes=5, width=0.25, shortcut="B")
    ma = create_model("resnet20", **kw).eval()
    mb = create_model("resnet20", **kw).eval()
    for mod in list(ma.modules()) + list(mb.modules()):  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    x, y = _data(30, (3, 8, 8), 5)
    names = ["conv1", "layer1.1.conv2", "layer2.0.shortcut.0", "layer3.2.conv1"]
    rows = stitching_errors(ma, ma.state_dict(), mb.state_dict(), _batches(x, y, 7), probes=names)
    assert [r["layer"] for r in rows[2:]] == names
    for r, name in zip(rows[2:], names):
        feats = {}
        h = ma.get_submodule(name).register_forward_hook(lambda mod, i, o: feats.setdefault("a", o.clone()))
        with torch.no_grad():
            ma(x)
        h.remove()
        h = mb.get_submodule(name).register_forward_hook(lambda mod, i, o: feats["a"])
        with torch.no_grad():
            out = mb(x)
        h.remove()
        e, l = _err_loss(out, y)
        assert r["error"] == pytest.approx(e, abs=1e-12), name
        assert r["loss"] == pytest.approx(l, rel=1e-5), name


def test_errors():
    m, sd_a, sd_b = _mlp_pair()
    x, y = _data(8, (1, 5, 5), 4)
    with pytest.raises(UnknownNameError, match="layers.0"):
        stitching_errors(m, sd_a, sd_b, [(x, y)], probes=["no.such.layer"])
    bad = dict(sd_b)
    bad.pop("layers.0.bias")
    with pytest.raises(IncompatibleModelsError):
        stitching_errors(m, sd_a, bad, [(x, y)])
    with pytest.raises(ValueError, match="no samples"):
        stitching_errors(m, sd_a, sd_b, [])
