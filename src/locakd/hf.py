"""``locakd.hf``: LoCa distillation for Hugging Face ``transformers.Trainer`` / ``accelerate`` users.

    from locakd.hf import DistillationArguments, DistillationTrainer

:class:`DistillationArguments` is ``transformers.TrainingArguments`` plus the ``lm-distill`` method
settings; :class:`DistillationTrainer` is a ``transformers.Trainer`` that trains the student with
locakd's LM objective against a frozen teacher, under DDP, FSDP or DeepSpeed from ``accelerate launch``.
See :mod:`locakd.lm.hf_trainer` for the details. Importing this module imports ``transformers``;
``import locakd`` does not.
"""

from .lm.hf_trainer import DistillationArguments, DistillationTrainer

__all__ = ["DistillationArguments", "DistillationTrainer"]
