"""Tests of the model zoo and its registry (locakd.models)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import locakd.models as models
from locakd.errors import ConfigError, InputError
from locakd.models import registry

CIFAR = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "resnet18", "resnet50",
]  # fmt: skip
IMAGENET = ["imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50", "imagenet_mobilenetv1"]
MNIST1D = [f"mnist1d_cnn_{w}" for w in (8, 16, 32, 64)] + [f"mnist1d_mlp_{w}" for w in (32, 64, 128, 256)]

# Published parameter counts (millions) of the CRD / mdistiller CIFAR-100 models.
CIFAR100_PARAMS_M = {
    "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74,
    "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "wrn_40_2": 2.26,
    "vgg8": 3.96, "vgg13": 9.46, "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36,
    "resnet50": 23.71,
}  # fmt: skip

# torchvision's exact parameter counts at 1000 classes, and mdistiller's MobileNetV1.
IMAGENET_PARAMS = {
    "imagenet_resnet18": 11_689_512,
    "imagenet_resnet34": 21_797_672,
    "imagenet_resnet50": 25_557_032,
}


# One representative per block type / family for the (costlier) backward pass.
BACKWARD = [
    "resnet8", "wrn_16_1", "vgg8", "mobilenetv2", "shufflenetv1", "shufflenetv2", "resnet18", "resnet50",
    "imagenet_resnet18", "imagenet_resnet50", "imagenet_mobilenetv1", "mnist1d_cnn_8", "mnist1d_mlp_32",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # Tiny batches gain nothing from intra-op threads, and on a busy 2-core machine the
    # OpenMP pool makes these tests many times slower. Restored afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _example_input(name: str, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if name.startswith("mnist1d_"):
        return torch.randn(batch, 40, generator=gen)
    if name.startswith("imagenet_"):
        # All ImageNet models pool adaptively, so a small image keeps the test cheap.
        return torch.randn(batch, 3, 64, 64, generator=gen)
    return torch.randn(batch, 3, 32, 32, generator=gen)


def test_available_lists_exactly_the_zoo():
    assert models.available() == sorted(CIFAR + IMAGENET + MNIST1D)
    assert all(name == name.lower() for name in models.available())


@pytest.mark.parametrize("num_classes", [100, 7])
@pytest.mark.parametrize("name", CIFAR + IMAGENET + MNIST1D)
def test_forward_returns_plain_logits(name: str, num_classes: int):
    model = models.create(name, num_classes, seed=0).eval()
    x = _example_input(name, batch=2)
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BACKWARD)
def test_train_mode_backward(name: str):
    model = models.create(name, 5, seed=0).train()
    out = model(_example_input(name, batch=2))
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(("name", "millions"), sorted(CIFAR100_PARAMS_M.items()))
def test_cifar100_parameter_counts_match_published(name: str, millions: float):
    n = models.count_parameters(models.create(name, 100))
    assert abs(n / 1e6 - millions) <= 0.02 * millions, f"{name}: {n / 1e6:.3f}M vs published {millions}M"


@pytest.mark.parametrize(("name", "expected"), sorted(IMAGENET_PARAMS.items()))
def test_imagenet_resnet_parameter_counts_match_torchvision(name: str, expected: int):
    assert models.count_parameters(models.create(name, 1000)) == expected


def test_imagenet_mobilenetv1_parameter_count():
    n = models.count_parameters(models.create("imagenet_mobilenetv1", 1000))
    assert abs(n / 1e6 - 4.23) <= 0.02 * 4.23


def test_count_parameters_counts_trainable_and_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert models.count_parameters(model) == 3 * 4 + 4 + 4 * 2 + 2
    assert models.count_parameters(model, trainable_only=True) == 4 + 4 * 2 + 2


def test_state_dict_keys_mirror_reference_implementations():
    # mdistiller (CIFAR) / torchvision (ImageNet) module naming, so published checkpoints line up.
    expected = {
        "resnet8": ["conv1.weight", "layer2.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"],
        "wrn_40_2": [
            "block1.layer.0.convShortcut.weight",
            "block3.layer.5.conv2.weight",
            "bn1.weight",
            "fc.weight",
        ],
        "vgg8": ["block0.0.weight", "block0.1.running_mean", "block4.0.bias", "classifier.weight"],
        "vgg13": ["block1.3.weight", "block1.4.weight"],
        "mobilenetv2": ["conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.bias", "classifier.0.weight"],
        "shufflenetv1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
        "shufflenetv2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "linear.bias"],
        "resnet50": ["layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.weight"],
        "imagenet_resnet50": ["layer1.0.downsample.1.running_mean", "layer4.2.conv3.weight", "fc.weight"],
        "imagenet_mobilenetv1": ["model.0.0.weight", "model.13.4.weight", "fc.weight"],
    }
    for name, keys in expected.items():
        state = models.create(name, 10).state_dict()
        missing = [k for k in keys if k not in state]
        assert not missing, f"{name} lacks {missing}"


def test_unknown_name_error_names_the_name_and_suggests():
    with pytest.raises(ConfigError) as info:
        models.create("resnet33", 10)
    msg = str(info.value)
    assert "'resnet33'" in msg
    assert "resnet32" in msg
    assert "wrn_40_2" in msg  # the full list of available names is included

    with pytest.raises(ConfigError, match=r"did you mean 'resnet50'"):
        models.create("ResNet50", 10)
    with pytest.raises(ConfigError, match=r"did you mean 'mobilenetv2'"):
        models.create("mobile_half", 10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_num_classes_rejected(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        models.create("resnet8", bad)


def test_unknown_kwarg_rejected_with_accepted_list():
    with pytest.raises(ConfigError, match="resnet8"):
        models.create("resnet8", 10, width=3)
    with pytest.raises(ConfigError, match="input_length"):
        models.create("mnist1d_cnn_8", 10, input_lenght=40)


def test_seed_gives_identical_weights_without_touching_global_rng():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = models.create("resnet8", 10, seed=7).state_dict()
    b = models.create("resnet8", 10, seed=7).state_dict()
    c = models.create("resnet8", 10, seed=8).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_global_seed_also_gives_identical_weights():
    torch.manual_seed(0)
    a = models.create("mnist1d_cnn_8", 10).state_dict()
    torch.manual_seed(0)
    b = models.create("mnist1d_cnn_8", 10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_register_rejects_duplicates_and_bad_names(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register("tiny_test_model")
    def tiny(num_classes: int = 3) -> nn.Module:
        return nn.Linear(4, num_classes)

    assert "tiny_test_model" in models.available()
    assert models.create("tiny_test_model", 6)(torch.zeros(1, 4)).shape == (1, 6)
    models.register("tiny_test_model")(tiny)  # same factory again: no-op

    with pytest.raises(ConfigError, match="already registered"):
        models.register("tiny_test_model")(lambda num_classes: nn.Linear(4, num_classes))
    with pytest.raises(ConfigError, match="lower-case"):
        models.register("Tiny")
    with pytest.raises(ConfigError):
        models.register("")


@pytest.mark.parametrize("name", ["mnist1d_cnn_32", "mnist1d_mlp_64"])
def test_mnist1d_accepts_both_input_layouts(name: str):
    model = models.create(name, 10, seed=0).eval()
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x.unsqueeze(1)))


@pytest.mark.parametrize("name", ["mnist1d_cnn_16", "mnist1d_mlp_32"])
def test_mnist1d_input_length_kwarg_and_validation(name: str):
    model = models.create(name, 4, input_length=72).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 72)).shape == (2, 4)
    with pytest.raises(InputError, match="72"):
        model(torch.randn(2, 40))
    with pytest.raises(InputError, match="shape"):
        model(torch.randn(2, 3, 72))
    with pytest.raises(ConfigError, match="input_length"):
        models.create(name, 4, input_length=0)


def test_mnist1d_cnn_widths_are_ordered_by_capacity():
    counts = [models.count_parameters(models.create(f"mnist1d_cnn_{w}", 10)) for w in (8, 16, 32, 64)]
    assert counts == sorted(counts) and counts[-1] < 100_000  # small enough for CPU demos


def test_no_cuda_calls_in_model_sources():
    src = Path(models.__file__).parent
    offenders = [p.name for p in src.glob("*.py") if re.search(r"\.cuda\(", p.read_text())]
    assert not offenders
