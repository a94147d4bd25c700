"""locakd: LoCa logit calibration for knowledge distillation."""

__version__ = "0.1.0"
