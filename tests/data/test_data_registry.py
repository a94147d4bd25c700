"""build_dataset registry behaviour that needs no data on disk."""

import pytest

from locakd.data import available_datasets, build_dataset
from locakd.errors import ConfigError, DataError


def test_available_names():
    assert available_datasets() == ["cifar10", "cifar100", "imagefolder", "mnist1d"]


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError) as e:
        build_dataset("svhn", "data")
    for name in available_datasets():
        assert name in str(e.value)


def test_unknown_option_and_split(tmp_path):
    with pytest.raises(ConfigError, match="colour_jitter"):
        build_dataset("cifar100", tmp_path, colour_jitter=True)
    with pytest.raises(ConfigError, match="split"):
        build_dataset("cifar100", tmp_path, split="dev")
    with pytest.raises(ConfigError, match="root"):
        build_dataset("cifar10", None)


def test_missing_cifar_is_data_error(tmp_path):
    with pytest.raises(DataError, match="download: true"):
        build_dataset("CIFAR-100", tmp_path)
