"""Models: build, forward shapes, fx traceability, parameter counts computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn

from llfc.errors import ConfigError
from llfc.models import create_model, list_models
from llfc.models.resnet import LayerNorm2d, ZeroPadShortcut

torch.set_num_threads(1)

VGGS = [f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")]

# name -> (small kwargs, input shape)
SMALL: dict[str, tuple[dict, tuple[int, int, int]]] = {
    "mlp": ({"widths": (8, 8)}, (1, 28, 28)),
    "lenet": ({}, (1, 28, 28)),
    "resnet50": ({"width": 0.125}, (3, 64, 64)),
    "vit": ({"width": 16, "depth": 1, "heads": 2}, (1, 28, 28)),
}
for _v in VGGS:
    SMALL[_v] = ({"width": 0.125, "classifier": "linear"}, (3, 32, 32))
for _d in (20, 32, 56):
    SMALL[f"resnet{_d}"] = ({"width": 0.25}, (3, 32, 32))
    SMALL[f"resnet{_d}_ln"] = ({"width": 0.25}, (3, 32, 32))

EXTRA = [  # further variants worth covering
    ("lenet", {}, (3, 32, 32)),
    ("vgg16_bn", {"width": 0.125, "classifier": "paper", "hidden": 16}, (3, 32, 32)),
    ("vgg11", {"width": 0.125, "classifier": "linear"}, (3, 64, 64)),
    ("resnet20", {"width": 0.5, "shortcut": "B"}, (3, 32, 32)),
    ("resnet20_ln", {"width": 0.5, "norm": "layernorm"}, (3, 32, 32)),
    ("resnet50", {"width": 0.125, "stem": "imagenet"}, (3, 64, 64)),
]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_registered_model_is_covered():
    assert set(list_models()) == set(SMALL) | {"gpt"}  # gpt takes token ids: tests/test_transformers.py


CASES = [(n, *SMALL[n]) for n in sorted(SMALL)] + EXTRA


@pytest.mark.parametrize("name,kwargs,shape", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_forward_and_fx_trace(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=7, **kwargs).eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), y)
    # the logits depend on the input (a constant network would pass the shape checks)
    with torch.no_grad():
        assert not torch.allclose(model(x + 1.0), y)


# ------------------------------------------------------------------------------------------
# parameter counts, computed by hand from the architecture


def conv(cin, cout, k, bias):
    return cin * cout * k * k + (cout if bias else 0)


def lin(cin, cout):
    return cin * cout + cout


def test_lenet_param_count():
    expected = conv(1, 6, 5, True) + conv(6, 16, 5, True) + lin(400, 120) + lin(120, 84) + lin(84, 10)
    assert expected == 61_706
    assert n_params(create_model("lenet", input_shape=(1, 28, 28), num_classes=10)) == expected
    # 32×32: flatten size 16·6·6
    m = create_model("lenet", input_shape=(3, 32, 32), num_classes=10)
    assert m.fc1.in_features == 16 * 6 * 6


def test_vgg16_bn_param_count():
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    total, c = 0, 3
    for v in cfg:
        if v != "M":
            total += conv(c, v, 3, True) + 2 * v  # conv with bias + BN γ, β
            c = v
    total += lin(512, 4096) + lin(4096, 4096) + lin(4096, 10)
    assert total == 33_646_666
    m = create_model("vgg16_bn", input_shape=(3, 32, 32), num_classes=10)
    assert n_params(m) == total
    # without BN: minus 2·(sum of conv widths) = 2·4224
    assert n_params(create_model("vgg16", num_classes=10)) == total - 2 * 4224
    # linear head
    assert n_params(create_model("vgg16_bn", num_classes=10, classifier="linear")) == (
        total - (lin(512, 4096) + lin(4096, 4096) + lin(4096, 10)) + lin(512, 10)
    )


def _cifar_resnet_count(n: int, option: str, projection_k: int = 1) -> int:
    total = conv(3, 16, 3, False) + 2 * 16
    cin = 16
    for c in (16, 32, 64):
        for b in range(n):
            total += conv(cin if b == 0 else c, c, 3, False) + conv(c, c, 3, False) + 4 * c
            if b == 0 and cin != c and option != "A":
                total += conv(cin, c, projection_k, False) + 2 * c
        cin = c
    return total + lin(64, 10)


def test_resnet20_param_counts():
    a = _cifar_resnet_count(3, "A")
    b = _cifar_resnet_count(3, "B")
    assert a == 269_722  # Idelbayev's "0.27M"
    assert b == 272_474
    assert n_params(create_model("resnet20", num_classes=10)) == a
    assert n_params(create_model("resnet20", num_classes=10, shortcut="B")) == b
    assert n_params(create_model("resnet56", num_classes=10)) == _cifar_resnet_count(9, "A")
    # Git Re-Basin: 3×3 projection + LN (2C params, like BN)
    ln = _cifar_resnet_count(3, "B", projection_k=3)
    assert ln == 292_954
    assert n_params(create_model("resnet20_ln", num_classes=10)) == ln
    assert n_params(create_model("resnet20_ln", num_classes=10, norm="layernorm")) == ln


def test_resnet50_param_count_matches_torchvision():
    import torchvision

    tv = n_params(torchvision.models.resnet50(num_classes=200))
    m = create_model("resnet50", input_shape=(3, 64, 64), num_classes=200, stem="imagenet")
    assert n_params(m) == tv == 23_917_832
    # cifar stem: 3×3 instead of 7×7 first conv
    m3 = create_model("resnet50", num_classes=200)
    assert n_params(m3) == tv - 3 * 64 * (49 - 9)
    assert m3.linear.in_features == 2048


# ------------------------------------------------------------------------------------------
# structure and building blocks


def test_module_names_and_relu_kinds():
    m = create_model("vgg16_bn", width=0.125)
    names = dict(m.named_modules())
    assert isinstance(names["features.0"], nn.Conv2d)
    assert isinstance(names["features.1"], nn.BatchNorm2d)
    assert isinstance(names["features.2"], nn.ReLU) and names["features.2"].inplace
    assert isinstance(names["features.6"], nn.MaxPool2d)
    assert isinstance(names["classifier.6"], nn.Linear)
    m = create_model("vgg16", width=0.125)
    assert isinstance(dict(m.named_modules())["features.1"], nn.ReLU)
    lenet = create_model("lenet")
    assert [n for n, _ in lenet.named_children()] == [
        "conv1", "relu1", "conv2", "relu2", "fc1", "relu3", "fc2", "relu4", "fc3"
    ]
    assert not lenet.relu1.inplace
    r = create_model("resnet20")
    names = dict(r.named_modules())
    assert {"conv1", "bn1", "layer1.0", "layer3.2", "linear"} <= set(names)
    assert not any(isinstance(x, nn.ReLU) for x in r.modules())  # functional ReLUs
    assert isinstance(names["layer2.0.shortcut"], ZeroPadShortcut)
    assert isinstance(names["layer1.0.shortcut"], nn.Identity)
    g = create_model("resnet20_ln", width=2)
    assert isinstance(dict(g.named_modules())["layer2.0.shortcut.0"], nn.Conv2d)
    assert dict(g.named_modules())["layer2.0.shortcut.0"].kernel_size == (3, 3)
    assert g.conv1.out_channels == 32 and g.linear.in_features == 128


def test_zero_pad_shortcut_values():
    x = torch.randn(2, 4, 6, 6)
    y = ZeroPadShortcut(4, 8, 2)(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2])
    assert (y[:, :2] == 0).all() and (y[:, 6:] == 0).all()


def test_layernorm2d_normalises_channels_per_pixel():
    torch.manual_seed(0)
    ln = LayerNorm2d(5)
    with torch.no_grad():
        ln.ln.weight.uniform_(0.5, 2.0)
        ln.ln.bias.normal_()
    x = torch.randn(3, 5, 4, 4) * 3 + 1
    y = ln(x)
    # independent formula
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-6) * ln.ln.weight.view(1, 5, 1, 1) + ln.ln.bias.view(1, 5, 1, 1)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_block_is_identity_plus_residual_relu():
    """A BasicBlock whose last BN has γ = β = 0 computes relu(x) (the residual vanishes)."""
    m = create_model("resnet20", width=0.5).eval()
    blk = m.layer1[1]
    with torch.no_grad():
        blk.bn2.weight.zero_()
        blk.bn2.bias.zero_()
        x = torch.randn(2, 8, 5, 5)
        torch.testing.assert_close(blk(x), torch.relu(x))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet20", {"shortcut": "C"}),
        ("resnet20_ln", {"norm": "batchnorm"}),
        ("vgg16", {"classifier": "mlp"}),
        ("vgg16", {"input_shape": (3, 16, 16)}),
        ("lenet", {"input_shape": (1, 8, 8)}),
        ("resnet50", {"stem": "big"}),
        ("resnet20", {"width": 0}),
    ],
)
def test_bad_options_raise_config_error(name, kwargs):
    with pytest.raises(ConfigError):
        create_model(name, **kwargs)
