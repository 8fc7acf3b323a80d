"""Permutation specs derived from the fx graph: self-test, structure, errors, apply/invert."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from llfc.errors import UnsupportedOperationError
from llfc.permutation import (
    AxisRef,
    PermutationSpec,
    SpecCheckError,
    apply_permutation,
    check_spec,
    compose,
    derive_spec,
    invert,
    random_permutation,
    register_handler,
    strip_module_prefix,
)
from llfc.permutation import spec as spec_mod
from test_permutation_models import CifarResNet, make, randomize_norm_stats

torch.set_num_threads(1)

X_MNIST = (2, 1, 28, 28)
X_CIFAR = (2, 3, 32, 32)

# (model builder, input shape, expected number of permutable groups, counted by hand)
CASES = {
    "mlp": (lambda: make("mlp", widths=(32, 24, 16)), X_MNIST, 3),
    "lenet": (lambda: make("lenet"), X_MNIST, 4),  # conv1, conv2, fc1, fc2
    "vgg11": (lambda: make("vgg11", width=0.125), X_CIFAR, 9),  # 8 convs + 1 hidden Linear
    "vgg16_bn": (lambda: make("vgg16_bn", width=0.0625), X_CIFAR, 14),  # 13 convs + 1 hidden Linear
    # 3 residual streams + 9 inner block convs
    "resnet20_bn_1x1": (lambda: make("resnet20", shortcut="conv1x1"), X_CIFAR, 12),
    "resnet20_gn_3x3": (lambda: make("resnet20_gn", shortcut="conv3x3"), X_CIFAR, 12),
    "resnet20_ln": (lambda: make("resnet20_ln"), X_CIFAR, 12),
    # 4 residual streams (stem+layer1, layer2..4) + 8 inner block convs
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), X_CIFAR, 12),
    # 8 convs + 2 hidden Linear (the first one takes 512·7·7 inputs: blocks of 49)
    "tv_vgg11_bn": (lambda: torchvision.models.vgg11_bn(num_classes=10), X_CIFAR, 10),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    fn, shape, _ = CASES[name]
    return randomize_norm_stats(fn(), seed, shape[1:]), torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CASES))
def test_derived_spec_passes_self_test(name):
    model, x = build(name)
    spec = derive_spec(model, x, check=False)
    assert len(spec.groups) == CASES[name][2]
    rel = check_spec(model, spec, x, rtol=1e-4, seed=1)
    assert rel < 1e-5
    sd = model.state_dict()
    keys_in_spec = set(spec.keys())
    # integer buffers are never in a spec; every norm running stat is
    assert not any(k.endswith("num_batches_tracked") for k in keys_in_spec)
    for k in sd:
        if k.endswith(("running_mean", "running_var")):
            assert k in keys_in_spec, k
    # the classifier's output axis and the first layer's input axis are never permuted
    for g, refs in spec.groups.items():
        for r in refs:
            assert sd[r.key].shape[r.axis] != 10 or spec.sizes[g] * r.block == sd[r.key].shape[r.axis]
    # a single group permuted at random really changes the raw weights (the check is not vacuous)
    g0 = next(iter(spec.groups))
    p = random_permutation(spec, torch.Generator().manual_seed(0), derange=True)
    moved = apply_permutation(spec, {g0: p[g0]}, sd)
    assert any(not torch.equal(moved[r.key], sd[r.key]) for r in spec.groups[g0])


@pytest.mark.parametrize("name", [n for n in CASES if n != "tv_vgg11_bn"])
def test_dropping_any_weight_axis_is_detected(name):
    """The self-test is not vacuous: removing one weight's axis from a group makes it fail, naming the group."""
    model, x = build(name)
    spec = derive_spec(model, x)
    g = max(spec.groups, key=lambda k: len(spec.groups[k]))
    victim = [r for r in spec.groups[g] if r.key.endswith("weight")][-1]
    broken = PermutationSpec.from_groups({k: [r for r in v if r != victim] for k, v in spec.groups.items()})
    with pytest.raises(SpecCheckError, match=f"group {g!r}"):
        check_spec(model, broken, x)


def test_mlp_spec_matches_hand_written():
    model, x = build("mlp")
    spec = derive_spec(model, x)
    hand = PermutationSpec.from_groups(
        {
            "h0": [("layers.0.weight", 0), ("layers.0.bias", 0), ("layers.2.weight", 1)],
            "h1": [("layers.2.weight", 0), ("layers.2.bias", 0), ("layers.4.weight", 1)],
            "h2": [("layers.4.weight", 0), ("layers.4.bias", 0), ("layers.6.weight", 1)],
        },
        state_dict=model.state_dict(),
    )
    assert sorted(map(sorted, spec.groups.values())) == sorted(map(sorted, hand.groups.values()))
    assert sorted(spec.sizes.values()) == [16, 24, 32]
    assert hand.sizes == {"h0": 32, "h1": 24, "h2": 16}
    check_spec(model, hand, x)
    # feature nodes: the post-ReLU outputs
    assert [spec.feature_nodes(g)[0].node for g in spec.groups] == ["layers_1", "layers_3", "layers_5"]
    text = str(spec)
    assert "layers.0" in text and "layers.2.weight:1" in text and "32" in text


def test_flatten_gives_block_structure():
    model, x = build("lenet")  # 28x28 → 16 channels of 4x4 before fc1
    spec = derive_spec(model, x)
    assert AxisRef("fc1.weight", 1, 16, 0) in spec.groups["conv2"]
    assert spec.sizes["conv2"] == 16
    # torchvision VGG: AdaptiveAvgPool2d((7, 7)) then flatten → blocks of 49
    model, x = build("tv_vgg11_bn")
    spec = derive_spec(model, x, check=False)
    blocks = [r for refs in spec.groups.values() for r in refs if r.key == "classifier.0.weight" and r.axis == 1]
    assert blocks == [AxisRef("classifier.0.weight", 1, 49, 0)]


def test_residual_stream_is_one_group():
    model, x = build("resnet20_bn_1x1")
    spec = derive_spec(model, x)
    stream = spec.groups["conv1"]
    keys = {(r.key, r.axis) for r in stream}
    # stem conv output, the first three blocks' second convs and the first projection's input share it
    for k in ["conv1.weight", "blocks.0.conv2.weight", "blocks.2.conv2.weight", "blocks.2.n2.running_var"]:
        assert (k, 0) in keys
    assert ("blocks.3.shortcut.0.weight", 1) in keys and ("blocks.3.conv1.weight", 1) in keys
    # the post-activation node of a residual group is the last ReLU of the stream
    assert spec.feature_nodes("conv1")[0].kind == "activation"
    assert len(spec.feature_nodes("conv1", "all_activations")) == 4  # stem ReLU + 3 block outputs


class TiedMLP(nn.Module):
    """x → fc0 → fc1 → fc2 → fc3 with ReLUs and ``fc2.weight = fc1.weight`` (square, tied)."""

    def __init__(self, d_in: int):
        super().__init__()
        self.fc0, self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(F.relu(self.fc0(x)))))))


def test_tied_weights_share_one_permutation():
    """fc1.weight (rows h1, columns h0) is fc2.weight (rows h2, columns h1): derive_spec joins h0, h1 and h2
    into one group, and a random permutation of it keeps the tied keys equal and the function unchanged."""
    torch.manual_seed(0)
    model, x = TiedMLP(5), torch.randn(6, 5)
    spec = derive_spec(model, x)
    assert list(spec.groups) == ["fc0"]
    keys = {(r.key, r.axis) for r in spec.groups["fc0"]}
    assert {("fc1.weight", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.weight", 1), ("fc3.weight", 1)} <= keys
    sd = model.state_dict()
    perms = random_permutation(spec, torch.Generator().manual_seed(1), derange=True)
    out = apply_permutation(spec, perms, sd)
    assert torch.equal(out["fc1.weight"], out["fc2.weight"])
    assert not torch.equal(out["fc1.weight"], sd["fc1.weight"])
    moved = TiedMLP(5)
    moved.load_state_dict(out)
    with torch.no_grad():
        torch.testing.assert_close(moved(x), model(x), rtol=1e-5, atol=1e-6)


def test_tied_weights_touching_the_input_are_not_permuted():
    """With the input (8 features) in fc1.weight's columns, the tie fixes h1 and h2 too: nothing moves."""
    class InputTied(TiedMLP):
        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    model = InputTied(5)
    spec = derive_spec(model, torch.randn(4, 8))
    assert spec.groups == {}


class DenseCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(9)
        self.c3 = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        y = F.relu(self.bn(torch.cat([a, b], dim=1)))
        return self.fc(F.relu(self.c3(y)).mean(dim=(2, 3)))


def test_cat_along_channels_uses_segments():
    model = randomize_norm_stats(DenseCat(), 0, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    spec = derive_spec(model, x)
    assert AxisRef("c3.weight", 1, 1, 0) in spec.groups["c1"]
    assert AxisRef("c3.weight", 1, 1, 4) in spec.groups["c2"]
    assert AxisRef("bn.running_mean", 0, 1, 4) in spec.groups["c2"]
    assert spec.sizes == {"c1": 4, "c2": 5, "c3": 6}


def test_wrong_spec_is_refused_naming_the_group():
    model, x = build("vgg16_bn")
    spec = derive_spec(model, x)
    g = "features.3"  # second conv: its BN is features.4
    assert any(r.key == "features.4.running_mean" for r in spec.groups[g])
    broken = PermutationSpec.from_groups(
        {k: [r for r in v if r.key != "features.4.running_mean"] for k, v in spec.groups.items()}
    )
    with pytest.raises(SpecCheckError, match=r"group 'features\.3'"):
        check_spec(model, broken, x)
    # a group reaching the logits is refused too
    model, x = build("mlp")
    bad = PermutationSpec.from_groups({"logits": [("layers.6.weight", 0), ("layers.6.bias", 0)]})
    with pytest.raises(SpecCheckError, match="'logits'"):
        check_spec(model, bad, x)
    # integer buffers cannot be in a spec
    model, x = build("resnet20_bn_1x1")
    with pytest.raises(SpecCheckError, match="num_batches_tracked"):
        check_spec(model, PermutationSpec.from_groups({"g": [("n1.num_batches_tracked", 0)]}), x)


class WithCumsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.body = Inner()
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.body(self.fc(x)))


class Inner(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, dim=1)


def test_unsupported_operation_names_op_and_module_path():
    with pytest.raises(UnsupportedOperationError) as e:
        derive_spec(WithCumsum(), torch.randn(2, 4))
    msg = str(e.value)
    assert "cumsum" in msg and "'body'" in msg and "register_handler" in msg and "from_groups" in msg


def test_register_handler_makes_an_op_supported():
    class Clamp(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x).clamp(min=0))

    with pytest.raises(UnsupportedOperationError, match="Tensor.clamp"):
        derive_spec(Clamp(), torch.randn(3, 4))
    register_handler("clamp", spec_mod.passthrough, kind="activation")
    try:
        spec = derive_spec(Clamp(), torch.randn(3, 4))
        assert spec.sizes == {"a": 8} and spec.feature_nodes("a")[0].node == "clamp"
    finally:
        spec_mod._METHOD_HANDLERS.pop("clamp")


def test_option_a_padding_shortcut_is_refused():
    model = CifarResNet(20, shortcut="padA").eval()
    with pytest.raises(UnsupportedOperationError, match="pad"):
        derive_spec(model, torch.randn(X_CIFAR))


def test_untraceable_model_explains_why():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(UnsupportedOperationError, match="cannot trace") as e:
        derive_spec(Dynamic(), torch.randn(2, 4))
    assert "hand" in str(e.value) and "control flow" in str(e.value)


def test_apply_invert_roundtrip_and_integer_buffers():
    model, x = build("resnet20_bn_1x1")
    spec = derive_spec(model, x)
    sd = model.state_dict()
    snapshot = {k: v.clone() for k, v in sd.items()}
    p = random_permutation(spec, torch.Generator().manual_seed(5))
    out = apply_permutation(spec, p, sd)
    for k in sd:  # the input is left unmodified
        assert torch.equal(sd[k], snapshot[k])
    assert out["n1.num_batches_tracked"] is sd["n1.num_batches_tracked"]
    assert int(out["n1.num_batches_tracked"]) == 7
    # explicit convention check on one conv: W'[i] = W[p[i]] on the output axis
    g = "blocks.0.conv1"
    q = p["conv1"]  # the stream's permutation acts on blocks.0.conv1's input axis
    expected = sd["blocks.0.conv1.weight"][p[g]][:, q]
    assert torch.equal(out["blocks.0.conv1.weight"], expected)
    back = apply_permutation(spec, invert(p), out)
    for k in sd:
        assert torch.equal(back[k], sd[k])
    q2 = random_permutation(spec, torch.Generator().manual_seed(6))
    two = apply_permutation(spec, q2, out)
    one = apply_permutation(spec, compose(p, q2), sd)
    assert all(torch.equal(two[k], one[k]) for k in sd)


def test_strip_module_prefix():
    sd = {"module.a.weight": torch.ones(1), "module.b": torch.zeros(2)}
    assert list(strip_module_prefix(sd)) == ["a.weight", "b"]
    mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
    assert list(strip_module_prefix(mixed)) == ["module.a", "b"]
