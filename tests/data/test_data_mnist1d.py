"""MNIST-1D generated locally (no download)."""

import random
import warnings

import numpy as np
import pytest

pytest.importorskip("mnist1d", reason="the optional `mnist1d` package is not installed")

from locakd.data import build_dataset, load_mnist1d  # noqa: E402
from locakd.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def small():
    return load_mnist1d(num_samples=500, seed=3)


def test_shapes_dtypes_labels(small):
    assert small["x_train"].shape == (400, 40) and small["x_test"].shape == (100, 40)
    assert small["x_train"].dtype == np.float32 and small["y_train"].dtype == np.int64
    for key in ("y_train", "y_test"):
        assert small[key].min() >= 0 and small[key].max() <= 9
    assert set(np.unique(small["y_train"])) == set(range(10))


def test_deterministic_and_seed_dependent(small):
    again = load_mnist1d(num_samples=500, seed=3)
    for k in small:
        assert np.array_equal(small[k], again[k])
    other = load_mnist1d(num_samples=500, seed=4)
    assert not np.array_equal(small["x_train"], other["x_train"])


def test_global_rng_untouched():
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(num_samples=100, seed=0)
    assert np.random.rand() == expect_np and random.random() == expect_py


def test_cache_roundtrip(tmp_path, small):
    a = load_mnist1d(num_samples=500, seed=3, cache_dir=tmp_path)
    files = list(tmp_path.glob("mnist1d_*.npz"))
    assert len(files) == 1
    b = load_mnist1d(num_samples=500, seed=3, cache_dir=tmp_path)
    for k in small:
        assert np.array_equal(a[k], small[k]) and np.array_equal(b[k], small[k])
    files[0].write_bytes(b"corrupt")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        c = load_mnist1d(num_samples=500, seed=3, cache_dir=tmp_path)
    assert any("unreadable MNIST-1D cache" in str(x.message) for x in w)
    assert np.array_equal(c["x_train"], small["x_train"])


def test_bad_args():
    with pytest.raises(ConfigError):
        load_mnist1d(num_samples=5)
    with pytest.raises(ConfigError):
        load_mnist1d(num_samples=100, train_split=1.0)
    with pytest.raises(ConfigError, match="not_an_arg"):
        load_mnist1d(num_samples=100, not_an_arg=1)


def test_build_dataset_mnist1d(tmp_path):
    spec = build_dataset("mnist1d", root=tmp_path, num_samples=200, seed=1)
    assert spec.num_classes == 10 and spec.input_shape == (40,)
    assert len(spec.train) == 160 and len(spec.test) == 40
    x, y = next(iter(spec.loader("train", batch_size=32, seed=0)))
    assert x.shape == (32, 40) and y.shape == (32,)
    noisy = build_dataset("mnist1d", root=tmp_path, num_samples=200, seed=1, noise_std=0.1)
    xn, _ = next(iter(noisy.loader("train", batch_size=32, seed=0)))
    assert xn.shape == x.shape and not np.array_equal(xn.numpy(), x.numpy())
