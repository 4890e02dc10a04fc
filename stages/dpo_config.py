"""`align dpo`'s run config (stages/dpo.py): Direct Preference Optimization on preference pairs, reference = the SFT
model. The `training:` fields DPO adds are checked against the values TRL implements."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from align.config import (TRAINING_FIELDS, LoraConfig, ModelConfig, OutputConfig, PreferenceDataConfig,
                          QuantizationConfig, TemplateConfig)

# The losses TRL 1.16's DPOTrainer implements (DPOConfig declares them as plain strings): a typo fails with the config,
# not at the first training step.
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]


def _loss_type_problem(losses: Any) -> str | None:
    """A loss in a list of DPO losses that TRL does not implement (a single loss is checked by its type)."""
    for loss in [losses] if isinstance(losses, str) else losses:
        if loss not in typing.get_args(LossType):
            close = difflib.get_close_matches(str(loss), typing.get_args(LossType), n=1)
            return (f"{loss!r} is not a loss TRL implements{f' (did you mean {close[0]!r}?)' if close else ''}; one "
                    f"of {', '.join(typing.get_args(LossType))}")
    return None


DPO_TRAINING_FIELDS: dict[str, dict] = TRAINING_FIELDS | {
    "beta": {"above": 0},  # at 0 the DPO loss is a constant: nothing trains
    "label_smoothing": {"range": (0, 0.5)},
    "loss_type": {"type": LossType | list[str], "check": _loss_type_problem},
    "f_divergence_type": {"type": FDivergence},
}


@dataclass
class DPOTemplateConfig(TemplateConfig):
    name: Literal["auto", "chat", "alpaca", "question_answer", "plain", "custom"] = field(default="auto", metadata={
        "help": "How prompts become model input. `auto`: the template the SFT model was trained with (from its "
                "align_config.yaml; `chat` for a model align did not train). Or as in `align sft`: `chat` (the "
                "tokenizer's chat template; a text prompt becomes one user turn), `alpaca`, `question_answer`, "
                "`plain`, `custom` (needs `prompt`)."})


@dataclass
class DPORunConfig:
    """`align dpo`: DPO (Rafailov et al. 2023) on preference pairs, against a frozen reference (the SFT model)."""

    model: ModelConfig = field(metadata={"help": "The policy to start from: an SFT artifact (`sft:latest`), a causal "
                                                 "LM folder or hub id. An SFT LoRA adapter is merged once into its "
                                                 "base and a fresh LoRA is trained on top."})
    data: PreferenceDataConfig
    reference: str | None = field(default=None, metadata={
        "help": "The frozen reference of the DPO loss: a registry reference (`sft:2`) or a causal LM folder with the "
                "policy's tokenizer. Default: the starting policy itself; with LoRA that is the policy with its "
                "adapter disabled (no second copy of the weights), with full fine-tuning a frozen copy (none with "
                "training.precompute_ref_log_probs)."})
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    template: DPOTemplateConfig = field(default_factory=DPOTemplateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    training: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Fields of TRL's DPOConfig (transformers TrainingArguments + beta, loss_type (sigmoid, ipo, hinge, "
                "...), precompute_ref_log_probs, max_length, ...). `per_device_train_batch_size` counts PAIRS. align "
                "sets CPU-safe defaults: bf16 only on a supporting GPU, gradient_checkpointing off, report_to none.",
        "trl": "DPOConfig", "fields": DPO_TRAINING_FIELDS})
    seed: int = field(default=42, metadata={"help": "Seed for the new LoRA weights and the data order."})
