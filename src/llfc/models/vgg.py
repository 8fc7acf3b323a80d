"""CIFAR VGG-11/13/16/19 with and without BatchNorm (official LLFC code ``src/model/cifar_vgg.py``;
Simonyan & Zisserman 2015 configurations A/B/D/E; paper-digest §5.2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from llfc.errors import ConfigError
from llfc.models.registry import register_model

#: Channel configurations (Simonyan & Zisserman 2015, Table 1); "M" is a 2×2 max-pool.
CFGS: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}

CLASSIFIERS = ("paper", "linear")


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class VGG(nn.Module):
    """VGG for small images: ``features`` → ``avgpool`` (adaptive, 1×1) → flatten → ``classifier``.

    Module names (every ``nn.ReLU`` is ``inplace=True``, as in torchvision; the official LLFC
    code uses ``inplace=False`` — values are identical, but a forward hook that keeps a reference
    to a conv output (without BN) sees it overwritten by the ReLU, which llfc's probes must handle):

    - ``features.i``: for each number v in the configuration, ``Conv2d(in→v·width, 3×3, pad 1,
      bias)``, then ``BatchNorm2d`` if ``batch_norm``, then ``ReLU``; each "M" is
      ``MaxPool2d(2, 2)``. For VGG-16-BN: ``features.0`` conv, ``features.1`` BN, ``features.2``
      ReLU, ``features.3`` conv, ..., ``features.6`` max-pool, ...; for VGG-16 without BN:
      ``features.0`` conv, ``features.1`` ReLU, ``features.2`` conv, ``features.3`` ReLU,
      ``features.4`` max-pool, ...
    - ``avgpool``: ``AdaptiveAvgPool2d(1)`` (any input of at least 32×32 works; for 32×32 the map
      is already 1×1 after five pools).
    - ``classifier``: ``"paper"`` (the official code): ``classifier.0`` Linear(512·width →
      hidden), ``.1`` ReLU, ``.2`` Dropout(0.5), ``.3`` Linear(hidden → hidden), ``.4`` ReLU,
      ``.5`` Dropout(0.5), ``.6`` Linear(hidden → num_classes). ``"linear"``: ``classifier.0``
      Linear(512·width → num_classes) only.

    Initialisation (official code): convs Kaiming-normal (fan_out, ReLU gain), bias 0; linears
    N(0, 0.01²), bias 0; BN γ = 1, β = 0.

    Shapes: input (N, C, H, W) float32 with H, W ≥ 32; output (N, num_classes).
    """

    def __init__(
        self,
        cfg: Sequence,
        in_channels: int,
        num_classes: int,
        batch_norm: bool,
        width: float = 1.0,
        classifier: str = "paper",
        hidden: int = 4096,
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _scaled(v, width)
            layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1, bias=True))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if classifier == "paper":
            self.classifier = nn.Sequential(
                nn.Linear(c, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        elif classifier == "linear":
            self.classifier = nn.Sequential(nn.Linear(c, num_classes))
        else:
            raise ConfigError(
                f"unknown VGG classifier {classifier!r}; use 'paper' (512-4096-4096-classes MLP "
                f"with dropout, the official LLFC code) or 'linear' (one Linear layer)."
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _build(cfg_name: str, batch_norm: bool, input_shape, num_classes, width, classifier, hidden, dropout) -> VGG:
    c, h, w = (int(d) for d in input_shape)
    if h < 32 or w < 32:
        raise ConfigError(
            f"VGG halves the image five times and needs inputs of at least 32×32 pixels, got "
            f"{h}×{w}; use a dataset with larger images (cifar10) or a smaller model (lenet, mlp)."
        )
    if not width > 0:
        raise ConfigError(f"VGG width multiplier must be > 0, got {width!r}.")
    return VGG(CFGS[cfg_name], c, int(num_classes), batch_norm, float(width), classifier, int(hidden), float(dropout))


_DOC = """VGG-{depth}{bn} for CIFAR (configuration {cfg}{bn_text}); see :class:`VGG`.

    Args:
        input_shape: (C, H, W), H and W ≥ 32.
        num_classes: number of logits.
        width: channel multiplier (each conv has round(v·width) channels; 1 = the paper).
        classifier: "paper" (default; Linear(512w, hidden)-ReLU-Dropout-Linear(hidden, hidden)-
            ReLU-Dropout-Linear(hidden, classes), the official LLFC code) or "linear" (one
            Linear(512w, classes); cheap CPU runs).
        hidden: hidden width of the "paper" classifier (4096 in the paper).
        dropout: dropout probability of the "paper" classifier (0.5 in the paper).

    Source: official LLFC code ``src/model/cifar_vgg.py`` (paper-digest §5.2).
    Parameters at the defaults with 10 classes: {params}.
    """


def _make(depth: int, cfg: str, bn: bool, params: str):
    def factory(
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        width: float = 1.0,
        classifier: str = "paper",
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> VGG:
        return _build(cfg, bn, input_shape, num_classes, width, classifier, hidden, dropout)

    name = f"vgg{depth}{'_bn' if bn else ''}"
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = _DOC.format(
        depth=depth,
        bn="-BN" if bn else "",
        cfg=cfg,
        bn_text=", BatchNorm after every conv" if bn else "",
        params=params,
    )
    return register_model(name)(factory)


vgg11 = _make(11, "A", False, "28,144,010")
vgg11_bn = _make(11, "A", True, "28,149,514")
vgg13 = _make(13, "B", False, "28,328,522")
vgg13_bn = _make(13, "B", True, "28,334,410")
vgg16 = _make(16, "D", False, "33,638,218")
vgg16_bn = _make(16, "D", True, "33,646,666")
vgg19 = _make(19, "E", False, "38,947,914")
vgg19_bn = _make(19, "E", True, "38,958,922")
