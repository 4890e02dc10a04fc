"""`align pipeline`'s config (cli/pipeline.py): the InstructGPT chain, each step a normal registered run."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from align.errors import AlignError


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
    select: Literal["random", "uncertainty", "disagreement", "diversity"] | None = field(default=None, metadata={
        "help": "Active selection (labeling/selection.py, as `align label push --select`): `prompts` is a pool, of "
                "which `budget` prompts are ranked in each round, chosen at `random`, by the `uncertainty` of the "
                "previous round's reward model (round 1 has none: diversity, and it says so), by the "
                "`disagreement` of every earlier round's reward model (a committee: from round 3; round 2 has one "
                "and uses its uncertainty, and says so), or for `diversity` in embedding space; each record keeps "
                "why it was chosen. Unset: every prompt."})
    budget: int | None = field(default=None, metadata={
        "help": "With `select`: how many prompts of the pool are ranked in each round.", "range": (1, None)})
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
    rounds: int = field(default=1, metadata={
        "help": "Rounds of label -> reward -> policy (InstructGPT collected its rankings in rounds). Round r > 1 "
                "ranks K completions of round r-1's policy (`round_policy`) for the same prompts, in a new Argilla "
                "dataset, and trains the reward model again on the rankings of every round so far; the eval runs "
                "once, after the last round, with every round's policies.", "range": (1, None)})
    round_policy: Literal["ppo", "dpo"] | None = field(default=None, metadata={
        "help": "Which policy of round r-1 samples the completions of round r. Default: ppo when enabled, else dpo."})
    round_mix: int = field(default=0, metadata={
        "help": "How many of round r > 1's K completions per prompt the SFT model writes (the rest: round r-1's "
                "policy), so annotators also rank the policy against where it started (`align label push "
                "--mix-model --mix-k`). 0: all from the policy.", "range": (0, None)})
    reward_from: Literal["scratch", "previous"] = field(default="scratch", metadata={
        "help": "How round r > 1 trains its reward model on the rankings of every round so far: from `scratch` (a "
                "new score head on the reward step's backbone) or from round r-1's reward model (`previous`: its "
                "weights, LoRA adapter and score head train on)."})
    policy_from: Literal["sft", "previous"] = field(default="sft", metadata={
        "help": "Where round r's policy steps start: `sft` (each round trains anew; dpo on the rankings of every "
                "round so far) or `previous` (ppo / dpo continue round r-1's policy; dpo on round r's rankings, "
                "against the SFT model as its reference; ppo's KL reference is the policy it starts from, as "
                "`align ppo` has one model for both)."})

    def cross_check(self, where: typing.Callable[[str], str]) -> None:
        """Checks across keys, at file:line (`where`), run when the config loads."""
        if self.round_policy is not None and not getattr(self, self.round_policy).enabled:
            raise AlignError(f"{where('round_policy')}: round_policy: {self.round_policy} samples the next round's "
                             f"completions, but {self.round_policy}.enabled is false; enable it or name the other")
        if (self.label.select is None) != (self.label.budget is None):
            given, missing = ("label.select", "label.budget") if self.label.budget is None else \
                ("label.budget", "label.select")
            raise AlignError(f"{where(given)}: {given} needs {missing} too: select chooses `budget` prompts of the "
                             f"pool label.prompts")
        if self.round_mix >= self.label.k:
            raise AlignError(f"{where('round_mix')}: round_mix: {self.round_mix} of label.k: {self.label.k} "
                             f"completions from the SFT model leaves none for the policy; at most {self.label.k - 1}")
        if self.rounds > 1 and not (self.ppo.enabled or self.dpo.enabled):
            raise AlignError(f"{where('rounds')}: rounds: {self.rounds}: round 2 on ranks completions of round 1's "
                             f"policy, and ppo and dpo are both disabled; enable one of them or set rounds: 1")
