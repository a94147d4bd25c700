"""RNG capture / restore: every generator comes back, per rank, and survives torch.load(weights_only)."""

from __future__ import annotations

import random

import numpy as np
import torch

from locakd.engine import rng
from locakd.engine.distributed import DistEnv
from locakd.engine.io import load_checkpoint, save_checkpoint


def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_capture_restore_roundtrip_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    _draw()
    save_checkpoint({"rng": [rng.capture()]}, tmp_path / "c.pt")
    expected = _draw()
    _draw()
    state = load_checkpoint(tmp_path / "c.pt")["rng"][0]
    rng.restore(state)
    assert _draw() == expected
    if torch.cuda.is_available():  # every device's generator is captured, not only the current one
        assert len(state["cuda"]) == torch.cuda.device_count()


def test_restore_own_takes_this_ranks_state_or_reseeds_when_the_world_size_changed():
    states = []
    for r in range(2):
        torch.manual_seed(100 + r)
        states.append(rng.capture())
    expected = []
    for r in range(2):
        rng.restore(states[r])
        expected.append(torch.rand(2))
    assert rng.restore_own(states, DistEnv(rank=1, world_size=2), seed=0, position=3)
    assert torch.equal(torch.rand(2), expected[1])
    # three processes now: not matchable, reseeded from (seed, rank, position), reproducibly
    assert not rng.restore_own(states, DistEnv(rank=2, world_size=3), seed=0, position=3)
    a = torch.rand(2)
    rng.restore_own(states, DistEnv(rank=2, world_size=3), seed=0, position=3)
    assert torch.equal(torch.rand(2), a)
