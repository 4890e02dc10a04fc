"""What PPO reads besides its prompts: the ptx examples (PPO-ptx, InstructGPT: a language-modelling loss on
pretraining or SFT data, mixed into the policy's loss), tokenized in any `align sft` format; and the seeded order
in which prompts and ptx batches are served: every item once per epoch, the same items at the same positions on a
resumed run."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from align.config import DataConfig, TemplateConfig
from align.data import Dropped, read_records, to_examples
from align.errors import AlignError
from align.stages.ppo.config import PPORunConfig


@dataclass
class PtxData:
    """Tokenized ptx examples (input ids, labels with -100 on prompt tokens), served in a fixed seeded order."""

    rows: list[tuple[list[int], list[int]]]
    batch_size: int
    seed: int
    dropped: Dropped  # records left out, shown in the start table and kept in the metrics

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order = epoch_order(len(self.rows), index * self.batch_size, self.batch_size, self.seed)
        chosen = [self.rows[i] for i in order]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(chosen):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(targets)] = torch.tensor(targets)
            mask[row, :len(tokens)] = 1
        return ids, mask, labels


def load_ptx(cfg: PPORunConfig, path: str, tokenizer, template: TemplateConfig) -> PtxData:
    """ptx examples in any `align sft` format: loss on completions, or on every token of plain text."""
    prepared = to_examples(read_records(path, key="ptx.path"), DataConfig(path=path, columns=cfg.ptx.columns),
                           template)
    rows = []
    for example in prepared.examples:
        if "text" in example:
            ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
            prompt_len = 0
        elif "messages" in example:
            ids = _chat_ids(tokenizer, example["messages"])
            prompt_len = len(_chat_ids(tokenizer, example["messages"][:-1], generation_prompt=True))
        elif isinstance(example["prompt"], list):
            ids = _chat_ids(tokenizer, example["prompt"] + example["completion"])
            prompt_len = len(_chat_ids(tokenizer, example["prompt"], generation_prompt=True))
        else:
            prompt_ids = tokenizer(example["prompt"])["input_ids"]
            ids = prompt_ids + tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + \
                [tokenizer.eos_token_id]
            prompt_len = len(prompt_ids)
        ids = ids[:cfg.ptx.max_length]
        labels = [-100] * min(prompt_len, len(ids)) + ids[prompt_len:]
        if any(label != -100 for label in labels):
            rows.append((ids, labels))
        else:  # the examples have no line numbers any more: the file names them
            prepared.dropped.add("no_completion_within_ptx_max_length", path)
    if not rows:
        raise AlignError(f"ptx.path: {path}: no example keeps a completion token within ptx.max_length="
                         f"{cfg.ptx.max_length}; raise it")
    return PtxData(rows, cfg.ptx.batch_size, cfg.seed, prepared.dropped)


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def epoch_order(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items `start .. start+count` of an endless sequence of seeded permutations of range(n): every item once per
    epoch, and the same items for the same positions on a resumed run."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(_permutation(n, seed, epoch)[offset])
    return out


PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}  # (n, seed, epoch) -> that epoch's order, made once


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in PERMUTATIONS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        PERMUTATIONS[key] = order
    return PERMUTATIONS[key]
