"""Small, CPU-fast models for MNIST-1D (1-D signals, default length 40, 10 classes).

* ``mnist1d_cnn_{8,16,32,64}``: three ``Conv1d(kernel 5, stride 2, padding 2)`` + ReLU
  layers of ``width`` channels (length 40 -> 20 -> 10 -> 5), flattened into a linear head
  (the layout of the reference MNIST-1D ConvBase, kernel 5 throughout). Width 64 is a
  strong teacher, width 8 a weak one.
* ``mnist1d_mlp_{32,64,128,256}``: two hidden ``Linear`` + ReLU layers of ``width`` units.

Inputs may be ``[N, L]`` or ``[N, 1, L]`` with ``L == input_length`` (keyword argument of
every factory, default 40). ``forward`` returns logits ``[N, num_classes]``.
"""

from __future__ import annotations

from torch import Tensor, nn

from locakd.errors import ConfigError, InputError
from locakd.models.registry import register

__all__ = ["CNN_WIDTHS", "MLP_WIDTHS", "MNIST1DCNN", "MNIST1DMLP"]

CNN_WIDTHS = (8, 16, 32, 64)
MLP_WIDTHS = (32, 64, 128, 256)

_KERNEL = 5
_STRIDE = 2
_PADDING = 2


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_signal(x: Tensor, input_length: int, model: str) -> Tensor:
    """Accept ``[N, L]`` or ``[N, 1, L]``; return ``[N, 1, L]``."""
    if x.dim() == 2:
        x = x.unsqueeze(1)
    elif x.dim() != 3 or x.shape[1] != 1:
        raise InputError(
            f"{model} expects input of shape [N, {input_length}] or [N, 1, {input_length}], got {list(x.shape)}"
        )
    if x.shape[-1] != input_length:
        raise InputError(
            f"{model} was built for signals of length {input_length} (input_length), got input of shape {list(x.shape)}"
        )
    return x


class MNIST1DCNN(nn.Module):
    """Three strided 1-D convolutions (kernel 5) + ReLU, then a linear head on the flattened maps."""

    def __init__(self, width: int, num_classes: int = 10, input_length: int = 40):
        super().__init__()
        self.width = _check_positive("width", width)
        self.input_length = _check_positive("input_length", input_length)
        length = input_length
        layers: list[nn.Module] = []
        in_ch = 1
        for _ in range(3):
            layers += [
                nn.Conv1d(in_ch, width, _KERNEL, stride=_STRIDE, padding=_PADDING),
                nn.ReLU(inplace=True),
            ]
            in_ch = width
            length = (length + 2 * _PADDING - _KERNEL) // _STRIDE + 1
        self.features = nn.Sequential(*layers)
        self.feature_length = length
        self.head = nn.Linear(width * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_signal(x, self.input_length, type(self).__name__)
        return self.head(self.features(x).flatten(1))


class MNIST1DMLP(nn.Module):
    """Two hidden fully-connected layers of ``width`` units with ReLU."""

    def __init__(self, width: int, num_classes: int = 10, input_length: int = 40):
        super().__init__()
        self.width = _check_positive("width", width)
        self.input_length = _check_positive("input_length", input_length)
        self.net = nn.Sequential(
            nn.Linear(input_length, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = _as_signal(x, self.input_length, type(self).__name__)
        return self.net(x.flatten(1))


def _register_cnn(width: int) -> None:
    def factory(num_classes: int = 10, input_length: int = 40) -> MNIST1DCNN:
        return MNIST1DCNN(width, num_classes=num_classes, input_length=input_length)

    factory.__name__ = factory.__qualname__ = f"mnist1d_cnn_{width}"
    factory.__doc__ = f"MNIST-1D CNN with {width} channels per conv layer."
    register(f"mnist1d_cnn_{width}")(factory)


def _register_mlp(width: int) -> None:
    def factory(num_classes: int = 10, input_length: int = 40) -> MNIST1DMLP:
        return MNIST1DMLP(width, num_classes=num_classes, input_length=input_length)

    factory.__name__ = factory.__qualname__ = f"mnist1d_mlp_{width}"
    factory.__doc__ = f"MNIST-1D MLP with two hidden layers of {width} units."
    register(f"mnist1d_mlp_{width}")(factory)


for _w in CNN_WIDTHS:
    _register_cnn(_w)
for _w in MLP_WIDTHS:
    _register_mlp(_w)
