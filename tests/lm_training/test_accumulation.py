"""Gradient accumulation: the accumulated loss and gradient equal those of one big batch."""

from __future__ import annotations

import math

import pytest
import torch

from locakd.lm.config import method_spec
from locakd.lm.data import collate_examples, count_valid_tokens, tokenize_examples
from locakd.lm.models import FrozenTeacher, create_causal_lm, tiny_gpt2_config
from locakd.lm.tasks import make_instruction_suite
from locakd.lm.trainer import (
    LMObjective,
    accumulate_gradients,
    lr_factor,
    step_micro_batches,
    summed_cross_entropy,
)


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
    means_acc = stats_acc.means(0.5, method != "sft")
    means_big = stats_big.means(0.5, method != "sft")
    for key in means_big:
        assert math.isclose(means_acc[key], means_big[key], rel_tol=1e-5), (key, means_acc, means_big)
    assert grads_acc.keys() == grads_big.keys() and grads_big
    for name in grads_big:
        torch.testing.assert_close(grads_acc[name], grads_big[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in teacher.parameters())


def test_objective_matches_reference_formula(pieces):
    """loss = ((1 - r) * CE_sum + r * KL_sum) / N with the shift, written out by hand."""
    ds, student, teacher, tok = pieces
    batch = collate_examples([ds[i] for i in range(4)], tok.pad_token_id)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    s2, t2, y = s[:, :-1][valid], t[:, :-1][valid], labels[valid]
    ce = torch.nn.functional.cross_entropy(s2, y, reduction="sum")
    kl = torch.nn.functional.kl_div(s2.log_softmax(-1), t2.log_softmax(-1), log_target=True, reduction="sum")
    n = float(valid.sum())
    terms = LMObjective(spec=method_spec("kd"), kd_ratio=0.3, chunk_size=None)(s, batch["labels"], t, n)
    torch.testing.assert_close(terms.loss, (0.7 * ce + 0.3 * kl) / n, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_same_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 17, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 17))
    labels[0, :5] = -100
    labels[2, 10:] = -100
    one = summed_cross_entropy(logits, labels, None)
    (g_one,) = torch.autograd.grad(one, logits)
    chunked = summed_cross_entropy(logits, labels, 7)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    torch.testing.assert_close(one, chunked)
    torch.testing.assert_close(g_one, g_chunked)


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


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, "cosine", 0.0) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert f[-1] < 0.05
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0
    assert lr_factor(10, 10, 0, "linear", 0.1) == pytest.approx(0.1)
