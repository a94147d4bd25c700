"""Instruction data for the language-model pipeline (Dolly, chat ``messages``, ``prompt``/``completion``).

A *record* is a plain ``dict`` in one of the layouts instruction-tuning data comes in (detected per
file by :func:`load_instruction_records`, see :data:`DATA_FORMATS`)::

    dolly                       {"instruction": str, "context": str, "response": str, ...}
    messages                    {"messages": [{"role": "user", "content": str}, {"role": "assistant", ...}, ...]}
    prompt_completion           {"prompt": str, "completion": str}
    prompt_completion_messages  {"prompt": [messages], "completion": [messages]}

Extra fields are kept as they are. Dolly is what MiniLLM and the LoCa paper use; the other three are
TRL's dataset layouts. Chat layouts are rendered with the tokenizer's chat template and only the
assistant turns (the completion) are trained.

This module turns records into token ids for causal-LM training:

* :func:`load_instruction_records` reads records from a local ``.jsonl`` file or a Hugging Face
  dataset name (the ``datasets`` package is imported lazily, only for the latter);
* :class:`PromptTemplate` renders the prompt of a Dolly record (instruction + optional context);
* :func:`tokenize_examples` builds ``input_ids`` / ``labels`` with the prompt masked out
  (label ``-100``), the response trained (with a trailing EOS, or the chat template's end-of-turn
  marker for chat layouts), and counts every truncation;
* :func:`prompt_and_reference` gives the generation prompt and the reference answer of a record;
* :func:`collate_examples` / :func:`make_collate_fn` pad a batch (right padding for training) and carry
  each example's :data:`EXAMPLE_INDEX` when the examples have one (an offline teacher cache is looked
  up by it; it never reaches a model's forward);
* :func:`count_valid_tokens` and :func:`shift_for_next_token` (from :mod:`locakd.losses.token`,
  re-exported here) implement the one convention every loss must share (see below).

Label convention (same as Hugging Face): ``labels`` are aligned with ``input_ids``; the model's logits
at position ``t`` predict the token at ``t + 1``. A loss over a batch therefore uses
``logits[:, :-1]`` against ``labels[:, 1:]`` -- :func:`shift_for_next_token` does exactly that, and
:func:`count_valid_tokens` counts the label positions that survive the shift.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from locakd.errors import ConfigError, DataError
from locakd.losses.objectives import IGNORE_INDEX
from locakd.losses.token import shift_for_next_token  # noqa: F401  (re-exported: the one next-token alignment)

EXAMPLE_INDEX = "example_index"
"""Key of an example's position in its tokenised dataset; collated into a ``[B]`` int64 tensor when every
example of a batch has it (the offline teacher cache's row lookup, :class:`locakd.lm.batch_loss.CachedTeacher`)."""

REQUIRED_FIELDS = ("instruction", "response")
OPTIONAL_FIELDS = ("context",)

DOLLY = "dolly"
MESSAGES = "messages"
PROMPT_COMPLETION = "prompt_completion"
PROMPT_COMPLETION_MESSAGES = "prompt_completion_messages"
DATA_FORMATS: dict[str, str] = {
    DOLLY: "Dolly fields 'instruction', 'response' and optional 'context' (prompt from data.template)",
    MESSAGES: "'messages': a chat (role/content turns) rendered with the tokenizer's chat template; "
              "every assistant turn is trained",
    PROMPT_COMPLETION: "'prompt' and 'completion' strings: the prompt is used as it is, the completion is trained",
    PROMPT_COMPLETION_MESSAGES: "'prompt' and 'completion' message lists rendered with the chat template; "
                                "the completion is trained",
}
"""The record layouts :func:`load_instruction_records` recognises, with what each means."""

_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".parquet")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


_LAYOUT_HINT = ("expected one layout: 'messages' (chat turns), 'prompt' + 'completion', or Dolly "
                "'instruction' + 'response' (+ optional 'context')")


def _check_messages(value: Any, where: str, name: str) -> None:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of {{'role', 'content'}} messages, "
                        f"got {type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be an object with string fields 'role' and 'content', "
                            f"got {message!r:.80}")


def _record_layout(record: Mapping[str, Any], where: str) -> str:
    """Which layout a raw record uses, from its fields (DataError when none or several)."""
    layouts = []
    if "messages" in record:
        layouts.append(MESSAGES)
    if "completion" in record:
        layouts.append(PROMPT_COMPLETION)
    if any(name in record for name in REQUIRED_FIELDS):
        layouts.append(DOLLY)
    if len(layouts) > 1:
        raise DataError(f"{where}: the record has fields of several layouts ({', '.join(layouts)}; fields "
                        f"present: {sorted(record)}); {_LAYOUT_HINT}")
    if not layouts:
        raise DataError(f"{where}: no known data layout (fields present: {sorted(record)}); {_LAYOUT_HINT}")
    return layouts[0]


def _normalise_record(obj: Any, where: str) -> tuple[dict[str, Any], str]:
    """Validate one raw record; return it (Dolly: ``context`` filled in, ``""`` when absent) and its layout."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object with fields 'instruction', 'response' "
                        f"(and optional 'context'), 'messages', or 'prompt' and 'completion'; "
                        f"got {type(obj).__name__}")
    record = dict(obj)
    layout = _record_layout(record, where)
    if layout == MESSAGES:
        _check_messages(record["messages"], where, "messages")
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise DataError(f"{where}: 'messages' has no assistant turn, so nothing would be trained")
        return record, MESSAGES
    if layout == PROMPT_COMPLETION:
        if "prompt" not in record:
            raise DataError(f"{where}: missing field 'prompt' beside 'completion' (fields present: {sorted(record)})")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return record, PROMPT_COMPLETION
        if isinstance(prompt, list) and isinstance(completion, list):
            _check_messages(prompt, where, "prompt")
            _check_messages(completion, where, "completion")
            return record, PROMPT_COMPLETION_MESSAGES
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists, got "
                        f"{type(prompt).__name__} and {type(completion).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (fields present: {sorted(record)})")
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(record[name]).__name__}")
    context = record.get("context")
    if context is None:
        context = ""
    if not isinstance(context, str):
        raise DataError(f"{where}: field 'context' must be a string, got {type(context).__name__}")
    record["context"] = context
    return record, DOLLY


def _normalise_records(rows: Iterable[tuple[Any, str]], source: str) -> list[dict[str, Any]]:
    """Validate ``(raw record, where)`` pairs; all records of one source must share one layout."""
    records: list[dict[str, Any]] = []
    first_of: dict[str, str] = {}
    for obj, where in rows:
        record, layout = _normalise_record(obj, where)
        first_of.setdefault(layout, where)
        if len(first_of) > 1:
            (a, where_a), (b, where_b) = list(first_of.items())[:2]
            raise DataError(f"{source} mixes data layouts: {where_a} is '{a}' but {where_b} is '{b}'; "
                            "use one layout per file")
        records.append(record)
    return records


def normalise_records(records: Iterable[Any], source: str = "records") -> list[dict[str, Any]]:
    """Validate in-memory records (e.g. rows of a ``datasets.Dataset``) as :func:`load_instruction_records`
    validates a file: one known layout, shared by all of them; errors name ``source`` and the 1-based row."""
    return _normalise_records(((obj, f"{source}, row {i + 1}") for i, obj in enumerate(records)), source)


def record_format(record: Mapping[str, Any]) -> str:
    """The layout (a key of :data:`DATA_FORMATS`) of a record returned by :func:`load_instruction_records`."""
    if "messages" in record:
        return MESSAGES
    if "completion" in record:
        return PROMPT_COMPLETION if isinstance(record["completion"], str) else PROMPT_COMPLETION_MESSAGES
    return DOLLY


def records_format(records: Iterable[Mapping[str, Any]]) -> str:
    """The layout shared by ``records`` (several joined by ``+``; ``""`` for no records)."""
    return "+".join(sorted({record_format(r) for r in records}))


def read_instruction_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` file of records (any layout of :data:`DATA_FORMATS`), validating every line.

    Raises :class:`DataError` naming the file and the 1-based line number for an empty line, a line
    that is not valid JSON, a line that is not a JSON object, a record of no known layout or with a
    missing / mistyped field, and for a file that mixes layouts. A single trailing newline at the end
    of the file is fine.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"instruction data file not found: {path}")
    def rows():
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                where = f"{path}, line {lineno}"
                if not line.strip():
                    raise DataError(f"{where}: line is empty (remove blank lines from the JSONL file)")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
                yield obj, where

    records = _normalise_records(rows(), str(path))
    if not records:
        raise DataError(f"instruction data file is empty: {path}")
    return records


def _read_json_array(path: Path) -> list[dict[str, Any]]:
    """A ``.json`` file holding one JSON array of records (Alpaca / Dolly exports)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    if not data:
        raise DataError(f"instruction data file is empty: {path}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return _normalise_records(((obj, f"{path}, entry {i + 1}") for i, obj in enumerate(data)), str(path))


def looks_like_hub_name(source: str) -> bool:
    """True for ``name`` or ``owner/name`` strings without a file suffix (a Hugging Face hub id)."""
    return bool(_HUB_NAME_RE.match(source)) and not source.lower().endswith(_FILE_SUFFIXES)


def load_instruction_records(source: str | os.PathLike[str], split: str = "train") -> list[dict[str, Any]]:
    """Load instruction records; the layout (:data:`DATA_FORMATS`) is detected per file.

    Args:
        source: a local ``.jsonl`` file (one JSON object per line; a ``.json`` file holding one JSON
            array of objects is accepted too), or a Hugging Face dataset name such as
            ``"databricks/databricks-dolly-15k"`` (requires the optional ``datasets`` package).
            Each object is a Dolly record (``instruction``, ``response``, optional ``context``), a
            chat (``messages``: role/content turns with at least one assistant turn), or a
            ``prompt`` / ``completion`` pair (both strings, or both message lists). Use
            :func:`records_format` to name the layout of the result.
        split: dataset split for a Hugging Face name; ignored for a local file.

    Returns:
        A list of dicts; for Dolly records ``context`` is always present (``""`` when missing or
        null); any extra fields (e.g. Dolly's ``category``) are kept.

    Raises:
        DataError: missing file, empty line, malformed JSON, a record of no known layout or with a
            missing field (naming file and 1-based line, or dataset row), a file that mixes layouts,
            or a dataset name that cannot be loaded.
    """
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DataError(f"instruction data source {path} is a directory; expected a .jsonl file "
                            "or a Hugging Face dataset name")
        if path.suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            return _read_json_array(path)
        return read_instruction_jsonl(path)
    text = str(source)
    if not looks_like_hub_name(text):
        raise DataError(f"instruction data file not found: {text}")
    return _load_hf_dataset(text, split)


def _load_hf_dataset(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets  # optional dependency, imported lazily
    except ImportError as exc:
        raise DataError(
            f"'{name}' is not a local file, and loading it as a Hugging Face dataset needs the optional "
            "'datasets' package (pip install datasets); or export the data to a .jsonl file with "
            "fields instruction/context/response"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many different types
        raise DataError(f"could not load Hugging Face dataset '{name}' (split '{split}'): {exc}") from exc
    return _normalise_records(((row, f"dataset {name} ({split}), row {i + 1}") for i, row in enumerate(dataset)),
                              f"dataset {name} ({split})")


def train_test_split_records(
    records: Sequence[dict[str, Any]], n_test: int | float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split records into (train, test) after a seeded shuffle.

    Dolly-15k has a single split; MiniLLM holds out 500 examples for testing. ``n_test`` is a count
    (int) or a fraction in (0, 1) (float).
    """
    n = len(records)
    if isinstance(n_test, float):
        if not 0.0 < n_test < 1.0:
            raise ConfigError(f"n_test as a fraction must be in (0, 1), got {n_test}")
        n_test = max(1, round(n * n_test))
    if not 0 < n_test < n:
        raise ConfigError(f"n_test must be between 1 and {n - 1} for {n} records, got {n_test}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = [records[i] for i in order[:n_test]]
    train = [records[i] for i in order[n_test:]]
    return train, test


# --------------------------------------------------------------------------------------------------
# Prompt template
# --------------------------------------------------------------------------------------------------

_ALPACA_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
_ALPACA_WITHOUT_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    """How a record's instruction (and context) become the prompt text.

    ``with_context`` is used when the record's ``context`` is non-blank, ``without_context``
    otherwise. Both are :meth:`str.format` strings with the fields ``{instruction}`` and
    ``{context}`` (literal braces must be doubled: ``{{``). The response is appended directly after
    the prompt, so a template should end with a separator such as a newline.

    The default is the Alpaca / MiniLLM Dolly template. :data:`PROMPT_TEMPLATES` holds named presets.
    """

    with_context: str = _ALPACA_WITH_CONTEXT
    without_context: str = _ALPACA_WITHOUT_CONTEXT

    def __post_init__(self) -> None:
        for name in ("with_context", "without_context"):
            fmt = getattr(self, name)
            if not isinstance(fmt, str):
                raise ConfigError(f"prompt template '{name}' must be a string, got {type(fmt).__name__}")
            if "{instruction}" not in fmt:
                raise ConfigError(f"prompt template '{name}' must contain '{{instruction}}': {fmt!r}")
            try:
                fmt.format(instruction="x", context="y")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"prompt template '{name}' is not a valid format string with fields "
                    f"{{instruction}} and {{context}} ({exc!r}); double literal braces: {fmt!r}"
                ) from exc
        if "{context}" not in self.with_context:
            raise ConfigError(f"prompt template 'with_context' must contain '{{context}}': {self.with_context!r}")

    def format(self, record: Mapping[str, Any]) -> str:
        """Render the prompt of one record (``context`` optional)."""
        instruction = record["instruction"]
        context = record.get("context") or ""
        if context.strip():
            return self.with_context.format(instruction=instruction, context=context)
        return self.without_context.format(instruction=instruction, context="")

    @classmethod
    def from_config(cls, value: str | Mapping[str, str] | PromptTemplate | None) -> PromptTemplate:
        """Build from a preset name (see :data:`PROMPT_TEMPLATES`), a mapping with the two keys, or None."""
        if value is None:
            return cls()
        if isinstance(value, PromptTemplate):
            return value
        if isinstance(value, str):
            if value not in PROMPT_TEMPLATES:
                raise ConfigError(f"unknown prompt template '{value}'; known: {sorted(PROMPT_TEMPLATES)}")
            return PROMPT_TEMPLATES[value]
        if isinstance(value, Mapping):
            unknown = set(value) - {"with_context", "without_context"}
            if unknown:
                raise ConfigError(f"unknown prompt template keys {sorted(unknown)}; "
                                  "expected 'with_context' and 'without_context'")
            return cls(**value)
        raise ConfigError(f"prompt template must be a name, a mapping or None, got {type(value).__name__}")


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(),
    # Short template for tiny models / the CPU benchmark: fewer prompt tokens per example.
    "compact": PromptTemplate(
        with_context="Instruction: {instruction}\nInput: {context}\nResponse:\n",
        without_context="Instruction: {instruction}\nResponse:\n",
    ),
}


# --------------------------------------------------------------------------------------------------
# Rendering records of every layout
# --------------------------------------------------------------------------------------------------


def _apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "chat records ('messages', or 'prompt'/'completion' message lists) need a tokenizer with a chat "
            "template, and this tokenizer has none; use a tokenizer that has one (e.g. an -Instruct model's), set "
            "tokenizer.chat_template, or convert the data to 'prompt'/'completion' strings"
        )
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises TemplateError, templates raise their own exceptions
        raise DataError(f"the tokenizer's chat template failed on a record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(text, str):
        raise DataError(f"the tokenizer's chat template returned {type(text).__name__}, expected a string")
    return text


def _require_prefix(prefix: str, text: str, what: str) -> None:
    if not text.startswith(prefix):
        raise DataError(
            f"the chat template does not render {what} as a prefix of the longer conversation (it rewrites earlier "
            "turns), so the trained tokens cannot be located; use 'prompt'/'completion' records or a template that "
            "only appends turns"
        )


def _chat_pieces(record: Mapping[str, Any], tokenizer: Any) -> tuple[str, list[tuple[str, bool]]]:
    """(prompt text, [(text, trained), ...]) of a chat record; the prompt is everything before the first
    trained turn, trained spans are the assistant turns (``messages``) or the completion, as rendered by
    the chat template (with its end-of-turn marker). Text after the last trained span is dropped."""
    if record_format(record) == MESSAGES:
        messages = record["messages"]
        full = _apply_chat_template(tokenizer, messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _apply_chat_template(tokenizer, messages[:i], True) if i else ""
            upto = _apply_chat_template(tokenizer, messages[: i + 1], False)
            _require_prefix(before, upto, f"the turns before assistant turn {i}")
            _require_prefix(upto, full, f"the conversation up to turn {i}")
            spans.append((len(before), len(upto)))
    else:
        before = _apply_chat_template(tokenizer, record["prompt"], True)
        full = _apply_chat_template(tokenizer, list(record["prompt"]) + list(record["completion"]), False)
        _require_prefix(before, full, "the prompt")
        spans = [(len(before), len(full))]
    prompt = full[: spans[0][0]]
    pieces: list[tuple[str, bool]] = []
    position = spans[0][0]
    for start, end in spans:
        if start > position:
            pieces.append((full[position:start], False))
        if end > start:
            pieces.append((full[start:end], True))
        position = max(position, end)
    return prompt, pieces


def _render(record: Mapping[str, Any], tokenizer: Any, template: PromptTemplate) -> tuple[str, list[tuple[str, bool]], bool]:
    """(prompt text, [(text, trained), ...] after it, whether to append EOS) for a record of any layout."""
    layout = record_format(record)
    if layout == DOLLY:
        return template.format(record), [(record["response"], True)], True
    if layout == PROMPT_COMPLETION:
        return record["prompt"], [(record["completion"], True)], True
    prompt, pieces = _chat_pieces(record, tokenizer)
    return prompt, pieces, False


def prompt_and_reference(record: Mapping[str, Any], tokenizer: Any = None,
                         template: PromptTemplate | None = None) -> tuple[str, str]:
    """The generation prompt and the reference answer of a record (``lm-eval``, validation generation).

    Dolly: the template's prompt and ``response``. ``prompt``/``completion`` strings: both as they are.
    ``messages``: the chat template's rendering of everything before the LAST assistant turn (with the
    generation prompt) and that turn's content. ``prompt``/``completion`` message lists: the rendered
    prompt and the completion's assistant content. ``tokenizer`` is needed for the chat layouts only.
    """
    layout = record_format(record)
    if layout == DOLLY:
        return (template or PromptTemplate()).format(record), record["response"]
    if layout == PROMPT_COMPLETION:
        return record["prompt"], record["completion"]
    if tokenizer is None:
        raise ConfigError("prompt_and_reference: chat records need the tokenizer (its chat template)")
    if layout == MESSAGES:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _apply_chat_template(tokenizer, messages[:last], True), messages[last]["content"]
    completion = record["completion"]
    answers = [m["content"] for m in completion if m["role"] == "assistant"] or [m["content"] for m in completion]
    return _apply_chat_template(tokenizer, record["prompt"], True), "\n".join(answers)



# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizationStats:
    """Counts from :func:`tokenize_examples`.

    * ``kept``: examples returned.
    * ``prompt_truncated``: kept examples whose prompt was cut from the left to ``max_prompt_length``.
    * ``response_truncated``: kept examples whose response (+EOS) was cut on the right to fit
      ``max_length``; their EOS is lost (the model is not taught to stop mid-answer).
    * ``dropped_no_room``: examples dropped because no response token would fit.
    * ``dropped_empty_response``: examples dropped because the response tokenises to nothing.
    * ``format``: the records' layout (a key of :data:`DATA_FORMATS`).
    """

    total: int = 0
    format: str = ""  # layout of the records (DATA_FORMATS), named in the run log
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped_no_room: int = 0
    dropped_empty_response: int = 0
    response_tokens: int = 0
    prompt_tokens: int = 0

    @property
    def dropped(self) -> int:
        """Examples not returned, whatever the reason."""
        return self.dropped_no_room + self.dropped_empty_response

    def summary(self) -> str:
        """One human-readable line, e.g. for a training log."""
        return (
            (f"{self.format} records, " if self.format else "")
            + f"{self.kept}/{self.total} examples kept; prompt truncated: {self.prompt_truncated}; "
            f"response truncated: {self.response_truncated}; dropped: {self.dropped} "
            f"(no room for the response: {self.dropped_no_room}, empty response: "
            f"{self.dropped_empty_response}); tokens: {self.prompt_tokens} prompt, "
            f"{self.response_tokens} response"
        )

    def as_dict(self) -> dict[str, int | str]:
        return {
            "format": self.format, "total": self.total, "kept": self.kept, "prompt_truncated": self.prompt_truncated,
            "response_truncated": self.response_truncated, "dropped": self.dropped,
            "dropped_no_room": self.dropped_no_room, "dropped_empty_response": self.dropped_empty_response,
            "prompt_tokens": self.prompt_tokens, "response_tokens": self.response_tokens,
        }

    def __str__(self) -> str:
        return self.summary()


@dataclass
class TokenizedDataset:
    """The output of :func:`tokenize_examples`: a list-like of examples plus the stats.

    Supports ``len``, indexing and iteration, so it can be handed to a ``torch.utils.data.DataLoader``
    directly.
    """

    examples: list[dict[str, list[int]]] = field(default_factory=list)
    stats: TokenizationStats = field(default_factory=TokenizationStats)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.examples[i]

    def __iter__(self):
        return iter(self.examples)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer prepends BOS to plain text (Llama-style), False for GPT-2-style."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = _encode(tokenizer, "a", True)
    without = _encode(tokenizer, "a", False)
    return len(with_special) == len(without) + 1 and with_special[0] == bos


def encode_prompt(tokenizer: Any, prompt: str, max_prompt_length: int) -> tuple[list[int], bool]:
    """Token ids of a prompt, cut from the LEFT to ``max_prompt_length`` tokens.

    Special tokens the tokenizer adds (e.g. a Llama BOS) are included unless the prompt text already
    starts with the BOS token (a chat template put it there); a leading BOS is kept when the prompt is cut. Returns ``(ids, truncated)``. Used for training and for generation, so both see the
    same prompt tokens.
    """
    if max_prompt_length < 1:
        raise ConfigError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    # A prompt rendered by a chat template may already start with the BOS text: no second BOS then.
    bos_text = getattr(tokenizer, "bos_token", None)
    ids = _encode(tokenizer, prompt, not (isinstance(bos_text, str) and bos_text and prompt.startswith(bos_text)))
    if len(ids) <= max_prompt_length:
        return ids, False
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[0] == bos and max_prompt_length >= 2 and _adds_bos(tokenizer):
        return [ids[0]] + ids[len(ids) - (max_prompt_length - 1):], True
    return ids[len(ids) - max_prompt_length:], True


def tokenize_examples(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int = 512,
    max_prompt_length: int = 256,
    template: PromptTemplate | None = None,
) -> TokenizedDataset:
    """Tokenise records into causal-LM training examples with the prompt masked.

    Each example is ``{"input_ids": [...], "labels": [...]}`` with
    ``input_ids = prompt_ids + response_ids + [eos]`` and
    ``labels = [-100] * len(prompt_ids) + response_ids + [eos]``. Prompt and response are tokenised
    separately (prompt with the tokenizer's special tokens, response without), as in MiniLLM; the
    same :func:`encode_prompt` is used at generation time.

    Layouts (:data:`DATA_FORMATS`): a Dolly record's prompt comes from ``template``; a
    ``prompt``/``completion`` string pair is used as it is. Chat records are rendered with the
    tokenizer's chat template: the prompt is everything before the first assistant turn (or the
    completion), the trained tokens are the assistant turns / the completion as the template renders
    them (content and end-of-turn marker, no extra EOS), and user turns between assistant turns are in
    the input but masked.

    Truncation, each counted in the returned stats and never silent:

    * the prompt is cut from the LEFT to ``max_prompt_length`` tokens (the instruction's end and the
      "Response:" marker survive);
    * the response + EOS is cut on the RIGHT so the whole example fits ``max_length``; a cut response
      loses its EOS;
    * an example with no room for a single response token, or whose response is empty, is dropped.

    Args:
        records: dicts of any layout of :data:`DATA_FORMATS` (e.g. from :func:`load_instruction_records`).
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        max_length: maximum total tokens per example.
        max_prompt_length: maximum prompt tokens; must be <= ``max_length``.
        template: prompt template (default :class:`PromptTemplate()`).

    Returns:
        A :class:`TokenizedDataset` (list of examples + :class:`TokenizationStats`).
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= max_prompt_length <= max_length:
        raise ConfigError(f"max_prompt_length must be in [1, max_length={max_length}], got {max_prompt_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token_id; set tokenizer.eos_token before tokenising")
    template = template or PromptTemplate()
    out = TokenizedDataset()
    stats = out.stats
    layouts: set[str] = set()
    for record in records:
        stats.total += 1
        layouts.add(record_format(record))
        prompt, pieces, append_eos = _render(record, tokenizer, template)
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in pieces:
            piece = _encode(tokenizer, text, False)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if not any(label != IGNORE_INDEX for label in labels):
            stats.dropped_empty_response += 1
            continue
        if append_eos:
            ids.append(eos)
            labels.append(eos)
        prompt_ids, prompt_cut = encode_prompt(tokenizer, prompt, max_prompt_length)
        room = max_length - len(prompt_ids)
        response_cut = len(ids) > room
        ids, labels = ids[:max(room, 0)], labels[:max(room, 0)]
        n_trained = sum(label != IGNORE_INDEX for label in labels)
        if n_trained == 0:
            stats.dropped_no_room += 1
            continue
        stats.kept += 1
        stats.prompt_truncated += int(prompt_cut)
        stats.response_truncated += int(response_cut)
        stats.prompt_tokens += len(prompt_ids)
        stats.response_tokens += n_trained
        out.examples.append({
            "input_ids": prompt_ids + ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + labels,
        })
    stats.format = "+".join(sorted(layouts))
    return out


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def collate_examples(
    examples: Sequence[Mapping[str, Sequence[int]]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one in the batch.

    Returns int64 tensors ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real
    tokens) and ``labels`` (``-100`` on padding). Padding is recognised by position, never by id, so a
    pad id equal to EOS (GPT-2) does not mask the trained EOS. Use right padding for training. When
    every example holds :data:`EXAMPLE_INDEX` (its position in the tokenised dataset), the batch holds
    them too, as a ``[B]`` int64 tensor under the same key.
    """
    if padding_side not in ("right", "left"):
        raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not examples:
        raise DataError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, ex in enumerate(examples):
        ids = ex["input_ids"]
        lab = ex.get("labels", ids)
        if len(lab) != len(ids):
            raise DataError(f"example {i}: labels ({len(lab)}) and input_ids ({len(ids)}) differ in length")
        k = len(ids)
        sl = slice(0, k) if padding_side == "right" else slice(width - k, width)
        input_ids[i, sl] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, sl] = torch.as_tensor(lab, dtype=torch.long)
        attention[i, sl] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if all(EXAMPLE_INDEX in ex for ex in examples):
        batch[EXAMPLE_INDEX] = torch.tensor([int(ex[EXAMPLE_INDEX]) for ex in examples], dtype=torch.long)
    return batch


def make_collate_fn(tokenizer: Any, padding_side: str = "right",
                    pad_to_multiple_of: int | None = None) -> Callable[[Sequence[Mapping]], dict[str, torch.Tensor]]:
    """A ``collate_fn`` for ``DataLoader`` using the tokenizer's pad id (EOS when it has none)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ConfigError("the tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return partial(collate_examples, pad_token_id=pad, padding_side=padding_side,
                   pad_to_multiple_of=pad_to_multiple_of)


def count_valid_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift: bool = True) -> torch.Tensor:
    """Number of trained (response) label positions, as a 0-dim int64 tensor on ``labels.device``.

    With ``shift=True`` (default) counts ``labels[..., 1:]``, the positions that enter a next-token
    loss (the first position can never be predicted; it is always prompt in practice, so the two
    counts agree for data from :func:`tokenize_examples`). A tensor is returned so the trainer can
    ``all_reduce`` it across ranks and sum it across accumulation steps without a host sync; use
    ``int(...)`` for a Python number.
    """
    labels = torch.as_tensor(labels)
    if shift:
        labels = labels[..., 1:]
    return (labels != ignore_index).sum()
