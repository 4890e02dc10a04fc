"""The reward PPO optimizes, scored on each rollout's (prompt, response) text: `SharedBaseReward`, the reward
model as adapter `reward` + its score head on the policy's own base weights (no second copy; what `align reward` on
the same SFT model makes), or `TextReward`, a reward model loaded on its own. Both return the raw scores and the
scores PPO trains on (normalized as stored with the reward model, with reward.normalized)."""

from __future__ import annotations

from pathlib import Path

import torch

from align.errors import AlignError
from align.modeling import load_tokenizer, resolve_model
from align.scoring import Normalization, RewardScorer, encode_pair
from align.stages.ppo.adapters import (AdapterSwitch, adapter_config, adapter_weights, body_for_a_pass,
                                       last_token_states, load_adapter_weights, split_score_head)
from align.stages.ppo.config import PPORunConfig


def share_reward_base(cfg: PPORunConfig, reward_source, base_path: str) -> bool:
    """Whether the reward adapter can run on the policy's base weights: a LoRA reward model trained on exactly the
    folder the policy starts from (what `align reward` on the same SFT model makes)."""
    if cfg.reward.share_base == "false":
        return False
    reward_base = resolve_model(reward_source.adapter_of).path if reward_source.adapter_of else None
    same = bool(reward_base) and Path(reward_base).resolve() == Path(base_path).resolve() and cfg.lora.enabled
    if cfg.reward.share_base == "true" and not same:
        raise AlignError(f"reward.share_base: true, but the reward model {cfg.reward.path} was trained on "
                         f"{reward_base or 'its own full weights'} and the policy starts from {base_path}; set "
                         f"reward.share_base: auto (a separate reward model) or train the reward model on the same "
                         f"SFT model")
    return same


class SharedBaseReward:
    """The reward model as adapter `reward` + its score head on the policy's base weights: no second copy. Reads
    (prompt, response) formatted exactly as `align reward` trained it (align.scoring.encode_pair)."""

    model = None

    def __init__(self, adapters: AdapterSwitch, tokenizer, score: torch.Tensor, normalization: Normalization | None,
                 normalized: bool, batch_size: int):
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.score = score
        self.normalization = normalization if normalized else None
        self.batch_size = batch_size

    @classmethod
    def attach(cls, model, adapters: AdapterSwitch, source, reward_cfg) -> SharedBaseReward:
        folder = Path(source.path)
        lora, score = split_score_head(adapter_weights(folder))
        model.add_adapter("reward", adapter_config(folder, task_type="CAUSAL_LM", modules_to_save=None,
                                                    inference_mode=True))
        load_adapter_weights(model, "reward", lora)
        model.set_adapter("default")
        for name, param in model.named_parameters():
            if ".reward." in name:
                param.requires_grad_(False)
        tokenizer = load_tokenizer(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # the score is read at the last real token, found by length
        return cls(adapters, tokenizer, score.float(), Normalization.load(folder), reward_cfg.normalized,
                   reward_cfg.batch_size)

    @torch.no_grad()
    def __call__(self, model, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        encoded = [encode_pair(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        device = next(model.parameters()).device
        raw = [0.0] * len(encoded)
        with self.adapters.use("reward"):
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start:start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, tokens in enumerate(chunk):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                    mask[row, :len(tokens)] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = body_for_a_pass(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                values = last_token_states(hidden, mask).float() @ self.score.to(device).T
                raw[start:start + len(chunk)] = values.squeeze(-1).tolist()
        normalized = [self.normalization.apply(r) for r in raw] if self.normalization else raw
        return raw, normalized


class TextReward:
    """A separately loaded reward model (another base, architecture or tokenizer): (prompt, response) pairs pass as
    text, read as `align reward` trained it (align.scoring.RewardScorer). `align ppo` calls it as it calls
    SharedBaseReward; GRPO/RLOO give it to TRL inside their reward function (grpo.GroupReward)."""

    def __init__(self, scorer: RewardScorer, reward_cfg):
        self.scorer = scorer
        self.model = scorer.model
        self.normalized = reward_cfg.normalized
        self.batch_size = reward_cfg.batch_size

    def describe(self) -> str:
        return f"separate model ({type(self.scorer.model).__name__}), reads responses as text with its own tokenizer"

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        """The raw scores, and the scores normalized as stored with the model (with reward.normalized)."""
        raw = self.scorer.score(prompts, responses, self.batch_size, normalized=False)
        norm = self.scorer.normalization
        return raw, [norm.apply(r) for r in raw] if norm is not None and self.normalized else list(raw)

    def __call__(self, model, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        return self.score(prompts, responses)
