"""Wide ResNets for CIFAR (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Same architecture as CRD / mdistiller ``models/cifar/wrn.py`` (Zagoruyko & Komodakis
pre-activation WRN, depth = 6n + 4). Module names mirror mdistiller so state-dict keys
line up. ``forward`` returns logits only; the final pool is adaptive (identical to
mdistiller's ``avg_pool2d(out, 8)`` on 32x32 inputs).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from locakd.models.registry import register

__all__ = ["WideResNet"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu1(self.bn1(x))
        if self.equalInOut:
            shortcut = x
        else:
            # Mismatched blocks take the shortcut from the pre-activated input (as in mdistiller).
            assert self.convShortcut is not None
            shortcut = self.convShortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; ``depth`` must be 6n + 4."""

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = self.avgpool(out).flatten(1)
        return self.fc(out)


@register("wrn_16_1")
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=1, drop_rate=drop_rate)


@register("wrn_16_2")
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(16, num_classes, widen_factor=2, drop_rate=drop_rate)


@register("wrn_40_1")
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=1, drop_rate=drop_rate)


@register("wrn_40_2")
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    return WideResNet(40, num_classes, widen_factor=2, drop_rate=drop_rate)
