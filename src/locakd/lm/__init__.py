"""The language-model (instruction-following) pipeline.

Modules (imported explicitly; ``import locakd.lm`` itself loads nothing heavy):

* :mod:`locakd.lm.config` -- the typed experiment config (``locakd show-config lm``).
* :mod:`locakd.lm.data` -- records (Dolly, chat messages, prompt/completion), prompt template,
  tokenisation with prompt masking, collation, the next-token label convention.
* :mod:`locakd.lm.models` -- loading causal LMs and tokenizers, vocabulary and tokenizer checks, LoRA
  adapters, tiny GPT-2 configs.
* :mod:`locakd.lm.build` -- records, tokenizer, student, teacher, optimizer and schedule from a config.
* :mod:`locakd.lm.trainer` -- ``lm-sft`` / ``lm-distill``: optimizer step, accumulation, validation (the
  run lifecycle is :mod:`locakd.engine`'s, the loss :class:`locakd.losses.objectives.LMObjective`).
* :mod:`locakd.lm.evaluate` -- generation, ROUGE-L, exact match, teacher mis-instruction rate.
* :mod:`locakd.lm.eval_command` -- ``lm-eval`` on a run directory or a config.
* :mod:`locakd.lm.fixtures` -- a tiny BPE tokenizer and synthetic instruction data for tests and benchmarks.
* :mod:`locakd.lm.hf_trainer` -- ``DistillationArguments`` / ``DistillationTrainer`` for ``transformers.Trainer``
  users (public as :mod:`locakd.hf`).
* :mod:`locakd.lm.hf_run` -- ``run.engine=hf``: the same YAML run through the Trainer, on the engine's run folder.

``locakd.lm.pipeline``, ``locakd.lm.tokenizer`` and ``locakd.lm.tasks`` re-export the modules they were
split into, for one release.
"""
