"""`align ppo --algorithm grpo|rloo`: group-relative policy optimization against the reward model, through TRL.

GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) drop PPO's value function: every prompt gets
`ppo.group_size` responses, and a response's advantage is its reward against the others' in its group. TRL's
GRPOTrainer / RLOOTrainer do the sampling and the updates; align gives them the same inputs as `align ppo` (the SFT
policy and its template, the registered reward model, the prompts, the same `rollout`/`ppo` settings, mapped below),
and reads back the same per-iteration metrics, samples, plots, summary and registry row (stage `ppo`, with the
algorithm in its metrics: `align registry list` shows `ppo:N (grpo)`).

Reads top to bottom: config (loaded by the CLI; checked for what only PPO has) -> output folder -> prompts rendered
as the SFT model was trained (longer ones keep their last tokens, counted) -> the SFT policy (an adapter merged
once) with LoRA, QLoRA or full weights; the reference of the KL term is the SFT model (TRL's frozen copy of the new
adapter) -> the reward model, loaded on its own and reading (prompt, response) text as `align reward` trained it,
normalized (the TextReward `align ppo` uses for such a model), minus `rollout.missing_eos_penalty` without EOS ->
TRL's trainer -> artifact renamed into place -> registry row. The head and tail every stage shares are align/run.py.

With `gold` (align/gold.py), TRL gets a second reward function, the gold, with weight 0 (GRPOConfig/RLOOConfig
`reward_weights` [1, 0]): TRL scores and logs it per step (`rewards/gold/mean`, read back as the iteration's `gold`)
but it never reaches the rewards, advantages or loss. In TRL 1.16 both trainers sum the functions' weighted scores
with nansum, so 0 x gold adds exactly 0 (RLOO's KL term is added after that sum); the logged `reward` is that same
weighted sum, the proxy's alone. One case would differ, a response the proxy cannot score (NaN): TRL marks a row
unscorable only when every function gave NaN, so the gold gives NaN (None) there too.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback

from align.artifacts import CHECKPOINTS, RunDir
from align.config import LoadedConfig, read_config, to_dict
from align.errors import AlignError
from align.memory import check_memory, trainer_workload
from align.modeling import merge_adapter, parameter_summary, trainer_defaults, training_config, training_template
from align.gold import Gold
from align.registry import Artifact, resolve_path
from align.reporting import console, human_bytes, plot_metric_grid, print_table
from align.run import print_finished, save_run_record, start_run
from align.scoring import RewardScorer
from align.stages.ppo.common import (PLOT_PANELS, encode_prompts, finished_rows, load_policy, load_policy_tokenizer,
                                     load_run_gold, lr_scheduler_name, plot_overoptimization, print_overoptimization,
                                     print_samples, publish_policy, read_policy_prompts, resolve_models, summarize,
                                     write_samples)
from align.stages.ppo.config import PPORunConfig
from align.stages.ppo.rewards import TextReward

STAGE = "ppo"


def check(loaded: LoadedConfig) -> PPORunConfig:
    """The config align has read (`align.config.read_config`), checked in full: what GRPO / RLOO cannot honour was
    refused as the config was read (stages/ppo/config.py, with file:line); TRL's GRPOConfig / RLOOConfig is built
    when the run starts."""
    cfg = loaded.finish()
    if cfg.algorithm == "ppo":
        raise AlignError("algorithm: ppo runs in stages/ppo/stage.py (`align ppo` picks it)")
    return cfg


def load(config_path: str, overrides: list[str]) -> PPORunConfig:
    """The validated config, as `align ppo --algorithm grpo|rloo` loads it."""
    return check(read_config(config_path, overrides, PPORunConfig))


def run(cfg: PPORunConfig, config_path: str, resume: bool = False) -> Artifact | None:
    """`align ppo --algorithm grpo|rloo`: `cfg` checked by `check`, read from `config_path` (its file name is the
    default run name)."""
    # 1. The run (name, output folder, checkpoint to resume from, registry), the references: what the user can get
    # wrong fails before models load.
    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume)
    policy_source, reward_source = resolve_models(cfg, job.registry)
    if cfg.reward.share_base == "true":
        raise AlignError(f"reward.share_base: true: TRL's {cfg.algorithm.upper()} trainer scores with a reward model "
                         f"of its own; set reward.share_base: auto or false")
    prompt_path, prompt_artifact = resolve_path(cfg.data.path, job.registry)
    args, steps_per_iteration = _trl_config(cfg, job.folder)
    args.device  # noqa: B018 - sets up accelerate's state: each process's own GPU, where a reward-model gold loads
    gold = load_run_gold(cfg, reward_source)  # measured each iteration, never trained on; checked now

    # 2. Prompts, rendered as the SFT model was trained (its template, its tokenizer).
    prompts = read_policy_prompts(prompt_path, cfg.data)
    tokenizer, tokenizer_changes = load_policy_tokenizer(policy_source.path, cfg)
    encoded, truncated = encode_prompts(tokenizer, prompts, training_template(policy_source.path),
                                        cfg.rollout.max_prompt_length)
    if len(prompts) < cfg.ppo.batch_size * args.world_size:
        raise AlignError(f"data.path: {len(prompts)} prompts, fewer than one iteration's ppo.batch_size "
                         f"{cfg.ppo.batch_size} x {args.world_size} process(es) (TRL's sampler would run no step)")
    rows = [{"prompt": _trl_text(tokenizer, text, ids), "raw_prompt": prompt} for prompt, text, ids in encoded]

    # 3. Models: the policy with LoRA / QLoRA / full weights; the reward model on its own.
    with args.main_process_first(desc="merging the SFT adapter"):  # one process merges, the others reuse it
        base_path = merge_adapter(policy_source, cfg.model.dtype) if policy_source.adapter_of else policy_source.path
    model = load_policy(base_path, cfg, tokenizer)
    params = parameter_summary(model)
    ends = model.generation_config.eos_token_id
    eos_ids = {tokenizer.eos_token_id, *([ends] if isinstance(ends, int) else ends or [])}
    text_reward = TextReward(RewardScorer.load(reward_source.path, job.registry), cfg.reward)
    reward = GroupReward(text_reward, cfg.rollout.missing_eos_penalty, eos_ids)
    measure = GoldReward(gold, reward) if gold else None
    log = IterationLog(cfg, steps_per_iteration, reward)

    # 4. Train.
    trainer = _make_trainer(cfg.algorithm, model, [reward, measure] if measure else [reward], args, rows, tokenizer,
                            log)
    is_main = trainer.is_world_process_zero()
    longest = max(len(ids) for _, _, ids in encoded) + cfg.rollout.max_new_tokens
    reference = getattr(trainer, "ref_model", None)  # full fine-tuning: TRL's frozen copy
    memory = check_memory(trainer.model, trainer_workload(
        args, longest, logit_positions=cfg.rollout.max_new_tokens + 1,
        generation_tokens=cfg.ppo.batch_size * cfg.ppo.group_size * longest, batch_key="ppo.mini_batch_size",
        accumulation_key=None, checkpointing_key=None, length_key=None),
        extra_weight_bytes=parameter_summary(text_reward.model).memory_bytes +
        (parameter_summary(reference).memory_bytes if reference is not None else 0))
    job.folder.create()
    if is_main:
        print_table(f"align ppo --algorithm {cfg.algorithm}: {job.name}", [
            ("policy", f"{cfg.model.path} -> {base_path}" + (" (4-bit)" if cfg.quantization.load_in_4bit else
                                                               " (8-bit)" if cfg.quantization.load_in_8bit else "")),
            ("method", "LoRA" if cfg.lora.enabled else "full fine-tuning"),
            ("algorithm", f"{cfg.algorithm.upper()} (TRL {type(trainer).__name__}): {cfg.ppo.group_size} responses "
                          f"per prompt compared with each other; no value function"),
            ("reference (KL)", "the SFT model: a frozen copy of the new (identity) adapter (TRL's 'ref')"
             if cfg.lora.enabled else "a frozen copy of the SFT model"),
            ("reward model", f"{cfg.reward.path}: {text_reward.describe()}"),
            ("gold (measured only)", f"{gold.spec}: {gold.description}; scored on every iteration's responses as a "
                                     f"reward function of weight 0 (never trained on)" if gold else "none"),
            ("parameters", f"{params.trainable:,} trainable of {params.total:,} ({params.trainable_share:.2%})"),
            ("memory (weights)", human_bytes(params.memory_bytes)),
            memory,
            ("prompts", f"{prompt_path}: {len(prompts)}" + (f" ({truncated} over rollout.max_prompt_length="
                                                            f"{cfg.rollout.max_prompt_length}: kept their last "
                                                            f"tokens)" if truncated else "")),
            ("schedule", f"{cfg.ppo.steps} iterations x {cfg.ppo.batch_size} prompts x {cfg.ppo.group_size} "
                         f"responses x {args.world_size} process(es); {cfg.ppo.ppo_epochs} epochs of minibatch "
                         f"{cfg.ppo.mini_batch_size} = {steps_per_iteration} optimizer steps an iteration"),
            ("KL", f"beta {cfg.ppo.kl_coef} (fixed)"),
            *[("tokenizer", change) for change in tokenizer_changes],
            ("output", str(job.final)),
        ])
    resumed_step = int(job.checkpoint.rsplit("-", 1)[-1]) if job.checkpoint else 0
    if job.checkpoint and is_main:
        console.print(f"resuming from {job.checkpoint} (iteration {resumed_step // steps_per_iteration})")
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=job.checkpoint)
    # The loop's time: this process's, plus TRL's per-step times of the steps before a resumed checkpoint.
    loop_time = time.perf_counter() - started + sum(e.get("step_time", 0.0) for e in trainer.state.log_history
                                                    if e.get("step", 0) <= resumed_step)
    if "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")  # TRL's frozen copy of the starting adapter: not part of the policy
    trainer.save_model(str(job.work))  # every rank takes part (ZeRO-3 / FSDP gather); rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if not is_main:
        return None

    # 5. Artifact: policy (adapter or weights), tokenizer, card, log, plots, samples; rename; register.
    tokenizer.save_pretrained(str(job.work))
    config = to_dict(cfg)
    history = iterations(trainer.state.log_history, steps_per_iteration, cfg.ppo.kl_coef)
    save_run_record(job, config, history)
    write_samples(reward.samples, job.work / "samples.jsonl")
    done = len(history)
    summary = summarize(history, done, done * cfg.ppo.batch_size * cfg.ppo.group_size * args.world_size,
                        loop_time, 0, cfg.ppo.kl_coef)
    plots = plot_metric_grid(history, job.work, f"{cfg.algorithm}_curves.png", PLOT_PANELS) + \
        plot_overoptimization(history, job.work, summary.get("overoptimization"))
    metrics = {**summary, "group_size": cfg.ppo.group_size, "truncated_prompts": truncated, "prompts": len(prompts),
               "trainable_parameters": params.trainable, "total_parameters": params.total}
    artifact = publish_policy(job, cfg, policy_source, base_path, prompts, config, metrics, plots,
                              [policy_source.artifact, reward_source.artifact, prompt_artifact])
    print_finished(job, artifact, [("algorithm", f"{cfg.algorithm} (TRL {type(trainer).__name__})"),
                                   *finished_rows(summary)], plots)
    print_overoptimization(summary)
    return artifact


# --------------------------------------------------------------------------------------------------
# Inputs and TRL's configuration

def _trl_text(tokenizer, text: str, ids: list[int]) -> str:
    """The prompt text to give TRL, which tokenizes it again with the tokenizer's special tokens: a chat template
    that writes the BOS itself would get a second one, so a leading BOS is left out where the tokenizer adds it. (A
    prompt cut to its last tokens, which has none, gets the tokenizer's BOS from TRL.)"""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer(text)["input_ids"] != ids:
        return text[len(bos):]
    return text


def _trl_config(cfg: PPORunConfig, run_dir: RunDir):
    """TRL's GRPOConfig / RLOOConfig from the `ppo` and `rollout` sections. An iteration samples ppo.batch_size x
    ppo.group_size responses and runs ppo.ppo_epochs passes of minibatch ppo.mini_batch_size over them; TRL counts
    optimizer steps, so steps, warmup and checkpoints are scaled by the steps an iteration takes."""
    from trl import GRPOConfig, RLOOConfig

    ppo, rollout = cfg.ppo, cfg.rollout
    per_generation = ppo.batch_size * ppo.group_size // ppo.mini_batch_size  # optimizer steps per pass
    steps_per_iteration = per_generation * ppo.ppo_epochs
    values = trainer_defaults(cfg.model, run_dir.work / CHECKPOINTS, cfg.seed, cfg.data.seed, {}) | dict(
        per_device_train_batch_size=ppo.mini_batch_size, gradient_accumulation_steps=1,
        steps_per_generation=per_generation, num_generations=ppo.group_size, num_iterations=ppo.ppo_epochs,
        max_steps=ppo.steps * steps_per_iteration, learning_rate=ppo.learning_rate,
        lr_scheduler_type=lr_scheduler_name(ppo),
        warmup_steps=ppo.warmup_steps * steps_per_iteration, disable_dropout=True,
        weight_decay=ppo.weight_decay, max_grad_norm=ppo.max_grad_norm, beta=ppo.kl_coef,
        epsilon=ppo.cliprange, max_completion_length=rollout.max_new_tokens, temperature=rollout.temperature,
        top_k=rollout.top_k, top_p=rollout.top_p, logging_steps=1, disable_tqdm=True,
        save_strategy="steps", save_steps=ppo.save_steps * steps_per_iteration, save_total_limit=ppo.save_total_limit,
        shuffle_dataset=True)
    if cfg.gold:  # the gold is TRL's second reward function: logged, weighted 0 (see the module's docstring)
        values["reward_weights"] = [1.0, 0.0]
    return training_config(GRPOConfig if cfg.algorithm == "grpo" else RLOOConfig, values), steps_per_iteration


def _make_trainer(algorithm: str, model, rewards: list, args, rows: list[dict], tokenizer, log):
    """TRL's trainer with `rewards` as its reward functions (the proxy; the gold, weight 0); its own checks of the
    settings end as one-line errors."""
    from datasets import Dataset
    from trl import GRPOTrainer, RLOOTrainer

    from transformers import PrinterCallback

    trainer_class = GRPOTrainer if algorithm == "grpo" else RLOOTrainer
    try:
        trainer = trainer_class(model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[log])
    except (ValueError, NotImplementedError) as e:
        raise AlignError(f"ppo ({algorithm}): " + " ".join(str(e).split())) from None
    trainer.remove_callback(PrinterCallback)  # raw per-step dicts; IterationLog shows the run
    return trainer


# --------------------------------------------------------------------------------------------------
# The reward and the per-iteration log

class GroupReward:
    """TRL's reward function: the run's TextReward (the registered reward model's score of (prompt as written,
    response), normalized as stored with it), minus rollout.missing_eos_penalty for a response that reached
    max_new_tokens without EOS. Keeps the last batch's samples for the log."""

    __name__ = "reward"  # TRL names the logged reward after its function

    def __init__(self, reward: TextReward, missing_eos_penalty: float, eos_ids: set[int]):
        self.reward = reward
        self.penalty = missing_eos_penalty
        self.eos_ids = eos_ids
        self.samples: list[dict] = []  # the last batch's
        self.rewards: list[float] = []  # the last batch's

    def __call__(self, prompts, completions, completion_ids, raw_prompt, **kwargs) -> list[float]:
        responses = [c.strip() for c in completions]
        _, scores = self.reward.score(raw_prompt, responses)
        ended = [bool(ids) and ids[-1] in self.eos_ids for ids in completion_ids]
        rewards = [s - (0.0 if end else self.penalty) for s, end in zip(scores, ended)]
        self.samples = [{"prompt": p, "response": r, "reward": w} for p, r, w in zip(raw_prompt, responses, rewards)]
        self.rewards = rewards
        return rewards


class GoldReward:
    """The gold as TRL's second reward function, weighted 0: TRL logs its mean per step (`rewards/gold/mean`) and
    it adds nothing to the rewards the advantages come from. Called right after GroupReward on the same batch (TRL
    calls synchronous reward functions in order): it scores the same responses, adds `gold` to its samples, and
    gives None (NaN) where the proxy's reward is not finite, so that TRL's unscorable rows stay what they would be
    without a gold."""

    __name__ = "gold"  # TRL names the logged reward after its function: rewards/gold/mean

    def __init__(self, gold: Gold, proxy: GroupReward):
        self.gold, self.proxy = gold, proxy

    def __call__(self, prompts, completions, completion_ids, raw_prompt, **kwargs) -> list[float | None]:
        responses = [c.strip() for c in completions]
        scores = self.gold.score(raw_prompt, responses)
        proxy = self.proxy.rewards if len(self.proxy.rewards) == len(scores) else [0.0] * len(scores)
        scores = [s if math.isfinite(r) else None for s, r in zip(scores, proxy)]
        for sample, score in zip(self.proxy.samples, scores):
            sample["gold"] = score
        return scores


def iterations(log_history: list[dict], steps_per_iteration: int, kl_coef: float) -> list[dict]:
    """TRL's per-optimizer-step log (restored on --resume) as align ppo's per-iteration history: the means of an
    iteration's steps, in align ppo's names. TRL's KL is per token (GRPO: the k3 estimate in its loss, measured
    during the iteration's updates; RLOO: log pi - log pi_ref at sampling, which goes into the reward); it becomes
    nats per response like align ppo's by the mean response length (exact when the responses are equally long).
    TRL's clip fraction counts only the clipping that acts against the advantage (RLOO: per sequence), and its loss
    includes the KL term. The gold's mean (a reward function of weight 0) becomes `gold`."""
    buckets: dict[int, dict[str, list[float]]] = {}
    for logged in log_history:
        if "step" not in logged or "loss" not in logged and "reward" not in logged:
            continue  # the closing summary entry
        bucket = buckets.setdefault((logged["step"] - 1) // steps_per_iteration + 1, {})
        for key, name in TRL_KEYS.items():
            if isinstance(logged.get(key), (int, float)):
                bucket.setdefault(name, []).append(float(logged[key]))
    history = []
    for iteration, bucket in sorted(buckets.items()):
        entry = {name: sum(values) / len(values) for name, values in bucket.items()}
        if "eos_rate" in entry:
            entry["eos_rate"] = 1 - entry["eos_rate"]  # TRL logs the share that never ended
        if "kl" in entry and "response_length" in entry:
            entry["kl"] *= entry["response_length"]  # TRL's is per token; align ppo's per response (its sum)
        history.append({**entry, "step": iteration, "kl_coef": kl_coef})
    return history


TRL_KEYS = {"reward": "reward", "reward_std": "reward_std",
            "rewards/gold/mean": "gold", "rewards/gold/std": "gold_std", "kl": "kl", "entropy": "entropy",
            "clip_ratio/region_mean": "clipfrac", "completions/mean_length": "response_length",
            "completions/clipped_ratio": "eos_rate", "loss": "loss", "grad_norm": "grad_norm",
            "learning_rate": "learning_rate"}


class IterationLog(TrainerCallback):
    """The run as align ppo shows it: a progress bar over iterations, a log line every ppo.logging_steps iterations
    and a table of samples every ppo.sample_steps (TRL logs every optimizer step; an iteration is one sampled batch
    and its epochs)."""

    def __init__(self, cfg: PPORunConfig, steps_per_iteration: int, reward: GroupReward):
        self.cfg, self.steps_per_iteration, self.reward = cfg, steps_per_iteration, reward
        self.progress = None

    def on_train_begin(self, args, state, control, **kwargs):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if state.is_world_process_zero:
            self.progress = Progress(TextColumn(self.cfg.algorithm), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console,
                                     transient=True)
            self.progress.start()
            self.task = self.progress.add_task("iterations", total=self.cfg.ppo.steps,
                                               completed=state.global_step // self.steps_per_iteration, status="")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):
            return  # the trainer's closing summary
        if self.progress is None or state.global_step % self.steps_per_iteration:
            return
        # logging_steps=1: the last steps_per_iteration entries are the iteration just finished
        entry = iterations(state.log_history[-self.steps_per_iteration:], self.steps_per_iteration,
                           self.cfg.ppo.kl_coef)[-1]
        status = f"reward {entry.get('reward', float('nan')):+.3f}  kl {entry.get('kl', float('nan')):.3f}"
        self.progress.update(self.task, completed=entry["step"], status=status)
        ppo = self.cfg.ppo
        if entry["step"] % ppo.logging_steps == 0 or entry["step"] == ppo.steps:
            self.progress.console.print(f"iteration {entry['step']}/{ppo.steps}  " + "  ".join(
                f"{key} {entry[key]:{fmt}}" for key, fmt in (
                    ("reward", "+.3f"), ("gold", "+.3f"), ("kl", ".3f"), ("entropy", ".3f"), ("clipfrac", ".3f"),
                    ("response_length", ".1f"), ("eos_rate", ".2f")) if key in entry))
        if ppo.sample_steps and entry["step"] % ppo.sample_steps == 0:
            print_samples(self.reward.samples, entry["step"], self.progress.console)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            if not self.cfg.ppo.sample_steps:  # as align ppo: at the end only when never during the run
                print_samples(self.reward.samples, state.global_step // self.steps_per_iteration, console)
