"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4).

Same architecture as the CRD / mdistiller ``models/cifar/resnet.py`` family: a 3x3 stem,
three stages of BasicBlocks (depth = 6n + 2) at 32/16/8 resolution, global average pool,
linear classifier. Module names mirror mdistiller so its state-dict keys line up.

Difference from mdistiller: ``forward`` returns logits only (no feature dict), and the
final pool is adaptive (identical to mdistiller's ``AvgPool2d(8)`` on 32x32 inputs).
"""

from __future__ import annotations

from torch import Tensor, nn

from locakd.models.registry import register

__all__ = ["BasicBlock", "CifarResNet"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return (out + residual).relu()


class CifarResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks; ``depth`` must be 6n + 2."""

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


_SMALL = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _SMALL, num_classes)


@register("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(14, _SMALL, num_classes)


@register("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(20, _SMALL, num_classes)


@register("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _SMALL, num_classes)


@register("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(44, _SMALL, num_classes)


@register("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, _SMALL, num_classes)


@register("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, _SMALL, num_classes)


@register("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(8, _WIDE, num_classes)


@register("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(32, _WIDE, num_classes)
