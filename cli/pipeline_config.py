"""`align pipeline`'s config (cli/pipeline.py): the InstructGPT chain, each step a normal registered run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PipelineStepConfig:
    config: str = field(metadata={"help": "The stage's own YAML config (e.g. configs/ppo.yaml).", "file": True})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "`key=value` overrides for that config (sizes for the demo, ...). The pipeline adds the references "
                "to the steps before (model.path, data.path, reward.path) and output.name itself; an override given "
                "here wins over what it wires (e.g. a reward model on another backbone: model.path=...)."})
    enabled: bool = field(default=True, metadata={"help": "false: skip this step (a later step needing its output "
                                                          "then fails with a clear message)."})


@dataclass
class PipelineLabelConfig:
    prompts: str = field(metadata={"help": "Prompts to rank completions for: .txt or records with a prompt field."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use the first N prompts.", "range": (1, None)})
    k: int = field(default=4, metadata={"help": "Completions per prompt to rank (InstructGPT: 4-9).",
                                        "range": (2, 9)})
    max_new_tokens: int = field(default=64, metadata={"help": "Completion length limit in tokens.",
                                                      "range": (1, None)})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the completions.",
                                                      "range": (0.01, None)})
    batch_size: int = field(default=16, metadata={"help": "Generations per forward pass.", "range": (1, None)})
    annotators: Literal["simulated", "human"] = field(default="simulated", metadata={
        "help": "`human`: push to Argilla and wait until every record is ranked (annotators rank in the web UI); "
                "`simulated` (demos): scripted annotators rank by the `gold` preference, marked simulated "
                "everywhere."})
    gold: str = field(default="shorter", metadata={
        "help": "The gold preference simulated annotators rank by (align/gold.py): a built-in rule (sentiment, "
                "shorter, longer, keyword:WORD), a Python callable `module:function(prompt, response) -> number`, "
                "or a reward model. The pipeline also measures the policies under it in the eval step (`gold:` of "
                "the eval config), and PPO tracks it per iteration: the models never see it."})
    gold_tie_margin: float = field(default=0.0, metadata={
        "help": "Simulated annotators rank completions whose gold scores are this close as a tie (people do not "
                "tell near-equal responses apart either); tied pairs are left out of the preference data.",
        "range": (0, None)})
    simulate_annotators: int = field(default=1, metadata={"help": "How many simulated annotators.",
                                                          "range": (1, 100)})
    simulate_noise: float = field(default=0.0, metadata={
        "help": "Probability that a simulated annotator swaps two adjacent ranks.", "range": (0, 1)})
    wait_timeout_s: int = field(default=86400, metadata={
        "help": "With human annotators: how long to wait for the rankings before stopping (re-run to keep "
                "waiting; finished steps are skipped).", "range": (1, None)})


@dataclass
class PipelineRunConfig:
    """`align pipeline`: SFT -> completions -> rankings in Argilla -> reward model -> PPO and DPO -> evaluation."""

    name: str = field(metadata={"help": "Pipeline name: every step's run is `<name>-<step>` in the registry."})
    sft: PipelineStepConfig
    label: PipelineLabelConfig
    reward: PipelineStepConfig
    ppo: PipelineStepConfig
    dpo: PipelineStepConfig
    eval: PipelineStepConfig
    seed: int | None = field(default=None, metadata={
        "help": "One seed for the whole chain: set as `seed` of sft, reward, ppo and dpo and as the sampling seed of "
                "the label completions (a new seed is a new, independent run of every step). Unset: each step's "
                "config keeps its own."})
