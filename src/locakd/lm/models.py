"""Loading, checking and freezing causal language models (Hugging Face ``transformers``).

* :func:`load_causal_lm` / :func:`load_tokenizer` -- ``AutoModelForCausalLM`` / ``AutoTokenizer``
  with clear errors for missing paths and a pad token set to EOS when the tokenizer has none.
* :func:`check_vocab` / :func:`crop_logits` -- teacher and student must produce logits over the same
  vocabulary before a KD loss can compare them (see :func:`check_vocab` for the padded-rows case).
* :func:`check_same_tokenizer` / :func:`check_teacher_tokenizer` -- equal sizes are not enough: the
  two tokenizers must map the same ids to the same tokens and encode text alike.
* :func:`apply_lora` / :func:`is_adapter_dir` -- LoRA students through ``peft``; :func:`load_causal_lm`
  loads a saved adapter folder onto its base model.
* :class:`~locakd.teachers.FrozenTeacher` (re-exported here) -- the teacher never trains and stays in eval mode.
* :func:`tiny_gpt2_config` / :func:`create_causal_lm` -- small randomly initialised GPT-2s for tests
  and the CPU benchmark.

``transformers`` and ``peft`` are imported lazily so that ``import locakd.lm.models`` works without the
optional ``lm`` / ``hf`` extras until a function that needs them is called.
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


def _peft():
    try:
        import peft
    except ImportError as exc:
        raise ConfigError("LoRA students need the optional 'peft' package: pip install 'locakd[hf]'") from exc
    return peft


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

    A folder holding a ``peft`` adapter (``adapter_config.json``, as a LoRA run saves) is loaded with
    ``PeftModel.from_pretrained`` onto the base model its config names.

    The model is returned in eval mode (as ``from_pretrained`` leaves it); call ``.train()`` to train.
    Note: transformers 5 takes ``dtype=`` (``torch_dtype=`` is deprecated); this function passes ``dtype``.
    """
    source = _check_source(name_or_path, "model")
    torch_dtype = resolve_dtype(dtype)
    if is_adapter_dir(source):
        return _load_adapter(Path(source), torch_dtype, device, **kwargs)
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise DataError(f"could not load model '{source}': {exc}") from exc
    return model.to(device)


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a ``peft`` adapter (``adapter_config.json``), e.g. a LoRA student's best/."""
    return (Path(path) / "adapter_config.json").is_file()


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """True for a ``save_pretrained`` folder of a whole model (``config.json``) or of an adapter."""
    return (Path(path) / "config.json").is_file() or is_adapter_dir(path)


def _load_adapter(folder: Path, dtype: torch.dtype, device: str | torch.device, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained`` on the base model named in ``adapter_config.json``."""
    import json

    peft = _peft()
    try:
        base_source = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{folder / 'adapter_config.json'} does not name its base model "
                        f"('base_model_name_or_path'): {exc!r}") from exc
    if not base_source:
        raise DataError(f"the adapter in {folder} does not name its base model (empty base_model_name_or_path)")
    base = load_causal_lm(base_source, dtype=dtype, device="cpu", **kwargs)
    try:
        model = peft.PeftModel.from_pretrained(base, str(folder))
    except (OSError, ValueError) as exc:
        raise DataError(f"could not load the adapter in {folder} onto {base_source}: {exc}") from exc
    except ImportError as exc:  # peft refuses some installed optional backends (e.g. an old torchao)
        raise ConfigError(f"peft cannot load LoRA layers in this environment: {exc}") from exc
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
    except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files
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
# Tokenizer identity
# --------------------------------------------------------------------------------------------------

# Texts both tokenizers must encode to the same ids: equal vocabularies with different merges,
# normalisers or pre-tokenisers still split text differently.
_PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces, tabs\tand\nnew lines; numbers 3.14159 and 2024-05-01.",
    "Instruction: Write the words in upper case.\nResponse:\nCAT DOG",
    "Ünïcödé — naïve café, 東京, 😀",
    "def f(x):\n    return x ** 2  # code",
)
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token")  # pad is excluded: padding is never trained or compared


def _special(tokenizer: Any, name: str) -> tuple[Any, Any]:
    return getattr(tokenizer, name, None), getattr(tokenizer, f"{name}_id", None)


def tokenizer_differences(teacher_tokenizer: Any, student_tokenizer: Any, max_examples: int = 3) -> list[str]:
    """What differs between two tokenizers (empty when they are interchangeable for distillation).

    Compared: the vocabulary (every token string and its id, added tokens included), the BOS / EOS /
    UNK tokens and their ids, the additional special tokens, and the ids a few probe texts encode to.
    The pad token is not compared (padding positions are neither trained nor compared).
    """
    problems: list[str] = []
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        ids = sorted(set(t_by_id) | set(s_by_id))
        differ = [i for i in ids if t_by_id.get(i) != s_by_id.get(i)]
        shown = ", ".join(f"id {i}: {t_by_id.get(i, '<none>')!r} vs {s_by_id.get(i, '<none>')!r}"
                          for i in differ[:max_examples])
        problems.append(f"vocabulary: {len(differ)} of {len(ids)} token ids map to different tokens "
                        f"(teacher {len(t_vocab)} tokens, student {len(s_vocab)}; e.g. {shown})")
    for name in _SPECIAL_TOKENS:
        t, s = _special(teacher_tokenizer, name), _special(student_tokenizer, name)
        if t != s:
            problems.append(f"{name}: teacher {t[0]!r} (id {t[1]}) vs student {s[0]!r} (id {s[1]})")
    t_extra = set(getattr(teacher_tokenizer, "additional_special_tokens", None) or [])
    s_extra = set(getattr(student_tokenizer, "additional_special_tokens", None) or [])
    if t_extra != s_extra:
        problems.append(f"additional special tokens: only the teacher has {sorted(t_extra - s_extra)[:5]}, "
                        f"only the student {sorted(s_extra - t_extra)[:5]}")
    if not problems:
        for text in _PROBE_TEXTS:
            t_ids = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
            s_ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
            if list(t_ids) != list(s_ids):
                problems.append(f"encoding: {text!r} is {list(t_ids)[:12]} for the teacher and "
                                f"{list(s_ids)[:12]} for the student (same vocabulary, different merges or "
                                "normalisation)")
                break
    return problems


def check_same_tokenizer(teacher_tokenizer: Any, student_tokenizer: Any, *, opt_out: str) -> None:
    """Raise :class:`InputError` unless the two tokenizers are interchangeable (see :func:`tokenizer_differences`).

    Logit distillation compares the teacher's and the student's scores of the same token id, so equal
    vocabulary sizes are not enough: ids must mean the same tokens. ``opt_out`` names the setting that
    skips this check (it is quoted in the error).
    """
    problems = tokenizer_differences(teacher_tokenizer, student_tokenizer)
    if problems:
        raise InputError(
            "teacher and student tokenizers differ, so the same token id means different tokens and the "
            "distillation would be meaningless: " + "; ".join(problems) + ". Use a teacher and a student that "
            f"share one tokenizer; only if you are sure they encode every text to the same ids, set {opt_out} "
            "to skip this check"
        )


def check_teacher_tokenizer(teacher_source: str | os.PathLike[str], student_tokenizer: Any, *, opt_out: str) -> None:
    """Load the tokenizer saved with the teacher (folder or hub name) and :func:`check_same_tokenizer` it."""
    try:
        teacher_tokenizer = load_tokenizer(teacher_source)
    except (DataError, ConfigError) as err:
        raise DataError(f"cannot check that teacher and student share a tokenizer: no usable tokenizer at the "
                        f"teacher '{teacher_source}' ({err}); save the teacher's tokenizer next to it, or set "
                        f"{opt_out} to skip the check") from err
    # transformers 5 returns an empty tokenizer for a folder without tokenizer files instead of raising
    if len(teacher_tokenizer) < 2:
        raise DataError(f"cannot check that teacher and student share a tokenizer: the teacher folder "
                        f"'{teacher_source}' holds no tokenizer files; save the teacher's tokenizer next to it, or "
                        f"set {opt_out} to skip the check")
    check_same_tokenizer(teacher_tokenizer, student_tokenizer, opt_out=opt_out)


# --------------------------------------------------------------------------------------------------
# LoRA students
# --------------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, r: int, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: list[str] | str | None = None) -> nn.Module:
    """Wrap a causal LM in LoRA adapters (``peft.get_peft_model``); only the adapters train.

    ``target_modules`` None takes peft's default for the architecture (GPT-2: ``c_attn``; Llama /
    Qwen2: ``q_proj``, ``v_proj``); ``"all-linear"`` adapts every linear layer but the output head.
    ``save_pretrained`` then writes only the adapter, which :func:`load_causal_lm` (or
    ``PeftModel.from_pretrained``) loads onto the base model again.
    """
    peft = _peft()
    if r < 1:
        raise ConfigError(f"LoRA rank r must be >= 1, got {r}")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError(f"cannot add LoRA adapters to {type(model).__name__}: {exc}") from exc
    except ImportError as exc:  # peft refuses some installed optional backends (e.g. an old torchao)
        raise ConfigError(f"peft cannot create LoRA layers in this environment: {exc}") from exc


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
    :func:`locakd.lm.fixtures.train_bpe_tokenizer` (GPT-2's default 50256 would be out of range);
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
