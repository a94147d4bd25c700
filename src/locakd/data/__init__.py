"""Image-classification data layer: CIFAR, ImageNet-style folders, MNIST-1D.

Pure torch + numpy (Pillow only for image folders, ``mnist1d`` only for MNIST-1D;
both imported lazily). Entry point for the trainer: :func:`build_dataset`.
"""

from locakd.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    SampleGenerators,
    cifar_test_transform,
    cifar_train_transform,
    gaussian_noise,
    normalize,
    random_crop,
    random_hflip,
    to_float,
)
from locakd.data.cifar import CIFAR_INFO, download_url, file_md5, load_cifar, load_cifar_classes
from locakd.data.folder import EvalTransform, FolderLoader, ImageFolderDataset, TrainTransform
from locakd.data.loader import (
    BatchLoader,
    ShardSampler,
    TensorImageDataset,
    derive_seed,
    epoch_permutation,
    make_loader,
    sample_seeds,
    shard_indices,
)
from locakd.data.mnist1d import load_mnist1d
from locakd.data.registry import DatasetSpec, available_datasets, build_dataset

__all__ = [
    "BatchLoader",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_INFO",
    "Compose",
    "DatasetSpec",
    "EvalTransform",
    "FolderLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataset",
    "Normalize",
    "SampleGenerators",
    "ShardSampler",
    "TensorImageDataset",
    "TrainTransform",
    "available_datasets",
    "build_dataset",
    "cifar_test_transform",
    "cifar_train_transform",
    "derive_seed",
    "download_url",
    "epoch_permutation",
    "file_md5",
    "gaussian_noise",
    "load_cifar",
    "load_cifar_classes",
    "load_mnist1d",
    "make_loader",
    "normalize",
    "random_crop",
    "random_hflip",
    "sample_seeds",
    "shard_indices",
    "to_float",
]
