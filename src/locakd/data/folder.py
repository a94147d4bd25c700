"""ImageNet-style image folders: ``root/<split>/<class>/<image>``.

* Classes are the sorted sub-folder names of ``root/train`` (the label of a class
  is its position in that list); other splits must not introduce new classes.
* Images are decoded with Pillow (imported lazily, only when an image is read or
  a transform is built), converted to RGB.
* Transforms are implemented with PIL + torch, matching torchvision's defaults:
  train = RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) +
  horizontal flip; eval = Resize(256, shorter side) + CenterCrop(224); both then
  convert to float in [0, 1] and normalise with the ImageNet mean/std.
* Random transforms take an explicit generator; :class:`ImageFolderDataset`
  seeds it from ``(seed, epoch, index)``, so results do not depend on the number
  of DataLoader workers and a resumed run reproduces exactly.

The official ImageNet validation set ships as a flat folder; it must be
reorganised into ``val/<wnid>/`` sub-folders first (the usual ``valprep.sh``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from locakd.data.augment import IMAGENET_MEAN, IMAGENET_STD
from locakd.data.loader import ShardSampler, derive_seed
from locakd.errors import ConfigError, DataError

__all__ = [
    "IMG_EXTENSIONS",
    "EvalTransform",
    "FolderLoader",
    "ImageFolderDataset",
    "TrainTransform",
    "find_classes",
    "make_samples",
    "pil_to_tensor",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jpe")
_FOLDER_AUG_STREAM = 0x464F4C44  # "FOLD"

PilTransform = Callable[[Any, "torch.Generator | None"], torch.Tensor]


def _pil_image():
    """Import ``PIL.Image`` lazily with an actionable error."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading image folders needs Pillow, which is not installed: `pip install pillow` "
            "(CIFAR and MNIST-1D do not need it)"
        ) from e
    return Image


def _list_class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def find_classes(split_dir: str | Path) -> list[str]:
    """Sorted class sub-folder names of ``split_dir`` (DataError when missing or empty)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DataError(
            f"image folder not found: {split_dir} does not exist or is not a directory "
            f"(expected layout root/train/<class>/<image>, root/val/<class>/<image>)"
        )
    classes = _list_class_dirs(split_dir)
    if not classes:
        loose = any(p.suffix.lower() in IMG_EXTENSIONS for p in split_dir.iterdir() if p.is_file())
        hint = (
            (
                " It holds images directly: sort them into one sub-folder per class "
                "(for the official ImageNet val set use the usual valprep script)."
            )
            if loose
            else ""
        )
        raise DataError(f"image folder {split_dir} has no class sub-folders.{hint}")
    return classes


def _images_in(class_dir: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMG_EXTENSIONS:
                out.append(Path(dirpath) / f)
    return out


def make_samples(
    split_dir: str | Path, classes: Sequence[str], *, allow_empty_classes: bool = False
) -> list[tuple[Path, int]]:
    """``(path, label)`` pairs for every image under ``split_dir/<class>/``.

    Raises DataError when ``split_dir`` has a class not in ``classes``, when a class
    folder is empty (unless ``allow_empty_classes``) or when no image is found.
    """
    split_dir = Path(split_dir)
    present = find_classes(split_dir)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in present if c not in index]
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise DataError(f"{split_dir} has class folder(s) not present in the training classes: {shown}")
    samples: list[tuple[Path, int]] = []
    for c in present:
        files = _images_in(split_dir / c)
        if not files and not allow_empty_classes:
            raise DataError(
                f"class folder {split_dir / c} contains no images (extensions {', '.join(IMG_EXTENSIONS)})"
            )
        samples.extend((p, index[c]) for p in files)
    if not samples:
        raise DataError(
            f"image folder {split_dir} contains no images (extensions {', '.join(IMG_EXTENSIONS)})"
        )
    return samples


def pil_to_tensor(
    img: Any, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD
) -> torch.Tensor:
    """RGB PIL image -> float32 ``[3, H, W]`` in [0, 1], normalised when mean/std are given."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)  # HWC copy (writable)
    x = torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)
    if mean is not None and std is not None:
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        x = (x - m) / s
    return x


def _uniform(g: torch.Generator | None, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


class TrainTransform:
    """RandomResizedCrop(size) + random horizontal flip + to tensor + normalise (torchvision semantics)."""

    def __init__(
        self,
        size: int = 224,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
            raise ConfigError(f"bad RandomResizedCrop scale {scale} / ratio {ratio}")
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), bool(flip)
        self.mean, self.std = tuple(mean), tuple(std)
        _pil_image()

    def crop_box(self, width: int, height: int, g: torch.Generator | None) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the random crop (torchvision's 10-attempt algorithm)."""
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.scale)
            aspect = math.exp(_uniform(g, *log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=g))
                left = int(torch.randint(0, width - w + 1, (), generator=g))
                return top, left, h, w
        in_ratio = width / height  # fallback: central crop
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        Image = _pil_image()
        img = img.convert("RGB")
        top, left, h, w = self.crop_box(img.width, img.height, generator)
        img = img.resize(
            (self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
        )
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img, self.mean, self.std)

    def __repr__(self) -> str:
        return f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class EvalTransform:
    """Resize(shorter side = resize) + CenterCrop(size) + to tensor + normalise."""

    def __init__(
        self,
        size: int = 224,
        resize: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.size, self.resize = int(size), int(resize)
        self.mean, self.std = tuple(mean), tuple(std)
        _pil_image()

    def __call__(self, img: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        Image = _pil_image()
        img = img.convert("RGB")
        w, h = img.size
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))  # zero-fills if too small
        return pil_to_tensor(img, self.mean, self.std)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resize={self.resize})"


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/<image>`` as a Dataset of ``(float tensor [3, H, W], label)``.

    Args:
        root: folder holding ``train/`` (and ``val/``).
        split: sub-folder name, e.g. ``"train"`` or ``"val"``.
        transform: ``f(pil_image, generator) -> tensor``; ``"default"`` picks
            :class:`TrainTransform` for ``split == "train"`` and :class:`EvalTransform` otherwise;
            None returns the un-normalised full-size image as float [0, 1].
        classes: explicit class list; by default the sorted folders of ``root/train``
            (or of the split itself when ``root/train`` does not exist).
        seed, epoch: seed the per-sample augmentation generator with ``(seed, epoch, index)``;
            :class:`FolderLoader` keeps them in sync with its own.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: PilTransform | str | None = "default",
        classes: Sequence[str] | None = None,
        seed: int = 0,
        epoch: int = 0,
    ):
        self.root = Path(root).expanduser()
        self.split = split
        split_dir = self.root / split
        if classes is None:
            train_dir = self.root / "train"
            classes = find_classes(train_dir if train_dir.is_dir() else split_dir)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = make_samples(split_dir, self.classes, allow_empty_classes=split != "train")
        self.targets = [y for _, y in self.samples]
        if isinstance(transform, str):
            if transform != "default":
                raise ConfigError(f"transform must be a callable, None or 'default', got {transform!r}")
            transform = TrainTransform() if split == "train" else EvalTransform()
        self.transform = transform
        self.seed, self.epoch = int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> Any:
        """Decode sample ``i`` as an RGB PIL image (DataError naming the file when corrupt)."""
        Image = _pil_image()
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.load_image(i)
        if self.transform is None:
            return pil_to_tensor(img, None, None), self.samples[i][1]
        g = torch.Generator()
        g.manual_seed(derive_seed(_FOLDER_AUG_STREAM, self.seed, self.epoch, i))
        return self.transform(img, g), self.samples[i][1]

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, transform={self.transform!r})"
        )


class FolderLoader:
    """DataLoader wrapper for :class:`ImageFolderDataset` with the :class:`BatchLoader` interface.

    Index order comes from :class:`ShardSampler` (deterministic in ``(seed, epoch)``,
    disjoint DDP shards); augmentation from ``(seed, epoch, index)``. A fresh
    ``DataLoader`` is built per iteration so epoch changes reach the workers.
    """

    def __init__(
        self,
        dataset: ImageFolderDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        **dataloader_kwargs: Any,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.dataloader_kwargs = dataloader_kwargs
        ShardSampler(len(dataset), rank=self.rank, world_size=self.world_size)  # validates rank/world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        n, w = len(self.dataset), self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch starting at batch ``start_batch``."""
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
        self.dataset.seed, self.dataset.epoch = self.seed, self.epoch
        sampler = ShardSampler(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
            start_index=start_batch * self.batch_size,
        )
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=self.drop_last,
            **self.dataloader_kwargs,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)
