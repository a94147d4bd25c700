"""MNIST-1D generated locally with the ``mnist1d`` package (nothing is downloaded).

``mnist1d.data.make_dataset(args)`` works as follows (mnist1d 0.0.2):

* it calls ``np.random.seed(args.seed)`` and ``random.seed(args.seed)`` (global
  state!) and draws every random transform from numpy's global RNG, so the output
  is a deterministic function of ``args``;
* it makes ``args.num_samples // 10`` examples per digit (so ``N`` is rounded down
  to a multiple of 10), shuffles them, standardises the whole set to zero mean and
  unit std, and splits at ``int(N * args.train_split)``: the first part is train;
* examples are float64 ``[N, 40]`` (``final_seq_length``), labels int64 in 0..9.

:func:`load_mnist1d` wraps it, saving and restoring the global ``random``/numpy
RNG state so that generating data does not disturb the caller's seeding, and
optionally caches the result as ``.npz`` keyed by a hash of all generator args.
Generating is roughly 0.5 ms per sample on one CPU core (4000: ~2 s, 10000: ~5 s),
plus ~1.5 s to import mnist1d (scipy, matplotlib) the first time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from locakd.errors import ConfigError, DataError

__all__ = ["MNIST1D_LENGTH", "load_mnist1d", "mnist1d_args"]

MNIST1D_LENGTH = 40
_CACHE_FORMAT = 1


def _import_mnist1d():
    try:
        import mnist1d
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(
            "MNIST-1D needs the `mnist1d` package: `pip install mnist1d` (or `pip install locakd[data]`)"
        ) from e
    return mnist1d, get_dataset_args, make_dataset


def mnist1d_args(num_samples: int = 5000, seed: int = 42, train_split: float = 0.8, **overrides: Any) -> dict:
    """The generator arguments (mnist1d defaults + the given values) as a plain dict."""
    _, get_dataset_args, _ = _import_mnist1d()
    args = get_dataset_args(as_dict=True)
    args = dict(args)
    unknown = sorted(set(overrides) - set(args))
    if unknown:
        raise ConfigError(f"unknown MNIST-1D generator argument(s) {unknown}; known: {sorted(args)}")
    args.update(overrides)
    args.update(num_samples=int(num_samples), seed=int(seed), train_split=float(train_split))
    if args["num_samples"] < 10:
        raise ConfigError(f"num_samples must be >= 10 (10 classes), got {num_samples}")
    if not 0.0 < args["train_split"] < 1.0:
        raise ConfigError(f"train_split must lie strictly between 0 and 1, got {train_split}")
    n = (args["num_samples"] // 10) * 10
    split = int(n * args["train_split"])
    if split == 0 or split == n:
        raise ConfigError(f"train_split={train_split} leaves an empty train or test set with {n} samples")
    return args


def _cache_key(args: dict, version: str) -> str:
    keyed = {k: v for k, v in args.items() if k != "url"}
    blob = json.dumps(
        {"args": keyed, "mnist1d": version, "format": _CACHE_FORMAT}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _generate(args: dict) -> dict[str, np.ndarray]:
    _, _, make_dataset = _import_mnist1d()
    from mnist1d.utils import ObjectView

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {
        "x_train": np.ascontiguousarray(data["x"], dtype=np.float32),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(data["x_test"], dtype=np.float32),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
    }


_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in _KEYS}
        _validate(out, path)
    except Exception as e:  # truncated zip, missing key, ... -> regenerate
        warnings.warn(
            f"ignoring unreadable MNIST-1D cache {path} ({type(e).__name__}: {e}); regenerating", stacklevel=3
        )
        return None
    return out


def _write_cache(path: Path, data: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **data)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"could not write MNIST-1D cache {path}: {e}", stacklevel=3)


def load_mnist1d(
    num_samples: int = 5000,
    seed: int = 42,
    train_split: float = 0.8,
    cache_dir: str | Path | None = None,
    **generator_args: Any,
) -> dict[str, np.ndarray]:
    """Generate (or load from cache) MNIST-1D.

    Args:
        num_samples: total examples before the split (rounded down to a multiple of 10).
        seed: generator seed; the same args always give the same data.
        train_split: fraction of examples in the train part.
        cache_dir: if given, read/write ``mnist1d_<hash>.npz`` there (hash of all args
            and the mnist1d version); an unreadable cache file is regenerated.
        **generator_args: other ``get_dataset_args`` fields (e.g. ``iid_noise_scale``,
            ``shuffle_seq``); unknown names raise ConfigError.

    Returns:
        dict with ``x_train`` float32 ``[N_train, 40]``, ``y_train`` int64, ``x_test``,
        ``y_test`` (numpy arrays; ``torch.from_numpy`` them as needed).
    """
    args = mnist1d_args(num_samples, seed, train_split, **generator_args)
    path = None
    if cache_dir is not None:
        _import_mnist1d()
        try:
            version = importlib.metadata.version("mnist1d")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - e.g. vendored copy
            version = "unknown"
        path = Path(cache_dir).expanduser() / f"mnist1d_{_cache_key(args, version)}.npz"
        if path.is_file():
            data = _read_cache(path)
            if data is not None:
                return data
    data = _generate(args)
    _validate(data, "generated MNIST-1D")
    if path is not None:
        _write_cache(path, data)
    return data


def _validate(data: dict[str, np.ndarray], source: Any) -> None:
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(f"{source}: inconsistent {split} shapes x {list(x.shape)} / y {list(y.shape)}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DataError(f"{source}: {split} labels outside 0..9")
