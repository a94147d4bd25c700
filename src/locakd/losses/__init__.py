"""Distillation losses: pure functions over (student logits, teacher logits, labels).

Two registries name the loss math: :data:`~locakd.losses.targets.TRANSFORMS` (teacher-target
transforms: none, loca, ka_shift, ka_smooth, skip) and :data:`~locakd.losses.token.REGISTRY`
(token-level divergences). ``TARGET_TRANSFORMS`` and ``DIVERGENCES`` are their names.
"""

from ._common import kl_rows
from .dkd import KDDecomposition, decompose_kd, dkd_loss
from .kd import kd_loss
from .linear import LinearTerms, linear_distill_objective, linear_token_distill_loss
from .sparse import (
    sparse_misinstruction_mask,
    sparse_misinstruction_rate,
    sparse_teacher_buckets,
    sparse_token_distill_loss,
)
from .targets import TARGET_TRANSFORMS, TRANSFORMS, TargetTransform, standardize_logits, teacher_log_target
from .token import (
    DIVERGENCES,
    REGISTRY,
    Divergence,
    divergence_rows,
    forward_kl_loss,
    get_divergence,
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
    "REGISTRY",
    "TARGET_TRANSFORMS",
    "TRANSFORMS",
    "Divergence",
    "KDDecomposition",
    "LinearTerms",
    "TargetTransform",
    "decompose_kd",
    "divergence_rows",
    "dkd_loss",
    "forward_kl_loss",
    "get_divergence",
    "jsd_loss",
    "kd_loss",
    "kl_rows",
    "linear_distill_objective",
    "linear_token_distill_loss",
    "reverse_kl_loss",
    "shift_for_next_token",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "sparse_misinstruction_mask",
    "sparse_misinstruction_rate",
    "sparse_teacher_buckets",
    "sparse_token_distill_loss",
    "standardize_logits",
    "teacher_log_target",
    "token_distill_loss",
    "total_variation_loss",
]
