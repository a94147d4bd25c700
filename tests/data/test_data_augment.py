"""Batched augmentation ops."""

import pytest
import torch
import torch.nn.functional as F

from locakd.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    SampleGenerators,
    cifar_train_transform,
    gaussian_noise,
    normalize,
    random_crop,
    random_hflip,
)
from locakd.errors import InputError


def _batch(n=8, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_crop_shape_dtype_and_windows():
    x = _batch(6)
    out = random_crop(x, 32, 4, _gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.is_contiguous()
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):  # every crop is some 32x32 window of the padded image
        assert any(
            torch.equal(out[i], padded[i, :, a : a + 32, b : b + 32]) for a in range(9) for b in range(9)
        )


def test_crop_non_square_and_smaller_size():
    x = _batch(4, h=10, w=12).float()
    out = random_crop(x, (6, 8), padding=0, generator=_gen(3))
    assert out.shape == (4, 3, 6, 8) and out.dtype == torch.float32


def test_crop_no_padding_full_size_is_identity():
    x = _batch(3)
    assert torch.equal(random_crop(x, 32, 0, _gen(0)), x)


def test_crop_determinism_and_seed_dependence():
    x = _batch(16)
    a = random_crop(x, 32, 4, _gen(1))
    b = random_crop(x, 32, 4, _gen(1))
    c = random_crop(x, 32, 4, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_crop_rejects_bad_input():
    with pytest.raises(InputError):
        random_crop(torch.zeros(3, 32, 32), 32, 4)
    with pytest.raises(InputError):
        random_crop(_batch(2), 48, 4)


def test_hflip_flips_selected_samples():
    x = _batch(64)
    out = random_hflip(x, _gen(0))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54
    assert torch.equal(random_hflip(x, _gen(0), p=1.0), x.flip(-1))
    assert torch.equal(random_hflip(x, _gen(0), p=0.0), x)
    assert torch.equal(out, random_hflip(x, _gen(0)))


def test_normalize_values():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x, CIFAR100_MEAN, CIFAR100_STD)
    assert out.dtype == torch.float32
    expect = (1 - torch.tensor(CIFAR100_MEAN)) / torch.tensor(CIFAR100_STD)
    assert torch.allclose(out[0, :, 0, 0], expect)
    assert torch.allclose(normalize(x.float() / 255, CIFAR100_MEAN, CIFAR100_STD), out)
    with pytest.raises(InputError):
        normalize(x, (0.5,), (0.5,))


def test_train_pipeline_and_noise():
    tf = cifar_train_transform()
    x = _batch(5)
    a, b = tf(x, _gen(7)), tf(x, _gen(7))
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    z = torch.zeros(4, 40)
    n1 = gaussian_noise(0.1)(z, _gen(0))
    assert n1.shape == z.shape and 0.03 < n1.std() < 0.3
    assert torch.equal(n1, gaussian_noise(0.1)(z, _gen(0)))


def test_per_sample_generators_make_each_sample_independent_of_its_batch():
    x = _batch(6)
    seeds = [11, 12, 13, 14, 15, 16]
    tf = cifar_train_transform()
    whole = tf(x, SampleGenerators.from_seeds(seeds))
    halves = torch.cat([tf(x[:3], SampleGenerators.from_seeds(seeds[:3])), tf(x[3:], SampleGenerators.from_seeds(seeds[3:]))])
    assert torch.equal(whole, halves)
    reordered = tf(x.flip(0), SampleGenerators.from_seeds(seeds[::-1]))
    assert torch.equal(reordered, whole.flip(0))
    z = torch.zeros(6, 40)
    noise = gaussian_noise(0.1)(z, SampleGenerators.from_seeds(seeds))
    assert torch.equal(noise[2], gaussian_noise(0.1)(z[2:3], SampleGenerators.from_seeds([13]))[0])
    with pytest.raises(InputError, match="2 sample generators for a batch of 6"):
        random_hflip(x, SampleGenerators.from_seeds([1, 2]))
