"""Distillation losses: pure functions over (student logits, teacher logits, labels)."""

from .dkd import KDDecomposition, decompose_kd, dkd_loss
from .kd import kd_loss, kl_rows
from .targets import TARGET_TRANSFORMS, standardize_logits, teacher_log_target
from .token import (
    DIVERGENCES,
    divergence_rows,
    forward_kl_loss,
    jsd_loss,
    reverse_kl_loss,
    shift_for_next_token,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    token_distill_loss,
    total_variation_loss,
)

__all__ = [
    "DIVERGENCES",
    "KDDecomposition",
    "TARGET_TRANSFORMS",
    "decompose_kd",
    "divergence_rows",
    "dkd_loss",
    "forward_kl_loss",
    "jsd_loss",
    "kd_loss",
    "kl_rows",
    "reverse_kl_loss",
    "shift_for_next_token",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "standardize_logits",
    "teacher_log_target",
    "token_distill_loss",
    "total_variation_loss",
]
