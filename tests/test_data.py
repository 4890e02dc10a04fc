"""align.data: reading instruction data, detecting its format, converting it to TRL's formats, and failing
on bad data with the file:line and field at fault. Plain unit tests: no model, no tokenizer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from align.config import DataConfig, TemplateConfig
from align.data import (
    NAMED_TEMPLATES,
    Records,
    detect_format,
    fingerprint,
    read_records,
    split_validation,
    to_examples,
)
from align.errors import AlignError


def write_jsonl(path: Path, rows: list, blank_after: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def records(*rows: dict) -> Records:
    return Records(list(rows), [f"mem:{i + 1}" for i in range(len(rows))], "mem")


def convert(rows, template: str = "plain", prompt: str | None = None, system: str | None = None, **data):
    return to_examples(records(*rows), DataConfig(path="mem", **data),
                       TemplateConfig(name=template, prompt=prompt, system=system))


def align_error(call, *args, **kwargs) -> str:
    with pytest.raises(AlignError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"error messages are one line: {message!r}"
    return message


QA_PROMPT = NAMED_TEMPLATES["question_answer"].format(prompt="What is 2+2?")


# --- Formats: detection and conversion -------------------------------------------------------------

@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "messages"),
    ({"prompt": "p", "completion": "c"}, "prompt_completion"),
    ({"question": "q", "answer": "a"}, "question_answer"),
    ({"instruction": "i", "input": "x", "output": "o"}, "instruction"),
    ({"instruction": "i", "output": "o"}, "instruction"),
    ({"input": "x", "output": "o"}, "input_output"),
    ({"text": "t"}, "text"),
    # detection order: messages before pairs, pairs before text
    ({"messages": [{"role": "assistant", "content": "a"}], "prompt": "p", "completion": "c"}, "messages"),
    ({"prompt": "p", "completion": "c", "text": "t"}, "prompt_completion"),
])
def test_format_detection(row, fmt):
    assert detect_format(records(row), "auto") == fmt


@pytest.mark.parametrize("template, expected_prompt", [
    ("plain", "What is 2+2?"),
    ("question_answer", QA_PROMPT),
    ("custom", "Q (math): What is 2+2?\nA: "),
])
@pytest.mark.parametrize("row", [
    {"prompt": "What is 2+2?", "completion": "4", "topic": "math"},
    {"question": "What is 2+2?", "answer": "4", "topic": "math"},
    {"input": "What is 2+2?", "output": "4", "topic": "math"},
], ids=["prompt_completion", "question_answer", "input_output"])
def test_pairs_with_string_templates(row, template, expected_prompt):
    custom = "Q ({topic}): {prompt}\nA: " if template == "custom" else None
    prepared = convert([row], template, prompt=custom)
    assert prepared.examples == [{"prompt": expected_prompt, "completion": "4"}]
    assert prepared.conversational is False


def test_custom_template_uses_the_records_own_field_names():
    prepared = convert([{"question": "Why?", "answer": "Because.", "source": "faq"}], "custom",
                       prompt="[{source}] Question: {question}\nAnswer: ")
    assert prepared.examples == [{"prompt": "[faq] Question: Why?\nAnswer: ", "completion": "Because."}]


def test_alpaca_template_with_and_without_input():
    prepared = convert([{"instruction": "Add.", "input": "2 and 2", "output": "4"},
                        {"instruction": "Say hi.", "input": "", "output": "hi"},
                        {"instruction": "Say bye.", "output": "bye"}], "alpaca")
    with_input, empty_input, no_input = (e["prompt"] for e in prepared.examples)
    assert with_input == ("Below is an instruction that describes a task, paired with an input that provides "
                          "further context. Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\nAdd.\n\n### Input:\n2 and 2\n\n### Response:\n")
    assert empty_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                           "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input" not in no_input and "Say bye." in no_input
    assert [e["completion"] for e in prepared.examples] == ["4", "hi", "bye"]


def test_instruction_format_with_plain_and_question_answer_templates():
    rows = [{"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Hi.", "input": "",
                                                                          "output": "hi"}]
    assert [e["prompt"] for e in convert(rows, "plain").examples] == ["Add.\n\n2 and 2", "Hi."]
    assert convert(rows, "question_answer").examples[0]["prompt"] == "### Question:\nAdd.\n\n2 and 2\n### Answer:\n"


@pytest.mark.parametrize("row, user", [
    ({"prompt": "What is 2+2?", "completion": "4"}, "What is 2+2?"),
    ({"question": "What is 2+2?", "answer": "4"}, "What is 2+2?"),
    ({"instruction": "Add.", "input": "2 and 2", "output": "4"}, "Add.\n\n2 and 2"),
    ({"instruction": "Add 2 and 2.", "input": "", "output": "4"}, "Add 2 and 2."),
    ({"input": "What is 2+2?", "output": "4"}, "What is 2+2?"),
], ids=["prompt_completion", "question_answer", "instruction", "instruction_empty_input", "input_output"])
def test_pairs_with_chat_template_are_conversational(row, user):
    prepared = convert([row], "chat")
    assert prepared.examples == [{"prompt": [{"role": "user", "content": user}],
                                  "completion": [{"role": "assistant", "content": "4"}]}]
    assert prepared.conversational is True


def test_chat_template_system_message():
    prepared = convert([{"prompt": "p", "completion": "c"}], "chat", system="Be brief.")
    assert prepared.examples[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "p"}]


def test_messages_pass_through_with_system_added_once():
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    prepared = convert([{"messages": conversation, "id": 7}], "chat", system="Be brief.")
    assert prepared.format == "messages" and prepared.conversational is True
    assert prepared.examples == [{"messages": [{"role": "system", "content": "Be brief."}] + conversation}]
    own_system = [{"role": "system", "content": "Mine."}] + conversation
    assert convert([{"messages": own_system}], "chat", system="Be brief.").examples == [{"messages": own_system}]


def test_messages_without_an_assistant_answer_are_dropped_and_counted():
    prepared = convert([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]},
                        {"messages": [{"role": "user", "content": "a"}]}], "chat")
    assert len(prepared.examples) == 1 and prepared.dropped.counts == {"no_assistant_answer": 2}


def test_text_format():
    prepared = convert([{"text": "one"}, {"text": "two"}, {"text": ""}], "chat")
    assert prepared.examples == [{"text": "one"}, {"text": "two"}]
    assert prepared.format == "text" and prepared.conversational is False
    assert prepared.dropped.counts == {"empty_text": 1} and prepared.dropped.first == {"empty_text": "mem:3"}


def test_empty_completions_are_dropped_and_counted():
    prepared = convert([{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": ""},
                        {"prompt": "c", "completion": None}, {"prompt": "d", "completion": " \n"}])
    assert [e["prompt"] for e in prepared.examples] == ["a"] and prepared.dropped.total == 3
    assert prepared.dropped.counts == {"empty_completion": 2, "null_completion": 1}


def test_numbers_become_text():
    assert convert([{"question": "2+2?", "answer": 4}]).examples == [{"prompt": "2+2?", "completion": "4"}]


def test_explicit_format_wins_over_detection():
    row = {"prompt": "p", "completion": "c", "text": "t"}
    assert convert([row], format="text").examples == [{"text": "t"}]


# --- data.columns, clean_whitespace, max_examples --------------------------------------------------

def test_columns_with_dotted_paths_and_list_items():
    rows = [{"q": {"title": "Why?"}, "answers": ["Because.", "No idea."]},
            {"q": {"title": "How?"}, "answers": ["Carefully."]}]
    prepared = convert(rows, columns={"prompt": "q.title", "completion": "answers.0"})
    assert prepared.format == "prompt_completion"
    assert prepared.examples == [{"prompt": "Why?", "completion": "Because."},
                                 {"prompt": "How?", "completion": "Carefully."}]


def test_columns_pick_the_format_over_fields_the_record_also_has():
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
           "q": "Why?", "a": "Because."}
    prepared = convert([row], columns={"prompt": "q", "completion": "a"})
    assert prepared.format == "prompt_completion"
    assert prepared.examples == [{"prompt": "Why?", "completion": "Because."}]


def test_columns_missing_field_names_record_and_key():
    message = align_error(convert, [{"q": "a", "answers": ["x"]}, {"q": "b", "answers": []}],
                          columns={"prompt": "q", "completion": "answers.0"})
    assert message == "data: mem:2: data.columns.completion: field 'answers.0' is missing"


def test_clean_whitespace():
    row = {"prompt": "  What   is\t\t2+2?  \n  Be   brief.  ", "completion": "  It   is 4.  "}
    assert convert([row], clean_whitespace=True).examples == [{"prompt": "What is 2+2?\nBe brief.",
                                                               "completion": "It is 4."}]
    assert convert([row]).examples == [row]  # off by default


def test_clean_whitespace_applies_inside_templates():
    row = {"instruction": "  Add   these. ", "input": " 2   and 2 ", "output": " 4 "}
    prompt = convert([row], "alpaca", clean_whitespace=True).examples[0]["prompt"]
    assert "### Instruction:\nAdd these.\n\n### Input:\n2 and 2\n\n" in prompt
    row = {"question": " Why   not? ", "answer": "ok", "topic": "  big   ideas "}
    prompt = convert([row], "custom", prompt="[{topic}] {question}", clean_whitespace=True).examples[0]["prompt"]
    assert prompt == "[big ideas] Why not?"


def test_messages_clean_whitespace():
    row = {"messages": [{"role": "user", "content": "  hi   there "}, {"role": "assistant", "content": " yo  "}]}
    assert convert([row], "chat", clean_whitespace=True).examples[0]["messages"] == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "yo"}]


def test_max_examples_is_a_reproducible_subset_in_file_order():
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(50)]
    first = [e["prompt"] for e in convert(rows, max_examples=10, seed=1).examples]
    again = [e["prompt"] for e in convert(rows, max_examples=10, seed=1).examples]
    other = [e["prompt"] for e in convert(rows, max_examples=10, seed=2).examples]
    assert len(first) == 10 and first == again and first != other
    assert first == sorted(first, key=lambda p: int(p[1:]))  # kept in file order
    assert len(convert(rows, max_examples=500).examples) == 50


def test_max_examples_keeps_locations():
    rows = [{"prompt": f"p{i}", "completion": "c" if i != 7 else ""} for i in range(10)]
    rows[7]["prompt"] = ""
    message = align_error(convert, rows, max_examples=10)
    assert message.startswith("data: mem:8: field 'prompt' is empty")


# --- Readers: every file type, with locations ------------------------------------------------------

ROWS = [{"prompt": "a", "completion": "1"}, {"prompt": "b", "completion": "2"}, {"prompt": "c", "completion": "3"}]


def test_jsonl_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after=1)
    got = read_records(path)
    assert got.rows == ROWS and got.source == path
    assert got.locations == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_json_list_with_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    got = read_records(str(path))
    assert got.rows == ROWS
    assert got.locations == [f"{path}:2", f"{path}:6", f"{path}:10"]


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "d.json"
    text = ('{\n  "meta": {"name": "x", "tags": {"a": [1]}},\n  "data": [\n    {"prompt": "a", "completion": "1"},\n'
            '\n    {"prompt": "b {not a brace", "completion": "2 \\" ]"},\n    {"prompt": "c", "completion": "3"}\n'
            '  ]\n}\n')
    path.write_text(text)
    got = read_records(str(path))
    assert [r["prompt"] for r in got.rows] == ["a", "b {not a brace", "c"]
    assert got.locations == [f"{path}:4", f"{path}:6", f"{path}:7"]


def test_csv_with_line_numbers(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)
    got = read_records(str(path))
    assert got.rows == ROWS
    assert got.locations == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_byte_order_mark_is_ignored(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\na,1\n", encoding="utf-8-sig")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8-sig")
    assert read_records(str(csv_path)).rows == [ROWS[0]]
    assert read_records(str(jsonl_path)).rows == [ROWS[0]]


def test_parquet_with_row_numbers(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pyarrow.Table.from_pylist(ROWS), path)
    got = read_records(str(path))
    assert got.rows == ROWS
    assert got.locations == [f"{path} row 1", f"{path} row 2", f"{path} row 3"]


def test_saved_dataset_folder_and_split(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    got = read_records(str(tmp_path / "single"))
    assert got.rows == ROWS and got.locations[1] == f"{tmp_path / 'single'} row 2"

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dict"))
    assert read_records(str(tmp_path / "dict"), split="test").rows == ROWS[:1]
    message = align_error(read_records, str(tmp_path / "dict"), split="validation")
    assert "no split 'validation' (has train, test); set data.split" in message


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes").mkdir()
    message = align_error(read_records, str(tmp_path / "notes"))
    assert message == f"data: {tmp_path / 'notes'} is a folder but not a dataset saved with save_to_disk"


def test_every_reader_feeds_the_same_examples(tmp_path):
    import pyarrow
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "d.jsonl", ROWS)
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n"
                                                                    for r in ROWS))
    pq.write_table(pyarrow.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    results = [to_examples(read_records(str(tmp_path / f"d.{ext}")), DataConfig(path="x"),
                           TemplateConfig(name="chat")).examples for ext in ("jsonl", "json", "csv", "parquet")]
    assert all(r == results[0] for r in results) and len(results[0]) == 3


# --- Validation split and fingerprint --------------------------------------------------------------

EXAMPLES = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]


def test_split_validation_is_reproducible_and_disjoint():
    train, held = split_validation(EXAMPLES, 0.25, seed=3)
    assert len(held) == 10 and len(train) == 30
    assert split_validation(EXAMPLES, 0.25, seed=3) == (train, held)
    assert split_validation(EXAMPLES, 0.25, seed=4)[1] != held
    ids = lambda part: {e["prompt"] for e in part}  # noqa: E731
    assert not ids(train) & ids(held) and ids(train) | ids(held) == ids(EXAMPLES)
    assert [e["prompt"] for e in train] == sorted((e["prompt"] for e in train), key=lambda p: int(p[1:]))


def test_split_validation_count_and_none():
    assert len(split_validation(EXAMPLES, 5, seed=0)[1]) == 5
    assert split_validation(EXAMPLES, 0.0, seed=0) == (EXAMPLES, [])
    assert len(split_validation(EXAMPLES[:3], 0.01, seed=0)[1]) == 1  # at least one


@pytest.mark.parametrize("size", [40, 100])
def test_split_validation_leaving_nothing_to_train_on(size):
    assert "leaves no training examples" in align_error(split_validation, EXAMPLES, size, 0)


def test_fingerprint_changes_when_one_example_changes():
    base = fingerprint(EXAMPLES)
    assert fingerprint([dict(e) for e in EXAMPLES]) == base and len(base) == 16
    changed = [dict(e) for e in EXAMPLES]
    changed[17]["completion"] += "!"
    assert fingerprint(changed) != base
    assert fingerprint(EXAMPLES[::-1]) != base
    assert fingerprint(EXAMPLES[:-1]) != base


# --- Bad data: AlignError naming file:line and the field -------------------------------------------

def test_malformed_json_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "1"}\n\n{"prompt": "b", "completion": "2"}\n'
                    '{"prompt": "c", "completion": 3,}\n')
    message = align_error(read_records, str(path))
    assert message.startswith(f"data: {path}:4: malformed JSON (")
    assert "column 33" in message


def test_jsonl_holding_a_json_array_says_so(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS, indent=2))
    assert "looks like one JSON document: name it .json" in align_error(read_records, str(path))


def test_json_holding_json_lines_says_so(tmp_path):
    path = tmp_path / "d.json"
    write_jsonl(path, ROWS)
    message = align_error(read_records, str(path))
    assert message.startswith(f"data: {path}:2: malformed JSON (Extra data")
    assert "name it .jsonl" in message


@pytest.mark.parametrize("line, kind", [("[1, 2]", "an array"), ('"text"', "a string"), ("null", "null"),
                                        ("7", "a number")])
def test_non_object_line(tmp_path, line, kind):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    assert align_error(read_records, str(path)) == f"data: {path}:2: expected a JSON object per line, got {kind}"


def test_json_list_with_a_non_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a", "completion": "1"},\n  ["b", "2"]\n]\n')
    assert align_error(read_records, str(path)) == (f"data: {path}:3: expected a JSON object per record, "
                                                    f"got an array")


def test_json_object_with_two_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": ROWS, "test": ROWS}))
    assert "or an object holding one list (it holds lists under 'train', 'test')" in align_error(
        read_records, str(path))


def test_csv_row_with_extra_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,1\nb,2,oops\n")
    assert align_error(read_records, str(path)) == (f"data: {path}:3: 3 values but the header has 2 columns "
                                                    f"(quote values that contain commas)")


def test_csv_row_with_missing_values(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,1\nb\n")
    assert align_error(read_records, str(path)) == f"data: {path}:3: 1 values but the header has 2 columns"


def test_empty_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("")
    assert align_error(read_records, str(path)) == f"data: {path}:1: empty CSV (a header row is needed)"


def test_no_recognizable_format_lists_what_was_tried(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"query": "q", "response": "r"}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message.startswith(f"data: {path}:1: no recognizable format in fields [query, response]")
    for tried in ("messages (messages)", "prompt_completion (prompt/completion)",
                  "question_answer (question/answer)", "instruction (instruction/output)",
                  "input_output (input/output)", "text (text)"):
        assert tried in message
    assert "data.columns={prompt: query, completion: ...}" in message


def test_explicit_format_missing_fields(tmp_path):
    message = align_error(convert, [{"prompt": "p", "completion": "c"}], format="question_answer")
    assert message == ("data: mem:1: data.format 'question_answer' needs field(s) question, answer; the record has "
                       "prompt, completion (map yours with data.columns)")


@pytest.mark.parametrize("value, kind", [(["a", "b"], "an array"), ({"text": "a"}, "an object"), (None, "null")])
def test_field_that_is_not_text(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": value, "completion": "2"}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message.startswith(f"data: {path}:2: field 'prompt' must be text, got {kind}")


def test_list_completion_suggests_picking_an_item(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": ["a1", "a2"]}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message == (f"data: {path}:1: field 'answer' must be text, got an array; to use one item, map it with "
                       f"data.columns, e.g. {{answer: <field>.0}}")


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt(tmp_path, prompt):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"prompt": prompt, "completion": "x"}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message == f"data: {path}:3: field 'prompt' is empty; fill it in or remove that record"


def test_field_missing_from_a_later_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "b", "answer": "2"}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message.startswith(f"data: {path}:2: field 'completion' is missing")


@pytest.mark.parametrize("messages, expected", [
    ([], "field 'messages' must be a non-empty list of {role, content}, got an empty list"),
    ("hi", "field 'messages' must be a non-empty list of {role, content}, got a string"),
    ([{"role": "user"}], "messages[0] needs 'role' and 'content'"),
    ([{"role": "human", "content": "hi"}], "messages[0].role 'human' is not one of system, user, assistant, tool"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["a"]}],
     "messages[1].content must be text, got an array"),
])
def test_bad_messages(tmp_path, messages, expected):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [good, {"messages": messages}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message == f"data: {path}:2: {expected}"


def test_everything_empty_after_filtering(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": " "}])
    message = align_error(to_examples, read_records(path), DataConfig(path=path), TemplateConfig())
    assert message == (f"data: {path}: no usable examples left after filtering: all 2 records were dropped (empty "
                       f"completion: 2 (first at {path}:1)); each needs a non-empty completion (format "
                       f"prompt_completion); fill them in, or check data.format / data.columns")


def test_no_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    message = align_error(to_examples, read_records(str(path)), DataConfig(path=str(path)), TemplateConfig())
    assert message == f"data: {path} has no records (is it the right file?)"


def test_custom_template_field_the_record_lacks():
    message = align_error(convert, [{"question": "q", "answer": "a"}], "custom", prompt="{context}\n{question}")
    assert message == ("data: mem:1: template.prompt uses {context}, which the record does not have as text "
                       "(fields: question, answer)")


@pytest.mark.parametrize("path", ["missing.jsonl", "data/missing.csv", "./missing", "/nowhere/d.json"])
def test_file_not_found(path):
    message = align_error(read_records, path)
    assert message.startswith(f"data: {path}: file not found")
    assert message.endswith(")" if not path.startswith("/") else "file not found")  # relative: "(... start in <cwd>)"


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    assert "unsupported file type '.txt'" in align_error(read_records, str(path))


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    assert align_error(read_records, str(path)).startswith(f"data: {path}:1: not UTF-8 text")


def test_pkg_path_for_a_package_that_is_not_installed():
    message = align_error(read_records, "pkg:align_no_such_package/data/train.jsonl")
    assert message.startswith("data: 'pkg:align_no_such_package/data/train.jsonl': package 'align_no_such_package' "
                              "is not installed")


def test_pkg_path_for_a_file_the_package_lacks():
    message = align_error(read_records, "pkg:align/no_such_file.jsonl")
    assert message.startswith("data: 'pkg:align/no_such_file.jsonl': no file 'no_such_file.jsonl' in package 'align'")


def test_pkg_path_reads_a_packaged_file(tmp_path, monkeypatch):
    package = tmp_path / "align_test_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_jsonl(package / "data" / "train.jsonl", ROWS)
    monkeypatch.syspath_prepend(str(tmp_path))
    got = read_records("pkg:align_test_pkg/data/train.jsonl")
    assert got.rows == ROWS and got.locations[0].endswith("train.jsonl:1")
