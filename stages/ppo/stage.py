"""`align ppo`: InstructGPT stage 3, PPO against the reward model with a per-token KL penalty and PPO-ptx.

Reads top to bottom: config (loaded by the CLI) -> output folder -> prompts (and ptx data) -> the SFT policy (a LoRA
adapter merged once into its base, so "adapter disabled" IS the SFT model) -> models: with LoRA, ONE copy of the
base weights holds the policy (adapter `default`, trained), the reference (all adapters disabled), the value
function (adapter `value` + a linear head) and, when it was trained on the same base, the reward model (adapter
`reward` + its score head); otherwise the reward model is loaded on its own and reads responses as text -> the PPO
loop (`PPOTrainer`, trainer.py) -> artifact (policy adapter or weights, value function, tokenizer, card, log, plots,
samples) renamed into place -> registry row with the SFT model, the reward model and the ptx data as parents. The
head and tail every stage shares are align/run.py.

With `gold` (align/gold.py), every iteration's responses are also scored under a gold preference after the update
(measured, never trained on: nothing of it reaches the rewards, advantages or losses): its mean is logged as `gold`,
each sample keeps its own, and the plots and summary show proxy reward, gold score and KL together (Gao et al.
2022's overoptimization curve).

Distributed (distributed.py): under `torchrun` / `accelerate launch --multi_gpu` every process samples its own
prompts and the gradients are averaged across processes after each backward pass (data parallel, gloo on CPU, NCCL
on GPUs). Under `accelerate launch` with an FSDP config (configs/accelerate/fsdp.yaml) the model's weights (and their
gradients and optimizer state) are also split across the processes with PyTorch's FSDP2: one decoder layer is
gathered at a time.
"""

from __future__ import annotations

import copy
from pathlib import Path

from align.config import LoadedConfig, read_config, to_dict
from align.errors import AlignError
from align.memory import Workload, check_memory
from align.modeling import merge_adapter, parameter_summary, training_template
from align.registry import Artifact, resolve_path
from align.reporting import console, human_bytes, plot_metric_grid, print_table
from align.run import print_finished, save_run_record, start_run
from align.scoring import RewardScorer
from align.stages.ppo.adapters import AdapterSwitch, ValueFunction, base_weight_copies, language_model, value_probe
from align.stages.ppo.checkpoints import load_checkpoint_state, load_checkpoint_weights, save_policy
from align.stages.ppo.common import (PLOT_PANELS, encode_prompts, finished_rows, load_policy, load_policy_tokenizer,
                                     load_run_gold, plot_overoptimization, print_overoptimization, publish_policy,
                                     read_policy_prompts, resolve_models, write_samples)
from align.stages.ppo.config import PPORunConfig
from align.stages.ppo.data import load_ptx
from align.stages.ppo.distributed import Distributed
from align.stages.ppo.rewards import SharedBaseReward, TextReward, share_reward_base
from align.stages.ppo.trainer import PPOTrainer

STAGE = "ppo"


def check(loaded: LoadedConfig) -> PPORunConfig:
    """The config align has read (`align.config.read_config`), checked in full: align's PPO builds no library config,
    and what it cannot honour was refused as the config was read (stages/ppo/config.py, with file:line)."""
    cfg = loaded.finish()
    if cfg.algorithm != "ppo":
        raise AlignError(f"algorithm: {cfg.algorithm} runs in stages/ppo/grpo.py (`align ppo` picks it)")
    return cfg


def load(config_path: str, overrides: list[str]) -> PPORunConfig:
    """The validated config, as `align ppo` loads it."""
    return check(read_config(config_path, overrides, PPORunConfig))


def run(cfg: PPORunConfig, config_path: str, resume: bool = False) -> Artifact | None:
    """`align ppo`: `cfg` checked by `check`, read from `config_path` (its file name is the default run name)."""
    # 1. The processes, the run (name, output folder, checkpoint to resume from, registry), the references.
    # Everything the user can get wrong fails here, before models load.
    dist = Distributed.start(cfg)
    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume, is_main=dist.is_main)
    policy_source, reward_source = resolve_models(cfg, job.registry)
    gold = load_run_gold(cfg, reward_source)  # measured each iteration, never trained on; checked now
    prompt_path, prompt_artifact = resolve_path(cfg.data.path, job.registry)
    ptx_path, ptx_artifact = resolve_path(cfg.ptx.path, job.registry) if cfg.ptx.path else (None, None)

    # 2. Prompts and ptx data, rendered as the SFT model was trained (its template, its tokenizer).
    prompts = read_policy_prompts(prompt_path, cfg.data)
    tokenizer, tokenizer_changes = load_policy_tokenizer(policy_source.path, cfg)
    template = training_template(policy_source.path)
    encoded, truncated_prompts = encode_prompts(tokenizer, prompts, template, cfg.rollout.max_prompt_length)
    queries = [(prompt, ids) for prompt, _, ids in encoded]
    ptx = load_ptx(cfg, ptx_path, tokenizer, template) if ptx_path else None

    # 3. Models: one base copy for policy / reference / value (/ reward) with LoRA.
    base_path = merge_adapter(policy_source, cfg.model.dtype) if policy_source.adapter_of else policy_source.path
    share = share_reward_base(cfg, reward_source, base_path)
    model = load_policy(base_path, cfg, tokenizer)
    reference = None if cfg.lora.enabled else _frozen_copy(model)
    adapters = AdapterSwitch(model) if cfg.lora.enabled else None
    value = ValueFunction.create(model, cfg, adapters, reward_source if share else None)
    reward = SharedBaseReward.attach(model, adapters, reward_source, cfg.reward) if share else \
        TextReward(RewardScorer.load(reward_source.path, job.registry), cfg.reward)
    device = dist.device
    model.to(device)
    value.head.to(device)
    if reference is not None:
        reference.to(device)
    params = parameter_summary(model)
    copies = base_weight_copies(model, reference, reward.model if isinstance(reward, TextReward) else None)
    if job.checkpoint:  # weights first, while they are whole; the optimizer's state once the trainer exists
        load_checkpoint_weights(Path(job.checkpoint), model, value, cfg.lora.enabled, dist)
    dist.shard(model, reference)
    bytes_held = dist.bytes_held(model, reference)  # now, while every group is split (a pass leaves the root whole)

    # 4. The trainer; the start table.
    trainer = PPOTrainer(cfg, model, reference, value, reward, tokenizer, queries, ptx, dist, gold)
    if not value.check_upper(model, value_probe(queries, cfg, model.config), dist) and dist.is_main:
        console.print(f"value function: passes over its trained {value.layers_note(model)} alone do not reproduce "
                      f"{type(language_model(model)).__name__}'s forward pass; they run the whole model")
    weight_bytes = params.memory_bytes + (parameter_summary(reference).memory_bytes if reference is not None else 0)
    longest = max(len(ids) for _, ids in queries) + cfg.rollout.max_new_tokens
    memory = check_memory(model, Workload(
        batch=cfg.ppo.mini_batch_size, length=longest, logit_positions=cfg.rollout.max_new_tokens + 1,
        extra_tokens=cfg.ptx.batch_size * cfg.ptx.max_length if ptx else 0,
        generation_tokens=cfg.ppo.batch_size * longest, shards=dist.world if dist.sharded else 1,
        batch_key="ppo.mini_batch_size", accumulation_key=None, checkpointing_key=None, length_key=None),
        extra_weight_bytes=weight_bytes - params.memory_bytes +
        (parameter_summary(reward.model).memory_bytes if isinstance(reward, TextReward) else 0))
    if dist.is_main:
        print_table(f"align ppo: {job.name}", [
            ("policy", f"{cfg.model.path} -> {base_path}" + (" (4-bit)" if cfg.quantization.load_in_4bit else
                                                               " (8-bit)" if cfg.quantization.load_in_8bit else "")),
            ("method", "LoRA (adapter 'default')" if cfg.lora.enabled else "full fine-tuning"),
            ("reference (KL)", "the SFT model = the policy with its adapters disabled" if cfg.lora.enabled else
             "a frozen copy of the SFT model"),
            ("value function", f"adapter 'value' (trained on {value.layers_note(model)}) + linear head" +
             (" (initialized from the reward model)" if share else "") if cfg.lora.enabled else
             "linear head on the policy's last hidden states"),
            ("reward model", f"{cfg.reward.path}: " + ("adapter 'reward' on the policy's base (shared weights)" if share
                                                       else reward.describe())),
            ("gold (measured only)", f"{gold.spec}: {gold.description}; scored on every iteration's responses, never "
                                     f"trained on" if gold else "none"),
            ("base weight copies in memory", f"{copies}" + (f", each split across {dist.world} processes (FSDP2)"
                                                            if dist.sharded else "")),
            ("parameters", f"{trainer.trainable_count:,} trainable (policy and value) of {params.total:,} in the "
                           f"policy model"),
            ("memory (weights)", human_bytes(weight_bytes) + (f"; {human_bytes(bytes_held)} "
                                                              f"held by each process" if dist.sharded else "")),
            memory,
            ("prompts", f"{prompt_path}: {len(prompts)}" + (f" ({truncated_prompts} over rollout.max_prompt_length="
                                                            f"{cfg.rollout.max_prompt_length}: kept their last tokens)"
                                                            if truncated_prompts else "")),
            ("ptx", f"{ptx_path}: {len(ptx.rows)} examples, coef {cfg.ptx.coef}; dropped: {ptx.dropped.summary()}"
             if ptx else "off"),
            ("schedule", f"{cfg.ppo.steps} iterations x {cfg.ppo.batch_size} prompts x {dist.world} process(es), "
                         f"{cfg.ppo.ppo_epochs} PPO epochs of minibatch {cfg.ppo.mini_batch_size}"),
            ("KL", f"beta {cfg.ppo.kl_coef}" + (f", adaptive to target {cfg.ppo.target_kl}" if cfg.ppo.adaptive_kl
                                                else ", fixed")),
            *[("tokenizer", change) for change in tokenizer_changes],
            ("output", str(job.final)),
        ])

    # 5. Train.
    if dist.is_main:
        job.folder.create()
    dist.barrier()
    if job.checkpoint:
        load_checkpoint_state(trainer, Path(job.checkpoint))
        console.print(f"resumed from {job.checkpoint} (iteration {trainer.step})")
    trainer.train(job.folder)
    save_policy(job.work, model, value, cfg.lora.enabled, dist)  # every process: under FSDP each holds a part
    if not dist.is_main:
        # Wait until rank 0 has saved and registered: a process group torn down under a peer still using it can
        # abort gloo at exit ("terminate called without an active exception").
        dist.barrier()
        dist.stop()
        return None

    # 6. Artifact: policy (adapter or weights), value function, tokenizer, card, log, plots; rename; register.
    tokenizer.save_pretrained(str(job.work))
    config = to_dict(cfg)
    save_run_record(job, config, trainer.history)
    write_samples(trainer.samples, job.work / "samples.jsonl")
    summary = trainer.summary()
    plots = plot_metric_grid(trainer.history, job.work, "ppo_curves.png", PLOT_PANELS) + \
        plot_overoptimization(trainer.history, job.work, summary.get("overoptimization"))
    metrics = {**summary, "base_weight_copies": copies, "truncated_prompts": truncated_prompts,
               "prompts": len(prompts), "trainable_parameters": trainer.trainable_count,
               "total_parameters": params.total,
               **({f"ptx_{key}": count for key, count in ptx.dropped.metrics().items()} if ptx else {})}
    artifact = publish_policy(job, cfg, policy_source, base_path, prompts, config, metrics, plots,
                              [policy_source.artifact, reward_source.artifact, prompt_artifact, ptx_artifact])
    dist.barrier()
    dist.stop()
    print_finished(job, artifact, finished_rows(summary), plots)
    print_overoptimization(summary)
    return artifact


def _frozen_copy(model):
    """Full fine-tuning's reference: the SFT model as it was, frozen."""
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference
