"""Deterministic, resumable, DDP-aware batch iteration.

Determinism contract (what makes exact resumption possible):

* The permutation of an epoch depends only on ``(seed, epoch)``
  (:func:`epoch_permutation`), never on global RNG state or on earlier epochs.
* Distributed ranks take disjoint, interleaved shards of that same permutation,
  exactly like ``torch.utils.data.DistributedSampler``: the index list is padded
  (by wrapping around) to a multiple of ``world_size`` -- or truncated when
  ``drop_last`` -- and rank ``r`` takes positions ``r, r + world_size, ...``
  (:func:`shard_indices`). All ranks thus see the same number of batches.
* Augmentation randomness of a sample comes from its own generator, seeded from
  ``(seed, epoch, sample index)`` (:func:`sample_seeds`, the sample index being its
  index in the dataset), so it depends neither on the batch size nor on the rank
  split: skipping the first ``k`` batches (:meth:`BatchLoader.iter_from`) reproduces
  batches ``k, k+1, ...`` bit for bit, and N processes x B samples per batch draw
  exactly what 1 process x N*B draws (image folders do the same per sample).

:class:`BatchLoader` serves in-memory tensors (CIFAR, MNIST-1D) with vectorised
batch augmentation; :class:`ShardSampler` gives the same index order to a regular
``torch.utils.data.DataLoader`` (used for image folders).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from locakd.data.augment import SampleGenerators
from locakd.errors import ConfigError, InputError

__all__ = [
    "BatchLoader",
    "ShardSampler",
    "TensorImageDataset",
    "derive_seed",
    "epoch_permutation",
    "make_loader",
    "sample_seeds",
    "shard_indices",
]

# stream tags keep the permutation and augmentation seeds independent
_PERM_STREAM = 0x5045524D  # "PERM"
_AUG_STREAM = 0x41554720  # "AUG "
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def derive_seed(*values: int) -> int:
    """Mix integers into a 63-bit seed (numpy SeedSequence; no collisions like seed + epoch)."""
    entropy = [int(v) & _MASK64 for v in values]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 32) | int(state[1])) & ((1 << 63) - 1)


def _splitmix64(x: int) -> int:
    """The SplitMix64 output function: a bijective 64-bit mix (Steele et al. 2014)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def sample_seeds(seed: int, epoch: int, indices: torch.Tensor | list[int]) -> list[int]:
    """The augmentation seed of each sample index in ``epoch``: a function of (seed, epoch, index) only.

    One SeedSequence mix per (seed, epoch), then SplitMix64 over the index (a counter-based stream:
    distinct indices give distinct, well-mixed 63-bit seeds, cheaply).
    """
    base = derive_seed(_AUG_STREAM, seed, epoch)
    values = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return [_splitmix64((base + (int(i) + 1) * _GOLDEN64) & _MASK64) >> 1 for i in values]


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The (CPU, int64) permutation of ``range(n)`` for ``epoch``; depends only on (seed, epoch)."""
    g = torch.Generator()
    g.manual_seed(derive_seed(_PERM_STREAM, seed, epoch))
    return torch.randperm(n, generator=g)


def _check_dist(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, {world_size - 1}], got {rank}")


def shard_indices(
    n: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> torch.Tensor:
    """Indices of the samples that ``rank`` visits in ``epoch``, in order.

    ``drop_last=False`` pads the epoch's order by wrapping around to a multiple of
    ``world_size`` (some samples appear twice across ranks, every sample at least
    once); ``drop_last=True`` truncates it instead. Each rank gets
    ``ceil(n / world_size)`` (resp. ``floor``) indices.
    """
    _check_dist(rank, world_size)
    order = epoch_permutation(n, seed, epoch) if shuffle else torch.arange(n)
    if drop_last:
        total = (n // world_size) * world_size
        order = order[:total]
    else:
        total = math.ceil(n / world_size) * world_size
        if total > n:
            reps = math.ceil(total / n)
            order = order.repeat(reps)[:total]
    return order[rank:total:world_size]


class TensorImageDataset(Dataset):
    """In-memory dataset of ``images`` ``[N, ...]`` and integer ``labels`` ``[N]``.

    ``transform`` (optional, ``f(image) -> tensor``) is applied per sample in
    ``__getitem__`` for use with a plain ``DataLoader``. :class:`BatchLoader`
    ignores it and applies its own batched ``augment`` to the raw tensors instead.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise InputError("TensorImageDataset needs torch tensors for images and labels")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise InputError(
                f"labels must have shape [{images.shape[0]}] to match images {list(images.shape)}, "
                f"got {list(labels.shape)}"
            )
        if labels.is_floating_point():
            raise InputError(f"labels must be integers, got {labels.dtype}")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"dtype={self.images.dtype})"
        )


class BatchLoader:
    """Deterministic batch iterator over in-memory tensors with batched augmentation.

    Yields ``(inputs, labels)``: ``inputs = augment(images[idx], generators)`` with one
    generator per sample (:meth:`sample_generators`; the raw slice when ``augment`` is
    None), ``labels`` int64. With ``device`` set, the raw
    (e.g. uint8) slice is moved there first so that augmentation runs on the device.

    Call :meth:`set_epoch` before each epoch (or pass ``epoch``); use
    :meth:`iter_from` to resume in the middle of an epoch. ``len(loader)`` is the
    number of batches per rank (equal on all ranks).
    """

    def __init__(
        self,
        dataset: TensorImageDataset | tuple[torch.Tensor, torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        augment: Callable[[torch.Tensor, SampleGenerators], torch.Tensor] | None = None,
        device: str | torch.device | None = None,
    ):
        if isinstance(dataset, tuple):
            dataset = TensorImageDataset(*dataset)
        if not isinstance(dataset, TensorImageDataset):
            raise InputError(
                f"BatchLoader needs a TensorImageDataset or an (images, labels) tuple, got {type(dataset).__name__}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        _check_dist(rank, world_size)
        if len(dataset) == 0:
            raise InputError("BatchLoader got an empty dataset")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.augment = augment
        self.device = torch.device(device) if device is not None else None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation/augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in visiting order."""
        return shard_indices(
            len(self.dataset),
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        )

    @property
    def num_samples(self) -> int:
        """Samples per rank per epoch (after padding/truncation to a multiple of world_size)."""
        n, w = len(self.dataset), self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def sample_generators(self, indices: torch.Tensor) -> SampleGenerators:
        """One augmentation generator per sample index, for the current epoch (see :func:`sample_seeds`)."""
        return SampleGenerators.from_seeds(sample_seeds(self.seed, self.epoch, indices))

    def iter_from(self, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch starting at batch ``start_batch`` (for mid-epoch resume)."""
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0, got {start_batch}")
        idx = self.indices()
        images, labels = self.dataset.images, self.dataset.labels
        for b in range(start_batch, len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            x, y = images[sel], labels[sel]
            if self.device is not None:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x, self.sample_generators(sel))
            yield x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, epoch={self.epoch}, rank={self.rank}/{self.world_size}, "
            f"drop_last={self.drop_last}, augment={self.augment!r})"
        )


def make_loader(
    dataset: TensorImageDataset | tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    augment: Callable[[torch.Tensor, SampleGenerators], torch.Tensor] | None = None,
    device: str | torch.device | None = None,
) -> BatchLoader:
    """Functional constructor for :class:`BatchLoader` (same arguments)."""
    return BatchLoader(
        dataset,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        augment=augment,
        device=device,
    )


class ShardSampler(Sampler[int]):
    """``Sampler`` yielding :func:`shard_indices` (DistributedSampler semantics, derived seeds).

    Works without an initialised process group (rank/world_size are explicit).
    ``start_index`` skips the first indices of the shard, for mid-epoch resume
    (use ``start_batch * batch_size``).
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        start_index: int = 0,
    ):
        _check_dist(rank, world_size)
        self.n = int(n)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), int(epoch)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.start_index = int(start_index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        return shard_indices(
            self.n,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
        )[self.start_index :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices().tolist())

    def __len__(self) -> int:
        per_rank = self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)
        return max(per_rank - self.start_index, 0)
