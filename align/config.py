"""Run configs: YAML -> validated dataclasses, before any model is loaded.

A config file has one section per concern (``model``, ``quantization``, ``lora``, ``data``,
``template``, ``training``, ``output``). Every field below is documented where it is declared.
``training:`` is passed to TRL's own config class (``SFTConfig`` for ``align sft``): every TRL /
transformers ``TrainingArguments`` field is reachable there without align re-declaring it.

Errors name the file and line, the dotted key, and the nearest valid key:
``configs/x.yaml:12: lora.rank: unknown key (did you mean 'lora.r'?)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
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
    r: int = field(default=16, metadata={"help": "Adapter rank."})
    alpha: int = field(default=32, metadata={"help": "Scaling numerator: updates are scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input."})
    target_modules: list[str] | str = field(default="all-linear", metadata={
        "help": "Module names to adapt (`[q_proj, v_proj]`) or `all-linear`."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained in full and saved with the adapter (e.g. `[lm_head]`)."})
    bias: Literal["none", "all", "lora_only"] = field(default="none", metadata={"help": "Which biases to train."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized scaling alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})


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
                "`{prompt: question, completion: answers.0}`."})
    split: str = field(default="train", metadata={"help": "Split to read from a hub or saved DatasetDict."})
    eval_path: str | None = field(default=None, metadata={
        "help": "Separate validation data (same formats). Otherwise `val_set_size` is held out of `path`."})
    val_set_size: float = field(default=0.0, metadata={
        "help": "Held-out validation share (0-1) or count (>= 1) taken from `path` with `seed`."})
    seed: int = field(default=42, metadata={"help": "Seed of the validation split and of subsampling."})
    max_examples: int | None = field(default=None, metadata={
        "help": "Use a random subset of N records (drawn with `seed`, kept in file order)."})
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


@dataclass
class SFTRunConfig:
    """`align sft`: supervised fine-tuning (InstructGPT stage 1)."""

    model: ModelConfig
    data: DataConfig
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    training: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Fields of TRL's SFTConfig (transformers TrainingArguments + SFT options: max_length, packing, "
                "completion_only_loss, ...). align sets CPU-safe defaults: bf16 only on a supporting GPU, "
                "gradient_checkpointing off, report_to none."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after this many evaluations without improvement of `training.metric_for_best_model` "
                "(eval_loss by default). Needs training.load_best_model_at_end and an eval/save strategy."})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "Smallest improvement that counts for early stopping."})
    seed: int = field(default=42, metadata={"help": "Seed for model init of new weights, data order and sampling."})


# --------------------------------------------------------------------------------------------------
# Loading and validation

@dataclass
class Source:
    """Where each dotted key came from, for error messages."""

    file: str
    lines: dict[str, int] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)

    def where(self, key: str) -> str:
        if key in self.overrides:
            return f"override '{self.overrides[key]}'"
        parts = key.split(".")
        for i in range(len(parts), 0, -1):  # the nearest enclosing key that has a line
            line = self.lines.get(".".join(parts[:i]))
            if line is not None:
                return f"{self.file}:{line}"
        return self.file


def load_config(path: str | Path, overrides: list[str], schema: type, extra_sections: dict[str, type] | None = None):
    """Read a YAML config, apply `dotted.key=value` overrides, validate against `schema`.

    `extra_sections` maps a free-form dict section (like `training`) to the class whose dataclass fields are
    its valid keys (TRL's SFTConfig), so typos there are caught before any model loads.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise AlignError(f"config: cannot read {path}: {e.strerror}") from None
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise AlignError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}:1: the config must be a mapping of sections (model:, data:, ...)")
    source = Source(str(path), _key_lines(node))
    for item in overrides:
        key, value = _parse_override(item)
        source.overrides[key] = item
        _set_dotted(data, key, value, item)
    return _build(schema, data, "", source, extra_sections or {})


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; accept it as the number everybody means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise AlignError(f"override '{item}': expected dotted.key=value (e.g. training.learning_rate=1e-4)")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any, item: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AlignError(f"override '{item}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _build(schema: type, data: Any, prefix: str, source: Source, extra_sections: dict[str, type]):
    section = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise AlignError(f"{source.where(prefix.rstrip('.'))}: {section}: expected a mapping, got "
                         f"{_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in fields:
            raise AlignError(f"{source.where(prefix + str(key))}: {prefix}{key}: unknown key"
                             f"{_suggest(str(key), fields, prefix)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(_resolve_type(schema, name)):
                    raise AlignError(f"{source.file}: missing section '{key}:'")
                raise AlignError(f"{source.where(prefix.rstrip('.'))}: missing required key '{key}'")
            continue
        value = data[name]
        annotation = _resolve_type(schema, name)
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value if value is not None else {}, key + ".", source, extra_sections)
        elif key in extra_sections:
            kwargs[name] = _check_free_section(value or {}, key, extra_sections[key], source)
        else:
            _check_value(value, annotation, key, source)
            kwargs[name] = value
    return schema(**kwargs)


def _check_free_section(values: Any, key: str, target: type, source: Source) -> dict:
    if not isinstance(values, dict):
        raise AlignError(f"{source.where(key)}: {key}: expected a mapping, got {_describe(values)}")
    fields = {f.name: f for f in dataclasses.fields(target)}
    hints = typing.get_type_hints(target)
    for name, value in values.items():
        dotted = f"{key}.{name}"
        if name not in fields:
            raise AlignError(f"{source.where(dotted)}: {dotted}: unknown key for {target.__name__}"
                             f"{_suggest(str(name), fields, key + '.')}")
        _check_value(value, hints[name], dotted, source)
    return dict(values)


def _check_value(value: Any, annotation: Any, key: str, source: Source) -> None:
    if not _matches(value, annotation):
        raise AlignError(f"{source.where(key)}: {key}: expected {_type_name(annotation)}, got {_describe(value)}")


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any or annotation is object:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
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
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in annotation)
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


# Names other tools (axolotl, LLaMA-Factory, peft) use for our fields.
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "lora_target_modules": "target_modules", "sequence_len": "max_length", "max_seq_length": "max_length",
            "sample_packing": "packing", "micro_batch_size": "per_device_train_batch_size",
            "epochs": "num_train_epochs", "lr": "learning_rate", "base_model": "path", "torch_dtype": "dtype"}


def _suggest(key: str, fields: dict, prefix: str) -> str:
    if _ALIASES.get(key) in fields:
        return f" (did you mean '{prefix}{_ALIASES[key]}'?)"
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    return f"; valid keys: {', '.join(sorted(fields))}"


def _resolve_type(schema: type, name: str):
    return typing.get_type_hints(schema)[name]


def to_dict(config: Any) -> dict:
    """A config dataclass as plain data (for the saved config, the registry and the model card)."""
    return dataclasses.asdict(config)


def save_yaml(data: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
