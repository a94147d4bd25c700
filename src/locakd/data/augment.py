"""Vectorised batch augmentation on image tensors ``[N, C, H, W]`` (uint8 or float).

Every random op takes an explicit source of randomness, either

* a ``torch.Generator``: one stream for the whole batch, or
* :class:`SampleGenerators`: one stream per sample. The loaders use this, seeded from
  ``(seed, epoch, sample index)``, so a sample's crop, flip and noise do not depend on the batch it
  lands in: a resumed run reproduces exactly, and 2 processes x 16 samples draw the same
  augmentations as 1 process x 32.

The random numbers are drawn on the CPU (or the generator's device) and moved to the images'
device, so the ops work on GPU batches too; the image arithmetic itself stays batched.

Batch transforms used by the loaders have the signature
``transform(images, generator) -> tensor``; :func:`cifar_train_transform` and
:func:`cifar_test_transform` build the standard CIFAR pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from locakd.errors import InputError

__all__ = [
    "BatchTransform",
    "SampleGenerators",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "Normalize",
    "cifar_test_transform",
    "cifar_train_transform",
    "gaussian_noise",
    "normalize",
    "random_crop",
    "random_hflip",
    "to_float",
]

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



class SampleGenerators:
    """One ``torch.Generator`` per sample of a batch; each draw takes one value (or block) per sample.

    ``SampleGenerators.from_seeds(seeds)`` seeds sample ``i``'s generator with ``seeds[i]``. Draws
    advance every sample's own stream, so what sample ``i`` gets depends only on its seed and on the
    ops applied before, never on the other samples of the batch.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> SampleGenerators:
        gens = []
        for seed in seeds:
            g = torch.Generator()
            g.manual_seed(int(seed))
            gens.append(g)
        return cls(gens)

    def __len__(self) -> int:
        return len(self.generators)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """int64 ``[N]``: one draw from ``[low, high)`` per sample."""
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.generators])

    def rand(self) -> torch.Tensor:
        """float32 ``[N]``: one uniform draw from ``[0, 1)`` per sample."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        """float32 ``[N, *shape]``: standard normal draws, one block per sample."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])

    def __repr__(self) -> str:
        return f"SampleGenerators(n={len(self)})"


BatchTransform = Callable[[torch.Tensor, "torch.Generator | SampleGenerators | None"], torch.Tensor]


def _check_batch(images: torch.Tensor, op: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{op}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"{op}: images must have shape [N, C, H, W], got {list(images.shape)}")


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _per_sample(generator, n: int, op: str) -> bool:
    if not isinstance(generator, SampleGenerators):
        return False
    if len(generator) != n:
        raise InputError(f"{op}: {len(generator)} sample generators for a batch of {n}")
    return True


def _randint(generator, low: int, high: int, n: int, op: str) -> torch.Tensor:
    if _per_sample(generator, n, op):
        return generator.randint(low, high)
    return torch.randint(low, high, (n,), generator=generator, device=_gen_device(generator))


def _rand(generator, n: int, op: str) -> torch.Tensor:
    if _per_sample(generator, n, op):
        return generator.rand()
    return torch.rand(n, generator=generator, device=_gen_device(generator))


def _randn(generator, shape: Sequence[int], op: str) -> torch.Tensor:
    if _per_sample(generator, shape[0], op):
        return generator.randn(shape[1:])
    return torch.randn(tuple(shape), generator=generator, device=_gen_device(generator))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def random_crop(
    images: torch.Tensor,
    size: int | Sequence[int] = 32,
    padding: int = 4,
    generator: torch.Generator | SampleGenerators | None = None,
) -> torch.Tensor:
    """Zero-pad by ``padding`` on every side, then take one random ``size`` crop per sample.

    The batch is padded once and the crops are gathered with per-sample offsets
    (one advanced-indexing op on an unfold view, no Python loop). Keeps dtype and device.
    """
    _check_batch(images, "random_crop")
    n, c, h, w = images.shape
    ch, cw = _pair(size)
    if padding < 0:
        raise InputError(f"random_crop: padding must be >= 0, got {padding}")
    ph, pw = h + 2 * padding, w + 2 * padding
    if ch > ph or cw > pw or ch <= 0 or cw <= 0:
        raise InputError(f"random_crop: crop {ch}x{cw} does not fit a padded {ph}x{pw} image")
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    oy = _randint(generator, 0, ph - ch + 1, n, "random_crop").to(images.device)
    ox = _randint(generator, 0, pw - cw + 1, n, "random_crop").to(images.device)
    # [N, C, ph-ch+1, pw-cw+1, ch, cw] view of every window (no copy); pick one per sample
    windows = padded.unfold(2, ch, 1).unfold(3, cw, 1)
    return windows[torch.arange(n, device=images.device), :, oy, ox]


def random_hflip(
    images: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each sample left-right with probability ``p`` (works for [N, C, H, W] and [N, L])."""
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        raise InputError("random_hflip: images must be a tensor with a batch and a width dimension")
    n = images.shape[0]
    mask = _rand(generator, n, "random_hflip").to(images.device) < p
    mask = mask.view(n, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; floating input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if not images.is_floating_point():
        raise InputError(f"expected uint8 or floating images, got {images.dtype}")
    return images.to(torch.float32)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` on ``[N, C, H, W]`` (uint8 is scaled to [0, 1] first)."""
    _check_batch(images, "normalize")
    c = images.shape[1]
    if len(mean) != c or len(std) != c:
        raise InputError(
            f"normalize: mean/std need {c} entries (one per channel), got {len(mean)}/{len(std)}"
        )
    if any(s <= 0 for s in std):
        raise InputError(f"normalize: std must be positive, got {tuple(std)}")
    x = to_float(images)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, c, 1, 1)
    return (x - m) / s


class Normalize:
    """Batch transform wrapper around :func:`normalize` (ignores the generator)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
        return normalize(images, self.mean, self.std)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    """Chain batch transforms ``f(images, generator)``; the same generator is passed along."""

    def __init__(self, transforms: Sequence[BatchTransform]):
        self.transforms = list(transforms)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
        for t in self.transforms:
            images = t(images, generator)
        return images

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class _RandomCrop:
    def __init__(self, size: int | Sequence[int], padding: int):
        self.size, self.padding = size, padding

    def __call__(self, images: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
        return random_crop(images, self.size, self.padding, generator)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class _RandomHFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, images: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
        return random_hflip(images, generator, self.p)

    def __repr__(self) -> str:
        return f"RandomHFlip(p={self.p})"


class _GaussianNoise:
    def __init__(self, std: float):
        self.std = float(std)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | SampleGenerators | None = None) -> torch.Tensor:
        x = x if x.is_floating_point() else x.float()
        noise = _randn(generator, x.shape, "gaussian_noise")
        return x + self.std * noise.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


def gaussian_noise(std: float) -> BatchTransform:
    """Batch transform adding iid N(0, std^2) noise (e.g. for MNIST-1D; off unless asked for)."""
    if std < 0:
        raise InputError(f"gaussian_noise: std must be >= 0, got {std}")
    return _GaussianNoise(std)


def cifar_train_transform(
    mean: Sequence[float] = CIFAR100_MEAN,
    std: Sequence[float] = CIFAR100_STD,
    size: int = 32,
    padding: int = 4,
    flip: bool = True,
) -> Compose:
    """Standard CIFAR training pipeline: random crop (pad 4) + horizontal flip + normalize."""
    ts: list[BatchTransform] = [_RandomCrop(size, padding)]
    if flip:
        ts.append(_RandomHFlip())
    ts.append(Normalize(mean, std))
    return Compose(ts)


def cifar_test_transform(
    mean: Sequence[float] = CIFAR100_MEAN, std: Sequence[float] = CIFAR100_STD
) -> Compose:
    """CIFAR evaluation pipeline: normalize only."""
    return Compose([Normalize(mean, std)])
