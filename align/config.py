"""Run configs: YAML -> validated dataclasses, before any model is loaded.

This module is the engine (reading YAML, `key=value` overrides, type and range checks, errors at file:line) and
the sections several stages share; each stage's own run config lives beside it (`stages/sft_config.py`, ...,
`stages/ppo/config.py`). A config file has one section per concern (``model``, ``quantization``, ``lora``, ``data``,
``template``, ``training``, ``output``). Every field is documented where it is declared.
``training:`` is passed to TRL's own config class (``SFTConfig`` for ``align sft``): every TRL /
transformers ``TrainingArguments`` field is reachable there without align re-declaring it.

Errors name the file and line, the dotted key, and the nearest valid key:
``configs/x.yaml:12: lora.rank: unknown key (did you mean 'lora.r'?)``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import functools
import math
import importlib.util
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from align.errors import AlignError

Dtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass
class ModelConfig:
    path: str = field(metadata={"help": "Model to start from: a local folder, a Hugging Face hub id, a .gguf "
                                        "file, a registry reference (`sft:latest`, `sft:3`, a run name) or "
                                        "`pkg:<package>/<file>` for a file shipped inside an installed package."})
    gguf_file: str | None = field(default=None, metadata={
        "help": "GGUF file name inside `path` when `path` is a folder. A GGUF model is de-quantized once into a "
                "standard folder under the align home, so artifacts built on it load with plain transformers."})
    dtype: Dtype = field(default="auto", metadata={
        "help": "Weights dtype. `auto`: bfloat16 on a GPU that supports it, else float32."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run model code shipped with a hub model. Off unless you trust its authors."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "`sdpa`, `eager`, `flash_attention_2`...; None lets transformers choose."})
    train_only: list[str] | None = field(default=None, metadata={
        "help": "Full fine-tuning of only the parameters whose names contain one of these substrings "
                "(e.g. `['layers.29.', 'lm_head']`); everything else is frozen. Needs `lora.enabled: false`."})


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = field(default=False, metadata={"help": "Load base weights in 4 bit (QLoRA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load base weights in 8 bit (LLM.int8)."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit quantization constants too."})
    compute_dtype: Dtype = field(default="auto", metadata={
        "help": "Dtype of the matmuls on de-quantized 4-bit weights. `auto`: the model dtype."})


@dataclass
class LoraConfig:
    enabled: bool = field(default=True, metadata={
        "help": "Train LoRA adapters. false: full fine-tuning (or `model.train_only` layers)."})
    r: int = field(default=16, metadata={"help": "Adapter rank.", "range": (1, None)})
    alpha: int = field(default=32, metadata={"help": "Scaling numerator: updates are scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input.", "range": (0, 1)})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "Module names to adapt (`[q_proj, v_proj]`) or `all-linear`."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. `[lm_head]`)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized scaling alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})


# The fields each data format reads (align.data.FORMAT_FIELDS); `data.columns` maps onto these.
FORMAT_FIELD_NAMES = ("messages", "prompt", "completion", "question", "answer", "instruction", "input", "output",
                      "text")

DataFormat = Literal["auto", "messages", "prompt_completion", "question_answer", "instruction", "input_output",
                     "text"]


@dataclass
class DataConfig:
    path: str = field(metadata={"help": "Training data: a .jsonl/.json/.csv/.parquet file, a folder saved with "
                                        "`datasets.save_to_disk`, a hub dataset name, or `pkg:<package>/<file>`."})
    format: DataFormat = field(default="auto", metadata={
        "help": "Record format; `auto` detects it from the fields (messages, prompt/completion, question/answer, "
                "instruction/input/output, input/output, text, in that order)."})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Map format fields to your fields, dotted for nesting and list items: "
                "`{prompt: question, completion: answers.0}`.", "keys": FORMAT_FIELD_NAMES})
    split: str = field(default="train", metadata={"help": "Split to read from a hub or saved DatasetDict."})
    eval_path: str | None = field(default=None, metadata={
        "help": "Separate validation data (same formats). Otherwise `val_set_size` is held out of `path`."})
    val_set_size: float = field(default=0.0, metadata={
        "help": "Held-out validation share (0-1) or count (>= 1) taken from `path` with `seed`.", "range": (0, None)})
    seed: int = field(default=42, metadata={"help": "Seed of the validation split and of subsampling."})
    max_examples: int | None = field(default=None, metadata={
        "help": "Use a random subset of N records (drawn with `seed`, kept in file order).", "range": (1, None)})
    clean_whitespace: bool = field(default=False, metadata={
        "help": "Strip each text and collapse runs of spaces (newlines kept)."})
    overlong: Literal["truncate", "drop"] = field(default="truncate", metadata={
        "help": "Examples longer than `training.max_length` tokens: `truncate` them or `drop` them. Counted either "
                "way in the summary."})


@dataclass
class TemplateConfig:
    name: Literal["chat", "alpaca", "question_answer", "plain", "custom"] = field(default="chat", metadata={
        "help": "How pairs become model input. `chat`: the tokenizer's chat template (a plain-text one is set when "
                "the model has none); `alpaca`: `### Instruction / ### Input / ### Response`; `question_answer`: "
                "`### Question:\\n{prompt}\\n### Answer:\\n`; `plain`: the prompt as is; `custom`: `prompt`."})
    prompt: str | None = field(default=None, metadata={
        "help": "Custom prompt format with `{field}` placeholders from the record, e.g. "
                "`'### Question:\\n{question}\\n### Answer:\\n'` (needs `name: custom`)."})
    system: str | None = field(default=None, metadata={"help": "System message for the chat template."})


@dataclass
class OutputConfig:
    dir: str | None = field(default=None, metadata={
        "help": "Final artifact folder; default `runs/<stage>/<name>`. Written atomically: until the run "
                "finishes it lives in `<dir>.incomplete/`."})
    name: str | None = field(default=None, metadata={"help": "Run name in the registry; default: the config "
                                                             "file name."})
    merge: bool = field(default=False, metadata={"help": "Also save the LoRA adapter merged into the base weights "
                                                         "(`merged/`), for serving without peft."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    keep_checkpoints: bool = field(default=False, metadata={
        "help": "Keep `checkpoints/` (limited by training.save_total_limit) in the finished artifact; by default "
                "they are deleted once the final weights are saved."})


# --------------------------------------------------------------------------------------------------
# `training:` sections: the fields of TRL's config class, and align's checks of values TRL takes and fails on late

def _report_to_problem(report_to: Any) -> str | None:
    """A tracker transformers does not know: the trainer fails on it only when it starts, after the model loads."""
    known = _reporting_integrations()
    for name in [report_to] if isinstance(report_to, str) else list(report_to or []):
        if name not in known and name not in ("all", "none"):
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{name!r} is not a tracker transformers supports{hint}; one of {', '.join(known)}, all, none"
    return None


def check_report_to(report_to) -> None:
    """Fail before training when `training.report_to` names a tracker that is not installed (where the config is
    loaded to run, not wherever it is read: the config is valid where the tracker is installed)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    modules = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard", "comet_ml": "comet_ml"}
    for name in names:
        if name in modules and importlib.util.find_spec(modules[name]) is None:
            raise AlignError(f"training.report_to: '{name}' is not installed (pip install {modules[name]}), or "
                             f"remove it from report_to")


# align's checks of `training:` fields, on top of their types: `range` (inclusive), `above` (exclusive lower bound),
# `check` (value -> a problem, or None), `type` (narrower than TRL's). Each is a value TRL and transformers accept and
# then fail on after the model has loaded, or train on without a word.
TRAINING_FIELDS: dict[str, dict] = {
    "learning_rate": {"above": 0},
    "num_train_epochs": {"range": (0, None)},
    "max_steps": {"range": (-1, None)},  # -1: unset, the epochs decide
    "per_device_train_batch_size": {"range": (1, None)},
    "per_device_eval_batch_size": {"range": (1, None)},
    "gradient_accumulation_steps": {"range": (1, None)},
    "warmup_steps": {"range": (0, None)},
    "max_grad_norm": {"range": (0, None)},
    "weight_decay": {"range": (0, None)},
    "logging_steps": {"above": 0},  # below 1: a share of the training steps
    "eval_steps": {"above": 0},
    "save_steps": {"above": 0},
    "max_length": {"range": (1, None)},
    "dataloader_num_workers": {"range": (0, None)},
    "report_to": {"check": _report_to_problem},
}


# --------------------------------------------------------------------------------------------------
# Loading and validation

@dataclass
class Source:
    """Where each dotted key came from, for error messages."""

    file: str
    lines: dict[str, int] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> the override as typed
    raw: dict[str, str] = field(default_factory=dict)  # dotted key -> the value as written, unparsed

    def where(self, key: str) -> str:
        if key in self.overrides:
            return f"override '{self.overrides[key]}'"
        parts = key.split(".")
        for i in range(len(parts), 0, -1):  # the nearest enclosing key that has a line
            line = self.lines.get(".".join(parts[:i]))
            if line is not None:
                return f"{self.file}:{line}"
        return self.file


def load_config(path: str | Path, overrides: list[str], schema: type, extra_sections: dict[str, type] | None = None,
                check: typing.Callable[[Any], None] | None = None):
    """Read a YAML config, apply `dotted.key=value` overrides, validate against `schema`.

    A `training:` section (a field with `trl` metadata) takes the fields of TRL's config class of that name. Without
    `extra_sections` they are read from TRL's source, with their plain types, so a typo is reported without importing
    torch, transformers and TRL (seconds); `extra_sections` maps the section to TRL's class itself, whose types are
    then checked in full. `check(config)` runs last, e.g. building TRL's config object from the section; a
    `ConfigError` it raises is reported at the file:line of its key.
    """
    return read_config(path, overrides, schema, extra_sections).finish(check=check)


def read_config(path: str | Path, overrides: list[str], schema: type,
                extra_sections: dict[str, type] | None = None) -> LoadedConfig:
    """The first part of `load_config`: the config read and checked by align's own rules (TRL's fields read from its
    source unless `extra_sections` names its classes), kept with where each key came from, so that checks made once
    the libraries are imported (`LoadedConfig.finish`) are reported at the same file:line. `align <stage>` reads its
    config once this way: a typo is reported in a second, and the stage finishes the same object."""
    path = Path(path)
    text = read_text(path, "config", hint="check the --config path")
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise AlignError(f"{path}{_yaml_problem(e)}; check indentation, colons and quotes") from None
    needed = ", ".join(f"{f.name}:" for f in dataclasses.fields(schema) if _required(f))
    if data is None:  # an empty file, or only comments: most likely the wrong file, or one not saved yet
        raise AlignError(f"{path}: the config is empty; it needs at least {needed} (see configs/ for examples)")
    if not isinstance(data, dict):
        raise AlignError(f"{path}:1: the config must be a mapping of sections ({needed} ...), got {_describe(data)} "
                         f"(see configs/ for examples)")
    source = Source(str(path))
    source.lines = _key_lines(node, str(path), "", source.raw)
    for item in overrides:
        key, value, raw = _parse_override(item)
        source.overrides[key] = item
        source.raw[key] = raw
        _set_dotted(data, key, value, item)
    validator = _Validator(schema, source, extra_sections or {})
    config = validator.build(schema, data, "")
    _cross_check(config, source)
    return LoadedConfig(config, path, source, validator)


@dataclass
class LoadedConfig:
    """A config read by `read_config`, its file, and where each of its keys came from."""

    config: Any
    path: Path
    source: Source
    validator: _Validator

    def finish(self, sections: dict[str, type] | None = None, check: typing.Callable[[Any], None] | None = None):
        """The config, checked in full: each free-form section of `sections` typed again against the library's own
        class (TRL's SFTConfig for `training`: its enums and classes, which reading its source leaves unchecked),
        then `check(config)` (TRL's config object built, say), a `ConfigError` it raises reported at its key's
        file:line."""
        fields = {f.name: f for f in dataclasses.fields(self.config)}
        for key, target in (sections or {}).items():
            setattr(self.config, key, self.validator.free_section(getattr(self.config, key), key, target,
                                                                  fields[key].metadata.get("fields", {})))
        if check is not None:
            try:
                check(self.config)
            except ConfigError as e:
                raise AlignError(_located(e, self.source)) from None
        return self.config


class ConfigError(AlignError):
    """A value of config key `key` refused by a check made on the loaded config (TRL's config class built from the
    `training:` section, say). `load_config` reports it at that key's file:line, or, for a section, at its key that
    the message names first."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def _located(error: ConfigError, source: Source) -> str:
    """`file:line: key: message`. An error about a whole section is put at the key of it that the message names
    (TRL's "--load_best_model_at_end requires ..."), else at the one whose value it quotes ("foo is not a valid
    SchedulerType"), else at the section."""
    section = error.key
    given = [key for key in dict.fromkeys([*source.lines, *source.overrides])
             if key.startswith(section + ".") and key.count(".") == section.count(".") + 1]
    for text_of in (lambda key: key.rsplit(".", 1)[-1], lambda key: source.raw.get(key, "")):
        found = []
        for key in given:
            text = text_of(key)
            match = re.search(rf"\b{re.escape(text)}\b", error.message) if re.search("[A-Za-z]", text) else None
            if match:
                found.append((match.start(), key))
        if found:
            return f"{source.where(min(found)[1])}: {min(found)[1]}: {error.message}"
    return f"{source.where(section)}: {section}: {error.message}"


def read_text(path: str | Path, key: str, hint: str = "") -> str:
    """The text of a UTF-8 file (a byte-order mark dropped). Errors start with `key`, the config key or option that
    named the file (`prompts.path: p.txt: file not found`), and a byte that is not UTF-8 is reported with its line."""
    try:
        data = Path(path).expanduser().read_bytes()
    except FileNotFoundError:
        raise file_not_found(path, key, hint) from None
    except IsADirectoryError:
        raise AlignError(f"{key}: {path} is a folder, not a file" + (f" ({hint})" if hint else "")) from None
    except OSError as e:
        raise AlignError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AlignError(f"{key}: {path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason}); re-save "
                         f"it as UTF-8") from None


def file_not_found(path: str | Path, key: str, hint: str = "") -> AlignError:
    """`prompts.path: p.txt: file not found (relative paths start in /home/me)`."""
    notes = [hint] if hint else []
    if not Path(path).expanduser().is_absolute():
        notes.append(f"relative paths start in {Path.cwd()}")
    return AlignError(f"{key}: {path}: file not found" + (f" ({'; '.join(notes)})" if notes else ""))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """`:5: invalid YAML: found unexpected end of stream (while scanning a quoted scalar from line 4)`: the line
    where PyYAML noticed the problem, and the line of what it was reading when that started somewhere else."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    started = (f" ({context} from line {context_mark.line + 1})"
               if context and context_mark and mark and context_mark.line != mark.line else "")
    return f"{f':{mark.line + 1}' if mark else ''}: invalid YAML: {problem}{started}"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; accept it as the number everybody means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _key_lines(node, file: str, prefix: str = "", raw: dict[str, str] | None = None) -> dict[str, int]:
    """Dotted key -> line, for every mapping key; a key given twice in one mapping is an error (YAML would
    silently keep the last one). Unquoted scalar values are also kept as written in `raw`, so a text field
    can take `no` or `2024-01-01` as text (YAML 1.1 reads them as false and a date)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                continue  # complex keys and merge keys (`<<: *anchor`) have no dotted name
            line = key_node.start_mark.line + 1
            key = f"{prefix}{key_node.value}"
            if key_node.value in seen:
                raise AlignError(f"{file}:{line}: {key}: given twice (first at line {seen[key_node.value]}); "
                                 f"keep one")
            seen[key_node.value] = line
            lines[key] = line
            if raw is not None and isinstance(value_node, yaml.ScalarNode) and value_node.style is None:
                raw[key] = value_node.value
            lines.update(_key_lines(value_node, file, key + ".", raw))
    elif isinstance(node, yaml.SequenceNode):  # list items: `benchmarks.0.path`
        for index, item in enumerate(node.value):
            lines[f"{prefix}{index}"] = item.start_mark.line + 1
            lines.update(_key_lines(item, file, f"{prefix}{index}.", raw))
    return lines


def _parse_override(item: str) -> tuple[str, Any, str]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise AlignError(f"override '{item}': expected dotted.key=value (e.g. training.learning_rate=1e-4)")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value, raw


def _set_dotted(data: dict, key: str, value: Any, item: str) -> None:
    """Set `a.b.c` in nested mappings; a number indexes into a list (`benchmarks.0.max_examples=50`)."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        section = ".".join(parts[:i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise AlignError(f"override '{item}': '{'.'.join(parts[:i])}' is a list of {len(node)}; use an index "
                                 f"0-{len(node) - 1} after it")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if last:
            node[part] = value
            return
        child = node.get(part)
        if child is None:  # absent, or an empty section (`lora:` with nothing under it)
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise AlignError(f"override '{item}': '{section}' is {_describe(child)}, not a section")
        node = child


class _Validator:
    """Builds the schema's dataclasses from plain data, checking every key and value on the way."""

    def __init__(self, root: type, source: Source, extra_sections: dict[str, type]):
        self.source = source
        self.sections = dict(extra_sections)  # free-form section -> the dataclass whose fields are its keys
        # Every valid dotted key, for "did you mean" across sections (`lora.learning_rate` -> training).
        self.all_keys: list[str] = []
        self._collect(root, "")

    def _collect(self, schema: type, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            key = prefix + f.name
            if dataclasses.is_dataclass(hints[f.name]):
                self._collect(hints[f.name], key + ".")
            elif key in self.sections or "trl" in f.metadata:
                if key not in self.sections:
                    self.sections[key] = trl_config_fields(f.metadata["trl"])
                self.all_keys.extend(f"{key}.{g.name}" for g in dataclasses.fields(self.sections[key]))
            else:
                self.all_keys.append(key)

    def build(self, schema: type, data: Any, prefix: str):
        source = self.source
        section = prefix.rstrip(".") or "the config"
        if not isinstance(data, dict):
            raise AlignError(f"{source.where(prefix.rstrip('.'))}: {section}: expected a mapping of keys, got "
                             f"{_describe(data)}")
        fields = {f.name: f for f in dataclasses.fields(schema)}
        hints = typing.get_type_hints(schema)
        for key in data:
            if key not in fields:
                raise AlignError(f"{source.where(prefix + str(key))}: {prefix}{key}: unknown key"
                                 f"{self.suggest(str(key), fields, prefix)}")
        kwargs = {}
        for name, f in fields.items():
            key = prefix + name
            annotation = hints[name]
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    if dataclasses.is_dataclass(annotation):
                        needed = ", ".join(f"{key}.{g.name}" for g in dataclasses.fields(annotation)
                                           if _required(g))
                        raise AlignError(f"{source.file}: missing section '{key}:'"
                                         + (f" (it needs at least {needed})" if needed else ""))
                    raise AlignError(f"{source.where(prefix.rstrip('.'))}: missing required key '{key}'"
                                     f"{_help_hint(f)}")
                continue
            value = data[name]
            item_type = _list_of_dataclass(annotation)
            if dataclasses.is_dataclass(annotation):
                kwargs[name] = self.build(annotation, value if value is not None else {}, key + ".")
            elif item_type is not None:
                if not isinstance(value, list):
                    raise AlignError(f"{source.where(key)}: {key}: expected a list of mappings "
                                     f"({', '.join(g.name for g in dataclasses.fields(item_type))}), got "
                                     f"{_describe(value)}")
                kwargs[name] = [self.build(item_type, item, f"{key}.{index}.") for index, item in enumerate(value)]
            elif key in self.sections:
                kwargs[name] = self.free_section(value if value is not None else {}, key, self.sections[key],
                                                 f.metadata.get("fields", {}))
            else:
                if value is None and _required(f):
                    raise AlignError(f"{source.where(key)}: {key}: required, but empty{_help_hint(f)}")
                kwargs[name] = _check_value(value, annotation, key, source, f.metadata)
        return schema(**kwargs)

    def free_section(self, values: Any, key: str, target: type, checks: dict[str, dict]) -> dict:
        source = self.source
        if not isinstance(values, dict):
            raise AlignError(f"{source.where(key)}: {key}: expected a mapping of {target.__name__} fields, got "
                             f"{_describe(values)}")
        fields = {f.name: f for f in dataclasses.fields(target)}
        hints = typing.get_type_hints(target)
        checked = {}
        for name, value in values.items():
            dotted = f"{key}.{name}"
            if dotted in _MANAGED:
                raise AlignError(f"{source.where(dotted)}: {dotted}: set by align; {_MANAGED[dotted]}")
            if name not in fields:
                raise AlignError(f"{source.where(dotted)}: {dotted}: unknown key for {target.__name__}"
                                 f"{self.suggest(str(name), fields, key + '.')}")
            metadata = checks.get(name, {})
            checked[name] = _check_value(value, metadata.get("type", hints[name]), dotted, source, metadata)
        return checked

    def suggest(self, key: str, fields: dict, prefix: str) -> str:
        """` (did you mean 'x.y'?)`: an alias other tools use, the same key in another section, a close spelling."""
        if _ALIASES.get(key) in self.all_keys:
            return f" (did you mean '{_ALIASES[key]}'?)"
        elsewhere = [k for k in self.all_keys if k.rsplit(".", 1)[-1] == key]
        if elsewhere:  # `lora.learning_rate` -> training.learning_rate
            return f" (did you mean '{elsewhere[0]}'?)"
        close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
        if close:
            return f" (did you mean '{prefix}{close[0]}'?)"
        close = difflib.get_close_matches(key, [k.rsplit(".", 1)[-1] for k in self.all_keys], n=1, cutoff=0.8)
        if close:
            return f" (did you mean '{next(k for k in self.all_keys if k.endswith('.' + close[0]) or k == close[0])}'?)"
        names = sorted(fields)
        if len(names) > 25:
            return f" (no similar key among its {len(names)} fields; check the spelling)"
        return f"; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"


def _list_of_dataclass(annotation: Any) -> type | None:
    """The item class of a `list[SomeConfig]` field, else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _help_hint(f: dataclasses.Field) -> str:
    """` (model to start from)`: the first phrase of the field's help."""
    text = f.metadata.get("help", "")
    phrase = re.split(r"[.:;]", text, maxsplit=1)[0].strip()
    return f" ({phrase[0].lower() + phrase[1:]})" if phrase else ""


def _check_value(value: Any, annotation: Any, key: str, source: Source, metadata: Any = None) -> Any:
    """The value if it fits `annotation` (and the field's `range` / `keys`), else an AlignError naming the key."""
    if (not _matches(value, annotation) and key in source.raw and not isinstance(value, list)
            and _matches(source.raw[key], annotation)):
        value = source.raw[key]  # `eval_strategy: no`, `output.name=123`, `template.system=a: b`: meant as text
    if not _matches(value, annotation):
        raise AlignError(f"{source.where(key)}: {key}: expected {_type_name(annotation)}, got {_describe(value)}")
    metadata = metadata or {}
    low, high = metadata.get("range", (None, None))
    above = metadata.get("above")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # NaN passes every comparison; an infinite value passes open-ended bounds.
        if math.isnan(value) or (math.isinf(value) and (low, high, above) != (None, None, None)):
            raise AlignError(f"{source.where(key)}: {key}: must be a finite number, got {value}")
        if low is not None and value < low:
            raise AlignError(f"{source.where(key)}: {key}: must be at least {low}, got {value}")
        if high is not None and value > high:
            raise AlignError(f"{source.where(key)}: {key}: must be at most {high}, got {value}")
        if above is not None and value <= above:
            raise AlignError(f"{source.where(key)}: {key}: must be greater than {above}, got {value}")
    problem = metadata["check"](value) if "check" in metadata and value is not None else None
    if problem:
        raise AlignError(f"{source.where(key)}: {key}: {problem}")
    allowed = metadata.get("keys")
    if allowed and isinstance(value, dict):
        for name in value:
            if name not in allowed:
                close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise AlignError(f"{source.where(key)}: {key}.{name}: not a field align reads ({hint}valid: "
                                 f"{', '.join(allowed)})")
    if metadata.get("file") and isinstance(value, str):  # a missing file is blamed on this key, not on --config
        read_text(value, f"{source.where(key)}: {key}")
    return value


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict) and (
            len(args) != 2 or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # annotations we cannot check (callables, forward refs) are left to the library


_PLURALS = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple):
        return f"a list of {_PLURALS.get(args[0], _type_name(args[0]) + ' items')}" if args else "a list"
    if origin is dict:
        return f"a mapping of {_PLURALS.get(args[0], 'keys')} to {_PLURALS.get(args[1], 'values')}" \
            if len(args) == 2 else "a mapping"
    if annotation is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _describe(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    return f"{value!r} ({type(value).__name__})"


# Names other tools (axolotl, LLaMA-Factory, peft, transformers) use -> our dotted key. Suggested wherever the
# name appears: flat at the top (axolotl configs have no sections) or in any section.
_ALIASES = {
    "base_model": "model.path", "model_name_or_path": "model.path", "torch_dtype": "model.dtype",
    "datasets": "data.path", "dataset": "data.path", "val_size": "data.val_set_size",
    "rank": "lora.r", "lora_r": "lora.r", "lora_rank": "lora.r", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target_modules": "lora.target_modules", "lora_target": "lora.target_modules",
    "lora_target_linear": "lora.target_modules", "target": "lora.target_modules", "adapter": "lora.enabled",
    "finetuning_type": "lora.enabled", "quantization_bit": "quantization.load_in_4bit",
    "chat_template": "template.name", "output_dir": "output.dir",
    "sequence_len": "training.max_length", "max_seq_length": "training.max_length",
    "max_seq_len": "training.max_length", "cutoff_len": "training.max_length", "sample_packing": "training.packing",
    "micro_batch_size": "training.per_device_train_batch_size", "batch_size": "training.per_device_train_batch_size",
    "epochs": "training.num_train_epochs", "num_epochs": "training.num_train_epochs", "lr": "training.learning_rate",
    "wandb_project": "training.report_to",
}

# Keys of a free-form section that align sets itself, with what to use instead.
_MANAGED = {
    "training.output_dir": "use output.dir (checkpoints go to <output.dir>.incomplete/checkpoints until the run "
                           "finishes)",
    "training.resume_from_checkpoint": "use --resume to continue an interrupted run",
}


def _cross_check(config: Any, source: Source) -> None:
    """Checks that involve more than one key, done here so they fail with file:line before anything loads."""
    template = getattr(config, "template", None)
    if isinstance(template, TemplateConfig):
        if template.name == "custom" and not template.prompt:
            raise AlignError(f"{source.where('template.name')}: template.name: custom needs template.prompt, e.g. "
                             f"'### Question:\\n{{question}}\\n### Answer:\\n'")
        if template.prompt and template.name != "custom":
            raise AlignError(f"{source.where('template.prompt')}: template.prompt is only used with template.name: "
                             f"custom (set that, or remove template.prompt)")
        if template.prompt:
            _check_format_string(template.prompt, source)
    model, lora, quant = (getattr(config, name, None) for name in ("model", "lora", "quantization"))
    if isinstance(quant, QuantizationConfig):
        if quant.load_in_4bit and quant.load_in_8bit:
            raise AlignError(f"{source.where('quantization.load_in_8bit')}: quantization: choose one of load_in_4bit "
                             f"and load_in_8bit")
        if (quant.load_in_4bit or quant.load_in_8bit) and isinstance(lora, LoraConfig) and not lora.enabled:
            raise AlignError(f"{source.where('lora.enabled')}: lora.enabled: false, but a 4/8-bit model can only "
                             f"train adapters; set lora.enabled: true or turn quantization off")
    if isinstance(model, ModelConfig) and model.train_only and isinstance(lora, LoraConfig) and lora.enabled:
        raise AlignError(f"{source.where('model.train_only')}: model.train_only selects layers for full "
                         f"fine-tuning; set lora.enabled: false")
    training = getattr(config, "training", None)
    data = getattr(config, "data", None)
    if isinstance(training, dict) and isinstance(data, DataConfig):
        has_eval = bool(data.eval_path or data.val_set_size)
        if training.get("load_best_model_at_end") and not has_eval:
            raise AlignError(f"{source.where('training.load_best_model_at_end')}: training.load_best_model_at_end "
                             f"needs a validation set: set data.val_set_size or data.eval_path")
        strategy = training.get("eval_strategy")
        if strategy is False:  # YAML 1.1 reads `eval_strategy: no` as false; TRL's config reads it back as "no"
            strategy = "no"
        if strategy is not None and str(getattr(strategy, "value", strategy)).lower() != "no" and not has_eval:
            raise AlignError(f"{source.where('training.eval_strategy')}: training.eval_strategy: {strategy} needs a "
                             f"validation set: set data.val_set_size or data.eval_path (or eval_strategy: no)")
    patience = getattr(config, "early_stopping_patience", None)
    if patience and isinstance(training, dict) and not training.get("load_best_model_at_end"):
        raise AlignError(f"{source.where('early_stopping_patience')}: early_stopping_patience needs "
                         f"training.load_best_model_at_end: true (and matching training.eval_strategy / "
                         f"save_strategy)")
    if isinstance(training, dict) and training.get("num_train_epochs") == 0 and training.get("max_steps", -1) <= 0:
        raise AlignError(f"{source.where('training.num_train_epochs')}: training.num_train_epochs: 0 and no "
                         f"training.max_steps: nothing would train; set one of them")
    if hasattr(config, "cross_check"):  # a run config's own checks across its keys (`where(key)`: its file:line)
        config.cross_check(source.where)


def _check_format_string(text: str, source: Source) -> None:
    where = source.where("template.prompt")
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise AlignError(f"{where}: template.prompt: not a valid format string ({e}); write literal braces as "
                         f"{{{{ and }}}}") from None
    for name in names:
        if not name or name.isdigit() or not name.isidentifier():
            raise AlignError(f"{where}: template.prompt: placeholder {{{name}}} must be a record field name, like "
                             f"{{question}}")


# --------------------------------------------------------------------------------------------------
# TRL's config classes read from source: importing TRL imports torch and transformers (seconds), and a typo in
# `training:` should be reported before that. Only names, bases, imports and plain annotations are read.

class _Unreadable(Exception):
    """Source that this reading does not follow (the class is then imported)."""


@functools.cache
def trl_config_fields(class_name: str) -> type:
    """TRL's config class `class_name` (SFTConfig, ...) as a dataclass of the same fields, typed where the type is a
    plain one (a transformers enum or class reads as Any), read from TRL's and transformers' source files without
    importing them. TRL's class itself where the source cannot be followed."""
    try:
        fields = _class_fields("trl", class_name)
    except (_Unreadable, OSError, SyntaxError, UnicodeDecodeError):
        import trl

        return getattr(trl, class_name)
    return dataclasses.make_dataclass(class_name, [(name, annotation, dataclasses.field(default=None))
                                                   for name, annotation in fields.items()])


@functools.cache
def _reporting_integrations() -> list[str]:
    """The `report_to` trackers transformers implements: the keys of its INTEGRATION_TO_CALLBACK."""
    try:
        _, tree = _module_source("transformers.integrations.integration_utils")
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                    any(isinstance(t, ast.Name) and t.id == "INTEGRATION_TO_CALLBACK" for t in node.targets):
                return [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    except (_Unreadable, OSError, SyntaxError, UnicodeDecodeError):
        pass
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def _module_file(module: str) -> Path:
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)  # a top-level name is looked up on the path: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        raise _Unreadable(module)
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*rest.split(".") if rest else [])
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    raise _Unreadable(module)


@functools.cache
def _module_source(module: str) -> tuple[Path, ast.Module]:
    path = _module_file(module)
    return path, ast.parse(path.read_text(encoding="utf-8"))


def _class_fields(module: str, name: str, depth: int = 0) -> dict[str, Any]:
    """Field name -> type of the dataclass `name` that `module` defines or imports, its bases' fields first."""
    path, tree = _module_source(module)
    if depth > 20:
        raise _Unreadable(name)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            fields: dict[str, Any] = {}
            for base in node.bases:
                if not isinstance(base, ast.Name):
                    raise _Unreadable(f"a base of {name}")
                fields.update(_class_fields(module, base.id, depth + 1))
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                        and "ClassVar" not in ast.dump(item.annotation):
                    fields[item.target.id] = _annotation(item.annotation)
            return fields
    for node in ast.walk(tree):  # `from .x import name`, also under `if TYPE_CHECKING:` in a lazy package
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _class_fields(_imported_module(module, path, node), alias.name, depth + 1)
    raise _Unreadable(f"{name} in {module}")


def _imported_module(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


_PLAIN_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list, "tuple": tuple,
                "Any": Any, "Dict": dict, "List": list, "Tuple": tuple}
_GENERIC_TYPES = {"Optional": lambda args: typing.Optional[args[0]], "Union": lambda args: typing.Union[tuple(args)],
                  "dict": lambda args: dict[tuple(args)], "Dict": lambda args: dict[tuple(args)],
                  "list": lambda args: list[args[0]], "List": lambda args: list[args[0]]}


def _annotation(node: ast.expr) -> Any:
    """The annotation as a type `_matches` can check; Any where it names a library type (an enum, a class)."""
    try:
        return _evaluate_annotation(node)
    except (_Unreadable, SyntaxError, TypeError):
        return Any


def _evaluate_annotation(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _evaluate_annotation(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return typing.Union[_evaluate_annotation(node.left), _evaluate_annotation(node.right)]
    target = node.value if isinstance(node, ast.Subscript) else node
    name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else None
    if not isinstance(node, ast.Subscript) and name in _PLAIN_TYPES:
        return _PLAIN_TYPES[name]
    if isinstance(node, ast.Subscript):
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Literal" and all(isinstance(item, ast.Constant) for item in items):
            return Literal[tuple(item.value for item in items)]
        if name in _GENERIC_TYPES:
            return _GENERIC_TYPES[name]([_evaluate_annotation(item) for item in items])
    raise _Unreadable(ast.dump(node))


def to_dict(config: Any) -> dict:
    """A config dataclass as plain data (for the saved config, the registry and the model card)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------------------------------
# Preference data: `align reward` and `align dpo`

# The fields the preference formats read (align.data.PREFERENCE_FORMATS); `data.columns` maps onto these.
PREFERENCE_FIELD_NAMES = ("prompt", "chosen", "rejected", "completions", "ranks", "margin", "category", "tie")


@dataclass
class PreferenceDataConfig:
    path: str = field(metadata={"help": "Preference data: a registry reference (`label:latest`, the pairs `align "
                                        "label pull` wrote), a .jsonl/.json/.csv/.parquet file, a saved dataset "
                                        "folder, a hub dataset or `pkg:<package>/<file>`. Formats, detected per file: "
                                        "rankings (prompt, completions, ranks: rank 1 best, expanded to all pairs), "
                                        "explicit (prompt, chosen, rejected), implicit (chosen, rejected: the shared "
                                        "start is the prompt; HH-RLHF `\\n\\nHuman: ... \\n\\nAssistant: ...` "
                                        "dialogues are split at the last Assistant turn). Texts or conversational "
                                        "message lists."})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Map format fields to your fields, dotted for nesting: `{prompt: question, chosen: good.text}`.",
        "keys": PREFERENCE_FIELD_NAMES})
    split: str = field(default="train", metadata={"help": "Split to read from a hub or saved DatasetDict."})
    eval_path: str | None = field(default=None, metadata={
        "help": "Separate held-out preferences (same formats). Pairs whose prompt is also in the training data are "
                "left out of it. Otherwise `val_set_size` is held out of `path`."})
    val_set_size: float = field(default=0.1, metadata={
        "help": "Held-out share (0-1) or count (>= 1) of PROMPTS: all pairs of a prompt go to the same side, so no "
                "prompt is in both. 0: no held-out metrics.", "range": (0, None)})
    seed: int = field(default=42, metadata={"help": "Seed of the held-out split and of the batch order."})
    min_pairs: int = field(default=8, metadata={
        "help": "Refuse to train on fewer usable pairs than this (after ties and identical pairs are dropped).",
        "range": (1, None)})
    use_margin: bool = field(default=True, metadata={
        "help": "When pairs have a numeric `margin` (e.g. a rating difference), train on "
                "-log sigmoid(r_chosen - r_rejected - margin) (Llama 2's margin loss)."})
