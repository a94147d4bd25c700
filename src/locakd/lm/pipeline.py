"""Building blocks shared by the LM commands: records, tokenizer, models, and ``lm-eval``.

``lm-sft`` / ``lm-distill`` (:mod:`locakd.lm.trainer`) and ``lm-eval`` (:func:`run_lm_eval` here)
resolve a :class:`~locakd.lm.config.LMExperimentConfig` into data and models the same way, so a
run directory can be evaluated with exactly the prompts and tokenizer it was trained with.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..teachers import FrozenTeacher
from ..training.checkpoint import atomic_write_text
from .config import LMExperimentConfig, load_lm_config
from .data import (
    TokenizedDataset,
    load_instruction_records,
    make_collate_fn,
    tokenize_examples,
    train_test_split_records,
)
from .models import (
    apply_lora,
    check_teacher_tokenizer,
    create_causal_lm,
    is_model_dir,
    load_causal_lm,
    load_tokenizer,
)

VALID_HOLDOUT_SEED = 0
"""The train/valid hold-out split does not depend on run.seed, so every seed sees the same split."""


@dataclass
class RecordSplits:
    train: list[dict[str, Any]]
    valid: list[dict[str, Any]]


def load_train_valid_records(config: LMExperimentConfig) -> RecordSplits:
    """Training and validation records (validation: ``data.valid``, or ``data.valid_holdout`` train records)."""
    d = config.data
    if not d.train:
        raise ConfigError("data.train is required: a Dolly-layout .jsonl file or a Hugging Face dataset name")
    train = load_instruction_records(d.train, d.train_split)
    if d.max_train_examples is not None:
        train = train[: d.max_train_examples]
    valid: list[dict[str, Any]] = []
    if d.valid:
        if d.valid_holdout:
            raise ConfigError("set either data.valid or data.valid_holdout, not both")
        valid = load_instruction_records(d.valid, d.valid_split)
    elif d.valid_holdout:
        if d.valid_holdout >= len(train):
            raise ConfigError(f"data.valid_holdout={d.valid_holdout} leaves no training records out of {len(train)}")
        train, valid = train_test_split_records(train, d.valid_holdout, seed=VALID_HOLDOUT_SEED)
    return RecordSplits(train=train, valid=valid)


def load_test_records(config: LMExperimentConfig) -> list[dict[str, Any]]:
    if not config.data.test:
        raise ConfigError("data.test is required for lm-eval (a .jsonl file or a Hugging Face dataset name)")
    return load_instruction_records(config.data.test, config.data.test_split)


def tokenize(config: LMExperimentConfig, records: list[dict[str, Any]], tokenizer: Any) -> TokenizedDataset:
    return tokenize_examples(
        records, tokenizer, max_length=config.data.max_length,
        max_prompt_length=config.data.max_prompt_length, template=config.prompt_template(),
    )


def tokenizer_source(config: LMExperimentConfig) -> str:
    return config.model.tokenizer or config.model.student


def load_run_tokenizer(config: LMExperimentConfig, source: str | None = None) -> Any:
    source = source or tokenizer_source(config)
    if not source:
        raise ConfigError("model.student (or model.tokenizer) is required")
    with quiet_transformers():
        tokenizer = load_tokenizer(source)
    # transformers 5 quirk: AutoTokenizer on a folder with a config.json but no tokenizer files returns
    # an empty tokenizer (1 token) that encodes every text to [] instead of raising.
    if len(tokenizer) < 2 or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise DataError(
            f"the tokenizer loaded from '{source}' is empty (no tokenizer files there?); save the tokenizer "
            "next to the model or set model.tokenizer"
        )
    return tokenizer


def load_student(config: LMExperimentConfig, device: torch.device) -> nn.Module:
    """The model to train: ``from_pretrained``, or a fresh random init from its config (``model.init: scratch``)."""
    source = config.model.student
    if not source:
        raise ConfigError("model.student is required: a save_pretrained folder or a Hugging Face hub name")
    if config.model.init == "scratch":
        from transformers import AutoConfig

        try:
            hf_config = AutoConfig.from_pretrained(source)
        except OSError as err:
            raise DataError(f"model.init is 'scratch' but no model config could be read from '{source}': {err}") from None
        model = create_causal_lm(hf_config, seed=config.run.seed)
    else:
        with quiet_transformers():
            model = load_causal_lm(source, dtype="float32")
    lora = config.model.lora
    if lora.r:  # only the adapters train; best/ and final/ then hold the adapter
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
    return model.to(device)


def load_teacher(config: LMExperimentConfig, device: torch.device) -> FrozenTeacher:
    """The frozen teacher in ``model.teacher_dtype``, eval mode, no gradients.

    Unless ``model.check_tokenizer`` is false, the tokenizer saved with the teacher must equal the run's
    tokenizer (vocabulary, special tokens, encoding), or an error says how they differ."""
    if not config.model.teacher:
        raise ConfigError(f"method '{config.method.name}' needs a teacher: set model.teacher")
    if config.model.check_tokenizer:
        check_teacher_tokenizer(config.model.teacher, load_run_tokenizer(config), opt_out="model.check_tokenizer=false")
    with quiet_transformers():
        model = load_causal_lm(config.model.teacher, dtype=config.model.teacher_dtype, device=device)
    return FrozenTeacher(model)


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model: nn.Module, max_length: int, what: str) -> None:
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"data.max_length={max_length} exceeds the {what}'s {limit} positions; lower data.max_length "
            f"(and data.max_prompt_length)"
        )


def param_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@contextlib.contextmanager
def quiet_transformers():
    """No "Loading weights" / "Writing model shards" progress bars from transformers 5."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_pretrained_atomic(model: nn.Module, tokenizer: Any, target: Path, extra: dict[str, Any] | None = None) -> None:
    """``save_pretrained`` model + tokenizer into ``target``, swapped in by rename so it is never half-written."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    old = target.with_name(f".{target.name}.old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    with quiet_transformers():
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    if extra is not None:
        (tmp / "locakd_state.json").write_text(json.dumps(extra, indent=2) + "\n")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def misinstruction_batches(examples: TokenizedDataset | list, tokenizer: Any, batch_size: int):
    collate = make_collate_fn(tokenizer)
    for start in range(0, len(examples), batch_size):
        yield collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])


# --------------------------------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------------------------------


def _info(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_eval_source(source: str | Path, overrides: list[str] | None = None,
                        checkpoint: str | None = None) -> tuple[LMExperimentConfig, Path, Path | None]:
    """(config, model folder, run dir or None) for ``lm-eval CONFIG_OR_RUN_DIR``."""
    path = Path(source)
    if path.is_dir():
        cfg_path = path / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"{path} is not a locakd run directory (no config.yaml); pass a run dir or a config file")
        config = load_lm_config(cfg_path, overrides)
        which = checkpoint or config.eval.checkpoint
        model_dir = path / which
        if not is_model_dir(model_dir):
            fallback = path / "final"
            if which == "best" and is_model_dir(fallback):
                _info(f"lm-eval: {model_dir} not found (the run had no validation set); using {fallback}")
                model_dir = fallback
            else:
                raise DataError(f"no trained model in {model_dir}; did the run finish? (resume it with --resume)")
        return config, model_dir, path
    if not path.is_file():
        raise ConfigError(f"lm-eval: {path} is neither a run directory nor a config file")
    config = load_lm_config(path, overrides)
    if config.model.init == "scratch":
        raise ConfigError("lm-eval on a config evaluates model.student as it is; model.init 'scratch' has no weights")
    if not config.model.student:
        raise ConfigError("model.student is required: the model to evaluate")
    return config, Path(config.model.student), None


def teacher_misinstruction(config: LMExperimentConfig, teacher: nn.Module, tokenizer: Any,
                           train_examples: TokenizedDataset | list | None = None,
                           vocab_size: int | None = None) -> dict[str, Any]:
    """Teacher's token-level mis-instruction rate on (up to ``eval.misinstruction_max_examples``) training responses."""
    from .evaluate import teacher_misinstruction_rate

    if train_examples is None:
        records = load_train_valid_records(config).train
        train_examples = tokenize(config, records, tokenizer)
    cap = config.eval.misinstruction_max_examples
    examples = list(train_examples)[: cap or None]
    result = teacher_misinstruction_rate(
        teacher, misinstruction_batches(examples, tokenizer, config.eval.batch_size), vocab_size=vocab_size
    )
    return {**result, "n_examples": len(examples)}


def run_lm_eval(source: str | Path, overrides: list[str] | None = None, *, out_dir: str | Path | None = None,
                checkpoint: str | None = None) -> dict[str, Any]:
    """Generate for ``data.test`` and score ROUGE-L / exact match (mean +- std over seeds).

    Writes ``generations.jsonl`` and ``eval.json`` to ``out_dir`` (default: ``RUN_DIR/eval`` or
    ``run.out_dir/eval``). When ``model.teacher`` is set, also reports the teacher's token-level
    mis-instruction rate on the training responses.
    """
    from ..training.runtime import resolve_device, seed_everything
    from .evaluate import evaluate_generation

    config, model_dir, run_dir = resolve_eval_source(source, overrides, checkpoint)
    out = Path(out_dir) if out_dir is not None else (run_dir or Path(config.run.out_dir)) / "eval"
    device = resolve_device(config.run.device)
    seed_everything(config.run.seed)
    tokenizer = load_run_tokenizer(config, str(model_dir) if run_dir is not None else None)
    test = load_test_records(config)
    with quiet_transformers():
        model = load_causal_lm(model_dir, dtype="float32", device=device).eval()
    e = config.eval
    started = time.time()
    _info(f"lm-eval: {model_dir} on {len(test)} test records, "
          f"{'sampling' if e.do_sample else 'greedy'}, seeds {config.decode_seeds}")
    scores = evaluate_generation(
        model, tokenizer, test, template=config.prompt_template(), seeds=config.decode_seeds,
        max_new_tokens=e.max_new_tokens, do_sample=e.do_sample, temperature=e.temperature, top_p=e.top_p,
        top_k=e.top_k, batch_size=e.batch_size, max_prompt_length=config.data.max_prompt_length,
        output_path=out / "generations.jsonl", case_sensitive=e.case_sensitive,
    )
    result: dict[str, Any] = {
        "model": str(model_dir),
        "run_dir": str(run_dir) if run_dir is not None else None,
        "test": config.data.test,
        "decoding": {"do_sample": e.do_sample, "temperature": e.temperature, "top_p": e.top_p, "top_k": e.top_k,
                     "max_new_tokens": e.max_new_tokens, "seeds": config.decode_seeds},
        **scores,
        "generation_time_s": round(time.time() - started, 2),
    }
    if config.model.teacher:
        teacher = load_teacher(config, device)
        result["teacher_misinstruction"] = teacher_misinstruction(config, teacher, tokenizer)
        del teacher
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(result, indent=2) + "\n")
    _info(f"lm-eval: ROUGE-L {scores['rouge_l_mean']:.2f} +- {scores['rouge_l_std']:.2f}, exact match "
          f"{scores['exact_match_mean']:.2f} +- {scores['exact_match_std']:.2f} -> {out / 'eval.json'}")
    if "teacher_misinstruction" in result:
        _info(f"lm-eval: teacher token-level mis-instruction rate on training responses "
              f"{100 * result['teacher_misinstruction']['misinstruction_rate']:.1f}%")
    return result
