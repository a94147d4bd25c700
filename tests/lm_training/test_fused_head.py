"""The fused lm-head path (method.fused_lm_head): HeadTap / check_fused_head (lm/fused_head.py) and the micro-batch
loss that consumes hidden states and heads instead of logits (lm/batch_loss.py), against the logits path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locakd.errors import ConfigError
from locakd.lm.batch_loss import DenseLogits, FusedHead, micro_batch_loss
from locakd.lm.config import method_spec
from locakd.lm.evaluate import teacher_misinstruction_rate
from locakd.lm.fused_head import LOGIT_POST_PROCESSING, HeadTap, check_fused_head
from locakd.lm.models import FrozenTeacher, create_causal_lm, tiny_gpt2_config
from locakd.losses.objectives import IGNORE_INDEX, LMObjective

transformers = pytest.importorskip("transformers")

EPS32 = torch.finfo(torch.float32).eps
VOCAB = 300


def _llama_like(kind: str, layers: int, vocab: int = VOCAB):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "llama":  # untied head
        return transformers.LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False)
    if kind == "phi":  # a head with a bias
        return transformers.PhiConfig(**common)
    raise ValueError(kind)


def _pair(arch: str, student_vocab: int = VOCAB, teacher_vocab: int = VOCAB):
    """(student, frozen teacher): GPT-2 (tied head), Llama (untied) or Phi (head with a bias)."""
    if arch == "gpt2":
        sc, tc = tiny_gpt2_config(student_vocab, n_layer=1), tiny_gpt2_config(teacher_vocab, n_layer=2)
    else:
        sc, tc = _llama_like(arch, 1, student_vocab), _llama_like(arch, 2, teacher_vocab)
    return create_causal_lm(sc, seed=0).train(), FrozenTeacher(create_causal_lm(tc, seed=1))


def _batch(seed: int = 0, b: int = 3, length: int = 20, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX  # prompts
    mask = torch.ones_like(ids)
    labels[2, 14:], mask[2, 14:] = IGNORE_INDEX, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _run(loss_of, student, batch, normalizer, **kwargs):
    student.zero_grad(set_to_none=True)
    terms, _ = loss_of(student, batch, normalizer, count_misinstructed=True, **kwargs)
    terms.loss.backward()
    return terms, {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}


def _projection_error(model, batch) -> tuple[float, float]:
    """(e, max|z|): a float32 logit h @ W.T + b is within e = 16 ulps of the size of its H products (they round
    independently: the root of their sum of squares) plus |b| of the exact one, whichever way it is blocked."""
    with torch.no_grad(), HeadTap(model, "model") as tap:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    head = tap.inputs(batch["input_ids"])
    h = head.hidden.double().reshape(-1, head.hidden.shape[-1])
    w = head.weight.detach().double()
    bias = 0.0 if head.bias is None else head.bias.detach().double()
    size = float((h ** 2 @ (w ** 2).T).sqrt().max()) + (0.0 if head.bias is None else float(head.bias.detach().abs().max()))
    return 16 * EPS32 * size, float((h @ w.T + bias).abs().max())


def _rounding_bounds(student, teacher, batch, vocab):
    """(per-token loss error, relative gradient error) between the fused and the logits path, both float32.

    Each path's logits are within e of the exact ones (:func:`_projection_error`), so the two differ by <= 2 e
    per logit; each log-prob additionally rounds by 8 ulps of (max|z| + log V). A per-token CE or divergence term
    moves by at most 2x the log-prob change, so the two paths differ by <= 2 (2 lp + 2 e) per token. d loss /
    d logits moves relatively by the same amount (a probability times the log-prob change); a parameter's
    gradient sums those over the tokens (a random walk: sqrt(tokens)), plus the 64-ulp reordering allowance of
    tests/hf/test_hf_trainer.py."""
    (e_s, z_s), (e_t, z_t) = _projection_error(student, batch), _projection_error(teacher, batch)
    lp = 8 * EPS32 * (max(z_s, z_t) + math.log(vocab))
    per_token = 2 * (2 * lp + 2 * max(e_s, e_t))
    tokens = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return per_token, per_token * math.sqrt(tokens) + 64 * EPS32


def _misinstruction_range(teacher, labels, batch) -> tuple[int, int]:
    """(surely, possibly) mis-instructed response tokens by the teacher's float32 logits: the fused count may
    differ from theirs only on a token whose label logit is within 4 e of the best other logit (each count's
    logits are within e of the exact ones, so each margin within 2 e)."""
    e, _ = _projection_error(teacher, batch)
    with torch.no_grad():
        z = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()[:, :-1]
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    index = targets.clamp(min=0).unsqueeze(-1)
    margin = z.gather(-1, index).squeeze(-1) - z.scatter(-1, index, float("-inf")).amax(-1)
    close = valid & (margin.abs() <= 4 * e)
    mis = valid & (margin < 0)
    return int((mis & ~close).sum()), int((mis | close).sum())


# ------------------------------------------------------------------------------------------ the micro-batch loss


@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi"])
@pytest.mark.parametrize("method", ["kd+loca", "jsd"])
def test_fused_micro_batch_equals_the_logits_path(arch, method):
    """Loss, CE / divergence sums, the teacher's mis-instruction count and every student gradient (the tied or
    untied head's and its bias included) of one micro-batch: fused == logits path to float32 rounding."""
    student, teacher = _pair(arch)
    batch = _batch(seed=3)
    objective = LMObjective(spec=method_spec(method), kd_ratio=0.4, loca_alpha=0.8, temperature=1.5, chunk_size=7)
    n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    dense, dense_grads = _run(DenseLogits(objective, teacher), student, batch, n)
    fused, fused_grads = _run(FusedHead(objective, teacher), student, batch, n)
    per_token, grad_rtol = _rounding_bounds(student, teacher, batch, VOCAB)
    assert math.isclose(float(fused.loss.detach()), float(dense.loss.detach()), rel_tol=0, abs_tol=per_token)
    assert math.isclose(float(fused.ce_sum), float(dense.ce_sum), rel_tol=0, abs_tol=n * per_token)
    assert math.isclose(float(fused.kd_sum), float(dense.kd_sum), rel_tol=0, abs_tol=n * per_token)
    surely, possibly = _misinstruction_range(teacher, batch["labels"], batch)
    assert surely <= float(fused.n_misinstructed) <= possibly and surely <= float(dense.n_misinstructed) <= possibly
    assert surely > 0
    head = student.get_output_embeddings()
    assert dense_grads.keys() == fused_grads.keys()
    for name, grad in dense_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=grad_rtol * scale, msg=name)
    head_names = [name for name, p in student.named_parameters() if p is head.weight or p is head.bias]
    assert head_names and all(float(fused_grads[name].abs().max()) > 0 for name in head_names)


def test_padded_heads_compare_the_shared_vocabulary():
    """crop_vocab: student head 300 rows, teacher 320 (padding): the divergence uses weight[:300] of the teacher."""
    student, teacher = _pair("llama", student_vocab=VOCAB, teacher_vocab=VOCAB + 20)
    batch = _batch(seed=5)
    objective = LMObjective(spec=method_spec("rkl+loca"), kd_ratio=0.5, chunk_size=16, vocab_size=VOCAB)
    dense, dense_grads = _run(DenseLogits(objective, teacher), student, batch, 10.0)
    fused, fused_grads = _run(FusedHead(objective, teacher), student, batch, 10.0)
    per_token, grad_rtol = _rounding_bounds(student, teacher, batch, VOCAB + 20)
    n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert math.isclose(float(fused.loss.detach()), float(dense.loss.detach()), rel_tol=0, abs_tol=n / 10.0 * per_token)
    assert math.isclose(float(fused.kd_sum), float(dense.kd_sum), rel_tol=0, abs_tol=n * per_token)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=0, atol=grad_rtol * float(grad.abs().max()), msg=name)


def test_a_bfloat16_teacher_under_autocast_accumulates_in_float32():
    """A bf16 teacher and a bf16-autocast student: the fused loss equals the logits objective on float32 logits
    of the very hidden states and weights the heads received (no bf16 rounding of the logits), and the validation
    CE of the fused path equals the logits form from the same hidden states."""
    student, teacher = _pair("gpt2")
    teacher.module.to(torch.bfloat16)
    batch = _batch(seed=7)
    objective = LMObjective(spec=method_spec("kd+loca"), chunk_size=8)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    fused, _ = _run(FusedHead(objective, teacher), student, batch, 12.0, autocast=autocast)

    def float32_logits(model, context):
        with torch.no_grad(), context, HeadTap(model, "model") as tap:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        head = tap.inputs(batch["input_ids"])
        assert head.hidden.dtype == (torch.bfloat16 if model is teacher else torch.float32)
        return head.hidden.float() @ head.weight.float().T

    zs, zt = float32_logits(student, autocast), float32_logits(teacher, torch.autocast("cpu", enabled=False))
    reference = objective(zs, batch["labels"], zt, 12.0, count_misinstructed=True)
    per_token, _ = _rounding_bounds(student, teacher, batch, VOCAB)
    n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert math.isclose(float(fused.loss.detach()), float(reference.loss.detach()), rel_tol=0, abs_tol=n / 12.0 * per_token)
    surely, possibly = _misinstruction_range(teacher, batch["labels"], batch)
    assert surely <= float(fused.n_misinstructed) <= possibly and surely <= float(reference.n_misinstructed) <= possibly
    ce, _ = FusedHead(objective, teacher).summed_ce(student, batch, autocast=autocast)
    dense_ce = objective(zs, batch["labels"], zt, 1.0).ce_sum
    assert math.isclose(float(ce), float(dense_ce), rel_tol=0, abs_tol=n * per_token)


def test_validation_ce_and_teacher_misinstruction_without_logits():
    student, teacher = _pair("llama")
    batch = _batch(seed=9)
    objective = LMObjective(spec=method_spec("kd"), chunk_size=5)
    per_token, _ = _rounding_bounds(student, teacher, batch, VOCAB)
    n = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    fused_ce, fused_out = FusedHead(objective, teacher).summed_ce(student, batch)
    dense_ce, dense_out = DenseLogits(objective, teacher).summed_ce(student, batch)
    assert fused_out.logits.shape[1] == 0 and dense_out.logits.shape[1] == 20  # no logits on the fused path
    assert math.isclose(float(fused_ce), float(dense_ce), rel_tol=0, abs_tol=n * per_token)
    # the teacher is right on every third response token: the fused count must see the difference
    with torch.no_grad():
        top = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    labels = batch["labels"].clone()
    right = (torch.arange(labels.numel()).reshape(labels.shape) % 3 == 0) & (labels != IGNORE_INDEX)
    labels[:, 1:] = torch.where(right[:, 1:], top[:, :-1], labels[:, 1:])
    rigged = {**batch, "labels": labels}
    plain = teacher_misinstruction_rate(teacher, [rigged])
    fused = teacher_misinstruction_rate(teacher, [rigged], fused_lm_head=True, chunk_size=4)
    surely, possibly = _misinstruction_range(teacher, labels, batch)
    assert fused["n_tokens"] == plain["n_tokens"] and 0 < surely <= possibly < plain["n_tokens"]
    assert surely <= fused["n_misinstructed"] <= possibly and surely <= plain["n_misinstructed"] <= possibly


def test_the_tap_computes_no_logits_and_leaves_the_model_alone_outside():
    student, _ = _pair("gpt2")
    batch = _batch()
    with HeadTap(student, "student") as tap:
        out = student(input_ids=batch["input_ids"])
    assert out.logits.shape == (3, 0, VOCAB)
    head = tap.inputs(batch["input_ids"])
    assert head.hidden.shape == (3, 20, 32) and head.weight is student.transformer.wte.weight  # tied
    assert student(input_ids=batch["input_ids"]).logits.shape == (3, 20, VOCAB)  # the hook is gone


# ------------------------------------------------------------------------------------------ refusals


def _tiny(config_cls, **extra):
    config = config_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        **extra)
    return create_causal_lm(config, seed=0)


@pytest.mark.parametrize("config_cls, extra, named", [
    ("Gemma2Config", {"head_dim": 16}, r"final_logit_softcapping=30\.0"),
    ("CohereConfig", {}, r"logit_scale=0\.0625"),
    ("GraniteConfig", {"logits_scaling": 4.0}, r"logits_scaling=4\.0"),
])
def test_models_that_post_process_their_logits_are_refused(config_cls, extra, named):
    model = _tiny(getattr(transformers, config_cls), **extra)
    with pytest.raises(ConfigError, match=rf"method\.fused_lm_head .*post-processes its logits \({named}\)"):
        check_fused_head(model, "teacher")


def test_the_probe_catches_post_processing_the_config_list_does_not_name(monkeypatch):
    """Soft-capping at 30 barely changes small random logits; the probe's marker ramp of +-60 shows it."""
    model = _tiny(transformers.Gemma2Config, head_dim=16)
    monkeypatch.delitem(LOGIT_POST_PROCESSING, "final_logit_softcapping")
    state = torch.random.get_rng_state()
    with pytest.raises(ConfigError, match=r"method\.fused_lm_head .*does not return its output layer's result unchanged"):
        check_fused_head(model, "student")
    assert torch.equal(torch.random.get_rng_state(), state)  # the probe leaves the run's random stream alone
    model.config.final_logit_softcapping = None
    check_fused_head(model, "student")


class _TwoHeads(nn.Module):
    """A causal LM calling its output layer twice (e.g. an auxiliary head on the same weight)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        h = self.embed(input_ids)
        return (self.head(h) + self.head(h.flip(1)),)


class _QuantisedHead(nn.Linear):
    def forward(self, x):
        return super().forward(x).round()


def test_heads_that_are_not_one_plain_linear_call_are_refused():
    with pytest.raises(ConfigError, match=r"method\.fused_lm_head.*called its output layer 2 times"):
        check_fused_head(_TwoHeads(), "student")
    model = _TwoHeads()
    model.head = _QuantisedHead(8, VOCAB)
    with pytest.raises(ConfigError, match=r"needs a plain torch\.nn\.Linear output layer; the student's is .*_QuantisedHead"):
        check_fused_head(model, "student")
    with pytest.raises(ConfigError, match=r"needs the teacher's output layer"):
        check_fused_head(nn.Linear(3, 3), "teacher")
    with pytest.raises(ConfigError, match=r"method\.fused_lm_head .*method 'sft' has no divergence"):
        micro_batch_loss(LMObjective(spec=method_spec("sft")), None, fused_lm_head=True)


def test_a_weight_the_forward_leaves_unmaterialised_is_an_error():
    """The weight is taken when the head runs; one whose storage is gone after the forward (FSDP resharding frees
    it) or that is a partitioned placeholder (DeepSpeed ZeRO-3) is an error, not a silently wrong loss."""
    from locakd.losses.objectives import HeadInputs

    student, _ = _pair("llama")
    ids = _batch()["input_ids"]
    tap = HeadTap(student, "student")
    freed = torch.zeros(VOCAB, 32)
    freed.untyped_storage().resize_(0)
    for weight in (freed, torch.empty(0, 32)):
        tap._captured, tap._calls = HeadInputs(torch.zeros(3, 20, 32), weight), 1
        with pytest.raises(ConfigError, match=r"method\.fused_lm_head.*output-layer weight is not materialised"):
            tap.inputs(ids)
    tap._captured = HeadInputs(torch.zeros(3, 19, 32), torch.zeros(VOCAB, 32))
    with pytest.raises(ConfigError, match=r"received hidden states of shape \(3, 19, 32\) for input_ids \(3, 20\)"):
        tap.inputs(ids)
