"""Reading instruction data in the formats people have, and turning it into TRL's dataset formats.

Every record keeps where it came from (file:line), so bad data fails before training with a message
that points at it. The output is TRL's own formats: `{"prompt", "completion"}` (plain strings or
conversational message lists), `{"messages"}`, or `{"text"}`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from align.config import DataConfig, TemplateConfig, file_not_found, read_text
from align.errors import AlignError
from align.modeling import resolve_package_path

# Fields that identify each format, in detection order.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "instruction": ("instruction", "output"),
    "input_output": ("input", "output"),
    "text": ("text",),
}

NAMED_TEMPLATES = {
    "alpaca": ("Below is an instruction that describes a task{input_clause}. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"),
    "question_answer": "### Question:\n{prompt}\n### Answer:\n",
    "plain": "{prompt}",
}


@dataclass
class Records:
    """Raw records with the place each came from."""

    rows: list[dict]
    locations: list[str]
    source: str
    key: str = "data"  # the config key or option that named the file: the start of every message about its records

    @property
    def section(self) -> str:
        return _section(self.key)


def _section(key: str) -> str:
    """`ptx` for `ptx.path`: the config section whose `columns`, `format`... apply to the file that key names."""
    return key.split(".")[0]


def read_records(path: str, split: str = "train", key: str = "data") -> Records:
    """Read .jsonl/.json/.csv/.parquet files, `save_to_disk` folders, or hub datasets. Errors start with `key`, the
    config key or option that named the file (`prompts.path`, `--data`)."""
    path = _package_file(path, key)
    file = Path(path).expanduser()
    if file.is_dir():
        return _read_saved_dataset(file, split, key)
    suffix = file.suffix.lower()
    if not file.exists():
        # "org/name" or "name" may be a hub dataset; anything that looks like a file path is a missing file.
        if suffix in (".jsonl", ".json", ".csv", ".parquet") or path.startswith((".", "/", "~")):
            raise file_not_found(path, key)
        return _read_hub_dataset(path, split, key)
    if suffix == ".parquet":
        return _read_parquet(file, key)
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}.get(suffix)
    if reader is None:
        raise AlignError(f"{key}: {path}: unsupported file type '{suffix}' (use .jsonl, .json, .csv, .parquet, a "
                         f"saved dataset folder, or a hub dataset name)")
    return reader(file, read_text(file, key), key)


def _package_file(path: str, key: str) -> str:
    """`pkg:<package>/<file>` -> its path; errors name `key`."""
    try:
        return resolve_package_path(path)
    except AlignError as e:
        raise AlignError(f"{key}: {e}") from None


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "true/false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _json_problem(e: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Invalid control character at"), meant to be followed by a position.
    return f"malformed JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def _read_jsonl(file: Path, text: str, key: str) -> Records:
    rows, locations = [], []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # universal newlines, as open() reads
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ("; the file looks like one JSON document: name it .json" if number == 1 and
                    line.strip() in ("[", "{") else "; each line must be one complete JSON object")
            raise AlignError(f"{key}: {file}:{number}: {_json_problem(e)}{hint}") from None
        if not isinstance(row, dict):
            raise AlignError(f"{key}: {file}:{number}: expected a JSON object per line, got {_json_kind(row)}")
        rows.append(row)
        locations.append(f"{file}:{number}")
    return Records(rows, locations, str(file), key)


def _read_json(file: Path, text: str, key: str) -> Records:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; the file looks like JSON Lines (one object per line): name it .jsonl" \
            if e.msg == "Extra data" else ""
        raise AlignError(f"{key}: {file}:{e.lineno}: {_json_problem(e)}{hint}") from None
    list_key = None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = f"it holds lists under {', '.join(map(repr, lists))}" if lists else "it holds no list"
            raise AlignError(f"{key}: {file}: expected a list of records, or an object holding one list ({found})")
        list_key = lists[0]
        data = data[list_key]
    if not isinstance(data, list):
        raise AlignError(f"{key}: {file}: expected a list of JSON objects, got {_json_kind(data)}")
    starts = _item_lines(text, list_key)
    locations = [f"{file}:{starts[i]}" if i < len(starts) else f"{file} record {i + 1}" for i in range(len(data))]
    for row, where in zip(data, locations):
        if not isinstance(row, dict):
            raise AlignError(f"{key}: {where}: expected a JSON object per record, got {_json_kind(row)}")
    return Records(data, locations, str(file), key)


def _item_lines(text: str, key: str | None) -> list[int]:
    """The line each item of the records list starts on (the top-level list, or the list under `key`)."""
    decoder = json.JSONDecoder()
    space = re.compile(r"[ \t\n\r]*")
    newlines = [m.start() for m in re.finditer("\n", text)]

    def skip(i: int) -> int:
        return space.match(text, i).end()

    def line_of(i: int) -> int:
        return bisect.bisect_left(newlines, i) + 1

    try:
        i = skip(0)
        if key is not None:  # walk the wrapper object's members to the list
            i = skip(i + 1)
            while True:
                name, i = decoder.raw_decode(text, i)
                i = skip(skip(i) + 1)  # past ':'
                if name == key:
                    break
                _, i = decoder.raw_decode(text, i)
                i = skip(skip(i) + 1)  # past ','
        lines = []
        i = skip(i + 1)  # past '['
        while text[i] != "]":
            lines.append(line_of(i))
            _, i = decoder.raw_decode(text, i)
            i = skip(i)
            if text[i] == ",":
                i = skip(i + 1)
        return lines
    except (ValueError, IndexError):  # cannot happen for text json.loads accepted; fall back to record numbers
        return []


def _read_csv(file: Path, text: str, key: str) -> Records:
    rows, locations = [], []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise AlignError(f"{key}: {file}:1: empty CSV (a header row is needed)")
    columns = len(reader.fieldnames)
    for row in reader:
        if None in row:
            raise AlignError(f"{key}: {file}:{reader.line_num}: {columns + len(row[None])} values but the header "
                             f"has {columns} columns (quote values that contain commas)")
        if any(value is None for value in row.values()):
            given = sum(value is not None for value in row.values())
            raise AlignError(f"{key}: {file}:{reader.line_num}: {given} values but the header has {columns} columns")
        rows.append(row)
        locations.append(f"{file}:{reader.line_num}")
    return Records(rows, locations, str(file), key)


def _read_parquet(file: Path, key: str) -> Records:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for broken files
        raise AlignError(f"{key}: {file}: not a readable parquet file ({e})") from None
    return Records(rows, [f"{file} row {i + 1}" for i in range(len(rows))], str(file), key)


def _read_saved_dataset(folder: Path, split: str, key: str) -> Records:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(folder))
    except FileNotFoundError:
        raise AlignError(f"{key}: {folder} is a folder but not a dataset saved with save_to_disk") from None
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise AlignError(f"{key}: {folder}: no split '{split}' (has {', '.join(dataset)}); set data.split")
        dataset = dataset[split]
    rows = dataset.to_list()
    return Records(rows, [f"{folder} row {i + 1}" for i in range(len(rows))], str(folder), key)


def _read_hub_dataset(name: str, split: str, key: str) -> Records:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as e:  # offline, missing, gated: all end the same way for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set" if offline else type(e).__name__
        raise AlignError(f"{key}: '{name}' is not a local file or folder, and loading it from the Hugging Face hub "
                         f"failed ({reason}). Check the path, or download the dataset.") from None
    rows = dataset.to_list()
    return Records(rows, [f"{name}[{split}] row {i + 1}" for i in range(len(rows))], name, key)


# --------------------------------------------------------------------------------------------------
# Formats

def _lookup(row: dict, dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def apply_columns(records: Records, columns: dict[str, str]) -> Records:
    """Rename/extract fields: `{prompt: question, completion: answers.0}`."""
    if not columns:
        return records
    rows = []
    for row, where in zip(records.rows, records.locations):
        mapped = dict(row)
        for target, source in columns.items():
            value = _lookup(row, source)
            if value is None:
                raise AlignError(f"{records.key}: {where}: {records.section}.columns.{target}: field '{source}' is "
                                 f"missing")
            mapped[target] = value
        rows.append(mapped)
    return Records(rows, records.locations, records.source, records.key)


def detect_format(records: Records, requested: str, mapped: Iterable[str] = ()) -> str:
    """The format of the records (from the first one). With `data.columns`, a format using the mapped fields wins
    over one the record happens to have too (a record with both `messages` and a mapped `prompt`/`completion`)."""
    if not records.rows:
        raise AlignError(f"{records.key}: {records.source} has no records (is it the right file?)")
    first = records.rows[0]
    if requested != "auto":
        missing = [f for f in FORMAT_FIELDS[requested] if f not in first]
        if missing:
            raise AlignError(f"{records.key}: {records.locations[0]}: {records.section}.format '{requested}' needs "
                             f"field(s) {', '.join(missing)}; the record has {', '.join(first) or 'no fields'} (map "
                             f"yours with {records.section}.columns)")
        return requested
    mapped = set(mapped)
    candidates = [name for name, needed in FORMAT_FIELDS.items() if all(f in first for f in needed)]
    for name in candidates:
        if mapped & set(FORMAT_FIELDS[name]):
            return name
    if candidates:
        return candidates[0]
    tried = "; ".join(f"{name} ({'/'.join(fields)})" for name, fields in FORMAT_FIELDS.items())
    raise AlignError(f"{records.key}: {records.locations[0]}: no recognizable format in fields "
                     f"[{', '.join(map(str, first)) or 'none'}]. Tried: {tried}. Map your fields with "
                     f"{records.section}.columns, e.g. {records.section}.columns={{prompt: {next(iter(first), 'q')}, "
                     f"completion: ...}}")


def _text(row: dict, key: str, where: str, option: str, allow_empty: bool = False, required: bool = True) -> str | None:
    """The text of `row[key]`. Missing (when `required`) or not text: an error naming the record and field.
    Empty or null: an error unless `allow_empty` (then null is None, and the caller drops the record and counts it)."""
    if key not in row:
        if not required:
            return ""
        raise AlignError(f"{option}: {where}: field '{key}' is missing (the first record has it; every record needs "
                         f"the same fields)")
    value = row[key]
    if value is None and allow_empty:
        return None
    if isinstance(value, bool):
        value = "yes" if value else "no"
    elif isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        hint = (f"; to use one item, map it with {_section(option)}.columns, e.g. {{{key}: <field>.0}}"
                if isinstance(value, list) else "")
        raise AlignError(f"{option}: {where}: field '{key}' must be text, got {_json_kind(value)}{hint}")
    if not value.strip() and not allow_empty:
        raise AlignError(f"{option}: {where}: field '{key}' is empty; fill it in or remove that record")
    return value


def _clean(text: str) -> str:
    return "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in text.strip().split("\n"))


_DROP_LABELS = {"identical": "chosen == rejected", "no_assistant_answer": "no non-empty assistant message",
                "null_message_content": "a message with null content"}


@dataclass
class Dropped:
    """Records (or pairs) left out, counted by reason with the place each reason was first seen. Every reader that
    skips something counts it here, and the stages show `summary()` in their start table and keep `metrics()` in the
    registry: nothing is left out without a word."""

    counts: dict[str, int] = field(default_factory=dict)  # reason -> how many; a reason may be listed at 0
    first: dict[str, str] = field(default_factory=dict)  # reason -> file:line of the first one

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def __add__(self, other: Dropped) -> Dropped:
        """Both together (a training file and its held-out file): counts summed, the first place kept."""
        counts = {reason: self.counts.get(reason, 0) + other.counts.get(reason, 0)
                  for reason in {**self.counts, **other.counts}}
        return Dropped(counts, {**other.first, **self.first})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """`null completion: 3 (first at d.jsonl:4); ties: 1 (first at d.jsonl:9)`, or `none`."""
        return "; ".join(f"{_DROP_LABELS.get(reason, reason.replace('_', ' '))}: {count} (first at "
                         f"{self.first[reason]})" for reason, count in self.counts.items() if count) or "none"

    def metrics(self) -> dict[str, int]:
        """`{"dropped": 4, "dropped_null_completion": 3, ...}` for the registry."""
        return {"dropped": self.total, **{f"dropped_{reason}": count for reason, count in self.counts.items()}}


@dataclass
class Prepared:
    """Examples in TRL's format, with what was left out on the way."""

    examples: list[dict]
    format: str
    conversational: bool
    dropped: Dropped = field(default_factory=Dropped)


# What an example needs to be kept, per format (for the "nothing left" message).
_TARGET = {"messages": "a non-empty assistant message", "prompt_completion": "a non-empty completion",
           "question_answer": "a non-empty answer", "instruction": "a non-empty output",
           "input_output": "a non-empty output", "text": "non-empty text"}


def to_examples(records: Records, data_cfg: DataConfig, template: TemplateConfig) -> Prepared:
    """Records -> TRL examples: prompt/completion pairs (chat or templated strings), messages, or text."""
    if data_cfg.max_examples is not None and data_cfg.max_examples < 1:
        raise AlignError(f"data.max_examples: must be at least 1, got {data_cfg.max_examples}")
    if data_cfg.max_examples and data_cfg.max_examples < len(records.rows):
        order = sorted(random.Random(data_cfg.seed).sample(range(len(records.rows)), data_cfg.max_examples))
        records = Records([records.rows[i] for i in order], [records.locations[i] for i in order], records.source,
                          records.key)
    records = apply_columns(records, data_cfg.columns)
    fmt = detect_format(records, data_cfg.format, data_cfg.columns)
    clean = _clean if data_cfg.clean_whitespace else (lambda text: text)
    examples, dropped = [], Dropped()
    target = FORMAT_FIELDS[fmt][-1]  # the field a record is dropped without: completion, answer, output, text
    chat = template.name == "chat"
    if template.name == "custom" and not template.prompt:
        raise AlignError("template.prompt: required with template.name: custom (e.g. '### Question:\\n{question}"
                         "\\n### Answer:\\n')")
    for row, where in zip(records.rows, records.locations):
        if fmt == "messages":
            messages, reason = _messages(row.get("messages"), where, clean, records.key)
            if reason:
                dropped.add(reason, where)
                continue
            if template.system and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": template.system}] + messages
            examples.append({"messages": messages})
            continue
        if fmt == "text":
            prompt, completion, fields = "", _text(row, "text", where, records.key, allow_empty=True), {}
        else:
            prompt, completion, fields = _pair(row, fmt, where, records.key)
        # A null target is most likely a data bug, an empty one a record nobody filled in: dropped and counted apart.
        if completion is None:
            dropped.add(f"null_{target}", where)
            continue
        completion = clean(completion)
        if not completion.strip():
            dropped.add(f"empty_{target}", where)
            continue
        if fmt == "text":
            examples.append({"text": completion})
            continue
        prompt = clean(prompt)
        fields = {name: clean(value) for name, value in fields.items()}
        if chat:
            messages = [{"role": "user", "content": prompt}]
            if template.system:
                messages.insert(0, {"role": "system", "content": template.system})
            examples.append({"prompt": messages, "completion": [{"role": "assistant", "content": completion}]})
        else:
            examples.append({"prompt": _render(template, prompt, fields, row, where, clean, records.key),
                             "completion": completion})
    if not examples:
        raise AlignError(f"{records.key}: {records.source}: no usable examples left after filtering: all "
                         f"{len(records.rows)} records were dropped ({dropped.summary()}); each needs {_TARGET[fmt]} "
                         f"(format {fmt}); fill them in, or check {records.section}.format / {records.section}.columns")
    conversational = fmt == "messages" or (chat and fmt != "text")
    return Prepared(examples, fmt, conversational, dropped)


def _messages(value: Any, where: str, clean, option: str) -> tuple[list[dict], str | None]:
    """The conversation, and why it is dropped (None: kept)."""
    if not isinstance(value, list) or not value:
        raise AlignError(f"{option}: {where}: field 'messages' must be a non-empty list of {{role, content}}, got "
                         f"{'an empty list' if value == [] else _json_kind(value)}")
    messages, null = [], False
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise AlignError(f"{option}: {where}: messages[{i}] needs 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise AlignError(f"{option}: {where}: messages[{i}].role '{message['role']}' is not one of "
                             f"system, user, assistant, tool")
        content = message["content"]
        if content is None:
            null, content = True, ""
        if not isinstance(content, str):
            raise AlignError(f"{option}: {where}: messages[{i}].content must be text, got {_json_kind(content)}")
        messages.append({"role": message["role"], "content": clean(content)})
    if null:
        return messages, "null_message_content"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return messages, "no_assistant_answer"
    return messages, None


def _pair(row: dict, fmt: str, where: str, option: str) -> tuple[str, str | None, dict]:
    """(prompt, completion: None when null, the fields a template may use)."""
    if fmt == "prompt_completion":
        prompt, completion = _text(row, "prompt", where, option), _text(row, "completion", where, option, True)
        return prompt, completion, {"prompt": prompt}
    if fmt == "question_answer":
        question, answer = _text(row, "question", where, option), _text(row, "answer", where, option, True)
        return question, answer, {"prompt": question, "question": question}
    instruction = _text(row, "instruction" if fmt == "instruction" else "input", where, option)
    # Alpaca's optional input: null reads as none (it is not what the record is kept for).
    extra = (_text(row, "input", where, option, True, required=False) or "") if fmt == "instruction" else ""
    output = _text(row, "output", where, option, True)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return prompt, output, {"prompt": prompt, "instruction": instruction, "input": extra}


def _render(template: TemplateConfig, prompt: str, fields: dict, row: dict, where: str, clean=lambda t: t,
            option: str = "data") -> str:
    if template.name == "custom":
        values = {k: clean(str(v)) for k, v in row.items()
                  if isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)}
        try:
            return template.prompt.format(**{**values, **fields})
        except KeyError as e:
            raise AlignError(f"{option}: {where}: template.prompt uses {{{e.args[0]}}}, which the record does not "
                             f"have as text (fields: {', '.join(map(str, row))})") from None
        except (IndexError, ValueError, AttributeError) as e:
            raise AlignError(f"template.prompt: not a usable format string ({e}); use named fields like "
                             f"{{question}} and write literal braces as {{{{ and }}}}") from None
    if template.name == "alpaca":
        extra = fields.get("input", "")
        return NAMED_TEMPLATES["alpaca"].format(
            instruction=fields.get("instruction", prompt),
            input_clause=", paired with an input that provides further context" if extra else "",
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
    return NAMED_TEMPLATES[template.name].format(prompt=prompt)


def format_prompt(template: TemplateConfig, prompt: str) -> str:
    """A bare prompt in a non-chat training template, so generation sees what training saw."""
    fields = {"prompt": prompt, "question": prompt, "instruction": prompt, "input": ""}
    return _render(template, prompt, fields, fields, "prompt")


# --------------------------------------------------------------------------------------------------
# Prompts for generation (`align generate --prompts`, `align label push --prompts`)

PROMPT_FIELDS = ("prompt", "question", "instruction", "input", "text")


def read_prompts(path: str, option: str = "--prompts") -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl/.json/.csv file whose records have one of
    PROMPT_FIELDS. Errors name ``option`` (the option or config key that named the file) and the record's file:line."""
    if path.endswith(".txt"):
        prompts = [line.strip() for line in read_text(_package_file(path, option), option).splitlines()
                   if line.strip()]
    else:
        records = read_records(path, key=option)
        prompts = []
        for row, where in zip(records.rows, records.locations):
            field_name = next((f for f in PROMPT_FIELDS if f in row), None)
            if field_name is None:
                raise AlignError(f"{option}: {where}: no prompt field ({', '.join(PROMPT_FIELDS)}); the record has "
                                 f"{', '.join(map(str, row)) or 'none'}")
            value = row[field_name]
            if not isinstance(value, str):
                raise AlignError(f"{option}: {where}: field '{field_name}' must be text, got {_json_kind(value)}")
            if not value.strip():
                raise AlignError(f"{option}: {where}: field '{field_name}' is empty; fill it in or remove that record")
            prompts.append(value)
    if not prompts:
        raise AlignError(f"{option}: {path} has no prompts")
    return prompts


# --------------------------------------------------------------------------------------------------
# Length, split, fingerprint

def token_lengths(examples: list[dict], tokenizer) -> list[int]:
    """Tokens per example as the trainer will see them (chat template applied, EOS included)."""
    lengths = []
    for example in examples:
        if "messages" in example:
            ids = tokenizer.apply_chat_template(example["messages"], tokenize=True)
        elif "text" in example:
            ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
        elif isinstance(example["prompt"], list):
            ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=True)
        else:
            ids = tokenizer(example["prompt"] + example["completion"])["input_ids"] + [tokenizer.eos_token_id]
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        lengths.append(len(ids))
    return lengths


def split_validation(examples: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `size` (share if < 1, count if >= 1) of the examples, reproducibly for `seed`."""
    if not size:
        return examples, []
    if size < 0:
        raise AlignError(f"data.val_set_size: must be a share (0-1) or a count (>= 1), got {size}")
    count = int(round(size * len(examples))) if size < 1 else int(size)
    count = max(1, count)
    if count >= len(examples):
        raise AlignError(f"data.val_set_size: {size} leaves no training examples ({len(examples)} in all)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def fingerprint(examples: list[dict]) -> str:
    """A stable hash of the training examples (after formatting), recorded with every artifact."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Preferences (`align reward`, `align score`): TRL's preference formats, HH-RLHF dialogues, K-way rankings

# Fields that identify each preference format, in detection order.
PREFERENCE_FORMATS = {
    "rankings": ("prompt", "completions", "ranks"),
    "explicit": ("prompt", "chosen", "rejected"),
    "implicit": ("chosen", "rejected"),
}
RESPONSE_FIELDS = ("response", "completion", "chosen")  # what `align score` reads next to `prompt`
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
_HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class Preferences:
    """Preference pairs ``{prompt, chosen, rejected, group[, margin][, category][, subset]}`` in TRL's explicit-prompt
    format: all texts, or all message lists (conversational). ``group`` numbers the distinct prompts in order of
    appearance; ``locations[i]`` is the file:line pair ``i`` came from."""

    pairs: list[dict]
    locations: list[str]
    format: str
    records: int
    rankings: int = 0  # ranking records expanded into all their pairs
    dropped: Dropped = field(default_factory=lambda: Dropped({"ties": 0, "identical": 0}))

    @property
    def dropped_ties(self) -> int:
        return self.dropped.counts["ties"]

    @property
    def dropped_identical(self) -> int:
        return self.dropped.counts["identical"]

    @property
    def conversational(self) -> bool:
        return bool(self.pairs) and isinstance(self.pairs[0]["prompt"], list)

    @property
    def prompts(self) -> int:
        return len({pair["group"] for pair in self.pairs})


def read_preferences(records: Records, columns: dict[str, str] | None = None, use_margin: bool = True) -> Preferences:
    """Records in any preference format -> pairs. Ties (``tie: true``, equal ranks) and pairs whose chosen and
    rejected are the same are dropped and counted; empty texts and missing fields fail with the record's file:line.
    """
    records = apply_columns(records, columns or {})
    fmt = _preference_format(records)
    pairs, locations, groups = [], [], {}
    dropped = Dropped({"ties": 0, "identical": 0})
    margins: tuple[bool, str] | None = None  # (first record has a margin, where): all records or none need one

    def add(prompt, chosen, rejected, row: dict, where: str, margin=None) -> None:
        prompt, chosen, rejected = _same_kind(prompt, chosen, rejected)
        if _pref_key(chosen) == _pref_key(rejected):
            dropped.add("identical", where)
            return
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                "group": groups.setdefault(_pref_key(prompt), len(groups))}
        if margin is not None:
            pair["margin"] = margin
        for key in ("category", "subset"):  # accuracy per category (`align reward`), per subset (RewardBench)
            if row.get(key) is not None:
                pair[key] = str(row[key])
        pairs.append(pair)
        locations.append(where)

    for row, where in zip(records.rows, records.locations):
        missing = [f for f in PREFERENCE_FORMATS[fmt] if f not in row]
        if missing:
            raise AlignError(f"{records.key}: {where}: field '{missing[0]}' is missing (format {fmt} needs "
                             f"{', '.join(PREFERENCE_FORMATS[fmt])}, as the first record has; map yours with "
                             f"{records.section}.columns)")
        if row.get("tie") is True:
            dropped.add("ties", where)
            continue
        if fmt == "rankings":
            prompt = _pref_value(row, "prompt", where, records.key)
            completions, ranks = _ranking(row, where, records.key)
            order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
            for a, b in ((order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))):
                if ranks[a] == ranks[b]:
                    dropped.add("ties", where)
                else:
                    add(prompt, completions[a], completions[b], row, where)
            continue
        margin = row.get("margin") if use_margin else None
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise AlignError(f"{records.key}: {where}: field 'margin' must be a number, got {_json_kind(margin)}")
        if margins is None:
            margins = (margin is not None, where)
        elif margins[0] != (margin is not None):
            raise AlignError(f"{records.key}: {where}: field 'margin' is "
                             f"{'present' if margin is not None else 'missing'} here but not in {margins[1]}; give "
                             f"every pair a margin or none (or {records.section}.use_margin: false)")
        if fmt == "explicit":
            prompt = _pref_value(row, "prompt", where, records.key)
            chosen = _pref_value(row, "chosen", where, records.key)
            rejected = _pref_value(row, "rejected", where, records.key)
        else:
            prompt, chosen, rejected = _split_implicit(_pref_value(row, "chosen", where, records.key),
                                                       _pref_value(row, "rejected", where, records.key), where,
                                                       records.key)
        add(prompt, chosen, rejected, row, where, None if margin is None else float(margin))
    if not pairs:
        raise AlignError(f"{records.key}: {records.source}: no usable preference pairs: all {len(records.rows)} "
                         f"records were ties ({dropped.counts['ties']} pairs) or had chosen identical to rejected "
                         f"({dropped.counts['identical']}); expected pairs whose chosen and rejected responses differ "
                         f"and are not marked \"tie\": true")
    return Preferences(pairs, locations, fmt, len(records.rows),
                       rankings=len(records.rows) if fmt == "rankings" else 0, dropped=dropped)


def _preference_format(records: Records) -> str:
    if not records.rows:
        raise AlignError(f"{records.key}: {records.source} has no records (is it the right file?)")
    first = records.rows[0]
    for name, needed in PREFERENCE_FORMATS.items():
        if all(f in first for f in needed):
            return name
    tried = "; ".join(f"{name} ({'/'.join(fields)})" for name, fields in PREFERENCE_FORMATS.items())
    raise AlignError(f"{records.key}: {records.locations[0]}: no preference format in fields "
                     f"[{', '.join(map(str, first)) or 'none'}]. Tried: {tried}. Map your fields with "
                     f"{records.section}.columns, e.g. {records.section}.columns={{prompt: question, chosen: good, "
                     f"rejected: bad}}")


def _pref_value(row: dict, key: str, where: str, option: str, value: Any = None) -> str | list[dict]:
    """A non-empty text or a list of {role, content} messages with some content."""
    value = row[key] if value is None else value
    if isinstance(value, str):
        if not value.strip():
            raise AlignError(f"{option}: {where}: field '{key}' is empty; fill it in or remove that record")
        return value
    if isinstance(value, list) and value:
        messages = []
        for i, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise AlignError(f"{option}: {where}: {key}[{i}] needs 'role' and 'content'")
            if not isinstance(message["content"], str):
                raise AlignError(f"{option}: {where}: {key}[{i}].content must be text, got "
                                 f"{_json_kind(message['content'])}")
            messages.append({"role": str(message["role"]), "content": message["content"]})
        if not any(m["content"].strip() for m in messages):
            raise AlignError(f"{option}: {where}: field '{key}' is empty (every message's content is empty)")
        return messages
    kind = "an empty list" if value == [] else "null" if value is None else _json_kind(value)
    raise AlignError(f"{option}: {where}: field '{key}' must be text or a list of {{role, content}} messages, got "
                     f"{kind}")


def _ranking(row: dict, where: str, option: str) -> tuple[list, list[int]]:
    completions, ranks = row["completions"], row["ranks"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise AlignError(f"{option}: {where}: field 'completions' must be a list of at least 2 responses")
    if (not isinstance(ranks, list) or len(ranks) != len(completions)
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks)):
        raise AlignError(f"{option}: {where}: field 'ranks' must be a list of {len(completions)} integers >= 1 (1 = "
                         f"best, one per completion; equal ranks are ties)")
    return [_pref_value(row, f"completions[{i}]", where, option, value=c) for i, c in enumerate(completions)], ranks


def _split_implicit(chosen, rejected, where: str, option: str):
    """Implicit prompt: the shared start of chosen and rejected is the prompt, the rest the responses."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(chosen, str) and isinstance(rejected, str) and _HH_ASSISTANT in f"{chosen}\0{rejected}":
        if _HH_ASSISTANT not in chosen or _HH_ASSISTANT not in rejected:
            raise AlignError(f"{option}: {where}: an HH-RLHF dialogue needs a final '\\n\\nAssistant:' turn in both "
                             f"chosen and rejected")
        # HH-RLHF: "\n\nHuman: ...\n\nAssistant: ..." dialogues that differ in the last Assistant turn.
        cut_c, cut_r = chosen.rindex(_HH_ASSISTANT), rejected.rindex(_HH_ASSISTANT)
        if chosen[:cut_c] != rejected[:cut_r]:
            raise AlignError(f"{option}: {where}: chosen and rejected differ before their last Assistant turn; an "
                             f"HH-RLHF pair must share the dialogue and differ only in the final answer")
        prompt = _hh_dialogue(chosen[:cut_c])
        chosen = [{"role": "assistant", "content": chosen[cut_c + len(_HH_ASSISTANT):].strip()}]
        rejected = [{"role": "assistant", "content": rejected[cut_r + len(_HH_ASSISTANT):].strip()}]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        if shared not in (chosen, rejected):  # cut back to a word boundary: "The cat" / "The car" share "The "
            shared = shared[:max(shared.rfind(" "), shared.rfind("\n")) + 1]
        prompt, chosen, rejected = shared, chosen[len(shared):], rejected[len(shared):]
    else:
        raise AlignError(f"{option}: {where}: chosen and rejected must both be texts or both message lists")
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise AlignError(f"{option}: {where}: no prompt: the record has no 'prompt' field and chosen/rejected share no "
                         f"beginning to use as one. Tried: explicit (prompt/chosen/rejected), implicit "
                         f"(chosen/rejected with a shared prompt), HH-RLHF dialogues; add a prompt field or map one "
                         f"with {_section(option)}.columns")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        _pref_value({key: value}, key, where + " (after the shared prompt)", option)
    return prompt, chosen, rejected


def _hh_dialogue(text: str) -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: bye"`` -> user/assistant/user messages."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "user", "content": parts[0].strip()}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def _same_kind(prompt, chosen, rejected):
    """All texts, or all message lists: a text beside messages becomes one user (prompt) or assistant message."""
    if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen, rejected = ([{"role": "assistant", "content": v}] if isinstance(v, str) else v
                            for v in (chosen, rejected))
    return prompt, chosen, rejected


def _pref_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def split_by_prompt(pairs: list[dict], size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `size` of the PROMPTS (share if < 1, count if >= 1) with all their pairs, reproducibly for `seed`:
    no prompt is on both sides."""
    if not size:
        return pairs, []
    groups = sorted({pair["group"] for pair in pairs})
    count = max(1, int(round(size * len(groups))) if size < 1 else int(size))
    if count >= len(groups):
        raise AlignError(f"data.val_set_size: {size} leaves no training prompts ({len(groups)} distinct prompts in "
                         f"all); lower it or give data.eval_path")
    random.Random(seed).shuffle(groups)
    held = set(groups[:count])
    return [p for p in pairs if p["group"] not in held], [p for p in pairs if p["group"] in held]


def read_prompt_responses(path: str, option: str = "--data") -> tuple[list, list, Records]:
    """(prompts, responses, records) from records with `prompt` and one of RESPONSE_FIELDS (texts or messages)."""
    records = read_records(path, key=option)
    if not records.rows:
        raise AlignError(f"{option}: {records.source} has no records")
    prompts, responses = [], []
    for row, where in zip(records.rows, records.locations):
        field_name = next((f for f in RESPONSE_FIELDS if f in row), None)
        if "prompt" not in row or field_name is None:
            raise AlignError(f"{option}: {where}: needs a 'prompt' field and a response field "
                             f"({', '.join(RESPONSE_FIELDS)}); the record has {', '.join(map(str, row)) or 'none'}")
        prompts.append(_pref_value(row, "prompt", where, option))
        responses.append(_pref_value(row, field_name, where, option))
    return prompts, responses, records
