"""locakd.lm.models.tokenizer_differences / check_same_tokenizer / check_teacher_tokenizer (issue 9, gap 3)."""

from __future__ import annotations

import copy

import pytest

from locakd.errors import DataError, InputError
from locakd.lm.models import (
    check_same_tokenizer,
    check_teacher_tokenizer,
    load_tokenizer,
    tokenizer_differences,
)


def test_the_same_tokenizer_passes(hf_env):
    again = load_tokenizer(hf_env.tokenizer_dir)
    assert tokenizer_differences(again, hf_env.tokenizer) == []
    check_same_tokenizer(again, hf_env.tokenizer, opt_out="x=false")


def test_equal_size_different_vocabulary(hf_env):
    other = load_tokenizer(hf_env.other_tokenizer_dir)
    assert len(other) == len(hf_env.tokenizer)
    (problem,) = [p for p in tokenizer_differences(other, hf_env.tokenizer) if p.startswith("vocabulary")]
    assert "token ids map to different tokens" in problem and "e.g. id" in problem


def test_same_vocabulary_different_special_tokens(hf_env):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(hf_env.tokenizer_dir)
    renamed = PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(tok.backend_tokenizer),
                                      eos_token=tok.convert_ids_to_tokens(5), bos_token=tok.bos_token,
                                      unk_token=tok.unk_token)
    assert renamed.get_vocab() == tok.get_vocab()
    problems = tokenizer_differences(renamed, tok)
    assert any(p.startswith("eos_token: teacher") for p in problems)
    with pytest.raises(InputError, match=r"eos_token.*set my\.opt_out=true to skip"):
        check_same_tokenizer(renamed, tok, opt_out="my.opt_out=true")


def test_same_vocabulary_different_encoding(hf_env):
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(hf_env.tokenizer_dir)
    core = copy.deepcopy(tok.backend_tokenizer)
    core.normalizer = normalizers.Lowercase()  # same vocabulary, other ids for upper-case text
    lowered = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=tok.eos_token, bos_token=tok.bos_token,
                                      unk_token=tok.unk_token)
    (problem,) = tokenizer_differences(lowered, tok)
    assert problem.startswith("encoding:") and "different merges or normalisation" in problem


@pytest.mark.parametrize("files", [(), ("config.json",), ("config.json", "model.safetensors")])
def test_a_teacher_folder_without_a_tokenizer_cannot_be_checked(hf_env, tmp_path, files):
    for name in files:  # transformers loads an empty tokenizer from a folder with a config.json only
        (tmp_path / name).write_bytes((hf_env.teachers["gpt2"] / name).read_bytes())
    with pytest.raises(DataError, match=r"(?s)cannot check that teacher and student share a tokenizer.*"
                                        r"model\.check_tokenizer=false to skip"):
        check_teacher_tokenizer(tmp_path, hf_env.tokenizer, opt_out="model.check_tokenizer=false")
