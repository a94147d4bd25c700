"""Fixtures for the trainer tests: a shared MNIST-1D cache and one briefly trained teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
from image_helpers import one_thread, tiny_config


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A cache folder shared by all tests (the data is generated once)."""
    return tmp_path_factory.mktemp("mnist1d")


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory, mnist_root) -> Path:
    """A briefly trained MNIST-1D CNN teacher run folder (best.pt, last.pt, summary.json)."""
    from locakd.image.trainer import train_teacher

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config(mnist_root, out, student="mnist1d_cnn_16", method="ce", epochs=3)
    with one_thread():
        train_teacher(cfg)
    return out
