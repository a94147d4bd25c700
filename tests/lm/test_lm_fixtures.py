"""Offline benchmark data: the instruction suite and the Shakespeare continuation prompts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from locakd.errors import ConfigError, DataError
from locakd.lm.data import load_instruction_records
from locakd.lm.fixtures import (
    INSTRUCTION_TASKS,
    WORDS,
    make_instruction_suite,
    make_shakespeare_prompts,
    write_jsonl,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def solve(record: dict) -> str:
    """An independent solver: recompute the answer from the instruction and the context."""
    cat, ins, ctx = record["category"], record["instruction"], record["context"]
    words = ctx.split()
    if cat == "reverse_words":
        return " ".join(words[::-1])
    if cat == "sort_numbers":
        return " ".join(str(n) for n in sorted(int(w) for w in words))
    if cat == "add_numbers":
        return str(sum(int(w) for w in words))
    if cat == "uppercase":
        return ctx.upper()
    if cat == "lowercase":
        return ctx.lower()
    if cat == "kth_word":
        k = int(re.search(r"word number (\d+)", ins).group(1))
        return words[k - 1]
    if cat == "count_letter":
        letter = re.search(r"the letter (\w) appear", ins).group(1)
        return str(ctx.count(letter))
    if cat == "repeat_word":
        n = int(re.search(r"Repeat the word (\d+) times", ins).group(1))
        return " ".join([ctx] * n)
    if cat == "max_number":
        return str(max(int(w) for w in words))
    if cat == "count_words":
        return str(len(words))
    raise AssertionError(f"unknown category {cat}")


def test_every_task_answer_is_correct():
    train, test = make_instruction_suite(200, 50, seed=7)
    assert {r["category"] for r in train} == set(INSTRUCTION_TASKS) and len(INSTRUCTION_TASKS) >= 8
    for r in train + test:
        assert set(r) == {"instruction", "context", "response", "category"}
        assert r["response"] == solve(r), r
    # small vocabulary: every alphabetic context word comes from WORDS (lower-cased)
    vocab = set(WORDS)
    for r in train:
        if r["category"] in ("reverse_words", "uppercase", "lowercase", "kth_word", "repeat_word", "count_words"):
            assert {w.lower() for w in r["context"].split()} <= vocab


def test_splits_disjoint_balanced_and_seeded():
    train, test = make_instruction_suite(120, 40, seed=1)
    assert len(train) == 120 and len(test) == 40
    key = lambda r: (r["instruction"], r["context"])  # noqa: E731
    assert len({key(r) for r in train}) == 120
    assert {key(r) for r in train}.isdisjoint({key(r) for r in test})
    counts = {c: sum(r["category"] == c for r in test) for c in INSTRUCTION_TASKS}
    assert set(counts.values()) == {4}
    assert make_instruction_suite(120, 40, seed=1) == (train, test)
    assert make_instruction_suite(120, 40, seed=2) != (train, test)
    sub, _ = make_instruction_suite(10, 0, seed=0, tasks=["add_numbers"])
    assert {r["category"] for r in sub} == {"add_numbers"}


def test_suite_errors():
    with pytest.raises(ConfigError, match="unknown instruction task"):
        make_instruction_suite(5, 5, tasks=["nope"])
    with pytest.raises(ConfigError):
        make_instruction_suite(0, 0)


def test_write_jsonl_roundtrip(tmp_path):
    train, _ = make_instruction_suite(20, 0, seed=0)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert load_instruction_records(path) == train


# ------------------------------------------------------------------------------------------ shakespeare


@pytest.fixture()
def numbered_text(tmp_path):
    # word i is "w{i:05d}", so any excerpt tells where it came from
    words = [f"w{i:05d}" for i in range(3000)]
    lines = [" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_shakespeare_split_by_position(numbered_text):
    text = numbered_text.read_text()
    split = int(len(text) * 0.9)
    train, test = make_shakespeare_prompts(numbered_text, prompt_chars=60, continuation_chars=30,
                                           n_train=40, n_test=10, holdout_fraction=0.1, seed=3)
    assert len(train) == 40 and len(test) == 10
    for r in train + test:
        assert r["instruction"] == "Continue the text:" and r["category"] == "shakespeare"
        excerpt = text[r["source_start"]:r["source_end"]]
        assert r["context"] in excerpt and r["response"] in excerpt
        assert excerpt.index(r["context"]) < excerpt.rindex(r["response"])
        assert r["context"] and r["response"]
        # cut at word boundaries: every token is a whole word
        assert all(re.fullmatch(r"w\d{5}", w) for w in (r["context"] + " " + r["response"]).split())
    assert max(r["source_end"] for r in train) <= split
    assert min(r["source_start"] for r in test) >= split
    train_words = {w for r in train for w in (r["context"] + " " + r["response"]).split()}
    test_words = {w for r in test for w in (r["context"] + " " + r["response"]).split()}
    assert train_words.isdisjoint(test_words)
    again = make_shakespeare_prompts(numbered_text, prompt_chars=60, continuation_chars=30,
                                     n_train=40, n_test=10, seed=3)
    assert again == (train, test)


def test_shakespeare_errors(tmp_path, numbered_text):
    missing = tmp_path / "nothere.txt"
    with pytest.raises(DataError, match="nothere.txt"):
        make_shakespeare_prompts(missing, n_train=1, n_test=1)
    with pytest.raises(ConfigError, match="test region"):
        make_shakespeare_prompts(numbered_text, prompt_chars=60, continuation_chars=30, n_train=1,
                                 n_test=100000)
    with pytest.raises(ConfigError, match="holdout_fraction"):
        make_shakespeare_prompts(numbered_text, n_train=1, n_test=1, holdout_fraction=1.0)


def test_real_tinyshakespeare():
    path = Path(os.environ.get("LOCAKD_SHAKESPEARE", REPO_ROOT / "../shared/data/tinyshakespeare.txt"))
    if not path.is_file():
        pytest.skip(f"tiny Shakespeare corpus not found at {path} (set LOCAKD_SHAKESPEARE)")
    train, test = make_shakespeare_prompts(path, prompt_chars=200, continuation_chars=100, n_train=50,
                                           n_test=20, seed=0)
    size = len(path.read_text(encoding="utf-8"))
    assert len(train) == 50 and len(test) == 20
    assert max(r["source_end"] for r in train) <= int(size * 0.9) <= min(r["source_start"] for r in test)
    assert all(60 <= len(r["context"]) <= 200 and 20 <= len(r["response"]) <= 100 for r in train + test)
