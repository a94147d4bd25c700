"""tests/lm_cache: make the helper module importable; tiny tensor ops single-threaded."""

import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# An LM run to capture a cache for (lm-cache-teacher tests): BPE tokenizer, tiny GPT-2s, data files
# --------------------------------------------------------------------------------------------------


class CacheRunEnv:
    """Files of a tiny lm-distill run; :meth:`config` returns its config dict (sections updated by keyword)."""

    def __init__(self, root, tokenizer, teacher, student_init, train, valid):
        self.root, self.tokenizer, self.teacher, self.student_init = root, tokenizer, teacher, student_init
        self.train, self.valid = train, valid

    def config(self, cache_dir, **sections):
        cfg = {
            "model": {"student": str(self.student_init), "init": "scratch", "teacher": str(self.teacher)},
            "data": {"train": str(self.train), "valid": str(self.valid), "template": "compact",
                     "max_length": 48, "max_prompt_length": 32},
            "method": {"name": "kd+loca"},
            "run": {"device": "cpu", "progress": False},
            "cache": {"dir": None if cache_dir is None else str(cache_dir), "top_k": 16, "examples_per_shard": 6, "batch_size": 4},
        }
        for name, values in sections.items():
            cfg[name] = {**cfg.get(name, {}), **values}
        return cfg

    def write_config(self, path, cache_dir, **sections):
        import yaml

        path.write_text(yaml.safe_dump(self.config(cache_dir, **sections), sort_keys=False))
        return path


@pytest.fixture(scope="session")
def cache_run(tmp_path_factory) -> CacheRunEnv:
    from locakd.lm.data import PromptTemplate
    from locakd.lm.fixtures import make_instruction_suite, train_bpe_tokenizer, write_jsonl
    from locakd.lm.models import create_causal_lm, tiny_gpt2_config

    root = tmp_path_factory.mktemp("cache_run")
    train, test = make_instruction_suite(30, 8, seed=11)
    template = PromptTemplate.from_config("compact")
    tokenizer = train_bpe_tokenizer([template.format(r) + r["response"] for r in train + test], 300,
                                    save_dir=root / "tokenizer")
    vocab = len(tokenizer)
    student_init = root / "student_init"
    tiny_gpt2_config(vocab, n_layer=1, n_head=2, n_embd=16, n_positions=64).save_pretrained(student_init)
    tokenizer.save_pretrained(student_init)
    teacher = root / "teacher"
    model = create_causal_lm(tiny_gpt2_config(vocab, n_layer=2, n_head=2, n_embd=32, n_positions=64), seed=3)
    with torch.no_grad():  # a peaked teacher (logits of a few nats' spread), not the flat random init
        model.transformer.wte.weight.mul_(30.0)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return CacheRunEnv(root, tokenizer, teacher, student_init, write_jsonl(train, root / "train.jsonl"),
                       write_jsonl(test, root / "valid.jsonl"))
