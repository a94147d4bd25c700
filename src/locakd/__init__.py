"""locakd: LoCa logit calibration for knowledge distillation.

The public API (calibration and losses) needs only torch and numpy::

    from locakd import kd_loss, dkd_loss, loca_calibrate, misinstruction_mask
"""

from .calibration import (
    loca_calibrate,
    loca_calibrate_sparse,
    loca_log_calibrate,
    misinstruction_mask,
    misinstruction_rate,
)
from .distiller import Distiller
from .errors import CheckpointError, ConfigError, DataError, InputError, LocakdError
from .losses import (
    DIVERGENCES,
    TARGET_TRANSFORMS,
    decompose_kd,
    dkd_loss,
    forward_kl_loss,
    jsd_loss,
    kd_loss,
    linear_token_distill_loss,
    reverse_kl_loss,
    shift_for_next_token,
    skew_forward_kl_loss,
    skew_reverse_kl_loss,
    sparse_misinstruction_rate,
    sparse_token_distill_loss,
    standardize_logits,
    teacher_log_target,
    token_distill_loss,
    total_variation_loss,
)

__version__ = "0.1.0"

__all__ = [
    "DIVERGENCES",
    "TARGET_TRANSFORMS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Distiller",
    "InputError",
    "LocakdError",
    "__version__",
    "decompose_kd",
    "dkd_loss",
    "forward_kl_loss",
    "jsd_loss",
    "kd_loss",
    "linear_token_distill_loss",
    "loca_calibrate",
    "loca_calibrate_sparse",
    "loca_log_calibrate",
    "misinstruction_mask",
    "misinstruction_rate",
    "reverse_kl_loss",
    "shift_for_next_token",
    "skew_forward_kl_loss",
    "skew_reverse_kl_loss",
    "sparse_misinstruction_rate",
    "sparse_token_distill_loss",
    "standardize_logits",
    "teacher_log_target",
    "token_distill_loss",
    "total_variation_loss",
]
