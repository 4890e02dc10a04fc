"""`align sft`'s run config (stages/sft.py): the sections every stage shares (align.config) and SFT's own fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.config import (TRAINING_FIELDS, DataConfig, LoraConfig, ModelConfig, OutputConfig, QuantizationConfig,
                          TemplateConfig)


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
                "gradient_checkpointing off, report_to none.", "trl": "SFTConfig", "fields": TRAINING_FIELDS})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop after this many evaluations without improvement of `training.metric_for_best_model` "
                "(eval_loss by default). Needs training.load_best_model_at_end and an eval/save strategy.",
        "range": (1, None)})
    early_stopping_threshold: float = field(default=0.0, metadata={
        "help": "Smallest improvement that counts for early stopping.", "range": (0, None)})
    seed: int = field(default=42, metadata={"help": "Seed for model init of new weights, data order and sampling."})
