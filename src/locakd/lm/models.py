"""Loading, checking and freezing causal language models (Hugging Face ``transformers``).

* :func:`load_causal_lm` / :func:`load_tokenizer` -- ``AutoModelForCausalLM`` / ``AutoTokenizer``
  with clear errors for missing paths and a pad token set to EOS when the tokenizer has none.
* :func:`check_vocab` / :func:`crop_logits` -- teacher and student must produce logits over the same
  vocabulary before a KD loss can compare them (see :func:`check_vocab` for the padded-rows case).
* :class:`~locakd.teachers.FrozenTeacher` (re-exported here) -- the teacher never trains and stays in eval mode.
* :func:`tiny_gpt2_config` / :func:`create_causal_lm` -- small randomly initialised GPT-2s for tests
  and the CPU benchmark.

``transformers`` is imported lazily so that ``import locakd.lm.models`` works without the optional
``lm`` extra until a function that needs it is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from locakd.errors import ConfigError, DataError, InputError
from locakd.lm.data import looks_like_hub_name
from locakd.losses.objectives import crop_logits  # noqa: F401  (re-exported)
from locakd.teachers import FrozenTeacher, freeze_teacher  # noqa: F401  (re-exported)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the lm extra is installed in tests
        raise ConfigError("the language-model pipeline needs the optional 'transformers' package: "
                          "pip install 'locakd[lm]'") from exc
    return transformers


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map ``"float32" | "bfloat16" | "float16"`` (or ``fp32``/``bf16``/``fp16``, or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported model dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"unknown model dtype '{dtype}'; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def _check_source(name_or_path: str | os.PathLike[str], what: str) -> str:
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{what} path {path} is a file; expected a folder written by save_pretrained "
                            "or a Hugging Face hub name")
        return str(path)
    if not looks_like_hub_name(text):
        raise DataError(f"{what} not found: no folder at '{text}' (and it is not a Hugging Face hub name)")
    return text


def load_causal_lm(
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> nn.Module:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a hub name (``"gpt2"``,
            ``"owner/model"``). A missing path that does not look like a hub name raises
            :class:`DataError` naming it, before ``transformers`` tries the network.
        dtype: parameter dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.
        device: where to put the model.
        **kwargs: passed to ``from_pretrained`` (e.g. ``revision``, ``attn_implementation``).

    The model is returned in eval mode (as ``from_pretrained`` leaves it); call ``.train()`` to train.
    Note: transformers 5 takes ``dtype=`` (``torch_dtype=`` is deprecated); this function passes ``dtype``.
    """
    source = _check_source(name_or_path, "model")
    torch_dtype = resolve_dtype(dtype)
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise DataError(f"could not load model '{source}': {exc}") from exc
    return model.to(device)


def load_tokenizer(name_or_path: str | os.PathLike[str], padding_side: str = "right", **kwargs: Any) -> Any:
    """Load a tokenizer with ``AutoTokenizer``; set ``pad_token = eos_token`` when there is none.

    ``padding_side`` defaults to ``"right"`` (training); batched generation in
    :func:`locakd.lm.evaluate.generate_responses` pads on the left by itself.
    """
    source = _check_source(name_or_path, "tokenizer")
    tf = _transformers()
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise DataError(f"could not load tokenizer '{source}': {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer '{source}' has no EOS token; the LM pipeline appends EOS to every response")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Vocabulary checks
# --------------------------------------------------------------------------------------------------


def output_vocab_size(model: nn.Module) -> int:
    """Number of logits the model produces per position (rows of its output layer)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        raise InputError(f"cannot tell the output vocabulary size of {type(model).__name__}: "
                         "no get_output_embeddings() weight and no config.vocab_size")
    return int(size)


def check_vocab(teacher: nn.Module | None, student: nn.Module, tokenizer: Any, crop_to_shared: bool = False) -> int:
    """Check that teacher and student logits cover the same vocabulary; return its size ``V``.

    Models of one family often have output layers padded to a multiple of 64/128 rows beyond the
    real vocabulary, and the padding differs between sizes (e.g. Qwen2.5: 152064 rows for the 7B,
    151936 for the 0.5B, tokenizer 151665). Those extra rows never correspond to a token, so the
    logits can be cropped to the shared size ``V = min(sizes)`` before the loss -- but only on
    request, because a genuine mismatch (different tokenizers) would otherwise be silently wrong.

    Args:
        teacher: the teacher model, or None (SFT: only the student is checked against the tokenizer).
        student: the student model.
        tokenizer: the tokenizer both models use; ``len(tokenizer)`` includes added tokens.
        crop_to_shared: allow different output sizes and return the shared size.

    Returns:
        ``V``: the vocabulary size the loss should use; apply :func:`crop_logits(logits, V)` to both
        teacher and student logits when a model's size differs from ``V``.

    Raises:
        InputError: sizes differ and ``crop_to_shared`` is False (the message names both sizes and the
            ``crop_vocab: true`` option), or a model has fewer rows than the tokenizer has tokens.
    """
    n_tok = len(tokenizer)
    s_size = output_vocab_size(student)
    sizes = {"student": s_size}
    if teacher is not None:
        sizes["teacher"] = output_vocab_size(teacher)
    for name, size in sizes.items():
        if size < n_tok:
            raise InputError(f"the {name}'s output layer has {size} rows but the tokenizer has {n_tok} tokens: "
                             f"the {name} cannot represent every token of this tokenizer")
    if teacher is not None and sizes["teacher"] != s_size:
        if not crop_to_shared:
            raise InputError(
                f"teacher and student output vocabularies differ: teacher {sizes['teacher']}, "
                f"student {s_size} (tokenizer {n_tok}). If they share a tokenizer and only the padded "
                f"embedding rows differ, set `crop_vocab: true` (crop_to_shared=True) to compare the "
                f"first {min(sizes['teacher'], s_size)} logits"
            )
        return min(sizes["teacher"], s_size)
    return s_size


# --------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------


def tiny_gpt2_config(
    vocab_size: int,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    n_positions: int = 256,
    dropout: float = 0.0,
    eos_token_id: int = 0,
    bos_token_id: int | None = None,
) -> Any:
    """A small ``GPT2Config`` for tests and the CPU benchmark.

    ``eos_token_id`` defaults to 0, the id of ``<|endoftext|>`` in tokenizers from
    :func:`locakd.lm.tokenizer.train_bpe_tokenizer` (GPT-2's default 50256 would be out of range);
    ``bos_token_id`` defaults to ``eos_token_id``. ``dropout`` sets residual, embedding and attention
    dropout alike.
    """
    if vocab_size < 1 or n_layer < 1 or n_head < 1 or n_embd < 1 or n_positions < 1:
        raise ConfigError("tiny_gpt2_config: vocab_size, n_layer, n_head, n_embd, n_positions must be >= 1")
    if n_embd % n_head:
        raise ConfigError(f"tiny_gpt2_config: n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if not 0 <= eos_token_id < vocab_size:
        raise ConfigError(f"tiny_gpt2_config: eos_token_id {eos_token_id} outside vocabulary of {vocab_size}")
    bos = eos_token_id if bos_token_id is None else bos_token_id
    tf = _transformers()
    return tf.GPT2Config(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=bos, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )


def create_causal_lm(config: Any, seed: int | None = None, dtype: str | torch.dtype = "float32") -> nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` from a config (seeded without touching the global RNG)."""
    tf = _transformers()
    torch_dtype = resolve_dtype(dtype)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.to(torch_dtype)
