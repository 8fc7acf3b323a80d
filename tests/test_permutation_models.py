"""Small reference architectures for the permutation tests (LeNet, VGG, CIFAR ResNet with BN/LN).

llfc.models does not hold these yet (another branch adds ``lenet``, ``vgg11``, ``vgg16``, ``vgg16_bn``,
``resnet20``, ``resnet20_ln``). The tests build every model through :func:`make`; switching to the
package's registry is the one-line change marked below.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.models import create_model

VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class LeNet(nn.Module):
    """LeNet-5: conv5-6 → pool → conv5-16 → pool → flatten (16·h·w, block structure) → 120 → 84 → classes."""

    def __init__(self, input_shape=(1, 28, 28), num_classes=10):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        hh, ww = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(16 * hh * ww, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class VGG(nn.Module):
    """CIFAR VGG: conv3 [+BN] + ReLU blocks with max-pools, then a 1-hidden-layer classifier."""

    def __init__(self, cfg, input_shape=(3, 32, 32), num_classes=10, width=1.0, bn=False, hidden=None):
        super().__init__()
        layers: list[nn.Module] = []
        c = input_shape[0]
        pools = 0
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                pools += 1
            else:
                out = max(1, int(round(v * width)))
                layers.append(nn.Conv2d(c, out, 3, padding=1))
                if bn:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU(inplace=True))
                c = out
        self.features = nn.Sequential(*layers)
        spatial = (input_shape[1] >> pools) * (input_shape[2] >> pools)
        hidden = hidden or c
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * spatial, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels at each position of an (N, C, H, W) map (Git Re-Basin's ResNet-20 LN)."""

    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind, c):
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(1, c)  # LayerNorm over (C, H, W)
    if kind == "ln":
        return ChannelLayerNorm(c)
    raise ValueError(kind)


class Block(nn.Module):
    def __init__(self, cin, cout, stride, norm, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(norm, cout)
        self.shortcut_kind = shortcut if (stride != 1 or cin != cout) else "identity"
        if self.shortcut_kind == "conv1x1":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))
        elif self.shortcut_kind == "conv3x3":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(norm, cout))
        elif self.shortcut_kind == "padA":
            pad = cout - cin
            self.shortcut = None
            self.pad = (0, 0, 0, 0, pad // 2, pad - pad // 2)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        if self.shortcut_kind == "padA":
            sc = F.pad(x[:, :, ::2, ::2], self.pad)
        else:
            sc = self.shortcut(x)
        return F.relu(out + sc)


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with width multiplier, BN / GroupNorm(1,C) / channel-LN, projection shortcuts."""

    def __init__(self, depth=20, input_shape=(3, 32, 32), num_classes=10, width=1, norm="bn", shortcut="conv1x1"):
        super().__init__()
        n = (depth - 2) // 6
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(input_shape[0], w[0], 3, 1, 1, bias=False)
        self.n1 = _norm(norm, w[0])
        blocks = []
        cin = w[0]
        for i, cout in enumerate(w):
            for j in range(n):
                blocks.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1, norm, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.relu(self.n1(self.conv1(x)))
        x = self.blocks(x)
        x = x.mean((2, 3))
        return self.fc(x)


def make(name: str, **kw) -> nn.Module:
    """Build a test model by name (mlp from llfc.models; the others defined here for now)."""
    # To switch to llfc.models once it has them: `return create_model(name, **kw)`.
    local = {
        "lenet": lambda input_shape=(1, 28, 28), num_classes=10: LeNet(input_shape, num_classes),
        "vgg11": lambda **k: VGG(VGG_CFG["vgg11"], **k),
        "vgg16": lambda **k: VGG(VGG_CFG["vgg16"], **k),
        "vgg16_bn": lambda **k: VGG(VGG_CFG["vgg16"], bn=True, **k),
        "resnet20": lambda **k: CifarResNet(20, norm="bn", **k),
        "resnet20_ln": lambda **k: CifarResNet(20, norm="ln", **k),
        "resnet20_gn": lambda **k: CifarResNet(20, norm="gn", **k),
    }
    if name in local:
        return local[name](**kw)
    return create_model(name, **kw)


def randomize_norm_stats(model: nn.Module, seed: int = 0, input_shape=None) -> nn.Module:
    """Make normalisation layers non-trivial so that a missing axis is detectable by the self-test.

    Conv/Linear weights are re-drawn with He (Kaiming normal) init and small random biases; affine
    parameters get random values; BatchNorm running statistics are calibrated on random inputs
    (so that a deep narrow net does not die in eval mode) and then shifted by random offsets;
    ``num_batches_tracked`` is set to 7. Returns the model in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # He init keeps the signal alive through deep ReLU stacks without BN
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                nn.init.kaiming_normal_(m.weight, generator=g)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns and input_shape is not None:
        saved = [m.momentum for m in bns]
        for m in bns:
            m.momentum = None  # cumulative average
            m.reset_running_stats()
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn((16, *input_shape), generator=g))
        for m, mom in zip(bns, saved):
            m.momentum = mom
    for m in bns:
        m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        m.num_batches_tracked.fill_(7)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "name,kw,shape,n_params",
    [
        ("lenet", {}, (2, 1, 28, 28), None),
        ("vgg11", {"width": 0.125}, (2, 3, 32, 32), None),
        ("resnet20", {}, (2, 3, 32, 32), 272474),  # the standard ResNet-20 with 1x1 shortcuts
    ],
)
def test_reference_models_shapes(name, kw, shape, n_params):
    m = make(name, **kw).eval()
    out = m(torch.randn(shape))
    assert out.shape == (2, 10)
    if n_params is not None:
        assert sum(p.numel() for p in m.parameters()) == n_params
    assert math.isfinite(out.sum().item())
