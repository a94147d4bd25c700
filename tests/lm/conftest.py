"""Shared fixtures for the LM pipeline tests: a small BPE tokenizer and tiny random GPT-2s."""

from __future__ import annotations

import pytest

from locakd.lm.data import PromptTemplate
from locakd.lm.fixtures import make_instruction_suite, train_bpe_tokenizer
from locakd.lm.models import create_causal_lm, tiny_gpt2_config


def _corpus() -> list[str]:
    train, test = make_instruction_suite(300, 50, seed=123)
    template = PromptTemplate()
    texts = []
    for r in train + test:
        texts.append(template.format(r) + r["response"])
    texts += [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(50)]
    return texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(_corpus(), vocab_size=400, save_dir=path)
    return path


@pytest.fixture(scope="session")
def lm_tokenizer(tokenizer_dir):
    from locakd.lm.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(lm_tokenizer):
    config = tiny_gpt2_config(len(lm_tokenizer), n_layer=2, n_head=2, n_embd=32, n_positions=256,
                              eos_token_id=lm_tokenizer.eos_token_id)
    return create_causal_lm(config, seed=0).eval()
