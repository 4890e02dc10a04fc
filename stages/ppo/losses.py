"""PPO's math as pure functions on tensors: no model, no process group, no state. Each returns what it computes and
the statistics PPO logs about it; what crosses processes (whitening's moments) goes through an injected `reduce`.

Shapes: (B, R) per response token, B responses of R positions; `mask` is 1.0 on real response tokens, 0.0 on the
padding after a response's end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Positions per chunk of the entropy: (B, chunk, vocab) floats at a time, not (B, R, vocab).
ENTROPY_CHUNK = 64


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of each of `tokens`: (B, R, vocab) logits -> (B, R)."""
    logits = logits.float() / temperature
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(token) - log pi_ref(token) at each sampled response token (0 on padding): summed over a response, the
    sampled estimate of its KL to the reference."""
    return (logprobs - ref_logprobs) * mask


def kl_penalized_rewards(scores: torch.Tensor, kl_per_token: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """InstructGPT's per-token reward: -beta * KL_t at every response token, plus the reward model's score (B,) on
    each response's last real token."""
    rewards = -kl_coef * kl_per_token
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over each response: (advantages, returns). Padding
    neither contributes a value nor carries an advantage back."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def _this_process(totals: torch.Tensor) -> torch.Tensor:
    return totals


def whiten(values: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = _this_process,
           shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over every real token, padding set to 0. `reduce` sums a tensor of this process's
    (sum, sum of squares, count) over every process (all-reduce; the identity in one process), so that the moments
    are those of every process's tokens together. shift_mean=False keeps the mean (rewards are only rescaled)."""
    totals = reduce(torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()]).cpu())
    mean = totals[0] / totals[2].clamp(min=1)
    var = (totals[1] / totals[2].clamp(min=1) - mean ** 2).clamp(min=0)
    whitened = (values - mean.to(values.device)) * torch.rsqrt(var.to(values.device) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean.to(values.device)
    return whitened * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective, as a loss; and its statistics: `clipfrac` (the share of tokens whose
    ratio left [1 - cliprange, 1 + cliprange]) and `approx_kl` (mean of 0.5 * log-ratio^2, old || new)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    losses = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(((ratio - 1).abs() > cliprange).float(), mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return masked_mean(losses, mask), stats


def clipped_value_loss(predicted: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * the larger squared error of the new values and of the new values kept within cliprange_value of the
    rollout's; and `vf_clipfrac`, the share of tokens where the clipped error was the larger (the clip decided the
    loss there, as TRL and OpenAI's baselines count it)."""
    clipped = old_values + torch.clamp(predicted - old_values, -cliprange_value, cliprange_value)
    errors, clipped_errors = (predicted - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(errors, clipped_errors), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_errors > errors).float(), mask)}
    return loss, stats


@torch.no_grad()
def entropy(logits: torch.Tensor, mask: torch.Tensor, chunk: int = ENTROPY_CHUNK) -> torch.Tensor:
    """Mean entropy (nats/token) of softmax(logits) over the real tokens, `chunk` positions at a time: the
    softmax of a whole (B, R, vocab) batch would double the largest tensor of the update."""
    per_token = []
    for start in range(0, logits.shape[1], chunk):
        part = logits[:, start:start + chunk]
        probs = torch.softmax(part, -1)
        per_token.append(torch.logsumexp(part, -1) - (probs * part).sum(-1))
    return masked_mean(torch.cat(per_token, dim=1), mask)


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns): how much of the returns' spread the value function predicted."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)
