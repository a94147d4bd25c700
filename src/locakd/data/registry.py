"""One entry point for the trainer: ``build_dataset(name, root, split, download, **kw)``.

It returns a :class:`DatasetSpec` holding the train/test data, the number of
classes, the input shape and the transforms, plus :meth:`DatasetSpec.loader`,
which builds the right deterministic, DDP-aware loader for a split::

    spec = build_dataset("cifar100", root="data", download=True)
    train = spec.loader("train", batch_size=128, seed=0, rank=rank, world_size=world)
    for epoch in range(start_epoch, epochs):
        train.set_epoch(epoch)
        for images, labels in train.iter_from(start_batch if epoch == start_epoch else 0):
            ...

Available names: ``cifar100``, ``cifar10`` (in-memory uint8 tensors, batched GPU-
friendly augmentation), ``imagefolder`` (ImageNet layout, per-sample PIL
transforms inside the dataset, DataLoader workers) and ``mnist1d`` (generated
locally, float32 ``[N, 40]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from locakd.data.augment import (
    BatchTransform,
    cifar_test_transform,
    cifar_train_transform,
    gaussian_noise,
)
from locakd.data.loader import BatchLoader, TensorImageDataset
from locakd.errors import ConfigError

__all__ = ["DATASETS", "DatasetSpec", "available_datasets", "build_dataset"]

_SPLITS = {
    None: ("train", "test"),
    "both": ("train", "test"),
    "all": ("train", "test"),
    "train": ("train",),
    "test": ("test",),
    "val": ("test",),
}


@dataclass
class DatasetSpec:
    """Everything the trainer needs to know about a dataset.

    Attributes:
        name: registry name.
        num_classes: number of labels (labels are ``0 .. num_classes - 1``).
        input_shape: shape of one model input after transforms, e.g. ``(3, 32, 32)`` or ``(40,)``.
        train, test: the data (None when that split was not requested). For in-memory
            datasets a :class:`TensorImageDataset` (raw tensors, e.g. uint8 images); for
            ``imagefolder`` an :class:`~locakd.data.folder.ImageFolderDataset` whose
            per-sample transform is already set.
        train_transform, test_transform: batch transforms ``f(x, generator)`` applied by
            :class:`BatchLoader` (None = use raw tensors; always None for ``imagefolder``).
        in_memory: True for tensor datasets (BatchLoader), False for folder datasets.
        classes: class names when known.
        mean, std: normalisation constants used by the transforms (None when not applicable).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    train: Any = None
    test: Any = None
    train_transform: BatchTransform | None = None
    test_transform: BatchTransform | None = None
    in_memory: bool = True
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str) -> Any:
        """The data of ``split`` (``"train"`` or ``"test"``/``"val"``); ConfigError if not loaded."""
        key = _split_key(split)
        data = self.train if key == "train" else self.test
        if data is None:
            raise ConfigError(f"dataset {self.name!r} was built without its {key!r} split")
        return data

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        augment: bool = True,
        device: str | torch.device | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        """A deterministic, DDP-sharded loader for ``split``.

        ``shuffle`` defaults to True for train, False for test. ``augment=False`` uses the
        test transform on the training set (e.g. to measure train accuracy). In-memory
        datasets give a :class:`BatchLoader` (``device`` moves raw batches before the
        transform); ``imagefolder`` gives a :class:`~locakd.data.folder.FolderLoader`
        (``num_workers``/``pin_memory`` apply). Both have ``set_epoch``, ``iter_from`` and ``len``.
        """
        key = _split_key(split)
        data = self.dataset(key)
        if shuffle is None:
            shuffle = key == "train"
        if self.in_memory:
            transform = self.train_transform if key == "train" and augment else self.test_transform
            return BatchLoader(
                data,
                batch_size,
                shuffle=shuffle,
                seed=seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                drop_last=drop_last,
                augment=transform,
                device=device,
            )
        from locakd.data.folder import EvalTransform, FolderLoader, ImageFolderDataset

        if key == "train" and not augment and isinstance(data, ImageFolderDataset):
            data = _with_transform(
                data,
                EvalTransform(
                    size=self.input_shape[-1],
                    resize=self.extra.get("resize", 256),
                    mean=self.mean,
                    std=self.std,
                ),
            )
        return FolderLoader(
            data,
            batch_size,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )


def _with_transform(ds: Any, transform: Any) -> Any:
    import copy

    clone = copy.copy(ds)
    clone.transform = transform
    return clone


def _split_key(split: str) -> str:
    if split == "train":
        return "train"
    if split in ("test", "val"):
        return "test"
    raise ConfigError(f"split must be 'train', 'test' or 'val', got {split!r}")


def _splits(split: str | None) -> tuple[str, ...]:
    if split not in _SPLITS:
        raise ConfigError(f"split must be one of 'train', 'test', 'val' or None (both), got {split!r}")
    return _SPLITS[split]


def _check_kwargs(name: str, kw: dict, allowed: set[str]) -> None:
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for dataset {name!r}; accepted: {sorted(allowed)}")


def _need_root(name: str, root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise ConfigError(f"dataset {name!r} needs a data root (data.root in the config)")
    return Path(root).expanduser()


def _build_cifar(name: str, root, splits, download: bool, **kw) -> DatasetSpec:
    from locakd.data.cifar import CIFAR_INFO, load_cifar, load_cifar_classes

    _check_kwargs(name, kw, {"verify", "progress", "augment", "crop_padding", "flip"})
    info = CIFAR_INFO[name]
    root = _need_root(name, root)
    data = {}
    for s in splits:
        images, labels = load_cifar(
            name, root, s, download=download, verify=kw.get("verify", True), progress=kw.get("progress", True)
        )
        data[s] = TensorImageDataset(images, labels)
    test_tf = cifar_test_transform(info.mean, info.std)
    if kw.get("augment", True):
        train_tf = cifar_train_transform(
            info.mean, info.std, padding=kw.get("crop_padding", 4), flip=kw.get("flip", True)
        )
    else:
        train_tf = test_tf
    return DatasetSpec(
        name=name,
        num_classes=info.num_classes,
        input_shape=(3, 32, 32),
        train=data.get("train"),
        test=data.get("test"),
        train_transform=train_tf,
        test_transform=test_tf,
        in_memory=True,
        classes=load_cifar_classes(name, root),
        mean=info.mean,
        std=info.std,
    )


def _build_imagefolder(name: str, root, splits, download: bool, **kw) -> DatasetSpec:
    from locakd.data.augment import IMAGENET_MEAN, IMAGENET_STD
    from locakd.data.folder import EvalTransform, ImageFolderDataset, TrainTransform, find_classes

    _check_kwargs(name, kw, {"image_size", "resize", "scale", "test_split", "mean", "std", "classes"})
    if download:
        raise ConfigError(
            "dataset 'imagefolder' cannot be downloaded; set download: false and point "
            "data.root at a folder with train/<class>/ and val/<class>/"
        )
    root = _need_root(name, root)
    size, resize = int(kw.get("image_size", 224)), int(kw.get("resize", 256))
    mean, std = tuple(kw.get("mean", IMAGENET_MEAN)), tuple(kw.get("std", IMAGENET_STD))
    test_split = kw.get("test_split", "val")
    classes = kw.get("classes")
    if classes is None:
        train_dir = root / "train"
        classes = find_classes(train_dir if ("train" in splits or train_dir.exists()) else root / test_split)
    classes = list(classes)
    train = test = None
    if "train" in splits:
        train = ImageFolderDataset(
            root,
            "train",
            TrainTransform(size, scale=tuple(kw.get("scale", (0.08, 1.0))), mean=mean, std=std),
            classes=classes,
        )
    if "test" in splits:
        test = ImageFolderDataset(
            root, test_split, EvalTransform(size, resize, mean=mean, std=std), classes=classes
        )
    return DatasetSpec(
        name=name,
        num_classes=len(classes),
        input_shape=(3, size, size),
        train=train,
        test=test,
        in_memory=False,
        classes=classes,
        mean=mean,
        std=std,
        extra={"resize": resize, "root": str(root)},
    )


def _build_mnist1d(name: str, root, splits, download: bool, **kw) -> DatasetSpec:
    from locakd.data.mnist1d import load_mnist1d

    generator_keys = {
        "template_len",
        "padding",
        "scale_coeff",
        "max_translation",
        "corr_noise_scale",
        "iid_noise_scale",
        "shear_scale",
        "shuffle_seq",
        "final_seq_length",
    }
    _check_kwargs(name, kw, {"num_samples", "seed", "train_split", "cache_dir", "noise_std"} | generator_keys)
    cache_dir = kw.get("cache_dir", root)
    gen = {k: v for k, v in kw.items() if k in generator_keys}
    d = load_mnist1d(
        num_samples=kw.get("num_samples", 5000),
        seed=kw.get("seed", 42),
        train_split=kw.get("train_split", 0.8),
        cache_dir=cache_dir,
        **gen,
    )
    train = TensorImageDataset(torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"]))
    test = TensorImageDataset(torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"]))
    noise = float(kw.get("noise_std", 0.0))
    return DatasetSpec(
        name=name,
        num_classes=10,
        input_shape=(int(d["x_train"].shape[1]),),
        train=train if "train" in splits else None,
        test=test if "test" in splits else None,
        train_transform=gaussian_noise(noise) if noise > 0 else None,
        test_transform=None,
        in_memory=True,
        classes=[str(i) for i in range(10)],
    )


DATASETS: dict[str, Callable[..., DatasetSpec]] = {
    "cifar100": _build_cifar,
    "cifar10": _build_cifar,
    "imagefolder": _build_imagefolder,
    "mnist1d": _build_mnist1d,
}


def available_datasets() -> list[str]:
    """Sorted registry names accepted by :func:`build_dataset`."""
    return sorted(DATASETS)


def build_dataset(
    name: str, root: str | Path | None = None, split: str | None = None, download: bool = False, **kw: Any
) -> DatasetSpec:
    """Build a :class:`DatasetSpec`.

    Args:
        name: one of :func:`available_datasets` (case-insensitive; ``cifar-100`` etc. accepted).
        root: data folder. CIFAR: holds the archive / extracted folder. imagefolder: holds
            ``train/`` and ``val/``. mnist1d: optional ``.npz`` cache folder.
        split: ``None`` (both), ``"train"``, or ``"test"``/``"val"``; unrequested splits are None.
        download: CIFAR only -- fetch the official archive when missing.
        **kw: dataset options.
            cifar: ``verify`` (md5, True), ``progress`` (True), ``augment`` (True: crop+flip),
            ``crop_padding`` (4), ``flip`` (True).
            imagefolder: ``image_size`` (224), ``resize`` (256), ``scale`` ((0.08, 1)),
            ``test_split`` ("val"), ``mean``/``std`` (ImageNet), ``classes`` (from train/).
            mnist1d: ``num_samples`` (5000), ``seed`` (42), ``train_split`` (0.8), ``cache_dir``
            (default ``root``), ``noise_std`` (0: no train augmentation), and mnist1d generator args.

    Raises:
        ConfigError: unknown name (listing the available ones), split or option.
        DataError: missing or corrupt data.
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return DATASETS[key](key, root, _splits(split), bool(download), **kw)
