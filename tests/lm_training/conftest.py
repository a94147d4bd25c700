"""Fixtures for the LM training tests: records, a small BPE tokenizer, tiny GPT-2 folders, configs.

Everything is built once per session under a temporary folder; no network, no hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from locakd.lm.data import PromptTemplate
from locakd.lm.fixtures import make_instruction_suite, train_bpe_tokenizer, write_jsonl
from locakd.lm.models import create_causal_lm, tiny_gpt2_config

N_POSITIONS = 96


@dataclass
class LMEnv:
    root: Path
    tokenizer: Any
    train: Path
    valid: Path
    test: Path
    student_init: Path  # config.json + tokenizer (model.init: scratch)
    teacher: Path  # random weights saved with save_pretrained (a "pretrained" teacher)

    def config(self, out_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
        """A small, fast experiment config as a dict; ``sections`` update the defaults per section."""
        cfg: dict[str, Any] = {
            "model": {"student": str(self.student_init), "init": "scratch", "teacher": str(self.teacher)},
            "data": {"train": str(self.train), "valid": str(self.valid), "test": str(self.test),
                     "template": "compact", "max_length": 64, "max_prompt_length": 48},
            "method": {"name": "kd+loca", "chunk_size": 37},
            "optim": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 4,
                      "warmup_steps": 1},
            "run": {"device": "cpu", "out_dir": str(out_dir), "progress": False, "tensorboard": False,
                    "log_every": 1, "eval_every": 2},
            "eval": {"max_new_tokens": 6, "do_sample": False, "seeds": [3], "batch_size": 8,
                     "valid_max_examples": 6, "misinstruction_max_examples": 16},
        }
        for name, values in sections.items():
            cfg[name].update(values)
        return cfg

    def write_config(self, path: Path, out_dir: Path, **sections: dict[str, Any]) -> Path:
        path.write_text(yaml.safe_dump(self.config(out_dir, **sections), sort_keys=False))
        return path


@pytest.fixture(scope="session")
def lm_env(tmp_path_factory) -> LMEnv:
    root = tmp_path_factory.mktemp("lm_training")
    train, test = make_instruction_suite(64, 16, seed=7)
    template = PromptTemplate.from_config("compact")
    tokenizer = train_bpe_tokenizer([template.format(r) + r["response"] for r in train + test], 300,
                                    save_dir=root / "tokenizer")
    paths = {
        "train": write_jsonl(train, root / "train.jsonl"),
        "valid": write_jsonl(test[:8], root / "valid.jsonl"),
        "test": write_jsonl(test[8:], root / "test.jsonl"),
    }
    vocab = len(tokenizer)
    student_init = root / "student_init"
    tiny_gpt2_config(vocab, n_layer=1, n_head=2, n_embd=32, n_positions=N_POSITIONS).save_pretrained(student_init)
    tokenizer.save_pretrained(student_init)
    teacher = root / "teacher"
    create_causal_lm(tiny_gpt2_config(vocab, n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS),
                     seed=1).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return LMEnv(root=root, tokenizer=tokenizer, student_init=student_init, teacher=teacher, **paths)
