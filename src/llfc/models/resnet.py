"""Residual networks.

- ``resnet20`` / ``resnet32`` / ``resnet56``: CIFAR ResNets (He et al. 2016, §4.2) with BatchNorm, as
  implemented by Y. Idelbayev and used by the official LLFC code (``cifar_resnet_plus.py``;
  paper-digest §5.2).
- ``resnet20_ln`` / ``resnet32_ln`` / ``resnet56_ln``: Git Re-Basin's ResNet for the permutation
  experiments (Ainsworth et al. 2023, ``src/resnet20.py``): LayerNorm, 3×3-conv projection
  shortcuts, width multiplier.
- ``resnet50``: bottleneck ResNet-50 (He et al. 2016, Table 1) adapted to 64×64 Tiny-ImageNet.

All ReLUs are functional (``F.relu`` inside ``forward``), as in the reference code, so they are not
modules: a forward hook can only see block outputs. Every model is ``torch.fx``-traceable.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.errors import ConfigError
from llfc.models.registry import register_model


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _check_width(name: str, width: float) -> float:
    if not width > 0:
        raise ConfigError(f"{name}: width multiplier must be > 0, got {width!r}.")
    return float(width)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet with BatchNorm (Idelbayev; official LLFC code)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016 §4.2): subsample by ``stride`` and zero-pad channels.

    ``y = F.pad(x[:, :, ::s, ::s], channels (lo, hi))`` with lo = (out − in) // 2 and
    hi = out − in − lo (Idelbayev pads planes//4 on each side, which is the same for out = 2·in).
    Parameter-free. Shapes: (N, in, H, W) → (N, out, ⌈H/s⌉, ⌈W/s⌉).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = int(stride)
        self.pad_lo = (out_channels - in_channels) // 2
        self.pad_hi = out_channels - in_channels - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_lo}, {self.pad_hi})"


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).

    Modules: ``conv1`` (3×3, stride s, no bias), ``bn1``, ``conv2`` (3×3, no bias), ``bn2``,
    ``shortcut``: ``nn.Identity`` when shapes match, else option A :class:`ZeroPadShortcut` or
    option B ``nn.Sequential(Conv2d 1×1 stride s, no bias; BatchNorm2d)`` (``shortcut.0``,
    ``shortcut.1``). The block's output is post-ReLU.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif option == "A":
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with BatchNorm (He et al. 2016 §4.2; Idelbayev's implementation).

    Layout (w = width multiplier; channels round(16w), round(32w), round(64w)):

    - ``conv1`` Conv2d(C → 16w, 3×3, no bias), ``bn1``, F.relu → (N, 16w, H, W)
    - ``layer1.0`` … ``layer1.{n-1}``: :class:`BasicBlock`, 16w channels, stride 1 → (N, 16w, H, W)
    - ``layer2.0`` … : 32w channels, first block stride 2 → (N, 32w, H/2, W/2)
    - ``layer3.0`` … : 64w channels, first block stride 2 → (N, 64w, H/4, W/4)
    - global average pool (``mean`` over H, W) → (N, 64w)
    - ``linear`` Linear(64w → num_classes) → logits.

    Init (Idelbayev): Kaiming-normal (fan_in, gain √2) for conv and linear weights; linear bias and
    BN as PyTorch defaults (γ = 1, β = 0).
    """

    def __init__(
        self, num_blocks: Sequence[int], in_channels: int, num_classes: int, width: float = 1.0, shortcut: str = "A"
    ):
        super().__init__()
        c1, c2, c3 = (_ch(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.layer1 = self._stage(c1, c1, num_blocks[0], 1, shortcut)
        self.layer2 = self._stage(c1, c2, num_blocks[1], 2, shortcut)
        self.layer3 = self._stage(c2, c3, num_blocks[2], 2, shortcut)
        self.linear = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int, option: str) -> nn.Sequential:
        blocks = [BasicBlock(cin, cout, stride, option)]
        blocks += [BasicBlock(cout, cout, 1, option) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


def _cifar_resnet(name: str, depth: int, input_shape, num_classes, width, shortcut) -> CifarResNet:
    if shortcut not in ("A", "B"):
        raise ConfigError(
            f"{name}: shortcut must be 'A' (parameter-free zero-padding, the default of He et "
            f"al. and the official code) or 'B' (1×1 conv + BN projection), got {shortcut!r}."
        )
    n = (depth - 2) // 6
    c = int(input_shape[0])
    return CifarResNet((n, n, n), c, int(num_classes), _check_width(name, width), shortcut)


_CIFAR_DOC = """CIFAR ResNet-{depth} ({n} BasicBlocks per stage) with BatchNorm; see :class:`CifarResNet`.

    Args:
        input_shape: (C, H, W); any H, W (designed for 32×32).
        num_classes: number of logits.
        width: channel multiplier (16w/32w/64w channels; 1 = the paper).
        shortcut: "A" (default; zero-padding identity, parameter-free, as in He et al. 2016 and
            the official LLFC code) or "B" (1×1 conv + BN projection where shapes change).

    Source: He et al. 2016 §4.2; Idelbayev's ``resnet.py`` as used by the official LLFC code
    (``cifar_resnet_plus.py``; paper-digest §5.2). Parameters (10 classes, width 1): {pa} with
    option A, {pb} with option B.
    """


def _make_cifar(depth: int, pa: str, pb: str):
    def factory(
        input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1.0, shortcut: str = "A"
    ) -> CifarResNet:
        return _cifar_resnet(f"resnet{depth}", depth, input_shape, num_classes, width, shortcut)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = _CIFAR_DOC.format(depth=depth, n=(depth - 2) // 6, pa=pa, pb=pb)
    return register_model(f"resnet{depth}")(factory)


resnet20 = _make_cifar(20, "269,722", "272,474")
resnet32 = _make_cifar(32, "464,154", "466,906")
resnet56 = _make_cifar(56, "853,018", "855,770")


# --------------------------------------------------------------------------------------------
# Git Re-Basin ResNet with LayerNorm


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis at every pixel, as Flax's ``nn.LayerNorm()`` on NHWC maps.

    y[n, :, h, w] = (x[n, :, h, w] − mean_c) / sqrt(var_c + eps) · weight + bias, with weight and
    bias of shape (C,) (parameters ``ln.weight``, ``ln.bias``). Implemented as an ``nn.LayerNorm``
    over the last axis between two permutes, so that torch.fx sees a standard LayerNorm module
    (the permutation-spec derivation handles it). eps = 1e-6 (Flax's default).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_channels = int(num_channels)
        self.ln = nn.LayerNorm(self.num_channels, eps=float(eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


NORMS = ("groupnorm", "layernorm")


def _norm(kind: str, c: int) -> nn.Module:
    if kind == "groupnorm":
        return nn.GroupNorm(1, c)
    return LayerNorm2d(c)


class LNBlock(nn.Module):
    """Git Re-Basin's residual block: relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x)).

    Modules: ``conv1`` (3×3, stride s, no bias), ``norm1``, ``conv2`` (3×3, no bias), ``norm2``,
    ``shortcut``: ``nn.Identity`` when s = 1, else ``nn.Sequential(Conv2d 3×3 stride s no bias,
    norm)`` (``shortcut.0``, ``shortcut.1``) — Git Re-Basin projects with a 3×3 conv (its comment:
    "not the original, but fairly common"), and only where the stride is 2.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False),
                _norm(norm, planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class LNResNet(nn.Module):
    """Git Re-Basin's CIFAR ResNet (``src/resnet20.py``), in PyTorch.

    Layout (w = width multiplier; channels round(16w), round(32w), round(64w)):

    - ``conv1`` Conv2d(C → 16w, 3×3, no bias), ``norm1``, F.relu
    - ``layer1.*``, ``layer2.*``, ``layer3.*``: n :class:`LNBlock` each (strides 1, 2, 2)
    - mean over H, W → (N, 64w); ``linear`` Linear(64w → num_classes) → logits (Git Re-Basin
      applies log_softmax afterwards; we return logits, which give the same argmax and, with
      cross-entropy, the same loss).

    Normalisation ``norm``: "groupnorm" (default) is ``nn.GroupNorm(1, C)``, i.e. LayerNorm over
    (C, H, W) per sample with a per-channel affine — the usual PyTorch rendering of "LayerNorm" in
    a CNN; "layernorm" is :class:`LayerNorm2d`, LayerNorm over C at each pixel, which is exactly
    what Git Re-Basin's Flax ``nn.LayerNorm()`` computes on NHWC maps. Both commute with channel
    permutations, so the permutation symmetry used by weight/activation matching holds for either.

    Init: Kaiming-normal (fan_in, gain √2) convs; PyTorch default Linear; norm γ = 1, β = 0
    (Git Re-Basin uses Flax defaults, LeCun-normal; the init does not affect the architecture).
    """

    def __init__(
        self, num_blocks: Sequence[int], in_channels: int, num_classes: int, width: float = 1.0, norm: str = "groupnorm"
    ):
        super().__init__()
        c1, c2, c3 = (_ch(c, width) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, stride=1, padding=1, bias=False)
        self.norm1 = _norm(norm, c1)
        self.layer1 = self._stage(c1, c1, num_blocks[0], 1, norm)
        self.layer2 = self._stage(c1, c2, num_blocks[1], 2, norm)
        self.layer3 = self._stage(c2, c3, num_blocks[2], 2, norm)
        self.linear = nn.Linear(c3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int, norm: str) -> nn.Sequential:
        blocks = [LNBlock(cin, cout, stride, norm)]
        blocks += [LNBlock(cout, cout, 1, norm) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(out.mean(dim=(2, 3)))


_LN_DOC = """Git Re-Basin's ResNet-{depth} with LayerNorm and a width multiplier; see :class:`LNResNet`.

    Args:
        input_shape: (C, H, W); any H, W (designed for 32×32).
        num_classes: number of logits.
        width: channel multiplier (16w/32w/64w channels). Default 1; the LLFC paper's
            permutation experiments use Git Re-Basin's 32× checkpoints (width=32).
        norm: "groupnorm" (default, ``nn.GroupNorm(1, C)``: normalises over C, H, W) or
            "layernorm" (:class:`LayerNorm2d`: normalises over C at each pixel, exactly Flax's
            ``nn.LayerNorm()`` as in Git Re-Basin).

    Source: Ainsworth et al. 2023 (Git Re-Basin), ``src/resnet20.py``; paper-digest §5.1–5.2.
    Parameters (10 classes, width 1): {params}.
    """


def _make_ln(depth: int, params: str):
    name = f"resnet{depth}_ln"

    def factory(
        input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width: float = 1.0, norm: str = "groupnorm"
    ) -> LNResNet:
        if norm not in NORMS:
            raise ConfigError(
                f"{name}: norm must be 'groupnorm' (GroupNorm(1, C), over C·H·W) or 'layernorm' "
                f"(over channels per pixel, as Git Re-Basin's Flax code), got {norm!r}."
            )
        n = (depth - 2) // 6
        return LNResNet((n, n, n), int(input_shape[0]), int(num_classes), _check_width(name, width), norm)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = _LN_DOC.format(depth=depth, params=params)
    return register_model(name)(factory)


resnet20_ln = _make_ln(20, "292,954")
resnet32_ln = _make_ln(32, "487,386")
resnet56_ln = _make_ln(56, "876,250")


# --------------------------------------------------------------------------------------------
# ResNet-50 for 64×64 inputs (Tiny-ImageNet)


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), expansion 4.

    Modules: ``conv1`` 1×1 (in → p), ``bn1``, ``conv2`` 3×3 stride s (p → p), ``bn2``, ``conv3``
    1×1 (p → 4p), ``bn3``; ``shortcut`` = ``nn.Identity`` or ``nn.Sequential(Conv2d 1×1 stride s,
    BatchNorm2d)`` where the shape changes (He et al. option B). The stride sits on the 3×3 conv
    (torchvision's "ResNet v1.5"). All convs without bias.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        if stride != 1 or in_planes != out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    """Bottleneck ResNet-50 (He et al. 2016, Table 1: 3, 4, 6, 3 blocks) for small images.

    Layout (w = width multiplier; stage widths p = 64w, 128w, 256w, 512w, outputs 4p):

    - stem ``"cifar"`` (default): ``conv1`` Conv2d(C → 64w, 3×3, stride 1, pad 1, no bias),
      ``bn1``, F.relu; no max-pool. A 64×64 input stays 64×64 and the last stage sees 8×8 maps.
      stem ``"imagenet"``: ``conv1`` 7×7 stride 2 pad 3, ``bn1``, F.relu, 3×3/2 max-pool
      (functional): 64×64 → 16×16, and the last stage sees only 2×2 maps.
    - ``layer1`` (3 blocks, stride 1), ``layer2`` (4, stride 2), ``layer3`` (6, stride 2),
      ``layer4`` (3, stride 2): :class:`Bottleneck` blocks ``layerK.i``.
    - adaptive average pool to 1×1 (``mean`` over H, W) → (N, 2048w); ``linear``
      Linear(2048w → num_classes).

    Init: Kaiming-normal (fan_out, ReLU) convs, BN γ = 1, β = 0, PyTorch default Linear
    (torchvision's ResNet init).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        stem: str = "cifar",
        blocks: Sequence[int] = (3, 4, 6, 3),
    ):
        super().__init__()
        p = [_ch(c, width) for c in (64, 128, 256, 512)]
        self.stem = stem
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, p[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, p[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(p[0])
        cin = p[0]
        stages = []
        for i, (planes, n) in enumerate(zip(p, blocks)):
            stride = 1 if i == 0 else 2
            layer = [Bottleneck(cin, planes, stride)]
            cin = planes * Bottleneck.expansion
            layer += [Bottleneck(cin, planes, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            out = F.max_pool2d(out, kernel_size=3, stride=2, padding=1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean(dim=(2, 3)))


@register_model("resnet50")
def resnet50(
    input_shape: Sequence[int] = (3, 64, 64), num_classes: int = 200, width: float = 1.0, stem: str = "cifar"
) -> ResNet50:
    """Bottleneck ResNet-50 for Tiny-ImageNet (64×64, 200 classes); see :class:`ResNet50`.

    Args:
        input_shape: (C, H, W); any H, W (designed for 64×64).
        num_classes: number of logits (200 for Tiny-ImageNet).
        width: channel multiplier (1 = standard; the head gets 2048·width features).
        stem: "cifar" (default; 3×3 stride-1 conv, no max-pool — keeps resolution on small
            images, the usual choice for 64×64 Tiny-ImageNet) or "imagenet" (7×7 stride-2 conv +
            max-pool, the original He et al. stem).

    Source: He et al. 2016, Table 1. The LLFC paper's Tiny-ImageNet model is not in the official
    code (paper-digest §5.2), so the stem is our choice. Parameters (200 classes, width 1):
    23,910,152 with the "cifar" stem, 23,917,832 with the "imagenet" stem (= torchvision's
    ``resnet50(num_classes=200)``).
    """
    if stem not in ("cifar", "imagenet"):
        raise ConfigError(
            f"resnet50: stem must be 'cifar' (3×3 stride-1 conv, no max-pool) or 'imagenet' "
            f"(7×7 stride-2 conv + max-pool), got {stem!r}."
        )
    return ResNet50(int(input_shape[0]), int(num_classes), _check_width("resnet50", width), stem)
