"""``locakd lm-eval``: generate for a test set and score ROUGE-L / exact match over seeds.

The source is a run directory (its ``best/`` or ``final/`` model, its ``config.yaml``) or a config file
(its ``model.student``); records, prompts and tokenizer are resolved by :mod:`locakd.lm.build`, exactly
as the run was trained.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..engine.io import atomic_write_text
from ..engine.runtime import resolve_device, seed_everything
from ..errors import ConfigError, DataError
from .build import (
    load_run_tokenizer,
    load_teacher,
    load_test_records,
    load_train_valid_records,
    quiet_transformers,
    teacher_misinstruction,
    tokenize,
)
from .config import LMExperimentConfig, load_lm_config
from .models import is_model_dir, load_causal_lm

__all__ = ["resolve_eval_source", "run_lm_eval"]


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
        if not is_model_dir(model_dir):  # a whole model (config.json) or a LoRA adapter
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


def run_lm_eval(source: str | Path, overrides: list[str] | None = None, *, out_dir: str | Path | None = None,
                checkpoint: str | None = None) -> dict[str, Any]:
    """Generate for ``data.test`` and score ROUGE-L / exact match (mean +- std over seeds).

    Writes ``generations.jsonl`` and ``eval.json`` to ``out_dir`` (default: ``RUN_DIR/eval`` or
    ``run.out_dir/eval``). When ``model.teacher`` is set, also reports the teacher's token-level
    mis-instruction rate on the training responses (read from ``model.teacher_cache`` when the run
    distilled from a cache; the teacher is then not loaded).
    """
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
    if config.model.teacher_cache:  # a run distilled from a cache: read the rate there, never load the teacher
        from .cache.run import cached_misinstruction, open_teacher_cache

        examples = tokenize(config, load_train_valid_records(config).train, tokenizer)
        cache = open_teacher_cache(config, tokenizer, split="train", examples=examples)
        result["teacher_misinstruction"] = cached_misinstruction(
            cache, examples, max_examples=config.eval.misinstruction_max_examples)
    elif config.model.teacher:
        teacher = load_teacher(config, device, tokenizer)
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
