"""align.config: YAML run configs -> validated dataclasses, with errors that say file:line, key and the fix.

Everything here is checked before a model loads, so these are plain unit tests: no model, no training.
`training:` keys are validated against TRL's real SFTConfig (imported once per session).
"""

from __future__ import annotations

import textwrap

import pytest
import yaml

from align.config import DataConfig, LoraConfig, load_config, to_dict
from align.stages.sft_config import SFTRunConfig
from align.errors import AlignError

BASE = """\
model:
  path: /models/tiny
data:
  path: data.jsonl
"""


@pytest.fixture(scope="session")
def sft_config_class():
    from trl import SFTConfig

    return SFTConfig


@pytest.fixture
def load(tmp_path, sft_config_class):
    """load(yaml_text, *overrides) -> SFTRunConfig, exactly as `align sft` loads it."""

    def _load(text: str, *overrides: str, name: str = "run.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return load_config(path, list(overrides), SFTRunConfig, extra_sections={"training": sft_config_class})

    return _load


@pytest.fixture
def error(load, tmp_path):
    """error(yaml_text, *overrides) -> the AlignError message, checked to be one line."""

    def _error(text: str, *overrides: str) -> str:
        with pytest.raises(AlignError) as info:
            load(text, *overrides)
        message = str(info.value)
        assert "\n" not in message, f"error messages are one line: {message!r}"
        return message

    return _error


def at(tmp_path, line: int) -> str:
    return f"{tmp_path / 'run.yaml'}:{line}: "


# --- A valid config --------------------------------------------------------------------------------

def test_valid_config_has_defaults_and_typed_values(load):
    cfg = load(BASE + textwrap.dedent("""\
        lora:
          r: 8
          target_modules: [q_proj, v_proj]
        training:
          learning_rate: 2e-4
          num_train_epochs: 2
          report_to: none
        template:
          name: alpaca
    """))
    assert cfg.model.path == "/models/tiny"
    assert cfg.model.dtype == "auto"
    assert cfg.data.path == "data.jsonl" and cfg.data.format == "auto" and cfg.data.columns == {}
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.r == 8 and cfg.lora.alpha == 32
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.training == {"learning_rate": 2e-4, "num_train_epochs": 2, "report_to": "none"}
    assert cfg.template.name == "alpaca"
    assert cfg.output.overwrite is False and cfg.seed == 42
    assert to_dict(cfg)["lora"]["r"] == 8


def test_empty_sections_mean_defaults(load):
    cfg = load(BASE + "lora:\ntraining:\noutput:\n")
    assert cfg.lora == LoraConfig() and cfg.training == {} and cfg.output.dir is None


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("2E-5", 2e-5), ("5e+3", 5e3), ("1.5e-4", 1.5e-4),
                                         ("-3e-2", -3e-2), (".5e-1", 0.05), ("0.0002", 2e-4)])
def test_scientific_notation_is_a_number(load, text, value):
    # adam_epsilon / adam_beta2: float fields without align ranges, so negative numbers load too
    cfg = load(BASE + f"training:\n  adam_epsilon: {text}\n", f"training.adam_beta2={text}")
    assert isinstance(cfg.training["adam_epsilon"], float)
    assert cfg.training["adam_epsilon"] == pytest.approx(value)
    assert cfg.training["adam_beta2"] == pytest.approx(value)  # overrides parse the same way


def test_scientific_notation_in_align_sections(load):
    assert load(BASE + "lora:\n  dropout: 5e-2\n").lora.dropout == pytest.approx(0.05)


def test_scientific_notation_does_not_change_pyyaml_globally():
    assert yaml.safe_load("x: 1e-4") == {"x": "1e-4"}  # only align's loader reads it as a number


def test_quoted_numbers_stay_strings(error, tmp_path):
    message = error(BASE + 'training:\n  learning_rate: "1e-4"\n')
    assert message.startswith(at(tmp_path, 6) + "training.learning_rate: expected a number")
    assert "the string '1e-4'" in message


# --- Unknown keys: file:line and the nearest valid key ---------------------------------------------

@pytest.mark.parametrize("extra, line, key, suggestion", [
    ("lora:\n  rank: 8\n", 6, "lora.rank", "lora.r"),
    ("lora:\n  lora_alpha: 16\n", 6, "lora.lora_alpha", "lora.alpha"),
    ("lora:\n  dropuot: 0.1\n", 6, "lora.dropuot", "lora.dropout"),
    ("training:\n  learning_rat: 1e-4\n", 6, "training.learning_rat", "training.learning_rate"),
    ("training:\n  num_train_epoch: 1\n", 6, "training.num_train_epoch", "training.num_train_epochs"),
    # axolotl / LLaMA-Factory names
    ("training:\n  sequence_len: 512\n", 6, "training.sequence_len", "training.max_length"),
    ("training:\n  max_seq_length: 512\n", 6, "training.max_seq_length", "training.max_length"),
    ("training:\n  micro_batch_size: 2\n", 6, "training.micro_batch_size",
     "training.per_device_train_batch_size"),
    ("training:\n  sample_packing: true\n", 6, "training.sample_packing", "training.packing"),
    ("sequence_len: 512\n", 5, "sequence_len", "training.max_length"),
    ("base_model: org/model\n", 5, "base_model", "model.path"),
    ("lora_r: 8\n", 5, "lora_r", "lora.r"),
    ("learning_rate: 1e-4\n", 5, "learning_rate", "training.learning_rate"),
    ("val_set_size: 0.1\n", 5, "val_set_size", "data.val_set_size"),
    # a key that belongs to another section
    ("lora:\n  learning_rate: 1e-4\n", 6, "lora.learning_rate", "training.learning_rate"),
    ("training:\n  lora_r: 8\n", 6, "training.lora_r", "lora.r"),
    ("training:\n  val_set_size: 0.1\n", 6, "training.val_set_size", "data.val_set_size"),
    ("modle:\n  path: x\n", 5, "modle", "model"),
    ("training:\n  torch_dtype: bfloat16\n", 6, "training.torch_dtype", "model.dtype"),
    ("model:\n  path: x\n  dataset: d.jsonl\ndata:\n  path: d\n", 3, "model.dataset", "data.path"),
])
def test_unknown_key_names_file_line_and_nearest_key(error, tmp_path, extra, line, key, suggestion):
    message = error(extra if extra.startswith("model:") else BASE + extra)
    assert message.startswith(at(tmp_path, line) + f"{key}: unknown key")
    assert f"(did you mean '{suggestion}'?)" in message


def test_unknown_nested_key_points_at_its_own_line(error, tmp_path):
    message = error("model:\n  path: x\n  revison: main\ndata:\n  path: d.jsonl\n")
    assert message.startswith(at(tmp_path, 3) + "model.revison: unknown key (did you mean 'model.revision'?)")


def test_unknown_key_with_nothing_close_lists_the_section_keys(error, tmp_path):
    message = error(BASE + "lora:\n  zzzz: 1\n")
    assert message.startswith(at(tmp_path, 6) + "lora.zzzz: unknown key")
    assert "valid keys under lora: alpha, bias, dropout, enabled, modules_to_save, r, target_modules" in message


def test_unknown_training_key_names_trl_class(error, tmp_path):
    message = error(BASE + "training:\n  qqqq_zzzz: 1\n")
    assert message.startswith(at(tmp_path, 6) + "training.qqqq_zzzz: unknown key for SFTConfig")


@pytest.mark.parametrize("key, instead", [("output_dir", "output.dir"), ("resume_from_checkpoint", "--resume")])
def test_training_keys_align_manages_are_refused(error, tmp_path, key, instead):
    message = error(BASE + f"training:\n  {key}: somewhere\n")
    assert message.startswith(at(tmp_path, 6) + f"training.{key}: set by align")
    assert instead in message


def test_duplicate_key_is_an_error_not_silently_last_wins(error, tmp_path):
    message = error(BASE + "lora:\n  r: 4\nlora:\n  r: 8\n")
    assert message.startswith(at(tmp_path, 7) + "lora: given twice (first at line 5)")
    message = error(BASE + "lora:\n  r: 4\n  r: 8\n")
    assert message.startswith(at(tmp_path, 7) + "lora.r: given twice (first at line 6)")


# --- Wrong types: the key and the expected type ----------------------------------------------------

@pytest.mark.parametrize("extra, line, expected", [
    ("training:\n  num_train_epochs: two\n", 6,
     "training.num_train_epochs: expected a number, got the string 'two'"),
    ("training:\n  per_device_train_batch_size: 8.0\n", 6,
     "training.per_device_train_batch_size: expected an integer, got the number 8.0"),
    ("training:\n  packing: 1\n", 6, "training.packing: expected true/false, got the integer 1"),
    ("lora:\n  r: 8.5\n", 6, "lora.r: expected an integer, got the number 8.5"),
    ('lora:\n  enabled: "yes"\n', 6, "lora.enabled: expected true/false, got the string 'yes'"),
    ("lora:\n  target_modules: [q_proj, 3]\n", 6,
     "lora.target_modules: expected a list of strings or a string, got a list"),
    ("model:\n  path: x\n  dtype: bf16\ndata:\n  path: d\n", 3,
     "model.dtype: expected one of 'auto', 'bfloat16', 'float16', 'float32', got the string 'bf16'"),
    ("template:\n  name: chatml\n", 6, "template.name: expected one of 'chat', 'alpaca'"),
    ("data:\n  path: d\n  columns: {prompt: 3}\nmodel:\n  path: x\n", 3,
     "data.columns: expected a mapping of strings to strings, got a mapping"),
    ("data:\n  path: d\n  columns: [prompt]\nmodel:\n  path: x\n", 3, "data.columns: expected a mapping"),
    ("lora: 8\n", 5, "lora: expected a mapping of keys, got the integer 8"),
    ("training: [1, 2]\n", 5, "training: expected a mapping of SFTConfig fields, got a list"),
    ("seed: forty-two\n", 5, "seed: expected an integer, got the string 'forty-two'"),
])
def test_wrong_type_names_key_and_expected_type(error, tmp_path, extra, line, expected):
    text = extra if extra.startswith(("model:", "data:")) else BASE + extra
    message = error(text)
    assert message.startswith(at(tmp_path, line) + expected), message


@pytest.mark.parametrize("extra, line, expected", [
    ("lora:\n  r: 0\n", 6, "lora.r: must be at least 1, got 0"),
    ("lora:\n  dropout: 1.5\n", 6, "lora.dropout: must be at most 1, got 1.5"),
    ("data:\n  path: d\n  val_set_size: -0.1\nmodel:\n  path: x\n", 3, "data.val_set_size: must be at least 0"),
    ("data:\n  path: d\n  max_examples: 0\nmodel:\n  path: x\n", 3, "data.max_examples: must be at least 1"),
])
def test_out_of_range_values(error, tmp_path, extra, line, expected):
    text = extra if extra.startswith(("model:", "data:")) else BASE + extra
    assert error(text).startswith(at(tmp_path, line) + expected)


def test_columns_targets_must_be_format_fields(error, tmp_path):
    message = error("model:\n  path: x\ndata:\n  path: d\n  columns: {completon: answer}\n")
    assert message.startswith(at(tmp_path, 5) + "data.columns.completon: not a field align reads")
    assert "did you mean 'completion'?" in message


def test_int_accepted_where_a_number_is_expected(load):
    cfg = load(BASE + "training:\n  learning_rate: 1\nlora:\n  dropout: 0\n")
    assert cfg.training["learning_rate"] == 1 and cfg.lora.dropout == 0


# --- Dotted overrides ------------------------------------------------------------------------------

def test_overrides_apply_with_types(load):
    cfg = load(BASE + "lora:\n  r: 16\n", "lora.r=8", "training.learning_rate=2e-4", "lora.enabled=false",
               "quantization.load_in_4bit=true", "lora.enabled=true", "lora.target_modules=[q_proj, v_proj]",
               "data.columns={prompt: q, completion: answers.0}")
    assert cfg.lora.r == 8
    assert cfg.training["learning_rate"] == 2e-4 and isinstance(cfg.training["learning_rate"], float)
    assert cfg.lora.enabled is True  # the last override wins
    assert cfg.quantization.load_in_4bit is True  # a section the file does not have
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.columns == {"prompt": "q", "completion": "answers.0"}


def test_override_into_empty_section(load):
    assert load(BASE + "lora:\n", "lora.r=4").lora.r == 4


def test_override_of_a_text_field_keeps_the_text(load):
    cfg = load(BASE, "output.name=123", "template.system=You are: terse", "output.dir=")
    assert cfg.output.name == "123"
    assert cfg.template.system == "You are: terse"
    assert cfg.output.dir is None


@pytest.mark.parametrize("override, expected", [
    ("lora.r=8.5", "override 'lora.r=8.5': lora.r: expected an integer, got the number 8.5"),
    ("lora.r=eight", "override 'lora.r=eight': lora.r: expected an integer, got the string 'eight'"),
    ("training.learning_rate=fast",
     "override 'training.learning_rate=fast': training.learning_rate: expected a number"),
    ("training.learning_rat=1e-4", "override 'training.learning_rat=1e-4': training.learning_rat: unknown key "
                                   "for SFTConfig (did you mean 'training.learning_rate'?)"),
    ("lora.rank=8", "override 'lora.rank=8': lora.rank: unknown key (did you mean 'lora.r'?)"),
    ("lora.r", "override 'lora.r': expected dotted.key=value"),
    ("=8", "override '=8': expected dotted.key=value"),
    ("model.path.x=1", "override 'model.path.x=1': 'model.path' is the string '/models/tiny', not a section"),
    ("lora=8", "override 'lora=8': lora: expected a mapping of keys, got the integer 8"),
])
def test_override_errors_name_the_override(error, override, expected):
    assert error(BASE, override).startswith(expected)


def test_override_supplies_a_missing_required_key(load):
    assert load("model:\n  dtype: auto\ndata:\n  path: d\n", "model.path=/m").model.path == "/m"


# --- Missing required keys and sections ------------------------------------------------------------

def test_missing_model_path(error, tmp_path):
    message = error("model:\n  dtype: auto\ndata:\n  path: d.jsonl\n")
    assert message.startswith(at(tmp_path, 1) + "missing required key 'model.path'")
    assert "model to start from" in message


def test_empty_model_section(error, tmp_path):
    assert error("model:\ndata:\n  path: d.jsonl\n").startswith(at(tmp_path, 1) + "missing required key "
                                                                 "'model.path'")


def test_null_model_path(error, tmp_path):
    assert error("model:\n  path:\ndata:\n  path: d.jsonl\n").startswith(at(tmp_path, 2) + "model.path: required, "
                                                                         "but empty")


def test_missing_data_section(error, tmp_path):
    message = error("model:\n  path: x\n")
    assert message == f"{tmp_path / 'run.yaml'}: missing section 'data:' (it needs at least data.path)"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(error, tmp_path, text):
    assert error(text) == f"{tmp_path / 'run.yaml'}: the config is empty; it needs at least model:, data: (see " \
                          f"configs/ for examples)"


def test_config_file_not_found(tmp_path, sft_config_class):
    with pytest.raises(AlignError, match=r"^config: .*nope\.yaml: file not found \(check the --config path"):
        load_config(tmp_path / "nope.yaml", [], SFTRunConfig, extra_sections={"training": sft_config_class})


def test_config_path_is_a_folder(tmp_path, sft_config_class):
    with pytest.raises(AlignError, match=r"is a folder, not a file \(check the --config path\)"):
        load_config(tmp_path, [], SFTRunConfig, extra_sections={"training": sft_config_class})


# --- Invalid YAML ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, line", [
    ("model:\n  path: x\ndata:\n  path: d.jsonl\n  seed: [1, 2\n", 6),  # unclosed flow list
    ("model:\n  path: x\n data:\n  path: d.jsonl\n", 3),  # bad indentation
    ("model:\n  path: x\ndata:\n  path: 'd.jsonl\n", 5),  # unclosed quote
    ("model:\n\tpath: x\n", 2),  # a tab
])
def test_invalid_yaml_gives_file_line(error, tmp_path, text, line):
    message = error(text)
    assert message.startswith(at(tmp_path, line) + "invalid YAML: ")


def test_config_must_be_a_mapping(error, tmp_path):
    assert error("- model\n- data\n").startswith(at(tmp_path, 1) + "the config must be a mapping of sections")


# --- Checks across keys, before anything loads -----------------------------------------------------

@pytest.mark.parametrize("extra, line, expected", [
    ("training:\n  load_best_model_at_end: true\n", 6,
     "training.load_best_model_at_end needs a validation set: set data.val_set_size or data.eval_path"),
    ("training:\n  eval_strategy: steps\n", 6, "training.eval_strategy: steps needs a validation set"),
    ("early_stopping_patience: 2\n", 5, "early_stopping_patience needs training.load_best_model_at_end: true"),
    ("template:\n  name: custom\n", 6, "template.name: custom needs template.prompt"),
    ("template:\n  prompt: 'Q: {question}'\n", 6, "template.prompt is only used with template.name: custom"),
    ("template:\n  name: custom\n  prompt: 'Q: {}'\n", 7, "template.prompt: placeholder {} must be a record field"),
    ("template:\n  name: custom\n  prompt: 'Q: {question'\n", 7, "template.prompt: not a valid format string"),
    ("quantization:\n  load_in_4bit: true\n  load_in_8bit: true\n", 7,
     "quantization: choose one of load_in_4bit and load_in_8bit"),
    ("quantization:\n  load_in_4bit: true\nlora:\n  enabled: false\n", 8,
     "lora.enabled: false, but a 4/8-bit model can only train adapters"),
    ("model:\n  path: x\n  train_only: [lm_head]\ndata:\n  path: d\n", 3,
     "model.train_only selects layers for full fine-tuning; set lora.enabled: false"),
])
def test_cross_key_checks(error, tmp_path, extra, line, expected):
    text = extra if extra.startswith("model:") else BASE + extra
    assert error(text).startswith(at(tmp_path, line) + expected)


def test_cross_key_checks_pass_when_satisfied(load):
    cfg = load(BASE.replace("data.jsonl", "data.jsonl\n  val_set_size: 0.1") + textwrap.dedent("""\
        training:
          load_best_model_at_end: true
          eval_strategy: steps
          save_strategy: steps
        early_stopping_patience: 2
        template:
          name: custom
          prompt: "Q: {question}\\nA: "
    """))
    assert cfg.early_stopping_patience == 2 and cfg.template.prompt == "Q: {question}\nA: "
    assert load(BASE + "training:\n  eval_strategy: 'no'\n").training == {"eval_strategy": "no"}
    cfg = load(BASE.replace("path: /models/tiny", "path: /models/tiny\n  train_only: [lm_head]")
               + "lora:\n  enabled: false\n")
    assert cfg.model.train_only == ["lm_head"]
    assert isinstance(cfg.data, DataConfig)


def test_yaml_words_for_booleans_stay_text_where_text_is_expected(load):
    """YAML 1.1 reads `no` as false; `eval_strategy: no` (as in transformers' docs) means the text."""
    cfg = load(BASE + "training:\n  eval_strategy: no\n  save_strategy: no\n  hub_strategy: every_save\n"
               "output:\n  name: 2024-01-01\n")
    assert cfg.training["eval_strategy"] == "no" and cfg.training["save_strategy"] == "no"
    assert cfg.output.name == "2024-01-01"


def test_text_is_not_taken_for_a_boolean_field(error, tmp_path):
    assert error(BASE + "lora:\n  enabled: maybe\n").startswith(at(tmp_path, 6) + "lora.enabled: expected true/false")
