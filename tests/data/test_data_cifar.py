"""CIFAR loading from tiny archives written in the official format."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from locakd.data import CIFAR_INFO, build_dataset, file_md5, load_cifar
from locakd.errors import ConfigError, DataError


def _add(tar, name, obj):
    raw = pickle.dumps(obj, protocol=2)
    info = tarfile.TarInfo(name)
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def write_cifar_archive(root, name="cifar100", n_train=50, n_test=20, seed=0):
    """Write root/<official archive name> with random data; return the arrays per split."""
    info = CIFAR_INFO[name]
    rng = np.random.default_rng(seed)
    arrays = {}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / info.archive, "w:gz") as tar:
        for split, n in (("train", n_train), ("test", n_test)):
            data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
            labels = rng.integers(0, info.num_classes, size=n)
            arrays[split] = (data, labels)
            members = info.members(split)
            for i, chunk in enumerate(np.array_split(np.arange(n), len(members))):
                obj = {
                    b"data": data[chunk],
                    info.label_key: [int(v) for v in labels[chunk]],
                    b"batch_label": b"test batch",
                    b"filenames": [b"x.png"] * len(chunk),
                }
                if name == "cifar100":
                    obj[b"coarse_labels"] = [0] * len(chunk)
                _add(tar, f"{info.folder}/{members[i]}", obj)
        key = b"fine_label_names" if name == "cifar100" else b"label_names"
        _add(
            tar,
            f"{info.folder}/{info.meta_member}",
            {key: [f"c{i}".encode() for i in range(info.num_classes)]},
        )
    return arrays


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_roundtrip_from_archive(tmp_path, name):
    arrays = write_cifar_archive(tmp_path, name)
    for split, n in (("train", 50), ("test", 20)):
        images, labels = load_cifar(name, tmp_path, split, verify=False)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        data, lab = arrays[split]
        assert torch.equal(images, torch.from_numpy(data.reshape(n, 3, 32, 32)))
        assert torch.equal(labels, torch.from_numpy(lab.astype(np.int64)))
    # extracted once next to the archive; a second load uses the folder even without the archive
    assert (tmp_path / CIFAR_INFO[name].folder).is_dir()
    (tmp_path / CIFAR_INFO[name].archive).unlink()
    images2, _ = load_cifar(name, tmp_path, "train")
    assert torch.equal(images2, torch.from_numpy(arrays["train"][0].reshape(50, 3, 32, 32)))


def test_root_may_be_the_archive_itself(tmp_path):
    write_cifar_archive(tmp_path, "cifar100")
    images, _ = load_cifar("cifar100", tmp_path / "cifar-100-python.tar.gz", "test", verify=False)
    assert images.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_md5_mismatch_names_both_sums(tmp_path, name):
    write_cifar_archive(tmp_path, name)
    actual = file_md5(tmp_path / CIFAR_INFO[name].archive)
    with pytest.raises(DataError) as e:
        load_cifar(name, tmp_path, "train", verify=True)
    msg = str(e.value)
    assert CIFAR_INFO[name].md5 in msg and actual in msg and CIFAR_INFO[name].archive in msg
    assert not (tmp_path / CIFAR_INFO[name].folder).exists()  # nothing extracted from a bad archive


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_missing_data_names_path_and_download_hint(tmp_path, name):
    where = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        load_cifar(name, where, "train")
    msg = str(e.value)
    assert str(where / CIFAR_INFO[name].archive) in msg
    assert "download: true" in msg and CIFAR_INFO[name].url in msg


def test_corrupt_archive_is_data_error(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(DataError, match="cannot read archive"):
        load_cifar("cifar10", tmp_path, "train", verify=False)


def test_archive_missing_member(tmp_path):
    with tarfile.open(tmp_path / "cifar-100-python.tar.gz", "w:gz") as tar:
        _add(tar, "cifar-100-python/train", {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0]})
    with pytest.raises(DataError, match="cifar-100-python/test"):
        load_cifar("cifar100", tmp_path, "train", verify=False)


def test_malformed_pickle_content(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]})
    )
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"\[N, 3072\]"):
        load_cifar("cifar100", tmp_path, "train")
    with pytest.raises(DataError, match="not a valid CIFAR pickle"):
        load_cifar("cifar100", tmp_path, "test")


def test_bad_name_and_split(tmp_path):
    with pytest.raises(ConfigError):
        load_cifar("cifar1000", tmp_path, "train")
    with pytest.raises(ConfigError):
        load_cifar("cifar10", tmp_path, "validation")


@pytest.mark.parametrize("name,classes", [("cifar100", 100), ("cifar10", 10)])
def test_build_dataset_cifar(tmp_path, name, classes):
    arrays = write_cifar_archive(tmp_path, name)
    spec = build_dataset(name, tmp_path, download=False, verify=False)
    assert spec.num_classes == classes and spec.input_shape == (3, 32, 32) and spec.in_memory
    assert len(spec.train) == 50 and len(spec.test) == 20
    assert spec.classes[:2] == ["c0", "c1"]
    assert torch.equal(spec.test.labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    x, y = next(iter(spec.loader("train", batch_size=16, seed=1)))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xt, _ = next(iter(spec.loader("test", batch_size=20)))
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    raw = torch.from_numpy(arrays["test"][0].reshape(20, 3, 32, 32)).float() / 255
    expected = (raw - mean) / std  # test loader: unshuffled, normalised only
    # the same float32 ops in another place: at most a few ulps of the largest |value|
    tol = 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    torch.testing.assert_close(xt, expected, rtol=0, atol=tol)
    only_test = build_dataset(name, tmp_path, split="test")
    assert only_test.train is None and len(only_test.test) == 20


def test_download_via_file_url(tmp_path, monkeypatch):
    """download=True path (urllib + temp file + rename + md5), served from a local file:// URL."""
    import dataclasses

    import locakd.data.cifar as cifar

    src = tmp_path / "mirror"
    arrays = write_cifar_archive(src, "cifar10")
    archive = src / CIFAR_INFO["cifar10"].archive
    fake = dataclasses.replace(CIFAR_INFO["cifar10"], url=archive.as_uri(), md5=file_md5(archive))
    monkeypatch.setitem(cifar.CIFAR_INFO, "cifar10", fake)
    dest = tmp_path / "data"
    images, labels = load_cifar("cifar10", dest, "test", download=True, progress=False)
    assert (dest / fake.archive).is_file()
    assert not list(dest.glob(".*part"))  # temp file renamed away
    assert torch.equal(labels, torch.from_numpy(arrays["test"][1].astype(np.int64)))
    # a download whose md5 does not match is rejected and leaves nothing behind
    bad = dataclasses.replace(fake, md5="0" * 32)
    monkeypatch.setitem(cifar.CIFAR_INFO, "cifar10", bad)
    other = tmp_path / "other"
    with pytest.raises(DataError, match="0" * 32):
        load_cifar("cifar10", other, "test", download=True, progress=False)
    assert list(other.iterdir()) == []
