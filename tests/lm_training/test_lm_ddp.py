"""DDP (gloo, CPU) through torchrun: same weights as one process, resume, failing rank stops the run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from distributed_helpers import run_distributed
from safetensors.torch import load_file

from locakd.config import from_dict
from locakd.lm.config import LMExperimentConfig
from locakd.lm.trainer import train_lm

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

TIMEOUT_S = 240
EPS32 = torch.finfo(torch.float32).eps


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=cwd)


def test_two_processes_match_one_process_and_resume(lm_env, tmp_path):
    # one process: 4 examples per micro-batch x 2 accumulation steps = global batch 8
    one = from_dict(LMExperimentConfig, lm_env.config(
        tmp_path / "one", optim={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 4}))
    train_lm(one)
    # two processes: 2 per micro-batch x 2 accumulation steps x 2 ranks = the same global batch,
    # stopped after 2 steps and resumed (torchrun again)
    cfg = lm_env.write_config(tmp_path / "two.yaml", tmp_path / "two",
                              optim={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 4})
    first = _torchrun(["-m", "locakd.cli.main", "lm-distill", str(cfg), "--stop-after-steps", "2"], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["status"] == "stopped"
    second = _torchrun(["-m", "locakd.cli.main", "lm-distill", str(cfg), "--resume"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["step"] == 4
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["tokens_trained"] == one_summary["tokens_trained"]
    assert summary["teacher_misinstruction"] == one_summary["teacher_misinstruction"]
    _assert_same_training(tmp_path / "one", tmp_path / "two", steps=4)


@pytest.mark.slow
def test_two_processes_from_a_teacher_cache_match_one_process(lm_env, tmp_path):
    """model.teacher_cache under torchrun: each rank reads the cached rows of its own examples (the teacher
    folder is gone), and 2 ranks x 2 x 2 give the weights of 1 rank x 4 x 2, as from a live teacher."""
    from locakd.lm.cache_command import capture_teacher_cache

    cache = tmp_path / "cache"
    capture_teacher_cache(from_dict(LMExperimentConfig, {
        **lm_env.config(tmp_path / "unused"), "cache": {"dir": str(cache), "top_k": 32}}))
    model = {"teacher": str(tmp_path / "no-such-teacher"), "teacher_cache": str(cache)}
    one = from_dict(LMExperimentConfig, lm_env.config(
        tmp_path / "one", model=model, optim={"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 3}))
    train_lm(one)
    cfg = lm_env.write_config(tmp_path / "two.yaml", tmp_path / "two", model=model,
                              optim={"micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_distributed([*TORCHRUN, "-m", "locakd.cli.main", "lm-distill", str(cfg)], clean=[tmp_path / "two"],
                                timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    one_summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 8 and summary["step"] == 3
    assert summary["tokens_trained"] == one_summary["tokens_trained"]
    assert summary["teacher_misinstruction"] == one_summary["teacher_misinstruction"]
    assert summary["teacher_cache"]["dir"] == str(cache) and summary["teacher_params"] is None
    _assert_same_training(tmp_path / "one", tmp_path / "two", steps=3)


def _assert_same_training(one_dir, two_dir, *, steps: int) -> None:
    """The last logged loss and the final weights of two runs over the same examples agree to float32 rounding."""
    one = json.loads((one_dir / "summary.json").read_text())
    two = json.loads((two_dir / "summary.json").read_text())
    tokens = one["tokens_trained"] / steps  # response tokens summed into each step's loss
    # a mean over `tokens` float32 terms summed in other groupings: a few ulps x sqrt(tokens), relative
    assert two["last_train"]["loss"] == pytest.approx(one["last_train"]["loss"], rel=16 * EPS32 * math.sqrt(tokens))
    a = load_file(str(one_dir / "final" / "model.safetensors"))
    b = load_file(str(two_dir / "final" / "model.safetensors"))
    tolerance = _adam_rounding_tolerance(one_dir, tokens)
    for name in a:
        excess = (a[name] - b[name]).abs() - tolerance[name]
        assert bool((excess <= 0).all()), (name, float(excess.max()), float(tolerance[name].min()))


def _adam_rounding_tolerance(run_dir, tokens: float) -> dict[str, torch.Tensor]:
    """Per-element bound on how far float32 rounding can move AdamW weights between two batch splits.

    The split changes only the order in which each step's gradient is summed: an error of about
    rho * G (rho = 16 ulps x sqrt(tokens), G = the tensor's gradient scale sqrt(max v)). Adam divides
    the gradient by sqrt(v) + eps, so element i's update moves by <= 2 * lr * rho * G / (sqrt(v_i) + eps)
    per step (more where the true gradient is ~0, e.g. the attention key bias: capped at the 2 * lr a
    normalised update can change by). Summed over the steps' learning rates.
    """
    from transformers import AutoModelForCausalLM

    from locakd.engine.io import load_checkpoint
    from locakd.lm.build import lr_factor, warmup_steps_of

    state = load_checkpoint(run_dir / "last.pt")
    config = from_dict(LMExperimentConfig, state["config"])
    o, steps = config.optim, state["step"]
    lr_sum = sum(o.lr * lr_factor(t, steps, warmup_steps_of(config, steps), o.schedule, o.min_lr_ratio)
                 for t in range(steps))
    rho = 16 * EPS32 * math.sqrt(tokens)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # the optimizer's parameter order (locakd.lm.build.make_optimizer): matrices first, then vectors
    ordered = [n for n, p in params if p.ndim >= 2] + [n for n, p in params if p.ndim < 2]
    out = {}
    for index, name in enumerate(ordered):
        adam = state["optimizer"]["state"][index]
        scale = (adam["exp_avg_sq"] / (1 - o.betas[1] ** int(adam["step"]))).sqrt()
        out[name] = 2 * lr_sum * torch.clamp(rho * scale.max() / (scale + o.eps), max=1.0)
    return out


FAILING_RANK = textwrap.dedent("""
    import os
    import sys

    import locakd.lm.trainer as trainer

    original = trainer.accumulate_gradients
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if os.environ.get("RANK") == "1" and len(calls) == 2:
            raise RuntimeError("injected failure on rank 1")
        return original(*args, **kwargs)

    trainer.accumulate_gradients = failing
    from locakd.cli.main import main

    sys.exit(main(sys.argv[1:]))
""")


def test_a_failing_rank_stops_the_run(lm_env, tmp_path):
    script = tmp_path / "fail_rank.py"
    script.write_text(FAILING_RANK)
    cfg = lm_env.write_config(tmp_path / "c.yaml", tmp_path / "run",
                              optim={"micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 6})
    started = time.time()
    result = _torchrun([str(script), "lm-distill", str(cfg)], tmp_path)  # raises TimeoutExpired if it hangs
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "injected failure on rank 1" in output
    assert time.time() - started < TIMEOUT_S
    assert not (tmp_path / "run" / "final").exists()


# The fused lm-head path under the wrappers that synchronise or shard the student: the student's forward runs
# through the wrapper (a forward pre-hook on the output layer takes its input and hands it an empty slice) and the
# head weight gets its gradient from the fused loss. Every rank's gradient must equal one process's logits-path
# gradient on the whole batch, for a tied (GPT-2) and an untied (Llama) head.
FUSED_SCRIPT = textwrap.dedent("""
    import copy
    import math
    import sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import LlamaConfig
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    sys.modules.setdefault("torchao", None)  # see tests/hf/conftest.py
    from accelerate.utils import FullyShardedDataParallelPlugin

    from locakd.lm.batch_loss import DenseLogits, FusedHead
    from locakd.lm.config import method_spec
    from locakd.lm.fused_head import HeadTap
    from locakd.lm.hf_trainer import _prepare_fsdp_teacher
    from locakd.lm.models import FrozenTeacher, create_causal_lm, tiny_gpt2_config
    from locakd.lm.trainer import accumulate_gradients
    from locakd.losses.objectives import LMObjective

    EPS32 = torch.finfo(torch.float32).eps
    V = 300
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def llama(layers):
        return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)

    ARCHS = {"gpt2": (tiny_gpt2_config(V, n_layer=1), tiny_gpt2_config(V, n_layer=2)), "llama": (llama(1), llama(2))}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (8, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    full = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 16, dtype=torch.long),
             "labels": labels[i:i + 4]} for i in (0, 4)]  # 2 micro-batches of 4 examples
    mine = [{k: v[2 * rank:2 * rank + 2] for k, v in mb.items()} for mb in full]  # this rank's 2 of each
    objective = LMObjective(spec=method_spec("kd+loca"), chunk_size=9)
    n_tokens = float(sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in full))

    def pair(arch):
        student_config, teacher_config = ARCHS[arch]
        return create_causal_lm(student_config, seed=0).train(), create_causal_lm(teacher_config, seed=1)

    def reference(student, teacher):
        \"\"\"(gradients, relative tolerance): the whole batch in one process through the logits path.

        The tolerance is tests/lm_training/test_fused_head.py's: the two paths' logits differ by <= 2 e (e = 16
        ulps of the size of the H products), each log-prob rounds by 8 ulps of (max|z| + log V), so a per-token
        term moves by <= 2 (2 lp + 2 e), the gradient relatively as much, summed over the tokens as a random walk,
        plus 64 ulps of reordering (the all-reduce adds the ranks' halves in another order).\"\"\"
        model = copy.deepcopy(student)
        loss_of = DenseLogits(objective, FrozenTeacher(teacher))
        for mb in full:  # not accumulate_gradients: it would all-reduce the token count over the ranks
            loss_of(model, mb, n_tokens)[0].loss.backward()
        e = zmax = 0.0
        for m in (student, teacher):
            for mb in full:
                with torch.no_grad(), HeadTap(m, "model") as tap:
                    m(input_ids=mb["input_ids"])
                head = tap.inputs(mb["input_ids"])
                h = head.hidden.detach().double().reshape(-1, head.hidden.shape[-1])
                w = head.weight.detach().double()
                e = max(e, 16 * EPS32 * float((h ** 2 @ (w ** 2).T).sqrt().max()))
                zmax = max(zmax, float((h @ w.T).abs().max()))
        per_token = 2 * (2 * 8 * EPS32 * (zmax + math.log(V)) + 2 * e)
        return {n: p.grad for n, p in model.named_parameters()}, per_token * math.sqrt(n_tokens) + 64 * EPS32

    def check(arch, what, got, expected, rtol, slack=None):
        for name, grad in expected.items():
            atol = rtol * float(grad.abs().max()) + (0.0 if slack is None else slack[name])
            torch.testing.assert_close(got[name], grad, rtol=0, atol=atol, msg=f"{what} {arch} {name}")
        print(f"rank {rank} {arch}: {what} ok", flush=True)

    def fsdp_plugin_teacher(teacher, version):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version, auto_wrap_policy="transformer_based_wrap")
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"))
        return FrozenTeacher(_prepare_fsdp_teacher(teacher.requires_grad_(False), accelerator))

    for arch in ARCHS:
        student, teacher = pair(arch)
        expected, rtol = reference(student, teacher)
        for find_unused in (False, True):  # DDP's unused-parameter search follows the outputs' graph
            model = DDP(copy.deepcopy(student), find_unused_parameters=find_unused)
            accumulate_gradients(model, FrozenTeacher(teacher), mine, objective, world_size=world, fused_lm_head=True)
            got = {n: p.grad for n, p in model.module.named_parameters()}
            for name, grad in got.items():  # synchronised: every rank holds the same gradient
                gathered = [torch.empty_like(grad) for _ in range(world)]
                dist.all_gather(gathered, grad)
                assert all(torch.equal(x, gathered[0]) for x in gathered), (arch, name)
            assert float(model.module.get_output_embeddings().weight.grad.abs().max()) > 0
            check(arch, f"DDP(find_unused_parameters={find_unused})", got, expected, rtol)

        # FSDP2: one unit per block plus the root, teacher sharded by the run's plugin
        sharded = copy.deepcopy(student)
        for block in (sharded.transformer.h if arch == "gpt2" else sharded.model.layers):
            fully_shard(block)
        fully_shard(sharded)
        loss_of = FusedHead(objective, fsdp_plugin_teacher(copy.deepcopy(teacher), 2))
        for mb in mine:
            (loss_of(sharded, mb, n_tokens)[0].loss * world).backward()
        check(arch, "FSDP2", {n: p.grad.full_tensor() for n, p in sharded.named_parameters()}, expected, rtol)

        # FSDP1 (accelerate's default version), with and without use_orig_params
        for orig in (True, False):
            sharded = FSDP(copy.deepcopy(student), auto_wrap_policy=ModuleWrapPolicy({GPT2Block, LlamaDecoderLayer}),
                           use_orig_params=orig, device_id=torch.device("cpu"))
            loss_of = FusedHead(objective, fsdp_plugin_teacher(copy.deepcopy(teacher), 1))
            for mb in mine:
                (loss_of(sharded, mb, n_tokens)[0].loss * world).backward()
            # one SGD step of lr 1 turns the sharded, flattened gradients into weight changes that can be gathered;
            # w - (w - g) adds the float32 rounding of the new weight, an ulp of |w|
            torch.optim.SGD(sharded.parameters(), lr=1.0).step()
            start = {n: p.detach() for n, p in student.named_parameters()}
            with FSDP.summon_full_params(sharded):
                got = {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in sharded.named_parameters()}
            got = {n: start[n] - w for n, w in got.items()}
            slack = {n: 2 * EPS32 * float(w.abs().max()) for n, w in start.items()}
            check(arch, f"FSDP1(use_orig_params={orig})", got, expected, rtol, slack)
    dist.destroy_process_group()
""")


def test_the_fused_lm_head_under_ddp_and_fsdp_matches_one_process(tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "fused_ddp.py"
    script.write_text(FUSED_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_distributed([*TORCHRUN, str(script)], timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    for rank in (0, 1):
        for arch in ("gpt2", "llama"):
            for what in ("DDP(find_unused_parameters=False)", "DDP(find_unused_parameters=True)", "FSDP2",
                         "FSDP1(use_orig_params=True)", "FSDP1(use_orig_params=False)"):
                assert f"rank {rank} {arch}: {what} ok" in output, output[-3000:]
