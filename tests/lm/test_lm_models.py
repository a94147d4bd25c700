"""Model loading, vocabulary checks, teacher freezing, and the BPE tokenizer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locakd.errors import ConfigError, DataError, InputError
from locakd.lm.fixtures import ENDOFTEXT, train_bpe_tokenizer
from locakd.lm.models import (
    FrozenTeacher,
    check_vocab,
    create_causal_lm,
    crop_logits,
    freeze_teacher,
    load_causal_lm,
    load_tokenizer,
    output_vocab_size,
    resolve_dtype,
    tiny_gpt2_config,
)


def _tiny(vocab, seed=0, **kw):
    return create_causal_lm(tiny_gpt2_config(vocab, n_layer=1, n_head=2, n_embd=16, n_positions=64, **kw), seed=seed)


# ------------------------------------------------------------------------------------------ tokenizer


def test_bpe_tokenizer_roundtrip_and_reload(tokenizer_dir, lm_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tok) <= 400
    assert tok.eos_token == tok.bos_token == tok.pad_token == ENDOFTEXT
    assert tok.eos_token_id == 0
    for text in ["Add the two numbers.\n12 7", "  spaces  and tabs\t", "ünïcödé — 漢字 🙂"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte level: everything round-trips
    assert tok("cat dog")["input_ids"] == lm_tokenizer("cat dog")["input_ids"]
    assert tok("cat")["input_ids"][0] != tok.eos_token_id  # no BOS added


def test_bpe_tokenizer_rejects_tiny_vocab():
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.add_special_tokens([ENDOFTEXT])
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token=ENDOFTEXT).save_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == tok.eos_token == ENDOFTEXT
    assert tok.padding_side == "right"


# ------------------------------------------------------------------------------------------ loading


def test_save_and_load_causal_lm_dtype(tmp_path, lm_tokenizer):
    model = _tiny(len(lm_tokenizer))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = load_causal_lm(tmp_path / "m", dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    loaded32 = load_causal_lm(str(tmp_path / "m"))
    for a, b in zip(model.parameters(), loaded32.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"model not found.*\./no/such/model"):
        load_causal_lm("./no/such/model")
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing") + "/")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        load_causal_lm(f)
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype("float8")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16


def test_create_causal_lm_is_seeded_and_leaves_global_rng():
    state = torch.get_rng_state()
    a, b, c = _tiny(300, seed=1), _tiny(300, seed=1), _tiny(300, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_tiny_config_checks():
    cfg = tiny_gpt2_config(300, n_layer=2, n_head=4, n_embd=32, n_positions=128)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.n_positions) == (300, 2, 4, 32, 128)
    assert cfg.eos_token_id == cfg.bos_token_id == 0
    with pytest.raises(ConfigError, match="divisible"):
        tiny_gpt2_config(300, n_head=3, n_embd=32)
    with pytest.raises(ConfigError, match="eos_token_id"):
        tiny_gpt2_config(300, eos_token_id=300)


# ------------------------------------------------------------------------------------------ vocab


def test_check_vocab_mismatch_and_crop(lm_tokenizer):
    teacher, student = _tiny(520), _tiny(512)
    assert output_vocab_size(teacher) == 520 and output_vocab_size(student) == 512
    with pytest.raises(InputError, match=r"teacher 520, student 512.*crop_vocab: true"):
        check_vocab(teacher, student, lm_tokenizer)
    v = check_vocab(teacher, student, lm_tokenizer, crop_to_shared=True)
    assert v == 512
    ids = torch.randint(0, len(lm_tokenizer), (2, 7))
    with torch.no_grad():
        t_logits = crop_logits(teacher(input_ids=ids).logits, v)
        s_logits = crop_logits(student(input_ids=ids).logits, v)
    assert t_logits.shape == s_logits.shape == (2, 7, 512)
    assert check_vocab(None, student, lm_tokenizer) == 512  # SFT: student only
    assert check_vocab(student, _tiny(512, seed=3), lm_tokenizer) == 512


def test_check_vocab_model_smaller_than_tokenizer(lm_tokenizer):
    small = _tiny(len(lm_tokenizer) - 1)
    with pytest.raises(InputError, match="cannot represent"):
        check_vocab(_tiny(len(lm_tokenizer)), small, lm_tokenizer, crop_to_shared=True)


def test_crop_logits():
    x = torch.randn(2, 3, 10)
    assert crop_logits(x, 10) is x
    assert torch.equal(crop_logits(x, 6), x[..., :6])
    with pytest.raises(InputError):
        crop_logits(x, 11)


# ------------------------------------------------------------------------------------------ teacher


def test_freeze_teacher_and_wrapper_stays_in_eval():
    model = _tiny(300, dropout=0.5)
    model.train()
    frozen = FrozenTeacher(model)
    assert not model.training and all(not p.requires_grad for p in model.parameters())

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.student = _tiny(300)
            self.teacher = frozen

    pair = Pair()
    pair.train()
    assert pair.student.training and not model.training and not frozen.training
    ids = torch.randint(0, 300, (2, 5))
    out1, out2 = frozen(input_ids=ids).logits, frozen(input_ids=ids).logits
    assert out1.grad_fn is None and torch.equal(out1, out2)  # eval: no dropout noise
    assert frozen.config.vocab_size == 300  # attributes forwarded
    model.train()  # even after a direct call, the forward puts it back into eval
    assert torch.equal(frozen(input_ids=ids).logits, out1)
    m2 = freeze_teacher(_tiny(300))
    assert not m2.training and not any(p.requires_grad for p in m2.parameters())


def test_label_convention_matches_hf_loss(tiny_model, lm_tokenizer):
    """Our shift convention (logits[:, :-1] vs labels[:, 1:]) is the one HF's own LM loss uses."""
    from locakd.lm.data import count_valid_tokens, make_collate_fn, shift_for_next_token, tokenize_examples

    records = [{"instruction": "Add the two numbers.", "context": "3 4", "response": "7"},
               {"instruction": "Repeat the word 3 times.", "context": "cat", "response": "cat cat cat"}]
    batch = make_collate_fn(lm_tokenizer)(tokenize_examples(records, lm_tokenizer).examples)
    with torch.no_grad():
        out = tiny_model(**batch)
    logits, labels = shift_for_next_token(out.logits, batch["labels"])
    ce_sum = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100, reduction="sum")
    # two float32 routes to the mean CE: each log-probability loses a few ulps of max|z| + log V
    tol = 8 * torch.finfo(torch.float32).eps * (float(out.logits.abs().max()) + math.log(out.logits.shape[-1]))
    torch.testing.assert_close(out.loss, ce_sum / count_valid_tokens(batch["labels"]), rtol=0, atol=tol)
