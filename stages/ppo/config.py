"""`align ppo`'s run config (stages/ppo/stage.py, and grpo.py for `--algorithm grpo|rloo`): the sections every
stage shares (align.config) and PPO's own: the reward model, the prompts, PPO-ptx, the rollout and the `ppo` settings;
and the checks of what the chosen algorithm cannot honour, made when the config loads (file:line)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from align.config import FORMAT_FIELD_NAMES, LoraConfig, ModelConfig, OutputConfig, QuantizationConfig
from align.errors import AlignError


@dataclass
class RewardModelConfig:
    path: str = field(metadata={"help": "Reward model: a registry reference (`reward:latest`) or a folder saved by "
                                        "`align reward`. Its stored normalization is applied (reference mean 0)."})
    share_base: Literal["auto", "true", "false"] = field(default="auto", metadata={
        "help": "Score with the reward adapter on the policy's own base weights (no second copy). `auto`: when the "
                "reward model is a LoRA adapter on the same base (as `align reward` on the SFT model makes); `true`: "
                "require it (error otherwise); `false`: always load the reward model separately and pass it "
                "responses as text (any architecture and tokenizer)."})
    normalized: bool = field(default=True, metadata={
        "help": "Use the normalized reward (InstructGPT: the SFT outputs average 0) when the model has one."})
    batch_size: int = field(default=16, metadata={"help": "Responses scored per forward pass.", "range": (1, None)})


@dataclass
class PromptDataConfig:
    path: str = field(metadata={"help": "Prompts: .txt (one per line) or .jsonl/.json/.csv records with a prompt "
                                        "field (prompt, question, instruction, input or text), or `pkg:<pkg>/<file>`."})
    max_examples: int | None = field(default=None, metadata={
        "help": "Use a random subset of N prompts (drawn with `seed`).", "range": (1, None)})
    seed: int = field(default=42, metadata={"help": "Seed of the subset."})


@dataclass
class PtxConfig:
    path: str | None = field(default=None, metadata={
        "help": "PPO-ptx (InstructGPT): pretraining or SFT data whose language-model loss is mixed into every PPO "
                "update to reduce the alignment tax. Any `align sft` data format; loss on completions (all tokens "
                "for plain text). Unset: no ptx term."})
    columns: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Map format fields to your fields, as `data.columns` of `align sft`.", "keys": FORMAT_FIELD_NAMES})
    coef: float = field(default=1.0, metadata={
        "help": "Weight of the ptx loss against the PPO loss (InstructGPT's gamma).", "range": (0, None)})
    batch_size: int = field(default=4, metadata={"help": "ptx examples per PPO minibatch.", "range": (1, None)})
    max_length: int = field(default=256, metadata={"help": "ptx examples are truncated to this many tokens.",
                                                    "range": (8, None)})


@dataclass
class RolloutConfig:
    max_new_tokens: int = field(default=64, metadata={"help": "Response length limit in tokens.", "range": (1, None)})
    max_prompt_length: int = field(default=256, metadata={
        "help": "Longer prompts keep their last tokens (the question and the assistant turn) and are counted.",
        "range": (1, None)})
    temperature: float = field(default=1.0, metadata={
        "help": "Sampling temperature; the log-probabilities of policy and reference are taken at the same one.",
        "range": (0.01, None)})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off). Off keeps PPO on-policy.",
                                            "range": (0, None)})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off). Off keeps PPO on-policy.",
                                                "range": (0, 1)})
    stop_strings: list[str] = field(default_factory=list, metadata={
        "help": "The response ends after the first of these strings (like EOS)."})
    forward_batch_size: int = field(default=16, metadata={
        "help": "PPO: responses per no-grad forward pass while scoring a rollout (reference log-probs, values; the "
                "reward model has reward.batch_size). Memory only: larger is faster until it no longer fits.",
        "range": (1, None)})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "Subtracted from the reward of a response that reaches max_new_tokens without EOS or a stop string "
                "(0: no penalty).", "range": (0, None)})
    gather_weights: bool = field(default=True, metadata={
        "help": "PPO under FSDP: gather the whole policy model on each process for the rollout (generation runs a "
                "forward pass per token; gathering one layer at a time for each is far slower), and split it again "
                "for the updates. false: for a model that does not fit whole on one GPU."})


@dataclass
class PPOConfig:
    steps: int = field(default=100, metadata={"help": "PPO iterations: each samples a batch, scores it, updates.",
                                              "range": (1, None)})
    batch_size: int = field(default=16, metadata={
        "help": "Prompts sampled per iteration per process (one response each).", "range": (1, None)})
    mini_batch_size: int = field(default=8, metadata={"help": "Responses per gradient step.", "range": (1, None)})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts.", "range": (1, None)})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the policy.",
                                                         "above": 0})
    value_learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the value function (adapter and head); default: learning_rate.", "range": (0, None)})
    group_size: int = field(default=4, metadata={
        "help": "GRPO/RLOO only: responses sampled per prompt; each response's advantage is its reward against the "
                "others' in its group. `batch_size` x `group_size` responses per iteration.", "range": (2, None)})
    value_layers: int | None = field(default=None, metadata={
        "help": "With LoRA: how many decoder layers, counted from the top, the value function trains. It starts as "
                "the reward model either way (shared base) or as the SFT model with a new adapter; the layers below "
                "keep their starting weights, so the hidden states entering the lowest trained layer stay the same "
                "through an iteration's PPO epochs: the rollout's value pass keeps them, and each value update runs "
                "the trained layers alone. Default (unset): a quarter of the layers, at least one. 0: train every "
                "layer (a whole forward and backward pass per value update).", "range": (0, None)})
    value_warmup_steps: int = field(default=0, metadata={
        "help": "First iterations that train only the value function (the policy is frozen; OpenRLHF's "
                "freezing_actor_steps). A value function started as the reward model scores every unfinished "
                "response as if it ended there; until it has learned otherwise, its advantages can push the policy "
                "the wrong way (e.g. away from EOS when the reward prefers short answers).", "range": (0, None)})
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = field(default="linear", metadata={
        "help": "Learning-rate schedule over `steps` (after warmup)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup iterations.", "range": (0, None)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay.", "range": (0, None)})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off).", "range": (0, None)})
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE.", "range": (0, 1)})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE.", "range": (0, 1)})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip.", "above": 0})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip around the old values.",
                                                          "range": (0, None)})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss.", "range": (0, None)})
    kl_coef: float = field(default=0.05, metadata={
        "help": "Per-token KL penalty coefficient beta (InstructGPT: 0.02); the start value when adaptive.",
        "range": (0, None)})
    adaptive_kl: bool = field(default=False, metadata={
        "help": "Adapt kl_coef towards `target_kl` (Ziegler et al. 2019's proportional controller)."})
    target_kl: float = field(default=6.0, metadata={"help": "Target KL (nats per response) of the adaptive "
                                                            "controller.", "above": 0})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (responses) of the adaptive controller.",
                                                     "range": (1, None)})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the per-token rewards before GAE."})
    max_bad_steps: int = field(default=3, metadata={
        "help": "Iterations in a row with NaN/inf rewards or losses (each skipped and reported) before the run "
                "stops with a checkpoint kept.", "range": (1, None)})
    logging_steps: int = field(default=1, metadata={"help": "Print the metrics every N iterations.",
                                                    "range": (1, None)})
    sample_steps: int = field(default=10, metadata={
        "help": "Print a table of sample prompts, responses and rewards every N iterations (0: only at the end).",
        "range": (0, None)})
    save_steps: int = field(default=20, metadata={"help": "Checkpoint every N iterations (for --resume).",
                                                  "range": (1, None)})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept.", "range": (1, None)})


@dataclass
class PPORunConfig:
    """`align ppo`: InstructGPT PPO against a reward model, KL-penalized to the SFT model, with PPO-ptx."""

    model: ModelConfig = field(metadata={"help": "The policy to optimize: an SFT artifact (`sft:latest`), prompted "
                                                 "with the template it was trained with. It is also the frozen "
                                                 "reference of the KL penalty."})
    reward: RewardModelConfig
    data: PromptDataConfig
    algorithm: Literal["ppo", "grpo", "rloo"] = field(default="ppo", metadata={
        "help": "`ppo`: InstructGPT PPO (align's trainer: value function, GAE, PPO-ptx). `grpo` (Shao et al. 2024) or "
                "`rloo` (Ahmadian et al. 2024): no value function; each prompt gets `ppo.group_size` responses whose "
                "rewards are compared with each other's, through TRL's GRPOTrainer / RLOOTrainer (no ptx, no stop "
                "strings; the reward model is loaded on its own). Also `align ppo --algorithm`."})
    ptx: PtxConfig = field(default_factory=PtxConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = field(default=42, metadata={"help": "Seed of sampling, minibatch order and new weights."})
    gold: str | None = field(default=None, metadata={
        "help": "Gold preference (align/gold.py) scored on every iteration's responses and never used for training: "
                "a built-in rule (sentiment, shorter, longer, keyword:WORD), a Python callable "
                "`module:function(prompt, response) -> number`, or a reward model other than `reward.path`. The "
                "training log, plots and summary then show proxy reward, gold score and KL over iterations: the "
                "overoptimization curve (Gao et al. 2022), and the summary says when the gold fell while the proxy "
                "rose. Checked at start-up. `align pipeline` sets it to the gold its simulated annotators ranked by."})

    def cross_check(self, where: typing.Callable[[str], str]) -> None:
        """Checks across keys, at file:line (`where`), run when the config loads."""
        _check_policy_optimization(self, where)


# `ppo` fields of PPO's value function, GAE and KL controller: GRPO and RLOO would ignore them.
PPO_ONLY = ("value_learning_rate", "value_warmup_steps", "value_layers", "gamma", "lam", "cliprange_value", "vf_coef",
            "adaptive_kl", "whiten_rewards")


def _check_policy_optimization(cfg: PPORunConfig, where: typing.Callable[[str], str]) -> None:
    """`align ppo`'s settings that its algorithm cannot honour (align's PPO, or TRL's GRPO / RLOO trainers)."""
    ppo, rollout, defaults = cfg.ppo, cfg.rollout, PPOConfig()

    def fail(key: str, message: str) -> None:
        raise AlignError(f"{where(key)}: {message}")

    if cfg.algorithm == "ppo":
        if ppo.mini_batch_size > ppo.batch_size:
            fail("ppo.mini_batch_size", f"ppo.mini_batch_size ({ppo.mini_batch_size}) is larger than ppo.batch_size "
                                        f"({ppo.batch_size}): a minibatch is a slice of the sampled batch")
        if cfg.lora.enabled and cfg.lora.bias != "none":
            fail("lora.bias", f"lora.bias: {cfg.lora.bias}: align ppo keeps every base weight frozen (with LoRA they "
                              f"are also the KL reference and the reward model); set lora.bias: none")
        if ppo.value_layers is not None and not cfg.lora.enabled:
            fail("ppo.value_layers", "ppo.value_layers: with full fine-tuning the value head reads the policy's own "
                                     "hidden states (no value adapter); remove it or set lora.enabled: true")
        if ppo.group_size != defaults.group_size:
            fail("ppo.group_size", "ppo.group_size: GRPO/RLOO only (algorithm: grpo or rloo); PPO samples one "
                                   "response per prompt: remove it")
        if cfg.reward.share_base == "true" and not cfg.lora.enabled:
            fail("reward.share_base", "reward.share_base: true needs lora.enabled: true (full fine-tuning changes the "
                                      "base weights the reward adapter was trained on); set reward.share_base: false")
        return
    if cfg.ptx.path:
        fail("ptx.path", f"ptx.path: PPO-ptx is part of align's PPO trainer; algorithm {cfg.algorithm} has no ptx "
                         f"term: unset it (ptx.path=null) or use algorithm: ppo")
    if rollout.forward_batch_size != RolloutConfig().forward_batch_size:
        fail("rollout.forward_batch_size", f"rollout.forward_batch_size: PPO only; algorithm {cfg.algorithm} scores "
                                           f"with ppo.mini_batch_size per pass: remove it")
    if rollout.gather_weights != RolloutConfig().gather_weights:
        fail("rollout.gather_weights", f"rollout.gather_weights: PPO only; algorithm {cfg.algorithm} runs TRL's "
                                       f"trainer, which gathers weights as accelerate does: remove it")
    if rollout.stop_strings:
        fail("rollout.stop_strings", f"rollout.stop_strings: not supported with algorithm {cfg.algorithm} (responses "
                                     f"end at EOS or rollout.max_new_tokens); remove them or use algorithm: ppo")
    for key in PPO_ONLY:
        if getattr(ppo, key) != getattr(defaults, key):
            fail(f"ppo.{key}", f"ppo.{key}: PPO only (value function, GAE, KL controller); algorithm {cfg.algorithm} "
                               f"has none of them: remove it")
    responses = ppo.batch_size * ppo.group_size
    if responses % ppo.mini_batch_size:
        fail("ppo.mini_batch_size", f"ppo.mini_batch_size: {ppo.mini_batch_size} does not divide the {responses} "
                                    f"responses of an iteration (ppo.batch_size {ppo.batch_size} x ppo.group_size "
                                    f"{ppo.group_size})")
