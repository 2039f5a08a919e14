"""The classic CIFAR-10 ResNets of He et al. 2016 (ResNet-20/32/44/56/110), "option A" shortcuts.

Written for prunekit as a model that is not torchvision's: the downsampling shortcut has no parameters,
it subsamples `x[:, :, ::2, ::2]` and zero-pads the missing channels with `F.pad`. The module names
follow the common layout of public CIFAR ResNet weights (conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,
bn2}, linear), so such state_dicts load as they are:

    prunekit gate examples/cifar_resnet.py:resnet20 --weights resnet20.th --input-shape 3,32,32 -o g.pt
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PadShortcut(nn.Module):
    """Option A: halve the resolution by subsampling, add `extra // 2` zero channels on each side."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.extra // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        downsample = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes - in_planes) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        widths, strides, layers, in_planes = (16, 32, 64), (1, 2, 2), [], 16
        for width, stride in zip(widths, strides, strict=True):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, width, stride if i == 0 else 1))
                in_planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet(depth: int = 20, num_classes: int = 10) -> CifarResNet:
    """depth = 6n + 2: 20, 32, 44, 56, 110."""
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), not {depth}")
    return CifarResNet((depth - 2) // 6, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return resnet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return resnet(56, num_classes)
