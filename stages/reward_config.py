"""`align reward`'s run config (stages/reward.py): preference data (align.config, shared with `align dpo`), reward
normalization, the run config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.config import (TRAINING_FIELDS, LoraConfig, ModelConfig, OutputConfig, PreferenceDataConfig,
                          QuantizationConfig)


@dataclass
class NormalizationConfig:
    enabled: bool = field(default=True, metadata={
        "help": "After training, score a reference set and store its mean/std in `reward_normalization.json`, so "
                "the scorer returns rewards where the reference outputs average 0 (InstructGPT)."})
    reference: str | None = field(default=None, metadata={
        "help": "File of {prompt, response} (or completion / chosen) records, e.g. SFT completions from "
                "`align generate --out`. Default: the distinct chosen responses of the training pairs."})
    max_examples: int | None = field(default=2048, metadata={
        "help": "Score at most this many reference examples (a seeded random subset).", "range": (1, None)})
    divide_by_std: bool = field(default=False, metadata={
        "help": "Also divide by the reference std (unit variance). InstructGPT only subtracts the mean."})


@dataclass
class RewardRunConfig:
    """`align reward`: a reward model from human preference pairs (InstructGPT stage 2). `model.path` names the
    backbone a new score head goes on, or a reward model trained before (`reward:N`): then that model trains further
    (its LoRA adapter and score head, or all its weights), as in rounds of labeling."""

    model: ModelConfig
    data: PreferenceDataConfig
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    training: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Fields of TRL's RewardConfig (transformers TrainingArguments + max_length, "
                "center_rewards_coefficient, ...). `per_device_train_batch_size` counts PAIRS: batches are built from "
                "whole prompts. align sets CPU-safe defaults: bf16 only on a supporting GPU, gradient_checkpointing "
                "off, report_to none; and one epoch (InstructGPT: reward models overfit after one).",
        "trl": "RewardConfig", "fields": TRAINING_FIELDS})
    seed: int = field(default=42, metadata={"help": "Seed for the new score head and LoRA weights, and data order."})
