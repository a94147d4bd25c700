"""Generation, ROUGE-L / exact match scoring, and the teacher mis-instruction rate."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from locakd.errors import DataError
from locakd.lm.data import PromptTemplate, make_collate_fn, tokenize_examples
from locakd.lm.evaluate import (
    evaluate_generation,
    exact_match,
    generate_responses,
    rouge_l,
    teacher_misinstruction_rate,
)
from locakd.lm.fixtures import make_instruction_suite

# ------------------------------------------------------------------------------------------ metrics


def test_rouge_l_known_cases():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("red blue green", "cat dog bird") == 0.0
    # LCS = 3 ("the cat sat"): P = 3/3, R = 3/6, F = 2PR / (P + R) = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # LCS("one two three four", "one three five") = 2: P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("one two three four", "one three five") == pytest.approx(4 / 7)
    assert rouge_l("The Cat, sat!", "the cat sat") == pytest.approx(1.0)  # case / punctuation ignored
    assert rouge_l("", "") == 0.0


def test_exact_match():
    assert exact_match("  cat   dog\n", "cat dog") == 1.0
    assert exact_match("Cat dog", "cat dog") == 0.0
    assert exact_match("Cat dog", "cat dog", case_sensitive=False) == 1.0
    assert exact_match("cat dogs", "cat dog") == 0.0


# ------------------------------------------------------------------------------------------ generation


PROMPTS = ["Add the two numbers.\n3 4\n", "Repeat", "Write the words in upper case.\ncat dog bird red blue\n"]


def test_generate_greedy_batched_equals_single(tiny_model, lm_tokenizer):
    state = torch.get_rng_state()
    batched = generate_responses(tiny_model, lm_tokenizer, PROMPTS, max_new_tokens=8, batch_size=3)
    single = generate_responses(tiny_model, lm_tokenizer, PROMPTS, max_new_tokens=8, batch_size=1)
    assert batched == single  # left padding does not change greedy outputs
    assert len(batched) == 3 and all(isinstance(x, str) for x in batched)
    assert torch.equal(torch.get_rng_state(), state)
    assert not tiny_model.training


def test_generate_sampling_is_seeded(tiny_model, lm_tokenizer):
    kw = {"max_new_tokens": 12, "do_sample": True, "batch_size": 2}
    a = generate_responses(tiny_model, lm_tokenizer, PROMPTS, seed=5, **kw)
    b = generate_responses(tiny_model, lm_tokenizer, PROMPTS, seed=5, **kw)
    c = generate_responses(tiny_model, lm_tokenizer, PROMPTS, seed=6, **kw)
    assert a == b
    assert a != c
    hot = generate_responses(tiny_model, lm_tokenizer, PROMPTS, seed=5, temperature=0.5, top_p=0.9, **kw)
    assert len(hot) == 3


class EchoModel(nn.Module):
    """A fake LM whose ``generate`` answers each prompt from a lookup table, then EOS and junk."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, **kwargs):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()].tolist())
            answer = self.tokenizer(self.answers[prompt], add_special_tokens=False)["input_ids"]
            new = (answer + [eos_token_id] + [5, 6, 7] * max_new_tokens)[:max_new_tokens]
            rows.append(ids.tolist() + new)
        return torch.tensor(rows)


def test_generate_left_pads_and_cuts_at_eos(lm_tokenizer):
    template = PromptTemplate()
    records = [{"instruction": "Add the two numbers.", "context": "3 4", "response": "7"},
               {"instruction": "Repeat the word 2 times.", "context": "cat", "response": "cat cat"},
               {"instruction": "Hi", "context": "", "response": "Hello there"}]
    prompts = [template.format(r) for r in records]
    model = EchoModel(lm_tokenizer, {p: r["response"] for p, r in zip(prompts, records, strict=True)})
    out = generate_responses(model, lm_tokenizer, prompts, max_new_tokens=20, batch_size=8)
    assert out == ["7", "cat cat", "Hello there"]
    ids, mask = model.calls[0]
    assert mask[:, -1].eq(1).all()  # every prompt ends at the right edge: LEFT padding
    assert mask[:, 0].eq(0).any()


def test_evaluate_generation_perfect_fake_model(tmp_path, lm_tokenizer):
    train, test = make_instruction_suite(0, 12, seed=3)
    template = PromptTemplate.from_config("compact")
    answers = {template.format(r): r["response"] for r in test}
    model = EchoModel(lm_tokenizer, answers)
    path = tmp_path / "gen" / "out.jsonl"
    res = evaluate_generation(model, lm_tokenizer, test, template=template, seeds=[1, 2], max_new_tokens=24,
                              output_path=path)
    assert res["rouge_l_mean"] == pytest.approx(100.0) and res["exact_match_mean"] == pytest.approx(100.0)
    assert res["rouge_l_std"] == 0.0 and len(res["per_seed"]) == 2
    assert set(res["per_category"]) == {r["category"] for r in test}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 24
    assert {"prompt", "reference", "output", "seed"} <= set(lines[0])
    assert all(x["output"] == x["reference"] for x in lines)


def test_evaluate_generation_tiny_model_sampling(tmp_path, tiny_model, lm_tokenizer):
    _, test = make_instruction_suite(0, 6, seed=4)
    res = evaluate_generation(tiny_model, lm_tokenizer, test, seeds=[0, 1, 2], max_new_tokens=6,
                              do_sample=True, batch_size=4, output_path=tmp_path / "g.jsonl")
    per = [s["rouge_l"] for s in res["per_seed"]]
    assert res["rouge_l_mean"] == pytest.approx(sum(per) / 3)
    assert 0.0 <= res["rouge_l_mean"] <= 100.0 and res["rouge_l_std"] >= 0.0
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 18


# ------------------------------------------------------------------------------------------ mis-instruction


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return self.logits


def _onehot_logits(argmaxes, vocab):
    logits = torch.zeros(1, len(argmaxes), vocab)
    for t, k in enumerate(argmaxes):
        logits[0, t, k] = 5.0
    return logits


def test_misinstruction_rate_uses_next_token_shift():
    labels = torch.tensor([[-100, -100, 3, 4, 5]])
    # logits[t] predicts labels[t + 1]: position 1 -> 3 (right), 2 -> 4 (right), 3 -> 5 (predicts 9: wrong);
    # position 0 predicts a prompt token and position 4 predicts nothing: both ignored.
    logits = _onehot_logits([1, 3, 4, 9, 0], vocab=10)
    batch = {"input_ids": torch.zeros(1, 5, dtype=torch.long), "labels": labels}
    res = teacher_misinstruction_rate(FixedLogits(logits), [batch])
    assert res["n_tokens"] == 3 and res["n_misinstructed"] == 1
    assert res["misinstruction_rate"] == pytest.approx(1 / 3)
    assert res["top1_accuracy"] == pytest.approx(2 / 3)
    # (without the shift the answer would be 3/3 wrong)


def test_misinstruction_rate_tie_and_crop():
    labels = torch.tensor([[-100, 2, 3, -100]])
    logits = torch.zeros(1, 4, 12)
    logits[0, 0, [2, 7]] = 4.0  # tie between the label 2 and token 7: counts as right
    logits[0, 1, 3] = 4.0
    logits[0, 1, 11] = 9.0  # a padded vocabulary row beats the label, but is cropped away
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": labels,
             "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    assert teacher_misinstruction_rate(FixedLogits(logits), [batch])["n_misinstructed"] == 1
    res = teacher_misinstruction_rate(FixedLogits(logits), [batch], vocab_size=10)
    assert res["n_misinstructed"] == 0 and res["n_tokens"] == 2
    with pytest.raises(DataError, match="no response tokens"):
        teacher_misinstruction_rate(FixedLogits(logits), [{"input_ids": batch["input_ids"],
                                                           "labels": torch.full((1, 4), -100)}])


def test_misinstruction_rate_real_model(tiny_model, lm_tokenizer):
    train, _ = make_instruction_suite(8, 0, seed=0)
    ds = tokenize_examples(train, lm_tokenizer, max_length=128, max_prompt_length=96)
    collate = make_collate_fn(lm_tokenizer)
    batches = [collate(ds.examples[:4]), collate(ds.examples[4:])]
    tiny_model.train()
    res = teacher_misinstruction_rate(tiny_model, batches)
    assert tiny_model.training  # mode restored
    tiny_model.eval()
    assert res["n_tokens"] == ds.stats.response_tokens
    assert 0.0 <= res["misinstruction_rate"] <= 1.0
    assert res["misinstruction_rate"] + res["top1_accuracy"] == pytest.approx(1.0)
    # cross-check against a direct computation with the same shift
    n_right = 0
    with torch.no_grad():
        for b in batches:
            logits = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            target = b["labels"][:, 1:]
            valid = target != -100
            n_right += int(((logits.argmax(-1) == target) & valid).sum())
    assert res["top1_accuracy"] == pytest.approx(n_right / res["n_tokens"])
