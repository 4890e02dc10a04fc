"""Damaged model files, the wrong kind of model, and bad sampling options end in one line (issue 17).

- A damaged file in a model folder (a truncated model.safetensors / pytorch_model.bin / adapter_model.safetensors, a
  config.json or tokenizer.json that does not parse) is named, with what to do, by every loader (align/modeling.py
  `model_files`).
- Every command that needs a causal LM, or a language model, refuses a reward model (and ppo an encoder-decoder)
  before weights load (`require_model_kind`).
- SamplingConfig checks its values (`align generate` / `align label push` options, configs that build one).

The CLI cases run `python -m align ...` in subprocesses, concurrently, in one module-scoped fixture; each fails before
any training, so each costs little more than importing torch/transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.errors import AlignError

# --------------------------------------------------------------------------------------------------
# Model folders: a classifier (reward model), damaged copies of the tiny Llama, a LoRA adapter


def _truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama) -> dict[str, str]:
    """Folders by name: `classifier` (a one-label LlamaForSequenceClassification, as `align reward` saves full
    weights), `truncated` (model.safetensors cut in half), `adapter` (a CAUSAL_LM LoRA adapter on the tiny Llama, with
    its tokenizer) and `truncated_adapter` (its adapter_model.safetensors cut in half)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_llama, num_labels=1))
    classifier.config.pad_token_id = tokenizer.pad_token_id
    classifier.save_pretrained(root / "classifier")
    tokenizer.save_pretrained(root / "classifier")

    shutil.copytree(tiny_llama, root / "truncated")
    _truncate(root / "truncated" / "model.safetensors")

    lora = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    shutil.copytree(root / "adapter", root / "truncated_adapter")
    _truncate(root / "truncated_adapter" / "adapter_model.safetensors")
    return {name: str(root / name) for name in ("classifier", "truncated", "adapter", "truncated_adapter")}


def _damaged_copy(tiny_llama: str, folder: Path, damage) -> str:
    shutil.copytree(tiny_llama, folder)
    damage(folder)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# CLI: python -m align ... in a subprocess

CONFIGS = {
    "sft.yaml": "model:\n  path: {model}\ndata:\n  path: data.jsonl\ntraining:\n  max_steps: 1\n"
                "  per_device_train_batch_size: 2\n",
    "ppo.yaml": "model:\n  path: {model}\nreward:\n  path: {model}\ndata:\n  path: prompts.txt\nrollout:\n"
                "  max_new_tokens: 4\nppo:\n  steps: 1\n  batch_size: 2\n  mini_batch_size: 2\n",
}
DATA = "".join(json.dumps({"prompt": f"reverse: {x}", "completion": x[::-1]}) + "\n"
               for x in ("a b c", "d e f", "a c e", "b d f"))


@dataclass
class Case:
    args: list[str]  # after `python -m align`; {model} is the model folder
    model: str  # a key of `models`, or "tiny_llama"
    expect: list[str]  # what the error line must contain ({model}: the model folder)
    stage: str | None = None  # the stage whose output must not exist (runs/<stage>/<config name>)


CASES = {
    "generate_truncated_safetensors": Case(
        ["generate", "--model", "{model}", "--prompt", "hi"], "truncated",
        ["error: model: {model}/model.safetensors is damaged (safetensors: incomplete metadata",
         "re-run the stage that wrote it", "restore it from a checkpoint"]),
    "sft_truncated_safetensors": Case(
        ["sft", "--config", "sft.yaml"], "truncated",
        ["error: model: {model}/model.safetensors is damaged", "re-run the stage that wrote it"], stage="sft"),
    "ppo_reward_model_as_policy": Case(
        ["ppo", "--config", "ppo.yaml"], "classifier",
        ["error: model.path: {model} is a sequence classifier (a reward model); align ppo needs a causal LM",
         "sft:latest"], stage="ppo"),
    "generate_reward_model": Case(
        ["generate", "--model", "{model}", "--prompt", "hi"], "classifier",
        ["error: --model: {model} is a sequence classifier (a reward model); generating text needs a language model",
         "align score"]),
    "generate_negative_temperature": Case(
        ["generate", "--model", "{model}", "--prompt", "hi", "--temperature", "-1"], "tiny_llama",
        ["error: align generate: argument --temperature: must be a number >= 0 (0: greedy decoding), got -1"]),
    "generate_batch_size_zero": Case(
        ["generate", "--model", "{model}", "--prompt", "hi", "--batch-size", "0"], "tiny_llama",
        ["error: align generate: argument --batch-size: must be a whole number >= 1, got 0"]),
}


@dataclass
class Result:
    case: Case
    cwd: Path
    home: Path
    model: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _run(case: Case, cwd: Path, model: str) -> Result:
    cwd.mkdir(parents=True)
    for name, text in CONFIGS.items():
        (cwd / name).write_text(text.replace("{model}", model))
    (cwd / "data.jsonl").write_text(DATA)
    (cwd / "prompts.txt").write_text("hi\nyo\nabc\n")
    home = cwd / ".align"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "ALIGN_"))}
    env.update(ALIGN_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    args = [a.replace("{model}", model) for a in case.args]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "align", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)
    return Result(case, cwd, home, model, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def results(tmp_path_factory, models, tiny_llama) -> dict[str, Result]:
    root = tmp_path_factory.mktemp("bad_models_cli")
    folders = {**models, "tiny_llama": tiny_llama}
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(_run, case, root / name, folders[case.model]) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


def _registry_rows(home: Path) -> int:
    if not (home / "registry.db").exists():
        return 0
    with sqlite3.connect(home / "registry.db") as conn:
        return conn.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_bad_model_or_option_is_one_line(results, name):
    result = results[name]
    described = f"exit {result.returncode} after {result.seconds:.1f}s\n--- stderr:\n{result.stderr}\n--- stdout:\n" \
                f"{result.stdout[-2000:]}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, described
    assert len(lines) == 1 and "Traceback" not in result.stderr, described
    for expected in result.case.expect:
        assert expected.replace("{model}", result.model) in lines[0], (expected, lines[0])
    # Nothing half-written: no output folder for the run, no registry row.
    if result.case.stage:
        out = result.cwd / "runs" / result.case.stage
        assert not (out / result.case.stage).exists() and not (out / f"{result.case.stage}.incomplete").exists()
    assert _registry_rows(result.home) == 0


def test_the_reward_model_case_fails_before_training(results):
    """The policy's kind is read from config.json: ppo refuses it before loading any weights or printing its plan."""
    result = results["ppo_reward_model_as_policy"]
    assert "align ppo:" not in result.stdout, result.stdout


# --------------------------------------------------------------------------------------------------
# Sampling options: one rule in SamplingConfig; the CLI parses options with it

BAD_SAMPLING = {
    "max_new_tokens": [0, -3, 1.5, True],
    "temperature": [-1, -0.1, math.nan, math.inf],
    "top_p": [0, -0.5, 1.01, 3, math.nan],
    "top_k": [-1, 2.0],
    "repetition_penalty": [0, -1, math.inf],
    "seed": [-1, 2**32, 1.0],
    "batch_size": [0, -1],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in BAD_SAMPLING.items() for v in values])
def test_sampling_config_refuses_a_bad_value_naming_it(field, value):
    from align.generation import SamplingConfig

    with pytest.raises(AlignError, match=rf"^{field}: must be .*, got ") as error:
        SamplingConfig(**{field: value})
    assert "\n" not in str(error.value)


def test_sampling_config_accepts_the_edges():
    from align.generation import MAX_SEED, SamplingConfig

    edges = SamplingConfig(max_new_tokens=1, temperature=0, top_p=1.0, top_k=0, repetition_penalty=0.5, seed=MAX_SEED,
                           batch_size=1)
    assert edges.temperature == 0 and edges.seed == MAX_SEED
    assert SamplingConfig(temperature=2, top_p=1).top_p == 1


def test_resampling_seeds_stay_in_range(monkeypatch):
    """sample_k draws repeats again with a shifted seed: from the largest seed it wraps instead of failing the check."""
    from align import generation
    from align.generation import MAX_SEED, SamplingConfig, sample_k

    seeds = []

    def repeating(model, tokenizer, prompts, sampling, template=None, progress=None):
        seeds.append(sampling.seed)
        return ["same"] * len(prompts)

    monkeypatch.setattr(generation, "generate", repeating)
    sample_k(None, None, ["p"], 2, SamplingConfig(seed=MAX_SEED), retries=1)
    assert seeds == [MAX_SEED, (MAX_SEED + 1_000_003) % (MAX_SEED + 1)]


GENERATE = ["generate", "--model", "m", "--prompt", "p"]
PUSH = ["label", "push", "--model", "m", "--prompts", "p.txt", "--dataset", "d"]


@pytest.mark.parametrize("argv,expected", [
    (GENERATE + ["--top-p", "3"], "argument --top-p: must be a number above 0 and at most 1"),
    (GENERATE + ["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number >= 1, got 0"),
    (GENERATE + ["--top-k", "-1"], "argument --top-k: must be a whole number >= 0 (0: off), got -1"),
    (GENERATE + ["--repetition-penalty", "0"], "argument --repetition-penalty: must be a number above 0"),
    (GENERATE + ["--seed", "-1"], "argument --seed: must be a whole number from 0 to 4294967295, got -1"),
    (GENERATE + ["--max-new-tokens", "1.5"], "argument --max-new-tokens: expected a whole number, got '1.5'"),
    (PUSH + ["--top-p", "1.5"], "argument --top-p: must be a number above 0 and at most 1"),
    (PUSH + ["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got 0"),
], ids=lambda v: " ".join(v[len(GENERATE) if v[0] == "generate" else len(PUSH):]) if isinstance(v, list) else "")
def test_cli_sampling_options_are_usage_errors(argv, expected, capsys):
    from align.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    command = "align generate" if argv[0] == "generate" else "align label push"
    assert err.startswith(f"error: {command}: {expected}") and err.count("\n") == 1, err


def test_cli_sampling_defaults_pass_their_own_check():
    from align.cli.main import _parser
    from align.generation import SamplingConfig

    for argv in (["generate", "--model", "m", "--prompt", "p"], ["label", "push", "--model", "m", "--prompts", "p",
                                                                 "--dataset", "d"]):
        args = _parser().parse_args(argv)
        SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)


# --------------------------------------------------------------------------------------------------
# Damaged files, in every loader


def test_a_truncated_safetensors_file_is_named_by_every_loader(models):
    from align.config import ModelConfig, QuantizationConfig
    from align.modeling import load_for_inference, load_model
    from align.scoring import load_sequence_classifier

    folder = models["truncated"]
    expected = f"model: {folder}/model.safetensors is damaged (safetensors: incomplete metadata, file not fully"
    for load in (lambda: load_model(folder, ModelConfig(path=folder), QuantizationConfig()),
                 lambda: load_for_inference(folder), lambda: load_sequence_classifier(folder)):
        with pytest.raises(AlignError) as error:
            load()
        assert str(error.value).startswith(expected) and "re-run the stage that wrote it" in str(error.value)


def test_a_truncated_adapter_is_named(models):
    from align.modeling import load_for_inference

    assert load_for_inference(models["adapter"]).model is not None  # the intact adapter merges
    with pytest.raises(AlignError, match=r"truncated_adapter/adapter_model\.safetensors is damaged \(safetensors: "):
        load_for_inference(models["truncated_adapter"])


def test_damaged_files_of_each_kind(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import load_file

    from align.config import ModelConfig, QuantizationConfig
    from align.modeling import load_model, load_tokenizer, resolve_model

    def as_bin(cut: bool):
        def damage(folder: Path):
            weights = folder / "model.safetensors"
            torch.save(load_file(weights), folder / "pytorch_model.bin")
            weights.unlink()
            if cut:
                _truncate(folder / "pytorch_model.bin")
        return damage

    def json_cut(name: str):
        return lambda folder: _truncate(folder / name)

    def load(folder: str):
        return load_model(folder, ModelConfig(path=folder), QuantizationConfig())

    intact_bin = _damaged_copy(tiny_llama, tmp_path / "intact_bin", as_bin(cut=False))
    assert load(intact_bin) is not None  # a whole pytorch_model.bin is not "damaged"
    cases = {  # folder damage, loader, the file named, what is wrong
        "bin": (as_bin(cut=True), load, "pytorch_model.bin", "not a readable PyTorch checkpoint: PytorchStreamReader"),
        "config": (json_cut("config.json"), load, "config.json", "invalid JSON: "),
        "config_without_type": (lambda f: (f / "config.json").write_text("{}"), load, "config.json", "no model_type"),
        "tokenizer": (json_cut("tokenizer.json"), load_tokenizer, "tokenizer.json", "invalid JSON: "),
        "empty_weights": (lambda f: (f / "model.safetensors").write_bytes(b""), load, "model.safetensors",
                          "safetensors: header too small"),
    }
    for name, (damage, loader, file, why) in cases.items():
        folder = _damaged_copy(tiny_llama, tmp_path / name, damage)
        with pytest.raises(AlignError) as error:
            loader(folder)
        assert str(error.value).startswith(f"model: {folder}/{file} is damaged ({why}"), (name, str(error.value))

    adapter = tmp_path / "bad_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM", "base_model_name_or_')
    with pytest.raises(AlignError, match=r"bad_adapter/adapter_config\.json is damaged \(invalid JSON: "):
        resolve_model(str(adapter))


def test_other_load_errors_pass_unchanged(tiny_llama):
    """Only a damaged file becomes the one line: an error from intact files is a bug, shown as it is."""
    from align.modeling import model_files

    with pytest.raises(ZeroDivisionError):
        with model_files(tiny_llama):
            raise ZeroDivisionError


# --------------------------------------------------------------------------------------------------
# Model kinds


def test_model_kind_reads_configs_without_weights(models, tiny_llama, tiny_t5, tmp_path):
    from align.modeling import model_kind, resolve_model

    seq_cls = tmp_path / "rm-adapter"
    seq_cls.mkdir()
    (seq_cls / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS",
                                                             "base_model_name_or_path": tiny_llama}))
    no_task = tmp_path / "no-task-adapter"  # a peft adapter saved without a task_type: its base model decides
    no_task.mkdir()
    (no_task / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_t5}))
    (tmp_path / "no-weights").mkdir()
    shutil.copy(Path(models["classifier"]) / "config.json", tmp_path / "no-weights")
    kinds = [model_kind(resolve_model(str(path)))[0] for path in
             (tiny_llama, tiny_t5, models["classifier"], models["adapter"], seq_cls, no_task, tmp_path / "no-weights")]
    assert kinds == ["causal", "seq2seq", "reward", "causal", "reward", "seq2seq", "reward"]


def test_require_model_kind_names_what_was_given_and_what_is_needed(models, tiny_t5):
    from align.modeling import require_model_kind, resolve_model

    assert require_model_kind(resolve_model(tiny_t5), "model.path", tiny_t5, "align sft") == "seq2seq"
    with pytest.raises(AlignError) as error:
        require_model_kind(resolve_model(tiny_t5), "model.path", "t5", "align ppo", kinds=("causal",), hint="sft:1")
    assert str(error.value) == ("model.path: t5 is an encoder-decoder model; align ppo needs a causal LM "
                                "(decoder-only): give sft:1")


def test_stages_refuse_a_reward_model_before_loading(models, tiny_llama, tmp_path, monkeypatch, capsys):
    """sft, ppo --algorithm grpo, and eval compare (as a compared model and as the baseline): one line, before any
    weights load (nothing is printed before it)."""
    from align.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    classifier = models["classifier"]
    (tmp_path / "data.jsonl").write_text(DATA)
    (tmp_path / "prompts.txt").write_text("hi\nyo\n")
    (tmp_path / "sft.yaml").write_text(CONFIGS["sft.yaml"].replace("{model}", classifier))
    (tmp_path / "ppo.yaml").write_text(CONFIGS["ppo.yaml"].replace("{model}", classifier) + "  group_size: 2\n")
    (tmp_path / "eval.yaml").write_text(f"baseline: {tiny_llama}\nmodels: [{classifier}]\nprompts:\n"
                                        f"  path: prompts.txt\n")
    runs = {
        ("sft", "--config", "sft.yaml"): f"model.path: {classifier} is a sequence classifier (a reward model); "
                                         f"align sft needs a language model (causal or encoder-decoder)",
        ("ppo", "--config", "ppo.yaml", "--algorithm", "grpo"): f"model.path: {classifier} is a sequence classifier "
                                                                 f"(a reward model); align ppo needs a causal LM",
        ("eval", "compare", "--config", "eval.yaml"): f"models: {classifier} is a sequence classifier (a reward model)"
                                                      f"; align eval compare needs a language model",
        ("eval", "compare", "--config", "eval.yaml", f"baseline={classifier}", f"models=[{tiny_llama}]"):
            f"baseline: {classifier} is a sequence classifier",
    }
    for argv, expected in runs.items():
        assert main(list(argv)) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith(f"error: {expected}") and captured.err.count("\n") == 1, captured.err
        assert not captured.out, captured.out
    from align.registry import Registry

    assert not Registry().list()
