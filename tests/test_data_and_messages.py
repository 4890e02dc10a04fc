"""Nothing is dropped without a word, and every message blames the right thing (issue 17, classes 6 and 7).

Unit tests of align/data.py's counting of dropped records (`Dropped`: counts by reason, first file:line) and of the
readers' messages (the config key that named a file, the line of a byte that is not UTF-8), then the real CLI in
subprocesses: one `error:` line on stderr, exit code 2, no traceback, nothing written. One short SFT run shows a
dropped record in the start table and the registry metrics.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from align.cli.pipeline_config import PipelineRunConfig
from align.config import DataConfig, TemplateConfig, load_config, read_text
from align.data import Dropped, Records, read_preferences, read_prompts, read_records, to_examples
from align.stages.sft_config import SFTRunConfig
from tests.test_data import align_error


def in_memory(*rows: dict) -> Records:
    return Records(list(rows), [f"d.jsonl:{i + 1}" for i in range(len(rows))], "d.jsonl")


def examples(*rows: dict, **data):
    return to_examples(in_memory(*rows), DataConfig(path="d.jsonl", **data), TemplateConfig(name="plain"))


# --------------------------------------------------------------------------------------------------
# Class 6: dropped records are counted by reason, with the first file:line


def test_dropped_counts_reasons_with_their_first_place():
    dropped = Dropped()
    dropped.add("null_completion", "a.jsonl:4")
    dropped.add("empty_completion", "a.jsonl:7")
    dropped.add("null_completion", "a.jsonl:9")
    assert dropped.total == 3
    assert dropped.summary() == "null completion: 2 (first at a.jsonl:4); empty completion: 1 (first at a.jsonl:7)"
    assert dropped.metrics() == {"dropped": 3, "dropped_null_completion": 2, "dropped_empty_completion": 1}
    assert Dropped().summary() == "none" and Dropped().metrics() == {"dropped": 0}


def test_dropped_from_two_files_adds_up_and_keeps_the_first_place():
    train, held = Dropped(), Dropped()
    train.add("ties", "train.jsonl:3")
    held.add("ties", "eval.jsonl:1")
    held.add("identical", "eval.jsonl:2")
    both = train + held
    assert both.counts == {"ties": 2, "identical": 1}
    assert both.first == {"ties": "train.jsonl:3", "identical": "eval.jsonl:2"}
    assert train.counts == {"ties": 1}  # the operands are unchanged


def test_null_and_empty_completions_are_counted_apart():
    prepared = examples({"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": None},
                        {"prompt": "c", "completion": "  "}, {"prompt": "d", "completion": None})
    assert [e["prompt"] for e in prepared.examples] == ["a"]
    assert prepared.dropped.counts == {"null_completion": 2, "empty_completion": 1}
    assert prepared.dropped.first == {"null_completion": "d.jsonl:2", "empty_completion": "d.jsonl:3"}


@pytest.mark.parametrize("rows, reason", [
    ([{"question": "q", "answer": "a"}, {"question": "q2", "answer": None}], "null_answer"),
    ([{"instruction": "i", "output": "o"}, {"instruction": "i2", "output": ""}], "empty_output"),
    ([{"text": "t"}, {"text": None}], "null_text"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
      {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]}],
     "null_message_content"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
      {"messages": [{"role": "user", "content": "q"}]}], "no_assistant_answer"),
])
def test_every_format_names_why_a_record_was_dropped(rows, reason):
    prepared = examples(*rows)
    assert len(prepared.examples) == 1
    assert prepared.dropped.counts == {reason: 1} and prepared.dropped.first == {reason: "d.jsonl:2"}


def test_null_alpaca_input_is_no_input_not_a_drop():
    prepared = examples({"instruction": "i", "input": None, "output": "o"})
    assert prepared.examples == [{"prompt": "i", "completion": "o"}] and prepared.dropped.total == 0


def test_nothing_left_is_an_error_that_lists_the_reasons():
    message = align_error(examples, {"prompt": "a", "completion": None}, {"prompt": "b", "completion": ""})
    assert message == ("data: d.jsonl: no usable examples left after filtering: all 2 records were dropped (null "
                       "completion: 1 (first at d.jsonl:1); empty completion: 1 (first at d.jsonl:2)); each needs a "
                       "non-empty completion (format prompt_completion); fill them in, or check data.format / "
                       "data.columns")


def test_a_null_prompt_is_an_error_with_file_line_and_field():
    message = align_error(examples, {"prompt": "a", "completion": "x"}, {"prompt": None, "completion": "y"})
    assert message == "data: d.jsonl:2: field 'prompt' must be text, got null"


def test_preference_drops_name_their_first_record():
    prefs = read_preferences(in_memory({"prompt": "p", "chosen": "a", "rejected": "b"},
                                       {"prompt": "p", "chosen": "a", "rejected": "b", "tie": True},
                                       {"prompt": "q", "chosen": "same", "rejected": "same"}))
    assert len(prefs.pairs) == 1
    assert prefs.dropped.summary() == "ties: 1 (first at d.jsonl:2); chosen == rejected: 1 (first at d.jsonl:3)"
    assert prefs.dropped.metrics() == {"dropped": 2, "dropped_ties": 1, "dropped_identical": 1}
    clean = read_preferences(in_memory({"prompt": "p", "chosen": "a", "rejected": "b"}))
    # Zero counts stay in the metrics, so every run's registry row has the same keys.
    assert clean.dropped.metrics() == {"dropped": 0, "dropped_ties": 0, "dropped_identical": 0}
    assert clean.dropped.summary() == "none"


def test_a_null_chosen_is_an_error_with_file_line_and_field():
    message = align_error(read_preferences, in_memory({"prompt": "p", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "p", "chosen": None, "rejected": "b"}))
    assert message.startswith("data: d.jsonl:2: field 'chosen' must be text or a list of {role, content} "
                              "messages, got null")


# --------------------------------------------------------------------------------------------------
# Class 7: the reader's messages name the key that named the file, and the line of a non-UTF-8 byte


def test_read_text_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert align_error(read_text, "nope.txt", "prompts.path") == (f"prompts.path: nope.txt: file not found (relative "
                                                               f"paths start in {tmp_path})")
    assert align_error(read_text, str(tmp_path / "nope.txt"), "perplexity") == \
        f"perplexity: {tmp_path / 'nope.txt'}: file not found"
    assert align_error(read_text, str(tmp_path), "label.prompts") == \
        f"label.prompts: {tmp_path} is a folder, not a file"


def test_non_utf8_is_reported_at_its_line_even_deep_in_a_big_file(tmp_path):
    # Far past the first read buffer (8 KiB): the line counts from the start of the file, not of a chunk.
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p" * 50, "completion": "c"}).encode() + b"\n"
    path.write_bytes(good * 999 + b'{"prompt": "caf\xe9", "completion": "c"}\n')
    message = align_error(read_records, str(path))
    assert message == (f"data: {path}:1000: not UTF-8 text (byte 0xe9: invalid continuation byte); re-save it as "
                       f"UTF-8")


@pytest.mark.parametrize("name, content", [("p.txt", b"fine\ncaf\xe9\n"), ("p.csv", b"prompt\nfine\ncaf\xe9\n"),
                                           ("p.json", b'[{"prompt": "fine"},\n {"prompt": "caf\xe9"}]')])
def test_non_utf8_prompt_files_name_key_and_line(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    message = align_error(read_prompts, str(path), option="prompts.path")
    assert message.startswith(f"prompts.path: {path}:{3 if name == 'p.csv' else 2}: not UTF-8 text (byte 0xe9")
    assert message.endswith("re-save it as UTF-8")


def test_missing_record_file_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert align_error(read_prompts, "nope.jsonl", option="prompts.path") == \
        f"prompts.path: nope.jsonl: file not found (relative paths start in {tmp_path})"
    assert align_error(read_records, "pkg:align_no_such_package/p.jsonl", key="ptx.path").startswith(
        "ptx.path: 'pkg:align_no_such_package/p.jsonl': package 'align_no_such_package' is not installed")


def test_record_errors_name_the_key_and_section_of_their_file(tmp_path):
    """ptx data in a PPO config (whose `data:` is the prompts): errors say ptx.path and point to ptx.columns."""
    path = tmp_path / "ptx.jsonl"
    path.write_text('{"prompt": "a", "completion": "x"}\n{"prompt": ["a", "b"], "completion": "y"}\n')
    records = read_records(str(path), key="ptx.path")
    assert align_error(to_examples, records, DataConfig(path=str(path)), TemplateConfig()) == (
        f"ptx.path: {path}:2: field 'prompt' must be text, got an array; to use one item, map it with ptx.columns, "
        f"e.g. {{prompt: <field>.0}}")
    path.write_text('{"query": "a"}\n')
    message = align_error(to_examples, read_records(str(path), key="ptx.path"), DataConfig(path=str(path)),
                       TemplateConfig())
    assert message.startswith(f"ptx.path: {path}:1: no recognizable format") and "data.columns" not in message
    assert "ptx.columns={prompt: query, completion: ...}" in message


def test_response_errors_name_the_option(tmp_path):
    from align.data import read_prompt_responses

    path = tmp_path / "ref.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": null}\n')
    assert align_error(read_prompt_responses, str(path), "normalization.reference") == (
        f"normalization.reference: {path}:2: field 'response' must be text or a list of {{role, content}} messages, "
        f"got null")


def test_preference_errors_name_the_eval_path(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    message = align_error(read_preferences, read_records(str(path), key="data.eval_path"))
    assert message.startswith(f"data.eval_path: {path}:2: field 'rejected' is missing")


@pytest.mark.parametrize("line, problem", [
    ('{"prompt": "a\tb", "completion": "x"}', "malformed JSON (Invalid control character at column 14)"),
    ('{"prompt": "a, "completion": "x"}', "malformed JSON (Expecting ',' delimiter at column 17)"),
    ('{"prompt": "ab', "malformed JSON (Unterminated string starting at column 12)"),
])
def test_json_problems_read_once(tmp_path, line, problem):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "x"}\n' + line)  # the last line: no newline to end a string
    message = align_error(read_records, str(path))
    assert message.startswith(f"data: {path}:2: {problem}") and "at at" not in message


def test_line_endings_and_line_separators_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a\xe2\x80\xa8b", "completion": "x"}\r\n\r\n{"prompt": "c", "completion": "y"}\r'
                     b'{"prompt": "e", "completion": "z"}\n')
    records = read_records(str(path))
    assert [r["prompt"] for r in records.rows] == ["a\u2028b", "c", "e"]
    assert records.locations == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_a_null_prompt_field_is_not_called_missing(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": null}\n{"answer": "x"}\n')
    assert align_error(read_prompts, str(path), option="label.prompts") == \
        f"label.prompts: {path}:2: field 'prompt' must be text, got null"
    path.write_text('{"prompt": "fine"}\n{"answer": "x"}\n')
    assert align_error(read_prompts, str(path)) == f"--prompts: {path}:2: no prompt field (prompt, question, " \
                                                f"instruction, input, text); the record has answer"


# --------------------------------------------------------------------------------------------------
# Class 7: config files


def load_sft(tmp_path, content: bytes | str):
    path = tmp_path / "run.yaml"
    path.write_bytes(content if isinstance(content, bytes) else textwrap.dedent(content).encode())
    return load_config(path, [], SFTRunConfig)


@pytest.mark.parametrize("content", ["", "\n\n", "# model:\n#   path: x\n"])
def test_an_empty_config_says_so(tmp_path, content):
    assert align_error(load_sft, tmp_path, content) == (f"{tmp_path / 'run.yaml'}: the config is empty; it needs at "
                                                     f"least model:, data: (see configs/ for examples)")


def test_a_config_that_is_a_list_says_what_it_needs(tmp_path):
    assert align_error(load_sft, tmp_path, "- model\n- data\n") == (
        f"{tmp_path / 'run.yaml'}:1: the config must be a mapping of sections (model:, data: ...), got a list (see "
        f"configs/ for examples)")


def test_a_non_utf8_config_names_its_line(tmp_path):
    assert align_error(load_sft, tmp_path, b"model:\n  path: x\ndata:\n  path: caf\xe9.jsonl\n") == (
        f"config: {tmp_path / 'run.yaml'}:4: not UTF-8 text (byte 0xe9: invalid continuation byte); re-save it as "
        f"UTF-8")


def test_invalid_yaml_names_where_the_unclosed_thing_started(tmp_path):
    message = align_error(load_sft, tmp_path, "model:\n  path: [x\ndata:\n  path: d.jsonl\n")
    assert message == (f"{tmp_path / 'run.yaml'}:3: invalid YAML: expected ',' or ']', but got ':' (while parsing a "
                       f"flow sequence from line 2); check indentation, colons and quotes")
    assert "at at" not in align_error(load_sft, tmp_path, "model:\n  path: 'x\n")


PIPELINE = """\
name: t
sft:
  config: {sft}
label:
  prompts: p.txt
reward:
  config: configs/nope.yaml
ppo:
  config: {sft}
dpo:
  config: {sft}
eval:
  config: {sft}
"""


def test_a_missing_step_config_is_blamed_on_the_pipeline_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.yaml").write_text("model:\n  path: x\ndata:\n  path: d.jsonl\n")
    (tmp_path / "pipe.yaml").write_text(PIPELINE.format(sft="sft.yaml"))
    assert align_error(load_config, "pipe.yaml", [], PipelineRunConfig) == (
        f"pipe.yaml:7: reward.config: configs/nope.yaml: file not found (relative paths start in {tmp_path})")
    assert align_error(load_config, "pipe.yaml", ["reward.config=."], PipelineRunConfig) == (
        "override 'reward.config=.': reward.config: . is a folder, not a file")
    assert load_config("pipe.yaml", ["reward.config=sft.yaml"], PipelineRunConfig).reward.config == "sft.yaml"


# --------------------------------------------------------------------------------------------------
# The real CLI: one line on stderr, exit code 2, no traceback, nothing written

SFT_CONFIG = "model:\n  path: {model}\ndata:\n  path: d.jsonl\ntraining:\n  max_steps: 1\n" \
             "  per_device_train_batch_size: 2\n"
EVAL_CONFIG = "models: [{model}]\nbaseline: {model}\nprompts:\n  path: nope.jsonl\n"
GOOD_ROW = '{"prompt": "a", "completion": "b"}\n'

# name: (arguments, files to write (text, or bytes as written), the whole stderr line expected; {cwd} is the folder)
CLI_CASES = {
    "no_command": ([], {}, "error: align: a command is required (see 'align --help')"),
    "eval_prompts_missing": (["eval", "compare", "--config", "eval.yaml"], {"eval.yaml": EVAL_CONFIG},
                             "error: prompts.path: nope.jsonl: file not found (relative paths start in {cwd})"),
    "eval_prompts_txt_not_utf8": (["eval", "compare", "--config", "eval.yaml", "prompts.path=p.txt"],
                                  {"eval.yaml": EVAL_CONFIG, "p.txt": b"first\nsecond caf\xe9\n"},
                                  "error: prompts.path: p.txt:2: not UTF-8 text (byte 0xe9: invalid continuation "
                                  "byte); re-save it as UTF-8"),
    "sft_data_not_utf8": (["sft", "--config", "run.yaml"],
                          {"run.yaml": SFT_CONFIG, "d.jsonl": GOOD_ROW.encode() + b'{"prompt": "caf\xe9"}\n'},
                          "error: data: d.jsonl:2: not UTF-8 text (byte 0xe9: invalid continuation byte); re-save "
                          "it as UTF-8"),
    "sft_eval_path_missing": (["sft", "--config", "run.yaml", "data.eval_path=held.jsonl"],
                              {"run.yaml": SFT_CONFIG, "d.jsonl": GOOD_ROW},
                              "error: data.eval_path: held.jsonl: file not found (relative paths start in {cwd})"),
    "sft_config_empty": (["sft", "--config", "run.yaml"], {"run.yaml": "# nothing yet\n"},
                         "error: run.yaml: the config is empty; it needs at least model:, data: (see configs/ for "
                         "examples)"),
    "sft_config_not_utf8": (["sft", "--config", "run.yaml"], {"run.yaml": b"model:\n  path: caf\xe9\n"},
                            "error: config: run.yaml:2: not UTF-8 text (byte 0xe9: invalid continuation byte); "
                            "re-save it as UTF-8"),
    "sft_control_character": (["sft", "--config", "run.yaml"],
                              {"run.yaml": SFT_CONFIG, "d.jsonl": GOOD_ROW + '{"prompt": "a\tb", "completion": "c"}\n'},
                              "error: data: d.jsonl:2: malformed JSON (Invalid control character at column 14); each "
                              "line must be one complete JSON object"),
    "pipeline_step_config_missing": (["pipeline", "--config", "pipe.yaml"],
                                     {"pipe.yaml": PIPELINE.format(sft="run.yaml"), "run.yaml": SFT_CONFIG},
                                     "error: pipe.yaml:7: reward.config: configs/nope.yaml: file not found (relative "
                                     "paths start in {cwd})"),
}


def _run_cli(args: list[str], files: dict, cwd: Path, model: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True)
    for name, content in files.items():
        path = cwd / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{model}", model))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "ALIGN_"))}
    env.update(ALIGN_HOME=str(cwd / ".align"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "align", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_llama) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case, run concurrently (each process costs mostly its imports)."""
    root = tmp_path_factory.mktemp("messages")
    with ThreadPoolExecutor(min(4, (os.cpu_count() or 1) + 1)) as pool:
        futures = {name: pool.submit(_run_cli, args, files, root / name, tiny_llama)
                   for name, (args, files, _) in CLI_CASES.items()}
        return {name: (root / name, future.result()) for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_cli_bad_input_is_one_line_and_leaves_nothing(cli, name):
    cwd, proc = cli[name]
    described = f"exit {proc.returncode}\n--- stderr:\n{proc.stderr}\n--- stdout:\n{proc.stdout[-2000:]}"
    assert proc.returncode == 2, described
    assert [line for line in proc.stderr.splitlines() if line.strip()] == \
        [CLI_CASES[name][2].replace("{cwd}", str(cwd))], described
    if name == "no_command":
        assert proc.stdout == "", described  # no help text: the error line says where help is
    # No run folder (runs/<stage>/<name>) and no file under runs/, no registry row.
    runs = cwd / "runs"
    assert not list(runs.glob("*/*")) and not [p for p in runs.rglob("*") if p.is_file()], list(runs.rglob("*"))
    db = cwd / ".align" / "registry.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 0


def test_sft_shows_dropped_records_in_the_start_table_and_metrics(tmp_path, monkeypatch, capsys, tiny_llama):
    """The null completion that used to vanish: counted with its file:line on screen and in the registry."""
    from align.cli.main import main
    from align.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    rows = [{"prompt": "a b", "completion": "b a"}, {"prompt": "c d", "completion": None},
            {"prompt": "e f", "completion": "f e"}, {"prompt": "a c", "completion": ""}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(SFT_CONFIG.replace("{model}", tiny_llama))
    assert main(["sft", "--config", "run.yaml", "lora.r=2"]) == 0
    shown = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the table may wrap a long row
    assert "null completion: 1 (first at d.jsonl:2); empty completion: 1 (first at d.jsonl:4)" in shown, shown
    [artifact] = Registry().list(stage="sft")
    assert artifact.metrics["dropped"] == 2 and artifact.metrics["train_examples"] == 2
    assert artifact.metrics["dropped_null_completion"] == 1 and artifact.metrics["dropped_empty_completion"] == 1
