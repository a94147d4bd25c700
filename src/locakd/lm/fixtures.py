"""Offline fixtures for tests and benchmarks: a tiny BPE tokenizer and synthetic instruction data.

Nothing is downloaded; everything is seeded.

* :func:`train_bpe_tokenizer` -- train a small byte-level BPE tokenizer (GPT-2-like) and wrap it as a
  Hugging Face tokenizer.
* :func:`make_instruction_suite` -- ten small instruction tasks with exact answers (reverse words, sort
  numbers, add, upper/lower case, k-th word, count a letter, repeat a word, max of a list, count words)
  over a small vocabulary, so a tiny GPT-2 can learn them on CPU. The task name is in ``category``.
* :func:`make_shakespeare_prompts` -- "Continue the text:" records cut from a text file, with train and
  test taken from disjoint regions of the file (split by position).
* :func:`write_jsonl` -- write records for :func:`locakd.lm.data.load_instruction_records`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from locakd.errors import ConfigError, DataError

WORDS: tuple[str, ...] = (
    "cat", "dog", "bird", "fish", "frog", "lion", "wolf", "bear", "duck", "goat",
    "red", "blue", "green", "gold", "pink", "gray",
    "sun", "moon", "star", "rain", "tree", "rose", "leaf", "stone",
    "car", "ship", "book", "lamp", "door", "cake", "milk", "ring",
)
"""The small vocabulary every word task draws from."""

_Task = Callable[[random.Random], tuple[str, str, str]]


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _numbers(rng: random.Random, lo: int, hi: int, top: int = 99) -> list[int]:
    return [rng.randint(0, top) for _ in range(rng.randint(lo, hi))]


def _join(items: Iterable[Any]) -> str:
    return " ".join(str(x) for x in items)


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 3, 5)
    return "Reverse the order of the words.", _join(w), _join(reversed(w))


def _sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    n = _numbers(rng, 3, 5)
    return "Sort the numbers in ascending order.", _join(n), _join(sorted(n))


def _add_numbers(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return "Add the two numbers.", f"{a} {b}", str(a + b)


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 2, 4)
    return "Write the words in upper case.", _join(w), _join(w).upper()


def _lowercase(rng: random.Random) -> tuple[str, str, str]:
    w = [x.upper() if rng.random() < 0.5 else x.capitalize() for x in _words(rng, 2, 4)]
    return "Write the words in lower case.", _join(w), _join(w).lower()


def _kth_word(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 3, 6)
    k = rng.randint(1, len(w))
    return f"What is word number {k} in the list?", _join(w), w[k - 1]


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS) + rng.choice(WORDS)
    letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    return f"How many times does the letter {letter} appear in the word?", word, str(word.count(letter))


def _repeat_word(rng: random.Random) -> tuple[str, str, str]:
    word, n = rng.choice(WORDS), rng.randint(2, 5)
    return f"Repeat the word {n} times.", word, _join([word] * n)


def _max_number(rng: random.Random) -> tuple[str, str, str]:
    n = _numbers(rng, 3, 6)
    return "What is the largest number?", _join(n), str(max(n))


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    w = _words(rng, 2, 7)
    return "How many words are in the list?", _join(w), str(len(w))


INSTRUCTION_TASKS: dict[str, _Task] = {
    "reverse_words": _reverse_words,
    "sort_numbers": _sort_numbers,
    "add_numbers": _add_numbers,
    "uppercase": _uppercase,
    "lowercase": _lowercase,
    "kth_word": _kth_word,
    "count_letter": _count_letter,
    "repeat_word": _repeat_word,
    "max_number": _max_number,
    "count_words": _count_words,
}
"""Task name -> generator ``rng -> (instruction, context, response)``."""


def make_instruction_suite(
    n_train: int, n_test: int, seed: int = 0, tasks: Sequence[str] | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Generate (train_records, test_records) of exact-answer instruction tasks.

    Records have ``instruction``, ``context``, ``response`` and ``category`` (the task name). Tasks
    are used in turn, so each split is balanced across tasks. No (instruction, context) pair appears
    twice, in particular never in both splits. The same ``seed`` gives the same records.

    Args:
        n_train, n_test: number of records per split (>= 0, at least one in total).
        seed: RNG seed.
        tasks: subset of :data:`INSTRUCTION_TASKS` names (default: all ten).

    Raises:
        ConfigError: unknown task, negative size, or a task whose distinct instances run out.
    """
    names = list(INSTRUCTION_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in INSTRUCTION_TASKS]
    if unknown or not names:
        raise ConfigError(f"unknown instruction task(s) {unknown or names}; known: {sorted(INSTRUCTION_TASKS)}")
    if n_train < 0 or n_test < 0 or n_train + n_test < 1:
        raise ConfigError(f"n_train and n_test must be >= 0 with at least one record, got {n_train}, {n_test}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()

    def draw(n: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for i in range(n):
            name = names[i % len(names)]
            for _ in range(1000):
                instruction, context, response = INSTRUCTION_TASKS[name](rng)
                if (instruction, context) not in seen:
                    break
            else:
                raise ConfigError(f"instruction task '{name}' ran out of distinct instances after "
                                  f"{len(seen)} records; ask for fewer records")
            seen.add((instruction, context))
            out.append({"instruction": instruction, "context": context, "response": response, "category": name})
        rng.shuffle(out)
        return out

    train = draw(n_train)
    test = draw(n_test)
    return train, test


# --------------------------------------------------------------------------------------------------
# Shakespeare continuation
# --------------------------------------------------------------------------------------------------


def _snap_back(text: str, pos: int, floor: int) -> int:
    """Largest whitespace position in (floor, pos] -- a word boundary -- or pos when there is none."""
    cut = text.rfind(" ", floor + 1, pos + 1)
    cut_nl = text.rfind("\n", floor + 1, pos + 1)
    cut = max(cut, cut_nl)
    return cut if cut > floor else pos


def _window(text: str, start: int, prompt_chars: int, continuation_chars: int) -> tuple[int, int, int]:
    """(prompt start, boundary, end) inside ``[start, start + prompt_chars + continuation_chars]`` at word edges."""
    end = start + prompt_chars + continuation_chars
    p0 = start
    if start > 0 and not text[start - 1].isspace():  # skip a partial first word (at most a quarter)
        limit = start + prompt_chars // 4
        nxt = min((i for i in (text.find(" ", start, limit), text.find("\n", start, limit)) if i >= 0),
                  default=-1)
        if nxt >= 0:
            p0 = nxt + 1
    boundary = _snap_back(text, start + prompt_chars, p0 + prompt_chars // 2)
    stop = _snap_back(text, min(boundary + continuation_chars, end), boundary + continuation_chars // 2)
    return p0, boundary, stop


def make_shakespeare_prompts(
    path: str | os.PathLike[str],
    prompt_chars: int = 256,
    continuation_chars: int = 128,
    n_train: int = 1000,
    n_test: int = 100,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    instruction: str = "Continue the text:",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Cut "continue the text" records from a text file, train and test split BY POSITION.

    The first ``1 - holdout_fraction`` of the characters feed the train records and the last
    ``holdout_fraction`` the test records; no window crosses the split point, so no test text is
    seen in training. Windows start at seeded random positions (distinct starts) and are trimmed to
    word boundaries: the excerpt (about ``prompt_chars`` characters) becomes ``context``, the next
    ~``continuation_chars`` characters the ``response``. Records also carry ``category``
    (``"shakespeare"``), ``source_start`` and ``source_end`` (character offsets in the file).

    Raises:
        DataError: the file does not exist (naming the path) or is empty.
        ConfigError: a split region is too small for one window, or asks for more windows than it has
            distinct start positions.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"text file for Shakespeare prompts not found: {file} "
                        "(pass the path to tinyshakespeare.txt or another plain-text file)")
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"text file is empty: {file}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if prompt_chars < 8 or continuation_chars < 4:
        raise ConfigError(f"prompt_chars must be >= 8 and continuation_chars >= 4, got {prompt_chars}, "
                          f"{continuation_chars}")
    window = prompt_chars + continuation_chars
    split = int(len(text) * (1.0 - holdout_fraction))
    rng = random.Random(seed)

    def draw(lo: int, hi: int, n: int, name: str) -> list[dict[str, Any]]:
        n_starts = hi - window - lo + 1
        if n > 0 and n_starts < n:
            raise ConfigError(
                f"the {name} region of {file} ({hi - lo} characters) has {max(n_starts, 0)} window starts "
                f"for windows of {window} characters but {n} records were asked for; use a larger file, "
                "shorter windows or fewer records"
            )
        out: list[dict[str, Any]] = []
        for start in (rng.sample(range(lo, hi - window + 1), n) if n else []):
            p0, boundary, stop = _window(text, start, prompt_chars, continuation_chars)
            context, response = text[p0:boundary].strip(), text[boundary:stop].strip()
            if not context or not response:  # whitespace-only stretch: fall back to the raw cut
                p0, boundary, stop = start, start + prompt_chars, start + window
                context, response = text[p0:boundary], text[boundary:stop]
            out.append({"instruction": instruction, "context": context, "response": response,
                        "category": "shakespeare", "source_start": p0, "source_end": stop})
        return out

    train = draw(0, split, n_train, "train")
    test = draw(split, len(text), n_test, "test")
    return train, test


def write_jsonl(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSON lines (UTF-8, one object per line); creates parent folders. Returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
    return out

# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

# Train a small byte-level BPE tokenizer (for tests and the offline CPU benchmark).
# The result behaves like GPT-2's tokenizer: byte-level (any text round-trips, no unknown tokens), no
# prefix space, and a single special token ``<|endoftext|>`` (id 0) used as EOS, BOS and PAD. It is
# saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(save_dir)`` (and
# :func:`locakd.lm.models.load_tokenizer`) load it back.

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
