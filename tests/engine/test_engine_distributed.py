"""Process-group helpers without a process group, the teardown policy, SyncBatchNorm off CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from locakd.engine import distributed as D
from locakd.errors import ConfigError


def test_single_process_helpers_are_no_ops():
    env = D.env_from_environment()
    assert not env.enabled and env.is_main
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce(t, "max") is t and torch.equal(t, torch.tensor([1.0, 2.0]))
    assert D.gather_objects({"a": 1}, env) == [{"a": 1}]
    assert D.broadcast_object(3) == 3
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model, torch.device("cpu"), env) is model and D.unwrap(model) is model


def test_teardown_only_of_a_group_created_here_and_only_on_success(monkeypatch):
    calls = []
    state = {"up": False}
    monkeypatch.setattr(D, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(D, "init_distributed", lambda device, timeout_s: state.update(up=True) or D.DistEnv())
    monkeypatch.setattr(D, "shutdown_distributed", lambda: calls.append("down"))
    with D.distributed_session(torch.device("cpu")):
        pass
    assert calls == ["down"]  # created here: torn down
    with D.distributed_session(torch.device("cpu")):  # state["up"] stays True: someone else's group
        pass
    assert calls == ["down"]
    state["up"] = False
    with pytest.raises(RuntimeError, match="boom"), D.distributed_session(torch.device("cpu")):
        raise RuntimeError("boom")
    assert calls == ["down"]  # an error leaves the group to the launcher


def test_sync_batchnorm_off_cuda_is_a_config_error_naming_the_key():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    for world_size in (1, 2):
        with pytest.raises(ConfigError, match="config key 'run.sync_batchnorm' needs CUDA"):
            D.convert_sync_batchnorm(model, torch.device("cpu"), D.DistEnv(world_size=world_size),
                                     "run.sync_batchnorm")
