"""Deterministic, resumable, sharded batch iteration."""

import pytest
import torch

from locakd.data import (
    ShardSampler,
    TensorImageDataset,
    cifar_train_transform,
    epoch_permutation,
    gaussian_noise,
    make_loader,
    sample_seeds,
    shard_indices,
)
from locakd.errors import ConfigError


def _dataset(n=103):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return TensorImageDataset(images, torch.arange(n) % 10)


def _order(loader):
    return torch.cat([x[:, 0, 0, 0] for x, _ in loader]).long()


def test_same_seed_epoch_same_order_and_epoch_changes_it():
    ds = _dataset()
    a = _order(make_loader(ds, 16, shuffle=True, seed=3, epoch=0))
    b = _order(make_loader(ds, 16, shuffle=True, seed=3, epoch=0))
    c = _order(make_loader(ds, 16, shuffle=True, seed=3, epoch=1))
    d = _order(make_loader(ds, 16, shuffle=True, seed=4, epoch=0))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert sorted(a.tolist()) == list(range(103))
    # seed/epoch are mixed, not added: (0, 1) and (1, 0) differ
    assert not torch.equal(epoch_permutation(50, 0, 1), epoch_permutation(50, 1, 0))


def test_set_epoch_matches_constructor_epoch():
    ds = _dataset()
    loader = make_loader(ds, 10, seed=5)
    loader.set_epoch(2)
    assert torch.equal(_order(loader), _order(make_loader(ds, 10, seed=5, epoch=2)))


def test_unshuffled_order_and_lengths():
    ds = _dataset(25)
    loader = make_loader(ds, 10, shuffle=False)
    assert len(loader) == 3 and _order(loader).tolist() == list(range(25))
    assert len(make_loader(ds, 10, shuffle=False, drop_last=True)) == 2
    sizes = [len(y) for _, y in make_loader(ds, 10, shuffle=False)]
    assert sizes == [10, 10, 5]


@pytest.mark.parametrize("n,world", [(103, 2), (100, 4), (7, 3)])
def test_ranks_get_disjoint_covering_shards(n, world):
    ds = _dataset(n)
    shards = [_order(make_loader(ds, 8, seed=1, epoch=2, rank=r, world_size=world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal length -> same number of steps on every rank
    allidx = torch.cat(shards).tolist()
    assert set(allidx) == set(range(n))
    pad = len(allidx) - n
    assert 0 <= pad < world  # only DistributedSampler-style padding duplicates
    # disjoint positions of the same permutation
    perm = epoch_permutation(n, 1, 2).tolist()
    padded = (perm * 2)[: len(allidx)]
    for r, s in enumerate(shards):
        assert s.tolist() == padded[r::world]
    if pad == 0:
        assert len(set(allidx)) == n


def test_drop_last_truncates_shards():
    shards = [
        shard_indices(103, shuffle=True, seed=0, epoch=0, rank=r, world_size=2, drop_last=True)
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_augmentation_reproducible_and_resumable():
    ds = TensorImageDataset(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.arange(40) % 10)
    tf = cifar_train_transform()
    full = list(make_loader(ds, 8, seed=9, epoch=3, augment=tf))
    again = list(make_loader(ds, 8, seed=9, epoch=3, augment=tf))
    for (x1, y1), (x2, y2) in zip(full, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    resumed = list(make_loader(ds, 8, seed=9, epoch=3, augment=tf).iter_from(2))
    assert len(resumed) == len(full) - 2
    for (x1, y1), (x2, y2) in zip(full[2:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = list(make_loader(ds, 8, seed=9, epoch=4, augment=tf))
    assert not torch.equal(full[0][0], other_epoch[0][0])
    # every sample draws its own stream: two samples of one batch are cropped/flipped independently
    seeds = sample_seeds(9, 3, range(40))
    assert len(set(seeds)) == 40 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seeds(9, 3, [5]) == [seeds[5]] and sample_seeds(9, 4, [5]) != [seeds[5]]


def _augmented_by_index(loaders):
    """{dataset index: augmented input} over the batches of every loader (e.g. every rank)."""
    out = {}
    for loader in loaders:
        order = loader.indices().tolist()
        seen = 0
        for x, _ in loader:
            for row in x:
                out.setdefault(order[seen], row)
                seen += 1
    return out


@pytest.mark.parametrize("kind", ["cifar", "noise"])
def test_augmentation_is_a_function_of_seed_epoch_and_sample(kind):
    """1 process x 32 and 2 processes x 16 (and other batch sizes) augment every sample identically."""
    if kind == "cifar":
        images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        tf = cifar_train_transform()
    else:
        images = torch.randn(64, 40, generator=torch.Generator().manual_seed(0))
        tf = gaussian_noise(0.3)
    ds = TensorImageDataset(images, torch.arange(64) % 10)
    single = _augmented_by_index([make_loader(ds, 32, seed=4, epoch=2, augment=tf)])
    split = _augmented_by_index([make_loader(ds, 16, seed=4, epoch=2, rank=r, world_size=2, augment=tf) for r in (0, 1)])
    odd = _augmented_by_index([make_loader(ds, 5, seed=4, epoch=2, augment=tf)])
    assert sorted(single) == sorted(split) == sorted(odd) == list(range(64))
    for i in range(64):
        assert torch.equal(single[i], split[i]) and torch.equal(single[i], odd[i]), i
    # the augmentation did something, and differs between samples and epochs
    raw = tf.transforms[-1](images) if kind == "cifar" else images
    assert sum(not torch.equal(single[i], raw[i]) for i in range(64)) > 32
    other = _augmented_by_index([make_loader(ds, 32, seed=4, epoch=3, augment=tf)])
    assert sum(not torch.equal(single[i], other[i]) for i in range(64)) > 32


def test_shard_sampler_matches_batch_loader():
    ds = _dataset(50)
    for r in range(3):
        bl = _order(make_loader(ds, 4, seed=2, epoch=1, rank=r, world_size=3))
        sampler = ShardSampler(50, seed=2, epoch=1, rank=r, world_size=3)
        assert list(sampler) == bl.tolist() and len(sampler) == len(bl)
        skipped = ShardSampler(50, seed=2, epoch=1, rank=r, world_size=3, start_index=8)
        assert list(skipped) == bl.tolist()[8:] and len(skipped) == len(bl) - 8


def test_bad_arguments():
    ds = _dataset(10)
    with pytest.raises(ConfigError):
        make_loader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        make_loader(ds, 0)
    with pytest.raises(ValueError):
        TensorImageDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))


def test_tuple_input_and_getitem_transform():
    x, y = torch.zeros(6, 3, 2, 2), torch.arange(6)
    loader = make_loader((x, y), 4, shuffle=False)
    assert [len(b[1]) for b in loader] == [4, 2]
    ds = TensorImageDataset(x, y, transform=lambda t: t + 1)
    img, label = ds[3]
    assert label == 3 and torch.equal(img, torch.ones(3, 2, 2))
