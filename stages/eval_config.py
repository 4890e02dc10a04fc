"""`align eval compare`'s run config (stages/eval.py): helpfulness (win rates against a baseline) and alignment tax."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from align.config import OutputConfig
from align.errors import AlignError


@dataclass
class EvalPromptsConfig:
    path: str = field(metadata={"help": "Held-out prompts: .txt or .jsonl/.json/.csv records with a prompt field "
                                        "(prompt, question, instruction, input or text). A `reference` / `answer` / "
                                        "`completion` field (a text, or a list: its first item) enables the task "
                                        "metrics (ROUGE-L, exact match, token F1)."})
    max_examples: int | None = field(default=None, metadata={
        "help": "Use a random subset of N prompts (drawn with `seed`).", "range": (1, None)})
    seed: int = field(default=1234, metadata={"help": "Seed of the subset."})


@dataclass
class JudgeConfig:
    path: str | None = field(default=None, metadata={
        "help": "Judge reward model (registry reference or folder) for pairwise win rates. A warning is printed and "
                "written in the report when a compared model was optimized against this very reward model (its "
                "win rate is then optimistic: reward hacking). Unset: no judge win rates."})
    tie_margin: float = field(default=0.0, metadata={
        "help": "Rewards within this margin count as a tie.", "range": (0, None)})
    batch_size: int = field(default=16, metadata={"help": "Responses scored per forward pass.", "range": (1, None)})


@dataclass
class GoldConfig:
    preference: str | None = field(default=None, metadata={
        "help": "Gold preference (align/gold.py) the models never trained on: a built-in rule (sentiment, shorter, "
                "longer, keyword:WORD), a Python callable `module:function(prompt, response) -> number`, or a reward "
                "model that is not the judge. Win rates under it lead the report; the judge's (a proxy) follow. "
                "Unset: no gold win rates (`align pipeline` sets the gold its simulated annotators ranked by)."})
    tie_margin: float = field(default=0.0, metadata={
        "help": "Gold scores within this margin count as a tie.", "range": (0, None)})


@dataclass
class BenchmarkConfig:
    path: str = field(metadata={"help": "Multiple-choice file: MMLU-style {question, choices|options, answer}, BoolQ "
                                        "{question, passage, answer}, or generic {context, options, label}; "
                                        "`pkg:<package>/<file>` for files shipped in a package."})
    name: str | None = field(default=None, metadata={"help": "Name in the report; default: the file name."})
    max_examples: int | None = field(default=None, metadata={
        "help": "Score a random subset of N questions (seeded, the same for every model).", "range": (1, None)})


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int = field(default=128, metadata={"help": "Response length limit in tokens.",
                                                       "range": (1, None)})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy decoding (reproducible).",
                                                      "range": (0, None)})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass when sampling.", "range": (0, 1)})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass.", "range": (1, None)})


@dataclass
class EvalRunConfig:
    """`align eval compare`: every model against a baseline on helpfulness, and on what alignment cost."""

    models: list[str] = field(metadata={"help": "Models to evaluate: registry references (`sft:latest`, `ppo:2`), "
                                                "folders or `pkg:` files. `align eval compare A B ...` replaces it."})
    baseline: str = field(metadata={"help": "The model every other model is compared with (win rates, tax, KL); "
                                            "usually the SFT model. Evaluated too."})
    prompts: EvalPromptsConfig
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    reward_models: list[str] = field(default_factory=list, metadata={
        "help": "Reward models to compare (every round's, when `align pipeline` runs rounds): each one's held-out "
                "accuracy from its own training (people's held-out rankings) and, with `gold.preference`, its "
                "agreement with the gold on the same gold-ranked pairs as the judge, with a 95% CI."})
    benchmarks: list[BenchmarkConfig] = field(default_factory=list, metadata={
        "help": "Capability benchmarks for the alignment tax: a list of {path, name, max_examples}."})
    perplexity: list[str] = field(default_factory=list, metadata={
        "help": "Held-out text files (.txt: one text per line, or records with a text field) for perplexity."})
    perplexity_max_texts: int = field(default=200, metadata={"help": "Texts per perplexity file at most.",
                                                             "range": (1, None)})
    generation: EvalGenerationConfig = field(default_factory=EvalGenerationConfig)
    samples_in_report: int = field(default=8, metadata={"help": "Side-by-side sample generations in the report.",
                                                         "range": (0, None)})
    output: OutputConfig = field(default_factory=OutputConfig)

    def cross_check(self, where: Callable[[str], str]) -> None:
        """Checks across keys, at file:line (`where`), run by align.config when the config loads."""
        if not self.models:
            raise AlignError(f"{where('models')}: models: no model to compare with the baseline; list at least one "
                             f"(a registry reference or a folder) under models: or after `align eval compare`")
