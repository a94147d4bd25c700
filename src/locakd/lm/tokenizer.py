"""Train a small byte-level BPE tokenizer (for tests and the offline CPU benchmark).

The result behaves like GPT-2's tokenizer: byte-level (any text round-trips, no unknown tokens), no
prefix space, and a single special token ``<|endoftext|>`` (id 0) used as EOS, BOS and PAD. It is
saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(save_dir)`` (and
:func:`locakd.lm.models.load_tokenizer`) load it back.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from locakd.errors import ConfigError

ENDOFTEXT = "<|endoftext|>"
_N_BYTES = 256


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    save_dir: str | os.PathLike[str] | None = None,
    min_frequency: int = 2,
    model_max_length: int | None = None,
) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    Args:
        texts: training text (any iterable of strings; consumed once).
        vocab_size: target vocabulary size including the 256 byte tokens and ``<|endoftext|>``
            (so at least 257). Fewer tokens result when the texts have too few merges to learn.
        save_dir: if given, the tokenizer is written there with ``save_pretrained``.
        min_frequency: minimum pair frequency for a merge.
        model_max_length: recorded in the tokenizer config (e.g. the model's ``n_positions``).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (in transformers 5 an alias of
        ``TokenizersBackend``) with ``eos_token = bos_token = pad_token = "<|endoftext|>"`` (id 0),
        ``padding_side = "right"``; it adds no special tokens when encoding.
    """
    if vocab_size < _N_BYTES + 1:
        raise ConfigError(f"vocab_size must be >= {_N_BYTES + 1} (256 byte tokens + {ENDOFTEXT}), got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    kwargs: dict[str, Any] = {}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=ENDOFTEXT,
        bos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        padding_side="right",
        **kwargs,
    )
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
