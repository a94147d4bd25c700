"""The language-model (instruction-following) pipeline.

Modules (imported explicitly; ``import locakd.lm`` itself loads nothing heavy):

* :mod:`locakd.lm.data` -- Dolly-layout records, prompt template, tokenisation with prompt masking,
  collation, the next-token label convention.
* :mod:`locakd.lm.models` -- loading causal LMs and tokenizers, vocabulary checks / cropping,
  frozen teacher, tiny GPT-2 configs.
* :mod:`locakd.lm.tokenizer` -- train a small byte-level BPE tokenizer offline.
* :mod:`locakd.lm.evaluate` -- generation, ROUGE-L, exact match, teacher mis-instruction rate.
* :mod:`locakd.lm.tasks` -- offline benchmark data (instruction suite, Shakespeare continuation).
"""
