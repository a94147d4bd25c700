"""ImageNet models: torchvision-style ResNet18/34/50 and mdistiller's MobileNetV1.

The ResNets are written here (torchvision is an optional dependency) and follow
``torchvision.models.resnet`` (v1.5: stride on the 3x3 conv of the bottleneck) with the
same module names, so torchvision state dicts load into them unchanged. They always use
this implementation, whether or not torchvision is installed, so results do not depend on
the environment.

``imagenet_mobilenetv1`` is the MobileNetV1 used as the student of mdistiller's ImageNet
ResNet50 -> MobileNetV1 pair (``mdistiller/models/imagenet/mobilenetv1.py``), with the
same module names; the classifier honours ``num_classes`` (mdistiller hard-codes 1000)
and the final pool is adaptive (identical to ``AvgPool2d(7)`` on 224x224 inputs).

All ``forward`` methods return logits only.
"""

from __future__ import annotations

from torch import Tensor, nn

from locakd.models.registry import register

__all__ = ["ImageNetResNet", "MobileNetV1"]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


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
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)


def _mbv1_conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def _mbv1_conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.model = nn.Sequential(
            _mbv1_conv_bn(3, 32, 2),
            _mbv1_conv_dw(32, 64, 1),
            _mbv1_conv_dw(64, 128, 2),
            _mbv1_conv_dw(128, 128, 1),
            _mbv1_conv_dw(128, 256, 2),
            _mbv1_conv_dw(256, 256, 1),
            _mbv1_conv_dw(256, 512, 2),
            _mbv1_conv_dw(512, 512, 1),
            _mbv1_conv_dw(512, 512, 1),
            _mbv1_conv_dw(512, 512, 1),
            _mbv1_conv_dw(512, 512, 1),
            _mbv1_conv_dw(512, 512, 1),
            _mbv1_conv_dw(512, 1024, 2),
            _mbv1_conv_dw(1024, 1024, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.model(x).flatten(1))


@register("imagenet_resnet18")
def imagenet_resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes, zero_init_residual)


@register("imagenet_resnet34")
def imagenet_resnet34(num_classes: int = 1000, zero_init_residual: bool = False) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes, zero_init_residual)


@register("imagenet_resnet50")
def imagenet_resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual)


@register("imagenet_mobilenetv1")
def imagenet_mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)
