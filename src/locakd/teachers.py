"""The frozen teacher: one concept, used by :class:`~locakd.distiller.Distiller` and the LM pipeline.

A teacher in distillation never trains: its parameters need no gradient, it runs without
autograd, and it must stay in eval mode (BatchNorm statistics and dropout frozen) even when
a parent module, a trainer or a user calls ``.train()``. :class:`FrozenTeacher` guarantees all
three for any ``nn.Module``; unknown attributes (``config``, ``device``,
``get_output_embeddings`` ...) are forwarded to the wrapped model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FrozenTeacher", "freeze_teacher"]


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode and turn off ``requires_grad`` on every parameter; returns it.

    A later ``parent.train()`` on a module that contains the teacher flips it back to train mode
    (dropout on!). Either call ``teacher.eval()`` after every ``.train()`` or wrap it in
    :class:`FrozenTeacher`, whose ``train()`` keeps the inner model in eval mode.
    """
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenTeacher(nn.Module):
    """A frozen teacher that cannot be switched back to train mode and runs without autograd.

    ``FrozenTeacher(model)(*args, **kwargs)`` calls ``model`` under ``torch.no_grad()`` (not
    ``inference_mode``: its outputs are used as constants inside the student's autograd graph).
    ``train(True)`` is ignored for the inner model, and a direct ``model.train()`` is undone at the
    next call. Wrapping a ``FrozenTeacher`` again returns the same kind of wrapper around the same
    model (no nesting).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if isinstance(model, FrozenTeacher):
            model = model.module
        self.module = freeze_teacher(model)
        super().train(False)  # the wrapper's own flag too: eval from construction, not only after .train()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        self.module.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training:  # someone called module.train() directly
            self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)
