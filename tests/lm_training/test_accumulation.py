"""Gradient accumulation: the accumulated loss and gradient equal those of one big batch."""

from __future__ import annotations

import math

import pytest
import torch

from locakd.lm.config import method_spec
from locakd.lm.data import collate_examples, count_valid_tokens, tokenize_examples
from locakd.lm.fixtures import make_instruction_suite
from locakd.lm.models import FrozenTeacher, create_causal_lm, tiny_gpt2_config
from locakd.lm.trainer import accumulate_gradients, step_micro_batches
from locakd.losses.objectives import LMObjective

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def pieces(lm_env):
    tok = lm_env.tokenizer
    records, _ = make_instruction_suite(12, 0, seed=3)
    ds = tokenize_examples(records, tok, max_length=64, max_prompt_length=48)
    vocab = len(tok)
    student = create_causal_lm(tiny_gpt2_config(vocab, n_layer=1, n_embd=32, n_positions=96), seed=0)
    teacher = FrozenTeacher(create_causal_lm(tiny_gpt2_config(vocab, n_layer=2, n_embd=32, n_positions=96), seed=1))
    return ds, student, teacher, tok


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["kd+loca", "rkl", "sft"])
def test_accumulated_equals_one_big_batch(pieces, method):
    ds, student, teacher, tok = pieces
    pad = tok.pad_token_id
    # micro-batches of different sizes and different numbers of response tokens
    splits = [[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]]
    micro = [collate_examples([ds[i] for i in idx], pad) for idx in splits]
    counts = [int(count_valid_tokens(b["labels"])) for b in micro]
    assert len(set(counts)) == len(counts), counts
    big = [collate_examples([ds[i] for i in range(12)], pad)]
    objective = LMObjective(spec=method_spec(method), kd_ratio=0.5, loca_alpha=0.9, chunk_size=23)

    student.zero_grad(set_to_none=True)
    stats_acc = accumulate_gradients(student, teacher, micro, objective)
    grads_acc = _grads(student)
    student.zero_grad(set_to_none=True)
    stats_big = accumulate_gradients(student, teacher, big, objective)
    grads_big = _grads(student)
    student.zero_grad(set_to_none=True)

    assert stats_acc.n_tokens == stats_big.n_tokens == sum(counts)
    n = stats_big.n_tokens
    means_acc = stats_acc.means(0.5, method != "sft")
    means_big = stats_big.means(0.5, method != "sft")
    for key in means_big:
        # means of n positive float32 per-token terms summed in other groupings: ulps x sqrt(n)
        assert math.isclose(means_acc[key], means_big[key], rel_tol=4 * EPS32 * math.sqrt(n)), (key, means_acc)
    assert grads_acc.keys() == grads_big.keys() and grads_big
    for name in grads_big:
        # each gradient is a sum over the n tokens' contributions, grouped differently: a few ulps
        # x sqrt(n) of the tensor's gradient scale
        tol = 8 * EPS32 * math.sqrt(n) * float(grads_big[name].abs().max())
        torch.testing.assert_close(grads_acc[name], grads_big[name], rtol=0, atol=tol, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_step_micro_batches_partition_the_global_batch():
    order = list(range(40))[::-1]
    lengths = [i % 7 for i in range(40)]
    for step in range(2):
        expected = set(order[step * 16:(step + 1) * 16])
        seen = []
        for rank in range(2):
            parts = step_micro_batches(order, step, lengths, micro_batch_size=4, grad_accum_steps=2,
                                       world_size=2, rank=rank)
            assert len(parts) == 2 and all(len(p) == 4 for p in parts)
            seen += [i for p in parts for i in p]
        assert sorted(seen) == sorted(expected)
    # the same global batch split over 1 process is the same set of examples
    single = step_micro_batches(order, 1, lengths, micro_batch_size=8, grad_accum_steps=2)
    assert sorted(i for p in single for i in p) == sorted(order[16:32])
