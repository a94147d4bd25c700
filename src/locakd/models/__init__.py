"""Model zoo behind one registry.

>>> from locakd import models
>>> net = models.create("resnet32x4", num_classes=100)
>>> "mnist1d_cnn_32" in models.available()
True

Every model's ``forward(x)`` returns plain logits ``[N, num_classes]``.
CIFAR architectures follow the CRD / mdistiller definitions (same module names, so
their state-dict keys line up); see each module's docstring.
"""

from locakd.models.registry import available, count_parameters, create, register

# Importing the architecture modules registers their factories.
from locakd.models import (  # noqa: E402, F401  # isort: skip
    cifar_resnet,
    imagenet,
    mnist1d,
    mobilenetv2,
    resnet_cifar_large,
    shufflenetv1,
    shufflenetv2,
    vgg,
    wrn,
)

__all__ = ["available", "count_parameters", "create", "register"]
