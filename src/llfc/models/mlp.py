"""Multi-layer perceptron (the paper's MNIST model, 784-512-512-512-10; LLFC paper §3, App. B.1)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from llfc.models.registry import register_model


class MLP(nn.Module):
    """Flatten → [Linear → ReLU] × len(widths) → Linear (logits).

    Modules are named ``layers.0`` (Linear), ``layers.1`` (ReLU), ... as in the official code.

    Args:
        in_features: input dimension (C·H·W).
        widths: hidden widths.
        num_classes: number of logits.

    Shapes: input (N, *) with prod(*) = in_features, float32; output (N, num_classes).
    """

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int):
        super().__init__()
        dims = [in_features, *widths]
        layers: list[nn.Module] = []
        for i in range(len(widths)):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.flatten(x, 1))


@register_model("mlp")
def mlp(
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    widths: Sequence[int] = (512, 512, 512),
) -> MLP:
    """The paper's MLP: flattened input → hidden ``widths`` with ReLU → ``num_classes`` logits."""
    in_features = 1
    for d in input_shape:
        in_features *= int(d)
    return MLP(in_features, [int(w) for w in widths], int(num_classes))
