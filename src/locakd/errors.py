"""Exception types raised by locakd.

Every error names the problem (which argument, which file, which key) so a user
can fix it without reading a stack trace from deep inside torch.
"""


class LocakdError(Exception):
    """Base class of every error raised deliberately by locakd."""


class InputError(LocakdError, ValueError):
    """A tensor argument has the wrong shape, dtype, range or contains NaN."""


class ConfigError(LocakdError, ValueError):
    """A config file or override is malformed, has an unknown key or a bad value."""


class DataError(LocakdError, ValueError):
    """A data file or directory is missing, corrupt or malformed."""


class CheckpointError(LocakdError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


class NonFiniteLossError(LocakdError, FloatingPointError):
    """A training loss term became NaN or infinite; the message names the term and the step."""

    def __init__(self, term: str, value: float | None, where: str) -> None:
        self.term, self.value, self.where = term, value, where
        shown = "not finite" if value is None else f"{value}"
        super().__init__(
            f"the training loss term '{term}' became {shown} at {where}; lower optim.lr, check the data, "
            "or use run.precision=float32"
        )
