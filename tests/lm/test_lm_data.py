"""Instruction data: loading, prompt template, tokenisation with prompt masking, truncation, collation."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from locakd.errors import ConfigError, DataError
from locakd.lm.data import (
    DATA_FORMATS,
    DOLLY,
    IGNORE_INDEX,
    MESSAGES,
    PROMPT_COMPLETION,
    PROMPT_COMPLETION_MESSAGES,
    PROMPT_TEMPLATES,
    PromptTemplate,
    collate_examples,
    count_valid_tokens,
    encode_prompt,
    load_instruction_records,
    make_collate_fn,
    prompt_and_reference,
    records_format,
    shift_for_next_token,
    tokenize_examples,
    train_test_split_records,
)
from locakd.lm.fixtures import write_jsonl
from locakd.losses.token import shift_for_next_token as losses_shift_for_next_token

# ------------------------------------------------------------------------------------------ loading


def test_load_jsonl_fills_context_and_keeps_extra_fields(tmp_path):
    path = write_jsonl([
        {"instruction": "Say hi.", "response": "hi", "category": "open_qa"},
        {"instruction": "Copy.", "context": "abc", "response": "abc"},
        {"instruction": "Null context.", "context": None, "response": "ok"},
    ], tmp_path / "d.jsonl")
    records = load_instruction_records(str(path))
    assert [r["context"] for r in records] == ["", "abc", ""]
    assert records[0]["category"] == "open_qa"


def _write_lines(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"instruction": "a", "response": "b"})


def test_empty_line_names_line_number(tmp_path):
    path = _write_lines(tmp_path, [GOOD, "", GOOD])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: line is empty"):
        load_instruction_records(path)


def test_bad_json_names_line_number(tmp_path):
    path = _write_lines(tmp_path, [GOOD, GOOD, '{"instruction": "a", "response": '])
    with pytest.raises(DataError, match=r"line 3: malformed JSON"):
        load_instruction_records(path)


def test_missing_field_names_line_and_field(tmp_path):
    path = _write_lines(tmp_path, [GOOD, json.dumps({"instruction": "a", "context": "c"})])
    with pytest.raises(DataError, match=r"line 2: missing field 'response'"):
        load_instruction_records(path)
    path = _write_lines(tmp_path, [json.dumps({"response": "a"})])
    with pytest.raises(DataError, match=r"line 1: missing field 'instruction'"):
        load_instruction_records(path)


def test_non_object_and_non_string_fields(tmp_path):
    path = _write_lines(tmp_path, ["[1, 2]"])
    with pytest.raises(DataError, match=r"line 1: expected a JSON object"):
        load_instruction_records(path)
    path = _write_lines(tmp_path, [json.dumps({"instruction": "a", "response": 3})])
    with pytest.raises(DataError, match=r"line 1: field 'response' must be a string"):
        load_instruction_records(path)


def test_missing_file_and_hub_name_without_datasets(tmp_path, monkeypatch):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_instruction_records(str(missing))
    monkeypatch.setitem(sys.modules, "datasets", None)  # make `import datasets` fail
    with pytest.raises(DataError, match="'datasets' package"):
        load_instruction_records("databricks/databricks-dolly-15k")


def test_json_array_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "response": "b"}, {"instruction": "c"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"entry 2: missing field 'response'"):
        load_instruction_records(path)
    path.write_text(json.dumps([{"instruction": "a", "response": "b"}]), encoding="utf-8")
    assert load_instruction_records(path) == [{"instruction": "a", "context": "", "response": "b"}]


def test_train_test_split_records():
    records = [{"instruction": str(i), "context": "", "response": "x"} for i in range(20)]
    train, test = train_test_split_records(records, 5, seed=1)
    assert len(train) == 15 and len(test) == 5
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in test)
    assert train_test_split_records(records, 0.25, seed=1) == (train, test)
    with pytest.raises(ConfigError):
        train_test_split_records(records, 20)


# ------------------------------------------------------------------------------------------ template


def test_prompt_template_with_and_without_context():
    t = PromptTemplate(with_context="I: {instruction} C: {context} R:\n", without_context="I: {instruction} R:\n")
    assert t.format({"instruction": "x", "context": "y"}) == "I: x C: y R:\n"
    assert t.format({"instruction": "x", "context": "  "}) == "I: x R:\n"
    assert t.format({"instruction": "{x}"}) == "I: {x} R:\n"  # braces in the data are fine
    default = PromptTemplate()
    assert "### Instruction:\nx" in default.format({"instruction": "x", "context": ""})
    assert "### Input:\ny" in default.format({"instruction": "x", "context": "y"})
    assert PromptTemplate.from_config("compact") is PROMPT_TEMPLATES["compact"]
    assert PromptTemplate.from_config({"with_context": "{instruction}{context}", "without_context": "{instruction}"})


@pytest.mark.parametrize("kwargs", [
    {"with_context": "{instruction}", "without_context": "{instruction}"},  # no {context}
    {"with_context": "{context}", "without_context": "{instruction}"},  # no {instruction}
    {"with_context": "{instruction}{context}{other}", "without_context": "{instruction}"},
])
def test_prompt_template_rejects_bad_formats(kwargs):
    with pytest.raises(ConfigError):
        PromptTemplate(**kwargs)


def test_prompt_template_unknown_name():
    with pytest.raises(ConfigError, match="unknown prompt template"):
        PromptTemplate.from_config("nope")


# ------------------------------------------------------------------------------------------ tokenising


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_masking_exact(lm_tokenizer):
    tok = lm_tokenizer
    template = PromptTemplate()
    records = [
        {"instruction": "Add the two numbers.", "context": "3 4", "response": "7"},
        {"instruction": "Repeat the word 2 times.", "context": "", "response": "cat cat"},
    ]
    ds = tokenize_examples(records, tok, max_length=256, max_prompt_length=128, template=template)
    assert ds.stats.kept == 2 and ds.stats.dropped == 0
    for r, ex in zip(records, ds, strict=True):
        prompt = _ids(tok, template.format(r))
        response = _ids(tok, r["response"])
        n = len(prompt)
        assert ex["input_ids"] == prompt + response + [tok.eos_token_id]
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == response + [tok.eos_token_id]
        assert tok.decode(ex["labels"][n:-1]) == r["response"]
    assert ds.stats.response_tokens == sum(len(_ids(tok, r["response"])) + 1 for r in records)


def test_truncation_stats(lm_tokenizer):
    tok = lm_tokenizer
    template = PromptTemplate.from_config("compact")
    long_words = " ".join(["cat dog bird"] * 40)
    records = [
        {"instruction": "Short.", "context": "", "response": "ok"},  # kept untouched
        {"instruction": "Copy the list.", "context": long_words, "response": "fine"},  # prompt cut
        {"instruction": "Say it.", "context": "", "response": long_words},  # response cut
        {"instruction": "Copy the list.", "context": long_words, "response": long_words},  # both cut
        {"instruction": "Nothing.", "context": "", "response": ""},  # empty response: dropped
    ]
    ds = tokenize_examples(records, tok, max_length=48, max_prompt_length=24, template=template)
    s = ds.stats
    assert (s.total, s.kept, s.prompt_truncated, s.response_truncated) == (5, 4, 2, 2)
    assert (s.dropped, s.dropped_empty_response, s.dropped_no_room) == (1, 1, 0)
    for ex in ds:
        assert len(ex["input_ids"]) == len(ex["labels"]) <= 48
        n_prompt = sum(lab == IGNORE_INDEX for lab in ex["labels"])
        assert n_prompt <= 24
        assert len(ex["labels"]) - n_prompt >= 1  # never a response cut to nothing
    # the prompt is cut from the LEFT: its end (the "Response:" marker) survives
    full_prompt = _ids(tok, template.format(records[1]))
    assert ds[1]["input_ids"][:24] == full_prompt[-24:]
    # a cut response fills the example and loses its EOS
    assert len(ds[2]["input_ids"]) == 48 and ds[2]["labels"][-1] != tok.eos_token_id
    summary = s.summary()
    assert "4/5 examples kept" in summary and "prompt truncated: 2" in summary and "dropped: 1" in summary


def test_response_with_no_room_is_dropped_and_counted(lm_tokenizer):
    template = PromptTemplate.from_config("compact")
    records = [{"instruction": " ".join(["dog"] * 50), "context": "", "response": "yes"},
               {"instruction": "Hi", "context": "", "response": "yes"}]
    ds = tokenize_examples(records, lm_tokenizer, max_length=16, max_prompt_length=16, template=template)
    assert ds.stats.dropped_no_room == 1 and ds.stats.kept == 1 and len(ds) == 1
    assert "no room for the response: 1" in str(ds.stats)


def test_tokenize_rejects_bad_lengths(lm_tokenizer):
    with pytest.raises(ConfigError, match="max_prompt_length"):
        tokenize_examples([], lm_tokenizer, max_length=10, max_prompt_length=11)


# ------------------------------------------------------------------------------------------ batching


def test_collate_right_padding_keeps_eos_label_equal_to_pad(lm_tokenizer):
    tok = lm_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # GPT-2 style: pad is EOS
    records = [{"instruction": "Add the two numbers.", "context": "3 4", "response": "7"},
               {"instruction": "Write the words in upper case.", "context": "cat dog bird", "response": "CAT DOG BIRD"}]
    ds = tokenize_examples(records, tok)
    batch = make_collate_fn(tok)(list(ds))
    lengths = [len(ex["input_ids"]) for ex in ds]
    width = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for i, ex in enumerate(ds):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][i, :n].eq(1).all() and batch["attention_mask"][i, n:].eq(0).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the trained EOS is not taken for padding
    assert int(count_valid_tokens(batch["labels"])) == ds.stats.response_tokens


def test_collate_left_padding_and_multiple():
    batch = collate_examples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}],
                             pad_token_id=0, padding_side="left", pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7], [0, 0, 0, 9]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, -100, -100, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(DataError):
        collate_examples([], pad_token_id=0)


def test_count_valid_tokens_and_shift():
    labels = torch.tensor([[-100, -100, 4, 5, -100], [7, -100, 8, -100, -100]])
    assert int(count_valid_tokens(labels)) == 3  # the first position is never predicted
    assert int(count_valid_tokens(labels, shift=False)) == 4
    assert count_valid_tokens(labels).dtype == torch.int64
    logits = torch.randn(2, 5, 11)
    lg, lb = shift_for_next_token(logits, labels)
    assert lg.shape == (2, 4, 11) and lb.tolist() == labels[:, 1:].tolist()
    assert torch.equal(lg, logits[:, :-1])
    # one alignment for every loss: lm.data re-exports the losses' function (misaligned logits and labels
    # are refused by LMObjective, tests/losses/test_objectives.py)
    assert shift_for_next_token is losses_shift_for_next_token


# ------------------------------------------------------------------------------------------ layouts

# A minimal chat template for the BPE test tokenizer: every turn is "<|role|>\n" + content; an assistant turn
# ends with EOS (so the trained tokens end with EOS), the others with a newline.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 3 and 4."},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "Now double it."},
        {"role": "assistant", "content": "14"}]


@pytest.fixture()
def chat_tokenizer(tokenizer_dir):
    from locakd.lm.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)  # a fresh copy: the session tokenizer stays without a template
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_each_layout_is_detected_per_file(tmp_path):
    files = {
        DOLLY: [{"instruction": "a", "response": "b"}],
        MESSAGES: [{"messages": CHAT, "id": 1}],
        PROMPT_COMPLETION: [{"prompt": "p", "completion": "c"}],
        PROMPT_COMPLETION_MESSAGES: [{"prompt": CHAT[:2], "completion": [CHAT[2]]}],
    }
    assert set(files) == set(DATA_FORMATS)
    for layout, rows in files.items():
        records = load_instruction_records(write_jsonl(rows, tmp_path / f"{layout}.jsonl"))
        assert records_format(records) == layout
        assert records[0].keys() >= rows[0].keys()  # extra fields are kept


def test_a_file_that_mixes_layouts_is_refused_naming_both_lines(tmp_path):
    path = write_jsonl([{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"},
                        {"messages": CHAT}], tmp_path / "mixed.jsonl")
    with pytest.raises(DataError, match=r"mixed\.jsonl mixes data layouts: .*line 1 is 'dolly' but .*line 3 is "
                                        r"'messages'"):
        load_instruction_records(path)
    # strings and message lists are two layouts too
    path = write_jsonl([{"prompt": "p", "completion": "c"}, {"prompt": CHAT[:2], "completion": [CHAT[2]]}],
                       tmp_path / "pc.jsonl")
    with pytest.raises(DataError, match="mixes data layouts"):
        load_instruction_records(path)


@pytest.mark.parametrize("row, message", [
    ({"text": "no layout"}, r"line 1: no known data layout \(fields present: \['text'\]\)"),
    ({"messages": CHAT, "instruction": "x", "response": "y"}, "fields of several layouts"),
    ({"completion": "c"}, "missing field 'prompt'"),
    ({"prompt": "p", "completion": [CHAT[2]]}, "both be strings or both be message lists"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object with string fields"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_records_are_refused_with_the_reason(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_instruction_records(write_jsonl([row], tmp_path / "bad.jsonl"))


def test_messages_train_every_assistant_turn_and_nothing_else(chat_tokenizer):
    tok = chat_tokenizer
    ds = tokenize_examples([{"messages": CHAT}], tok, max_length=256, max_prompt_length=128)
    (ex,) = ds.examples
    full = _ids(tok, tok.apply_chat_template(CHAT, tokenize=False))
    assert ex["input_ids"] == full  # pieces tokenised apart give the same ids here (turn markers split words)
    trained = [i for i, label in enumerate(ex["labels"]) if label != IGNORE_INDEX]
    assert [ex["labels"][i] for i in trained] == [ex["input_ids"][i] for i in trained]
    # the trained tokens are exactly the two assistant answers, each with its end-of-turn EOS
    runs, run = [], []
    for i in range(len(ex["labels"])):
        if ex["labels"][i] != IGNORE_INDEX:
            run.append(ex["labels"][i])
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    assert [tok.decode(r) for r in runs] == ["7<|endoftext|>", "14<|endoftext|>"]
    assert ds.stats.format == MESSAGES and ds.stats.response_tokens == len(trained)
    assert "messages records, 1/1 examples kept" in ds.stats.summary()
    # the prompt (everything before the first answer) is cut from the left like a Dolly prompt
    short = tokenize_examples([{"messages": CHAT}], tok, max_length=256, max_prompt_length=4)
    assert short.stats.prompt_truncated == 1 and short[0]["input_ids"][:4] == full[trained[0] - 4:trained[0]]


def test_prompt_completion_strings_and_message_lists(chat_tokenizer):
    tok = chat_tokenizer
    ds = tokenize_examples([{"prompt": "Q: 3+4? A:", "completion": " 7"}], tok)
    prompt, completion = _ids(tok, "Q: 3+4? A:"), _ids(tok, " 7")
    assert ds[0]["input_ids"] == prompt + completion + [tok.eos_token_id]  # the prompt is used as it is
    assert ds[0]["labels"] == [IGNORE_INDEX] * len(prompt) + completion + [tok.eos_token_id]
    record = {"prompt": CHAT[:2], "completion": [CHAT[2]]}
    ds = tokenize_examples([record], tok)
    rendered_prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    n = len(_ids(tok, rendered_prompt))
    assert ds[0]["labels"][:n] == [IGNORE_INDEX] * n
    assert tok.decode(ds[0]["labels"][n:]) == "7<|endoftext|>"
    assert ds.stats.format == PROMPT_COMPLETION_MESSAGES


def test_prompt_and_reference_of_every_layout(chat_tokenizer):
    tok = chat_tokenizer
    template = PromptTemplate.from_config("compact")
    dolly = {"instruction": "Say hi.", "context": "", "response": "hi"}
    assert prompt_and_reference(dolly, tok, template) == (template.format(dolly), "hi")
    assert prompt_and_reference({"prompt": "p", "completion": "c"}) == ("p", "c")
    prompt, reference = prompt_and_reference({"messages": CHAT}, tok)
    assert reference == "14"  # the LAST assistant turn
    assert prompt == tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and "7<|endoftext|>" in prompt
    assert prompt_and_reference({"prompt": CHAT[:2], "completion": [CHAT[2]]}, tok)[1] == "7"


def test_chat_records_need_a_chat_template(lm_tokenizer):
    assert lm_tokenizer.chat_template is None
    with pytest.raises(DataError, match="chat template"):
        tokenize_examples([{"messages": CHAT}], lm_tokenizer)


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    # renders only the last user turn when asked for a generation prompt: not a prefix of the conversation
    chat_tokenizer.chat_template = (
        "{% if add_generation_prompt %}{{ messages[-1]['content'] + '>' }}{% else %}"
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + eos_token }}{% endfor %}{% endif %}"
    )
    with pytest.raises(DataError, match="does not render .* as a prefix"):
        tokenize_examples([{"messages": CHAT}], chat_tokenizer)


def test_a_prompt_that_starts_with_bos_gets_no_second_bos(lm_tokenizer):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core = copy.deepcopy(lm_tokenizer.backend_tokenizer)
    bos_id = lm_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    core.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                        special_tokens=[("<|endoftext|>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    plain = encode_prompt(tok, "Hello there", 64)[0]
    assert plain[0] == bos_id and plain[1] != bos_id  # the tokenizer adds its BOS
    rendered = encode_prompt(tok, "<|endoftext|>Hello there", 64)[0]
    assert rendered == plain  # a chat template put the BOS there already: not doubled
