"""Configs are validated in full before anything heavy, and a mistake in them is reported in seconds.

`training:` values are checked for range as well as type (align's own ranges where TRL takes nonsense: a negative
learning rate, a batch size of 0, an unknown tracker, DPO beta 0), and TRL's own config object is built from them
before a model loads, its complaints reported at the file:line of the key. `align pipeline` checks every step's
config before the first step runs. `eval compare` refuses an empty `models:` list. align's own checks run before
torch, transformers' trainer stack and TRL are imported: TRL's `training:` fields are read from its source.

Bad input goes through the real CLI (`python -m align ...` in a subprocess, all cases at once in a module fixture):
ONE `error:` line with file:line and key, exit code 2, nothing under runs/ and no registry row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SFT = """\
model:
  path: /no/such/model  # never loaded: every case fails before
data:
  path: data.jsonl
  val_set_size: 0.5
training:
  max_steps: 1
"""
DPO = SFT.replace("data.jsonl", "pairs.jsonl")
PPO = """\
model:
  path: sft:1
reward:
  path: reward:1
data:
  path: prompts.txt
ppo:
  steps: 1
"""
EVAL = """\
models: []
baseline: sft:1
prompts:
  path: prompts.txt
"""
PIPELINE = f"""\
name: t
sft:
  config: {ROOT}/configs/sft-smollm2-lora.yaml
label:
  prompts: prompts.txt
  gold: shorter
reward:
  config: {ROOT}/configs/reward.yaml
ppo:
  config: {ROOT}/configs/ppo.yaml
dpo:
  config: {ROOT}/configs/dpo.yaml
eval:
  config: eval.yaml
"""
EVAL_WITH_TYPO = "models: [ppo:1]\nbaseline: sft:1\nprompts:\n  path: prompts.txt\n  max_example: 5\n"


@dataclass
class Case:
    """One CLI invocation: the files written into its folder, its arguments, what its error line must contain."""

    args: list[str]
    expect: list[str]
    files: dict[str, str]


def _sft(extra: str) -> dict[str, str]:
    return {"run.yaml": SFT + textwrap.indent(textwrap.dedent(extra), "  ")}


CASES = {
    "negative_learning_rate": Case(
        ["sft", "--config", "run.yaml"], ["error: run.yaml:8: training.learning_rate: must be greater than 0, got "
                                          "-0.0001"], _sft("learning_rate: -1e-4\n")),
    "nan_learning_rate": Case(  # NaN passes every comparison: checked for itself
        ["sft", "--config", "run.yaml"],
        ["error: run.yaml:8: training.learning_rate: must be a finite number, got nan"],
        _sft("learning_rate: .nan\n")),
    "batch_size_0": Case(
        ["sft", "--config", "run.yaml"], ["error: run.yaml:8: training.per_device_train_batch_size: must be at least "
                                          "1, got 0"], _sft("per_device_train_batch_size: 0\n")),
    "gradient_accumulation_0_as_override": Case(
        ["reward", "--config", "run.yaml", "training.gradient_accumulation_steps=0"],
        ["error: override 'training.gradient_accumulation_steps=0': training.gradient_accumulation_steps: must be "
         "at least 1, got 0"], _sft("")),
    "unknown_report_to": Case(
        ["sft", "--config", "run.yaml"], ["error: run.yaml:8: training.report_to: 'wandbb' is not a tracker "
                                          "transformers supports (did you mean 'wandb'?)", "tensorboard"],
        _sft("report_to: [tensorboard, wandbb]\n")),
    "zero_epochs_and_no_max_steps": Case(
        ["sft", "--config", "run.yaml", "training.max_steps=-1"],
        ["error: run.yaml:8: training.num_train_epochs: 0 and no training.max_steps: nothing would train"],
        _sft("num_train_epochs: 0\n")),
    "dpo_beta_0": Case(
        ["dpo", "--config", "run.yaml"], ["error: run.yaml:8: training.beta: must be greater than 0, got 0"],
        {"run.yaml": DPO + "  beta: 0\n"}),
    # TRL's own checks, made on the SFTConfig built from the section before the model loads, at the key's line.
    "trl_strategy_mismatch": Case(
        ["sft", "--config", "run.yaml"],
        ["error: run.yaml:10: training.load_best_model_at_end: --load_best_model_at_end requires the save and eval "
         "strategy to match"],
        _sft("eval_strategy: steps\nsave_strategy: epoch\nload_best_model_at_end: true\n")),
    "trl_unknown_scheduler": Case(
        ["dpo", "--config", "run.yaml"],
        ["error: run.yaml:8: training.lr_scheduler_type: foo is not a valid SchedulerType"],
        {"run.yaml": DPO + "  lr_scheduler_type: foo\n"}),
    "grpo_minibatch_with_file_line": Case(
        ["ppo", "--config", "run.yaml", "--algorithm", "grpo"],
        ["error: run.yaml:9: ppo.mini_batch_size: 5 does not divide the 64 responses"],
        {"run.yaml": PPO + "  mini_batch_size: 5\n"}),
    "ppo_cliprange_0": Case(
        ["ppo", "--config", "run.yaml"], ["error: run.yaml:9: ppo.cliprange: must be greater than 0, got 0"],
        {"run.yaml": PPO + "  cliprange: 0\n"}),
    "eval_empty_models": Case(
        ["eval", "compare", "--config", "run.yaml"],
        ["error: run.yaml:1: models: no model to compare with the baseline", "after `align eval compare`"],
        {"run.yaml": EVAL}),
    # Models on the command line replace the empty list: the config passes, the reference is what fails.
    "eval_models_from_the_command_line": Case(
        ["eval", "compare", "ppo:9", "--config", "run.yaml"], ["registry: no artifact 'sft:1'"],
        {"run.yaml": EVAL}),
    # A typo in the LAST step's config fails before the first step runs, at its file:line.
    "pipeline_typo_in_eval_config": Case(
        ["pipeline", "--config", "pipeline.yaml"],
        ["error: pipeline step 'eval': eval.yaml:5: prompts.max_example: unknown key (did you mean "
         "'prompts.max_examples'?)", "nothing has run yet"],
        {"pipeline.yaml": PIPELINE, "eval.yaml": EVAL_WITH_TYPO}),
    # ... and so does what only TRL's config object finds, in a later step (dpo).
    "pipeline_trl_error_in_dpo_step": Case(
        ["pipeline", "--config", "pipeline.yaml", "dpo.overrides=[training.lr_scheduler_type=foo]"],
        ["error: pipeline step 'dpo': override 'training.lr_scheduler_type=foo': training.lr_scheduler_type: foo is "
         "not a valid SchedulerType", "nothing has run yet"],
        {"pipeline.yaml": PIPELINE, "eval.yaml": EVAL_WITH_TYPO.replace("max_example:", "max_examples:")}),
    "pipeline_eval_without_ppo_and_dpo": Case(
        ["pipeline", "--config", "pipeline.yaml", "ppo.enabled=false", "dpo.enabled=false"],
        ["error: pipeline.yaml: eval compares the ppo and dpo models with sft, and both are disabled"],
        {"pipeline.yaml": PIPELINE, "eval.yaml": EVAL_WITH_TYPO}),
}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "ALIGN_"))}
    env.update(ALIGN_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


# Data the configs name, so that every case fails on what it is about, whatever else is checked at load.
DATA = {"data.jsonl": '{"prompt": "a", "completion": "b"}\n', "pairs.jsonl": '{"prompt": "a", "chosen": "b", '
        '"rejected": "c"}\n', "prompts.txt": "a prompt\n"}


def _run(case: Case, cwd: Path) -> Result:
    cwd.mkdir(parents=True)
    for name, text in {**DATA, **case.files}.items():
        (cwd / name).write_text(text)
    proc = subprocess.run([sys.executable, "-m", "align", *case.args], cwd=cwd, env=_env(cwd / ".align"),
                          capture_output=True, text=True, timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr, cwd)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("training_validation")
    with ThreadPoolExecutor(min(4, (os.cpu_count() or 1) + 1)) as pool:
        futures = {name: pool.submit(_run, case, root / name) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(results, name):
    result = results[name]
    described = f"exit {result.returncode}\n--- stderr:\n{result.stderr}\n--- stdout:\n{result.stdout[-2000:]}"
    assert result.returncode == 2, described
    assert len(result.lines) == 1 and result.lines[0].startswith("error: "), described
    for expected in CASES[name].expect:
        assert expected in result.lines[0], f"{expected!r} not in {result.lines[0]!r}"
    assert not (result.cwd / "runs").exists(), "nothing written under runs/"
    db = result.cwd / ".align" / "registry.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 0


def test_pipeline_checks_every_step_before_running_one(results):
    result = results["pipeline_typo_in_eval_config"]
    assert "pipeline t: sft" not in result.stdout and "align sft --config" not in result.stdout


def test_eval_models_from_the_command_line_replace_an_empty_list(results):
    assert "models:" not in results["eval_models_from_the_command_line"].lines[0]


# --------------------------------------------------------------------------------------------------
# A config mistake is reported without importing torch or TRL: in a second, not after the imports.

LIGHT = [  # (args, text of the error): the repository's configs, with a one-key typo
    (["sft", "--config", "configs/sft-smollm2-lora.yaml", "lora.rank=8"], "lora.rank: unknown key"),
    (["sft", "--config", "configs/sft-smollm2-lora.yaml", "training.lr=1e-4"],
     "training.lr: unknown key for SFTConfig (did you mean 'training.learning_rate'?)"),
    (["sft", "--config", "configs/sft-smollm2-lora.yaml", "training.max_length=long"],
     "training.max_length: expected an integer or null, got the string 'long'"),
    (["reward", "--config", "configs/reward.yaml", "training.learning_rate=-1"], "must be greater than 0"),
    (["dpo", "--config", "configs/dpo.yaml", "training.loss_type=sigmod"], "training.loss_type: expected one of"),
    (["dpo", "--config", "configs/dpo.yaml", "training.report_to=foo"], "'foo' is not a tracker"),
    (["ppo", "--config", "configs/ppo.yaml", "ppo.kl_coeff=0.1"], "ppo.kl_coeff: unknown key"),
    (["eval", "compare", "--config", "configs/eval.yaml", "prompts.max_example=5"], "prompts.max_example: unknown"),
    (["pipeline", "--config", "configs/pipeline-demo.yaml", "label.gold=shorter",
      "eval.overrides=[prompts.max_example=5]"], "pipeline step 'eval'"),
]


def test_config_mistakes_are_reported_before_torch_and_trl_import(tmp_path):
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from align.cli.main import main
        outcomes = []
        for args, _ in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = main(args)
            outcomes.append([code, err.getvalue()])
        heavy = sorted(m for m in ("torch", "trl", "peft", "transformers.training_args") if m in sys.modules)
        print(json.dumps({"outcomes": outcomes, "heavy": heavy}))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(LIGHT)], cwd=ROOT, env=_env(tmp_path / ".align"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (args, expected), (code, err) in zip(LIGHT, report["outcomes"]):
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (args, err)
    assert report["heavy"] == [], "a config mistake must not wait for these imports"


# --------------------------------------------------------------------------------------------------
# The fields read from TRL's source are TRL's fields, with the same types where a type is read.

@pytest.mark.parametrize("name", ["SFTConfig", "RewardConfig", "DPOConfig", "GRPOConfig", "RLOOConfig"])
def test_fields_read_from_source_match_trl(name):
    import trl

    from align.config import trl_config_fields

    light, real = trl_config_fields(name), getattr(trl, name)
    assert light is not real, "read from source, not imported"
    assert [f.name for f in dataclasses.fields(light)] == [f.name for f in dataclasses.fields(real)]
    light_hints, real_hints = typing.get_type_hints(light), typing.get_type_hints(real)
    typed = {key: hint for key, hint in light_hints.items() if hint is not typing.Any}
    assert len(typed) > 0.9 * len(light_hints), "most fields are plain types"
    assert typed == {key: real_hints[key] for key in typed}


# --------------------------------------------------------------------------------------------------
# The latency benchmark, as a smoke run (no timing asserts): every command ends as it should.

def test_cli_latency_benchmark_quick(tmp_path):
    out = tmp_path / "cli_latency.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cli_latency.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=_env(tmp_path / ".align"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == {}
    assert {"python -c pass", "import torch", "align --help", "align registry list", "typo: sft", "typo: reward",
            "typo: ppo", "typo: dpo", "typo: eval compare", "typo: pipeline"} == set(report["results"])
    assert all(r["median_s"] > 0 for r in report["results"].values())


def test_eval_strategy_no_reads_as_text_without_a_validation_set(tmp_path, monkeypatch):
    """YAML 1.1 reads `no` as false: `eval_strategy: no` (HF's spelling) must still mean "no", not a strategy that
    needs a validation set."""
    from align.stages import sft

    (tmp_path / "run.yaml").write_text(SFT.replace("  val_set_size: 0.5\n", "") + "  eval_strategy: no\n")
    (tmp_path / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    monkeypatch.chdir(tmp_path)
    assert sft.load("run.yaml", []).training["eval_strategy"] == "no"
