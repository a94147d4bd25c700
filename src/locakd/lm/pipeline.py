"""Split into :mod:`locakd.lm.build` and :mod:`locakd.lm.eval_command`; kept for one release."""

from .build import (
    VALID_HOLDOUT_SEED,
    RecordSplits,
    check_positions,
    load_run_tokenizer,
    load_student,
    load_teacher,
    load_test_records,
    load_train_valid_records,
    max_positions,
    misinstruction_batches,
    param_count,
    quiet_transformers,
    save_pretrained_atomic,
    teacher_misinstruction,
    tokenize,
    tokenizer_source,
)
from .eval_command import resolve_eval_source, run_lm_eval

__all__ = [
    "VALID_HOLDOUT_SEED",
    "RecordSplits",
    "check_positions",
    "load_run_tokenizer",
    "load_student",
    "load_teacher",
    "load_test_records",
    "load_train_valid_records",
    "max_positions",
    "misinstruction_batches",
    "param_count",
    "quiet_transformers",
    "resolve_eval_source",
    "run_lm_eval",
    "save_pretrained_atomic",
    "teacher_misinstruction",
    "tokenize",
    "tokenizer_source",
]
