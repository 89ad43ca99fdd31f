"""LeNet-5 in the 20-50-500 variant of Caffe's MNIST example, the one the ADMM-TT and MARS
papers compress (431k parameters at 28x28, 93% of them in ``fc1``)."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    """conv(20, 5x5) - pool - conv(50, 5x5) - pool - fc(500) - fc(classes).

    ReLUs follow the convolutions as in the usual PyTorch port; the layer sizes are Caffe's.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs inputs of at least 12x12 pixels, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))
