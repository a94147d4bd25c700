"""CIFAR MobileNetV2 (registered as ``mobilenetv2``).

Same architecture as CRD / mdistiller ``models/cifar/mobilenetv2.py`` ``mobile_half``:
expansion ratio T = 6, width multiplier 0.5, stride-2 3x3 stem, 7 inverted-residual
stages, a 1x1 conv to 1280 channels (not scaled for width <= 1, as in mdistiller) and a
linear classifier. Module names mirror mdistiller so state-dict keys line up.

Differences from mdistiller: ``forward`` returns logits only; the final pool is adaptive
(mdistiller's ``AvgPool2d(input_size // 16, ceil_mode=True)`` is identical on 32x32
inputs), so the input size no longer needs to be a multiple of 32.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from locakd.models.registry import register

__all__ = ["MobileNetV2"]


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True)
    )


def _conv_1x1_bn(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # mdistiller always builds the 1x1 expansion conv, even for expand_ratio == 1.
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, expand_ratio: int = 6, width_mult: float = 0.5):
        super().__init__()
        setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [expand_ratio, 24, 2, 1],
            [expand_ratio, 32, 3, 2],
            [expand_ratio, 64, 4, 2],
            [expand_ratio, 96, 3, 1],
            [expand_ratio, 160, 3, 2],
            [expand_ratio, 320, 1, 1],
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn(3, input_channel, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_1x1_bn(input_channel, self.last_channel)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)

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
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        out = self.avgpool(out).flatten(1)
        return self.classifier(out)


@register("mobilenetv2")
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """mdistiller's ``mobile_half``: MobileNetV2 with T=6, width 0.5."""
    return MobileNetV2(num_classes=num_classes, expand_ratio=6, width_mult=0.5)
