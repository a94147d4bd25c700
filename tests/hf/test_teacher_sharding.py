"""Under FSDP the teacher is sharded like the student, not kept whole on every rank (2 processes, gloo, CPU).

accelerate enables FSDP only on GPUs, so the Trainer's FSDP run cannot happen on a CPU; this checks the teacher
preparation it calls (locakd.lm.hf_trainer._prepare_fsdp_teacher) with both FSDP versions directly.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import torch
from distributed_helpers import run_distributed

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")]
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent("""
    import sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    sys.modules.setdefault("torchao", None)  # see tests/hf/conftest.py
    from accelerate.utils import FullyShardedDataParallelPlugin

    from locakd.lm.hf_trainer import _prepare_fsdp_teacher
    from locakd.lm.models import create_causal_lm, tiny_gpt2_config

    dist.init_process_group("gloo")
    config = tiny_gpt2_config(300, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    for version in (1, 2):
        whole = create_causal_lm(config, seed=1).eval().requires_grad_(False)
        n_params = sum(p.numel() for p in whole.parameters())
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap")
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"))
        sharded = _prepare_fsdp_teacher(create_causal_lm(config, seed=1).eval().requires_grad_(False), accelerator)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in sharded.parameters())
        assert not sharded.training
        if version == 2:  # every GPT-2 block is its own FSDP unit: gathered one at a time in the forward
            from torch.distributed.fsdp import FSDPModule

            assert all(isinstance(block, FSDPModule) for block in sharded.transformer.h)
        # each of the 2 ranks holds about half of the teacher (FSDP pads the flat shard to an even split)
        assert local <= n_params // 2 + 64, (version, local, n_params)
        with torch.no_grad():
            expected = whole(input_ids=ids).logits
            got = sharded(input_ids=ids).logits
        assert torch.equal(got, expected), (version, float((got - expected).abs().max()))
        print(f"rank {dist.get_rank()} fsdp{version}: {local} of {n_params} parameters, logits equal", flush=True)
    dist.destroy_process_group()
""")


def test_the_teacher_is_sharded_across_ranks_and_computes_the_same_logits(tmp_path):
    script = tmp_path / "shard_teacher.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = run_distributed(cmd, timeout=240, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        for version in (1, 2):
            assert f"rank {rank} fsdp{version}:" in output
