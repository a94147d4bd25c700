"""CIFAR VGGs with batch norm (vgg8, vgg11, vgg13, vgg16, vgg19).

Same architecture as CRD / mdistiller ``models/cifar/vgg.py`` ``vggXX_bn`` (the variants
mdistiller's CIFAR model dict registers as ``vgg8`` ... ``vgg19``): five conv blocks of
3x3 conv + BN + ReLU separated by 2x2 max-pools, a global average pool and a single
``Linear(512, num_classes)`` classifier. Like mdistiller, the max-pool between block 3
and block 4 is only applied to 64x64 inputs (so on 32x32 CIFAR images block 4 runs at
4x4 resolution). Module names mirror mdistiller so state-dict keys line up; ``forward``
returns logits only.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from locakd.models.registry import register

__all__ = ["VGG"]

_CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(channels: list[int], batch_norm: bool, in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in channels:
        layers.append(nn.Conv2d(in_channels, v, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        in_channels = v
    # The block's last ReLU is applied in forward (mdistiller keeps the pre-activation).
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], batch_norm: bool = True, num_classes: int = 100):
        super().__init__()
        self.block0 = _make_block(cfg[0], batch_norm, 3)
        self.block1 = _make_block(cfg[1], batch_norm, cfg[0][-1])
        self.block2 = _make_block(cfg[2], batch_norm, cfg[1][-1])
        self.block3 = _make_block(cfg[3], batch_norm, cfg[2][-1])
        self.block4 = _make_block(cfg[4], batch_norm, cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = F.relu(self.block3(x))
        if h == 64:  # mdistiller quirk: the 4th max-pool only for 64x64 (Tiny-ImageNet) inputs
            x = self.pool3(x)
        x = F.relu(self.block4(x))
        x = self.pool4(x).flatten(1)
        return self.classifier(x)


@register("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    return VGG(_CFG["S"], batch_norm=True, num_classes=num_classes)


@register("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    return VGG(_CFG["A"], batch_norm=True, num_classes=num_classes)


@register("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    return VGG(_CFG["B"], batch_norm=True, num_classes=num_classes)


@register("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    return VGG(_CFG["D"], batch_norm=True, num_classes=num_classes)


@register("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    return VGG(_CFG["E"], batch_norm=True, num_classes=num_classes)
