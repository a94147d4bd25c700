"""Fixtures for the Trainer integration tests: a BPE tokenizer with a chat template, data in every layout,
tiny random GPT-2, Llama and Qwen2 folders, and YAML configs for both engines. Built once per session,
no network."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from locakd.lm.data import PromptTemplate
from locakd.lm.fixtures import make_instruction_suite, train_bpe_tokenizer, write_jsonl
from locakd.lm.models import create_causal_lm, tiny_gpt2_config

N_POSITIONS = 96

# Every turn is "<|role|>\n" + content; an assistant turn ends with EOS (so its trained tokens end with EOS
# and generation stops there), the other turns with a newline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _torchao_too_old_for_peft() -> bool:
    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return False
    from packaging.version import Version

    return Version(version) < Version("0.16")


@pytest.fixture(autouse=True)
def _peft_without_old_torchao(monkeypatch):
    """peft >= 0.18 raises ImportError when an older torchao (< 0.16) is installed, as in the project's venv
    (torchtune's). These tests do not use torchao, so hide it from peft while they run."""
    if _torchao_too_old_for_peft():
        monkeypatch.setitem(sys.modules, "torchao", None)
        try:
            from peft import import_utils

            import_utils.is_torchao_available.cache_clear()
        except ImportError:
            pass
    yield
    if _torchao_too_old_for_peft():
        try:
            from peft import import_utils

            import_utils.is_torchao_available.cache_clear()
        except ImportError:
            pass


def tiny_llama_config(vocab: int, layers: int = 1, model_type: str = "llama") -> Any:
    from transformers import LlamaConfig, Qwen2Config

    cls = LlamaConfig if model_type == "llama" else Qwen2Config
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=N_POSITIONS,
               bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)


@dataclass
class HFEnv:
    root: Path
    tokenizer: Any
    tokenizer_dir: Path
    dolly: dict[str, Path]  # train / valid / test
    messages: dict[str, Path]
    prompt_completion: dict[str, Path]
    students: dict[str, Path]  # architecture -> config.json + tokenizer (model.init: scratch)
    pretrained_students: dict[str, Path]  # architecture -> random weights saved (model.init: pretrained)
    teachers: dict[str, Path]
    other_tokenizer_dir: Path  # same size, different vocabulary

    def config(self, out_dir: Path, arch: str = "gpt2", data: str = "dolly", **sections: dict[str, Any]) -> dict:
        files = getattr(self, data)
        cfg: dict[str, Any] = {
            "model": {"student": str(self.students[arch]), "init": "scratch", "teacher": str(self.teachers[arch])},
            "data": {"train": str(files["train"]), "valid": str(files["valid"]), "test": str(files["test"]),
                     "template": "compact", "max_length": 64, "max_prompt_length": 48},
            "method": {"name": "kd+loca", "chunk_size": 37},
            "optim": {"lr": 3e-3, "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 4, "warmup_steps": 1},
            "run": {"device": "cpu", "out_dir": str(out_dir), "progress": False, "tensorboard": False,
                    "log_every": 1, "eval_every": 2},
            "eval": {"max_new_tokens": 6, "do_sample": False, "seeds": [3], "batch_size": 8,
                     "valid_max_examples": 6, "misinstruction_max_examples": 16, "select_by": "loss"},
        }
        for name, values in sections.items():
            cfg[name].update(values)
        return cfg

    def write_config(self, path: Path, out_dir: Path, **kwargs: Any) -> Path:
        path.write_text(yaml.safe_dump(self.config(out_dir, **kwargs), sort_keys=False))
        return path


def _as_messages(record: dict[str, Any]) -> dict[str, Any]:
    user = record["instruction"] + (f"\n{record['context']}" if record["context"] else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["response"]}]}


def _as_prompt_completion(record: dict[str, Any], template: PromptTemplate) -> dict[str, Any]:
    return {"prompt": template.format(record), "completion": record["response"]}


@pytest.fixture(scope="session")
def hf_env(tmp_path_factory) -> HFEnv:
    root = tmp_path_factory.mktemp("hf")
    train, test = make_instruction_suite(64, 16, seed=7)
    template = PromptTemplate.from_config("compact")
    corpus = [template.format(r) + r["response"] for r in train + test] + ["<|user|>\n<|assistant|>\n<|system|>\n"] * 5
    tokenizer = train_bpe_tokenizer(corpus, 300)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer_dir = root / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    # a tokenizer of the same size trained on other text: same length, different token ids
    other = train_bpe_tokenizer([f"{w} zebra quokka {i} {w.upper()} xylophone" for i, w in
                                 enumerate(["alpha", "beta", "gamma", "delta", "omega"] * 40)] + corpus[:20],
                                len(tokenizer))
    other_dir = root / "other_tokenizer"
    other.save_pretrained(other_dir)
    assert len(other) == len(tokenizer) and other.get_vocab() != tokenizer.get_vocab()

    splits = {"train": train, "valid": test[:8], "test": test[8:]}
    dolly = {k: write_jsonl(v, root / f"dolly_{k}.jsonl") for k, v in splits.items()}
    messages = {k: write_jsonl([_as_messages(r) for r in v], root / f"messages_{k}.jsonl") for k, v in splits.items()}
    prompt_completion = {k: write_jsonl([_as_prompt_completion(r, template) for r in v], root / f"pc_{k}.jsonl")
                         for k, v in splits.items()}

    vocab = len(tokenizer)
    configs = {
        "gpt2": (tiny_gpt2_config(vocab, n_layer=1, n_head=2, n_embd=32, n_positions=N_POSITIONS),
                 tiny_gpt2_config(vocab, n_layer=2, n_head=2, n_embd=32, n_positions=N_POSITIONS)),
        # a Llama student distilled from a Qwen2 teacher: one tokenizer, two architectures
        "llama": (tiny_llama_config(vocab, 1, "llama"), tiny_llama_config(vocab, 2, "qwen2")),
    }
    students, pretrained, teachers = {}, {}, {}
    for arch, (student_cfg, teacher_cfg) in configs.items():
        students[arch] = root / f"{arch}_student_init"
        student_cfg.save_pretrained(students[arch])
        tokenizer.save_pretrained(students[arch])
        pretrained[arch] = root / f"{arch}_student_pretrained"
        create_causal_lm(student_cfg, seed=2).save_pretrained(pretrained[arch])
        tokenizer.save_pretrained(pretrained[arch])
        teachers[arch] = root / f"{arch}_teacher"
        create_causal_lm(teacher_cfg, seed=1).save_pretrained(teachers[arch])
        tokenizer.save_pretrained(teachers[arch])
    return HFEnv(root=root, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, dolly=dolly, messages=messages,
                 prompt_completion=prompt_completion, students=students, pretrained_students=pretrained,
                 teachers=teachers, other_tokenizer_dir=other_dir)
