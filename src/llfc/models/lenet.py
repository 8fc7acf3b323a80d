"""LeNet-5 style convolutional network (the official LLFC code's MNIST LeNet; paper-digest §5.2)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llfc.errors import ConfigError
from llfc.models.registry import register_model


class LeNet(nn.Module):
    """conv1 → relu1 → maxpool → conv2 → relu2 → maxpool → fc1 → relu3 → fc2 → relu4 → fc3.

    Layout (module names as in the official LLFC ``mnist_lenet.py``, so hooking every named
    submodule reproduces its probe list; the two 2×2 max-pools are functional, as there):

    ========  ==========================================  ===========================
    name      module                                      output for a 1×28×28 input
    ========  ==========================================  ===========================
    conv1     Conv2d(C→6, 5×5, padding 2)                 (N, 6, 28, 28)
    relu1     ReLU()                                      (N, 6, 28, 28)
    (pool)    F.max_pool2d(2)                             (N, 6, 14, 14)
    conv2     Conv2d(6→16, 5×5)                           (N, 16, 10, 10)
    relu2     ReLU()                                      (N, 16, 10, 10)
    (pool)    F.max_pool2d(2), flatten                    (N, 400)
    fc1       Linear(16·h·w → 120)                        (N, 120)
    relu3     ReLU()
    fc2       Linear(120 → 84)                            (N, 84)
    relu4     ReLU()
    fc3       Linear(84 → num_classes)                    (N, num_classes) logits
    ========  ==========================================  ===========================

    h = w = ((H // 2) − 4) // 2 for an H×H input: 5 for 28×28 (fc1 has 400 inputs, as in the paper
    code), 6 for 32×32. PyTorch default initialisation (as in the official code).

    Args:
        in_channels: C of the input.
        spatial: (H, W) of the input.
        num_classes: number of logits.

    Shapes: input (N, C, H, W) float32; output (N, num_classes).
    """

    def __init__(self, in_channels: int, spatial: tuple[int, int], num_classes: int):
        super().__init__()
        h, w = (((s // 2) - 4) // 2 for s in spatial)
        if h < 1 or w < 1:
            raise ConfigError(
                f"lenet needs inputs of at least 12×12 pixels, got {spatial[0]}×{spatial[1]}; "
                f"use a larger input or another model (e.g. mlp)."
            )
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(16 * h * w, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.relu1(self.conv1(x)), 2)
        x = F.max_pool2d(self.relu2(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model("lenet")
def lenet(input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10) -> LeNet:
    """LeNet for ``input_shape`` (C, H, W) images (H, W ≥ 12); see :class:`LeNet`.

    Source: official LLFC code ``src/model/mnist_lenet.py`` (paper-digest §5.2); 61,706
    parameters for (1, 28, 28) and 10 classes.
    """
    c, h, w = (int(d) for d in input_shape)
    return LeNet(c, (h, w), int(num_classes))
