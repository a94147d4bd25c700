"""Fixtures for the CLI tests: a shared MNIST-1D cache and a random teacher checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from locakd import models
from locakd.engine.io import save_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run faster on one thread, and a busy machine does not stall them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cli_mnist_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli-mnist1d")


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory) -> Path:
    """An untrained mnist1d_cnn_16 saved like a locakd checkpoint (enough for loading tests)."""
    path = tmp_path_factory.mktemp("cli-teacher") / "best.pt"
    save_checkpoint({"model": models.create("mnist1d_cnn_16", 10, seed=0).state_dict()}, path)
    return path
