"""ResNet-18-style image classifier with a CIFAR stem, in plain torch (no torchvision on the GPU image is
assumed): 3x3/1 stem without max-pool, four stages of two basic blocks, global average pool, linear head.

`forward(pixel_values, labels=None)` returns ``{"logits": ...}``, the interface LABOTrainer expects; the
loss is the Trainer's, never the model's.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10):
        super().__init__()
        if width < 1 or not blocks:
            raise ValueError(f"width must be >= 1 and blocks non-empty; got width={width}, blocks={blocks}")
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n):
                layers.append(BasicBlock(c, c_out, 2 if (i > 0 and j == 0) else 1))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, pixel_values, labels=None):
        x = self.layers(self.stem(pixel_values))
        return {"logits": self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))}
