"""CIFAR-10 / CIFAR-100 from the official python archives (no torchvision).

The archives published at https://www.cs.toronto.edu/~kriz/cifar.html contain
pickled dicts (written by Python 2) with ``b"data"``: uint8 ``[N, 3072]``
(channel-major 3x32x32 images) and ``b"fine_labels"`` (CIFAR-100) or
``b"labels"`` (CIFAR-10).

:func:`load_cifar` accepts, under ``root``:

* an already extracted folder (``root/cifar-100-python/`` or
  ``root/cifar-10-batches-py/``), used directly; or
* the archive (``root/cifar-100-python.tar.gz``), whose md5 is verified and which
  is then extracted once next to it (into the folder above) as a cache; or
* ``root`` pointing at the archive file itself.

With ``download=True`` a missing archive is fetched with ``urllib`` (tqdm
progress bar) into a temporary file that is atomically renamed into place, so
concurrent processes never see a half-written archive.

Security note: the official format is ``pickle``; only load archives from a
source you trust (the md5 check guards against corruption of the official files).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from locakd.errors import ConfigError, DataError

__all__ = [
    "CIFAR_INFO",
    "CifarInfo",
    "download_url",
    "file_md5",
    "load_cifar",
    "load_cifar_classes",
]


@dataclass(frozen=True)
class CifarInfo:
    """Static facts about one CIFAR variant."""

    name: str
    display: str
    archive: str
    md5: str
    url: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def members(self, split: str) -> tuple[str, ...]:
        """Names (relative to :attr:`folder`) of the pickles holding ``split``."""
        return self.train_members if split == "train" else self.test_members


CIFAR_INFO: dict[str, CifarInfo] = {
    "cifar100": CifarInfo(
        name="cifar100",
        display="CIFAR-100",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        folder="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        meta_member="meta",
        label_key=b"fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
    ),
    "cifar10": CifarInfo(
        name="cifar10",
        display="CIFAR-10",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        meta_member="batches.meta",
        label_key=b"labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
}

_CHUNK = 1 << 20


def file_md5(path: str | Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_url(
    url: str, dest: str | Path, md5: str | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same folder, then rename).

    If ``md5`` is given the downloaded bytes are checked before the rename; a
    mismatch removes the temporary file and raises :class:`DataError`.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (fixed https URL)
            except (urllib.error.URLError, OSError) as e:
                raise DataError(f"could not download {url} to {dest}: {e}") from e
            with resp:
                total = resp.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=f"downloading {dest.name}",
                    disable=not progress,
                ) as bar:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except OSError as e:
                            raise DataError(f"download of {url} interrupted: {e}") from e
                        if not chunk:
                            break
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if md5 is not None and h.hexdigest() != md5:
            raise DataError(
                f"md5 mismatch for {url} (downloaded to {dest}): expected {md5}, got {h.hexdigest()}"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _info(name: str) -> CifarInfo:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in CIFAR_INFO:
        raise ConfigError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_INFO)}")
    return CIFAR_INFO[key]


def _unpickle(raw: bytes, source: str) -> dict:
    try:
        obj = pickle.loads(raw, encoding="bytes")
    except Exception as e:  # pickle raises many different types on garbage input
        raise DataError(f"{source} is not a valid CIFAR pickle: {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{source} should hold a dict, found {type(obj).__name__}")
    return obj


def _decode(obj: dict, info: CifarInfo, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one unpickled batch and return (data uint8 [N,3072], labels int64 [N])."""
    for key in (b"data", info.label_key):
        if key not in obj and key.decode() not in obj:
            found = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
            raise DataError(f"{source} lacks key {key.decode()!r} (found keys {found})")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(info.label_key, obj.get(info.label_key.decode()))
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{source}: 'data' should have shape [N, 3072], found {list(data.shape)}")
    if data.dtype != np.uint8:
        raise DataError(f"{source}: 'data' should be uint8, found {data.dtype}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{source}: {info.label_key.decode()!r} should have {data.shape[0]} entries, "
            f"found shape {list(labels.shape)}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels should be integers, found {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"{source}: labels should lie in [0, {info.num_classes - 1}], "
            f"found range [{labels.min()}, {labels.max()}]"
        )
    return data, labels


def _check_archive(archive: Path, info: CifarInfo, verify: bool) -> None:
    if not verify:
        return
    actual = file_md5(archive)
    if actual != info.md5:
        raise DataError(
            f"md5 mismatch for {archive}: expected {info.md5}, got {actual}. The file is corrupt, "
            f"incomplete or not the official {info.display} archive; delete it and download it again "
            f"(download: true), or pass verify=False for a hand-made archive in the official format."
        )


def _read_members(archive: Path, info: CifarInfo, names: tuple[str, ...]) -> dict[str, bytes]:
    """Read the raw bytes of ``folder/<name>`` members (plus meta when present) from the archive."""
    wanted = {f"{info.folder}/{n}": n for n in names}
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    f = tar.extractfile(member)
                    if f is None:  # pragma: no cover - isfile() members always have a file object
                        continue
                    out[wanted[name]] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read archive {archive}: {type(e).__name__}: {e}") from e
    return out


def _extract(archive: Path, info: CifarInfo, target: Path) -> dict[str, bytes] | None:
    """Extract the data members of ``archive`` into ``target`` (atomic rename of a temp dir).

    Only the expected regular-file members are written (no path traversal). Returns
    the member bytes so the caller can use them even where ``target`` cannot be written.
    """
    required = info.train_members + info.test_members
    members = _read_members(archive, info, required + (info.meta_member,))
    missing = [f"{info.folder}/{n}" for n in required if n not in members]
    if missing:
        raise DataError(
            f"archive {archive} lacks member(s) {missing}; it is not a complete {info.display} archive"
        )
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{info.folder}.", suffix=".tmp", dir=target.parent))
    except OSError:
        return members  # read-only location: use the bytes in memory, no cache
    try:
        for name, raw in members.items():
            (tmp / name).write_bytes(raw)
        if target.exists():
            shutil.rmtree(target)  # stale/incomplete cache
        try:
            os.rename(tmp, target)
        except OSError:
            # another process (e.g. another DDP rank) extracted concurrently
            if not all((target / n).is_file() for n in required):
                raise
    except OSError:
        pass  # cache not written; the in-memory bytes are still valid
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return members


def load_cifar(
    name: str,
    root: str | Path,
    split: str = "train",
    download: bool = False,
    verify: bool = True,
    *,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR split as tensors.

    Args:
        name: ``"cifar100"`` or ``"cifar10"``.
        root: folder holding the archive and/or the extracted folder, or the archive itself.
        split: ``"train"`` or ``"test"``.
        download: fetch the official archive into ``root`` when neither the extracted
            folder nor the archive is present.
        verify: check the archive md5 before extracting it (set False for hand-made
            archives in the official format, e.g. in tests).
        progress: show a tqdm bar while downloading.

    Returns:
        ``(images, labels)``: uint8 tensor ``[N, 3, 32, 32]`` and int64 tensor ``[N]``.

    Raises:
        DataError: missing data (message says where it looked and how to download),
            md5 mismatch (naming both sums), unreadable archive or malformed pickles.
        ConfigError: unknown ``name`` or ``split``.
    """
    info = _info(name)
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    if root.is_file():
        archive, base = root, root.parent
    else:
        archive, base = root / info.archive, root
    folder = base / info.folder
    names = info.members(split)
    required = info.train_members + info.test_members

    raw: dict[str, bytes] | None = None
    if all((folder / n).is_file() for n in required):
        sources = {n: str(folder / n) for n in names}
    else:
        if not archive.is_file():
            if not download:
                where = f"extracted folder {folder} and archive {archive}"
                if folder.exists():
                    missing = [n for n in required if not (folder / n).is_file()]
                    where = f"extracted folder {folder} (incomplete: missing {missing}) and archive {archive}"
                raise DataError(
                    f"{info.display} not found: looked for the {where}. Set `download: true` in the "
                    f"data config (download=True) to fetch {info.url}, or place {info.archive} "
                    f"(md5 {info.md5}) in {base}."
                )
            download_url(info.url, archive, md5=info.md5 if verify else None, progress=progress)
        _check_archive(archive, info, verify)
        raw = _extract(archive, info, folder)
        sources = {n: f"{archive}:{info.folder}/{n}" for n in names}

    datas, labels = [], []
    for n in names:
        if raw is not None:
            blob = raw[n]
        else:
            try:
                blob = (folder / n).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {folder / n}: {e}") from e
        d, y = _decode(_unpickle(blob, sources[n]), info, sources[n])
        datas.append(d)
        labels.append(y)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    label = np.concatenate(labels) if len(labels) > 1 else labels[0]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(label)


def load_cifar_classes(name: str, root: str | Path) -> list[str] | None:
    """Class names from the extracted ``meta`` pickle, or None when it is not available."""
    info = _info(name)
    root = Path(root).expanduser()
    base = root.parent if root.is_file() else root
    path = base / info.folder / info.meta_member
    if not path.is_file():
        return None
    obj = _unpickle(path.read_bytes(), str(path))
    key = b"fine_label_names" if info.name == "cifar100" else b"label_names"
    names = obj.get(key)
    if names is None:
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
