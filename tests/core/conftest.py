"""tests/core: make the helper modules importable whatever pytest's import mode, and run
the (small) tensor ops single-threaded.

The core tests use tiny tensors; with several intra-op threads on a busy 2-core machine
each op spends far longer synchronising threads than computing (measured 30-100x
slower), so each test here runs with one thread and restores the setting afterwards.
"""

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
