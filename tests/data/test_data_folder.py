"""ImageNet-style folder dataset on a tiny tree of PNGs."""

import numpy as np
import pytest
import torch

PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (needed only for image folders)")

from locakd.data import (  # noqa: E402
    EvalTransform,
    FolderLoader,
    ImageFolderDataset,
    TrainTransform,
    build_dataset,
)
from locakd.errors import ConfigError, DataError  # noqa: E402


def _png(path, w, h, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[0, 0] = (255 - value, 0, 0)
    PIL_Image.fromarray(arr).save(path)


@pytest.fixture
def tree(tmp_path):
    for i, cls in enumerate(["zebra", "ant", "cat"]):  # unsorted on purpose
        for j in range(3):
            _png(tmp_path / "train" / cls / f"{j}.png", 40 + 7 * j, 30 + 5 * i, 20 * i + j)
        _png(tmp_path / "val" / cls / "v.png", 50, 36, 100 + i)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("ignored")
    return tmp_path


def test_classes_sorted_and_labels(tree):
    ds = ImageFolderDataset(tree, "train", TrainTransform(size=16))
    assert ds.classes == ["ant", "cat", "zebra"] and len(ds) == 9
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
    assert sorted(set(ds.targets)) == [0, 1, 2]
    val = ImageFolderDataset(tree, "val", EvalTransform(size=16, resize=20))
    assert val.classes == ds.classes and len(val) == 3
    xv, _ = val[0]
    assert xv.shape == (3, 16, 16)


def test_default_transforms_give_224(tree):
    ds = ImageFolderDataset(tree, "val")
    assert isinstance(ds.transform, EvalTransform)
    x, _ = ds[1]
    assert x.shape == (3, 224, 224)
    # uniform image -> after normalisation all pixels of a channel are equal except near the corner pixel
    assert torch.isfinite(x).all()


def test_train_augmentation_deterministic_per_seed_epoch(tree):
    ds = ImageFolderDataset(tree, "train", TrainTransform(size=16), seed=1)
    a, _ = ds[4]
    b, _ = ds[4]
    assert torch.equal(a, b)
    ds.set_epoch(1)
    outs = [ds[4][0] for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    crops = {TrainTransform(size=16).crop_box(100, 80, torch.Generator().manual_seed(s)) for s in range(10)}
    assert len(crops) > 1


def test_eval_transform_resize_center_crop_values():
    img = PIL_Image.fromarray(np.full((40, 80, 3), 255, dtype=np.uint8))
    x = EvalTransform(size=8, resize=10, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.ones_like(x))


def test_folder_loader_shards_and_resume(tree):
    ds = ImageFolderDataset(tree, "train", TrainTransform(size=8))
    loaders = [FolderLoader(ds, 2, seed=0, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 3
    batches = list(loaders[0])
    assert batches[0][0].shape == (2, 3, 8, 8) and batches[0][1].dtype == torch.int64
    resumed = list(loaders[0].iter_from(1))
    for (x1, y1), (x2, y2) in zip(batches[1:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    labels = [torch.cat([y for _, y in ld]) for ld in loaders]
    assert sum(len(v) for v in labels) == 10  # 9 images padded to a multiple of 2


def test_errors(tmp_path, tree):
    with pytest.raises(DataError, match=str(tmp_path / "missing" / "train")):
        ImageFolderDataset(tmp_path / "missing", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty", "train")
    (tmp_path / "empty" / "train" / "dog").mkdir()
    with pytest.raises(DataError, match="contains no images"):
        ImageFolderDataset(tmp_path / "empty", "train")
    _png(tree / "val" / "unicorn" / "u.png", 8, 8, 1)
    with pytest.raises(DataError, match="unicorn"):
        ImageFolderDataset(tree, "val")
    (tree / "train" / "ant" / "broken.png").write_bytes(b"not an image")
    ds = ImageFolderDataset(tree, "train", TrainTransform(size=8))
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.name == "broken.png"][0]
    with pytest.raises(DataError, match="broken.png"):
        ds[idx]


def test_flat_val_folder_hint(tmp_path):
    _png(tmp_path / "val" / "ILSVRC2012_val_00000001.png", 8, 8, 1)
    with pytest.raises(DataError, match="sub-folder per class"):
        ImageFolderDataset(tmp_path, "val", classes=None)


def test_build_dataset_imagefolder(tree):
    spec = build_dataset("imagefolder", tree, image_size=16, resize=20)
    assert spec.num_classes == 3 and spec.input_shape == (3, 16, 16) and not spec.in_memory
    assert spec.classes == ["ant", "cat", "zebra"]
    x, y = next(iter(spec.loader("train", batch_size=4, seed=0)))
    assert x.shape == (4, 3, 16, 16)
    xv, yv = next(iter(spec.loader("val", batch_size=4)))
    assert xv.shape == (3, 3, 16, 16) and yv.tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        build_dataset("imagefolder", tree, download=True)
