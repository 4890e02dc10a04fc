"""PPO's math (stages/ppo/losses.py) on small hand-made tensors, without a model or a process group: KL-shaped
rewards and GAE against a hand computation, whitening (one process, and two simulated by an injected reduce, which
must equal whitening their tokens together), the clipped policy and value losses (where they clip, what their
statistics count, where their gradient stops), chunked entropy against the full softmax, and the learning-rate
schedule PPO and GRPO/RLOO share.
"""

from __future__ import annotations

import math

import pytest
import torch

from align.stages.ppo import losses


def test_masked_mean_and_var_count_real_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 60.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert losses.masked_mean(values, mask).item() == pytest.approx(7 / 3)
    # (1 - 7/3)^2 + (2 - 7/3)^2 + (4 - 7/3)^2 = 16/9 + 1/9 + 25/9 = 42/9; over 3 tokens.
    assert losses.masked_var(values, mask).item() == pytest.approx(42 / 27)
    assert losses.masked_mean(values, torch.zeros_like(mask)).item() == 0, "no token: 0, not a division by zero"


def test_token_logprobs_are_the_log_softmax_of_the_sampled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    tokens = torch.randint(0, 7, (2, 4))
    expected = torch.log_softmax(logits / 0.5, -1).gather(2, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(losses.token_logprobs(logits, tokens, 0.5), expected, atol=1e-6)


def test_kl_penalized_rewards_and_gae_match_a_hand_computation():
    # Row 0: two response tokens. Row 1: one token and a padded position (its KL and value must not leak in).
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ref_logprobs = torch.tensor([[-1.2, -1.6], [-0.6, -9.0]])
    kl = losses.kl_per_token(logprobs, ref_logprobs, mask)
    assert torch.allclose(kl, torch.tensor([[0.2, -0.4], [0.1, 0.0]]), atol=1e-6)
    rewards = losses.kl_penalized_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    # -0.1 * KL on every token; the score on each response's last real token.
    assert torch.allclose(rewards, torch.tensor([[-0.02, 0.04 + 2.0], [-0.01 - 1.0, 0.0]]), atol=1e-6)

    values = torch.tensor([[0.5, 1.0], [0.3, 7.0]])
    advantages, returns = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0: A1 = 2.04 - 1.0 = 1.04; A0 = (-0.02 + 0.9 * 1.0 - 0.5) + 0.9 * 0.5 * 1.04 = 0.38 + 0.468 = 0.848.
    # Row 1: the padded value counts as 0: A0 = -1.01 + 0.9 * 0 - 0.3 = -1.31; A1 = 0.
    assert torch.allclose(advantages, torch.tensor([[0.848, 1.04], [-1.31, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[1.348, 2.04], [-1.01, 0.0]]), atol=1e-6), "returns = A + V"


def _tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask.bool()]


def test_whitening_in_one_process():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    whitened = losses.whiten(values, mask)
    assert torch.allclose(_tokens(whitened, mask), (real - real.mean()) / real.std(unbiased=False), atol=1e-5)
    assert whitened[1, 1] == 0 and whitened[1, 2] == 0, "padding stays 0"
    rescaled = losses.whiten(values, mask, shift_mean=False)
    assert _tokens(rescaled, mask).mean().item() == pytest.approx(real.mean().item(), abs=1e-5), "the mean kept"
    assert _tokens(rescaled, mask).std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)


def test_whitening_with_an_injected_reduce_equals_whitening_the_concatenation():
    """Two processes, simulated: each whitens its own tokens with a `reduce` that sums every process's moments (what
    an all-reduce gives), and gets what whitening both processes' tokens together gives."""
    torch.manual_seed(0)
    shards = [(torch.randn(2, 5) * 3 + 1, torch.tensor([[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0]])),
              (torch.randn(3, 5) - 2, torch.tensor([[1.0] * 5, [1.0] * 4 + [0.0], [1.0] + [0.0] * 4]))]
    local = []
    for values, mask in shards:  # each process's (sum, sum of squares, count), as the all-reduce receives them
        losses.whiten(values, mask, reduce=lambda totals: local.append(totals) or totals)
    summed = local[0] + local[1]

    def all_reduce(totals: torch.Tensor) -> torch.Tensor:
        return summed

    together = losses.whiten(torch.cat([v for v, _ in shards]), torch.cat([m for _, m in shards]))
    apart = torch.cat([losses.whiten(values, mask, reduce=all_reduce) for values, mask in shards])
    assert torch.allclose(apart, together, atol=1e-5)
    alone = torch.cat([losses.whiten(values, mask) for values, mask in shards])
    assert not torch.allclose(alone, together, atol=1e-2), "each process's own moments would differ"


def test_clipped_policy_loss_clips_where_it_should():
    """The loss takes the worse of the unclipped and clipped objective: a ratio beyond 1 +- cliprange stops
    counting only in the direction the advantage rewards."""
    ratios = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 50.0]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])  # the last, padded token: huge ratio, no effect
    old = torch.zeros_like(ratios)
    new = ratios.log().requires_grad_(True)
    loss, stats = losses.clipped_policy_loss(new, old, advantages, mask, cliprange=0.2)
    # Per token: A=+1, r=1.5 -> -1.2 (clipped); A=-1, r=1.5 -> 1.5; A=+1, r=0.5 -> -0.5; A=-1, r=0.5 -> 0.8
    # (clipped); A=2, r=1.1 -> -2.2. Mean over the 5 real tokens: -1.6 / 5.
    assert loss.item() == pytest.approx(-0.32, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(4 / 5), "4 of 5 ratios left [0.8, 1.2]"
    expected_kl = sum(0.5 * math.log(r) ** 2 for r in (1.5, 1.5, 0.5, 0.5, 1.1)) / 5
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, rel=1e-5)
    assert not stats["clipfrac"].requires_grad and not stats["approx_kl"].requires_grad
    loss.backward()
    grad = new.grad[0]
    assert grad[0] == 0 and grad[3] == 0, "clipped tokens give no gradient"
    assert grad[1] != 0 and grad[2] != 0 and grad[4] != 0
    assert grad[5] == 0, "padding gives no gradient"


def test_clipped_value_loss_clips_where_it_should():
    old = torch.zeros(1, 5)
    returns = torch.ones(1, 5)
    predicted = torch.tensor([[0.5, 0.1, -0.5, 0.6, 9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = losses.clipped_value_loss(predicted, old, returns, mask, cliprange_value=0.2)
    # 0.5 -> clipped to 0.2: errors 0.25 | 0.64, the larger 0.64; 0.1: within range, 0.81 both;
    # -0.5 -> clipped to -0.2: errors 2.25 | 1.44, the larger 2.25; 0.6 -> 0.2: 0.16 | 0.64.
    # 0.5 * mean = 0.5 * 4.34 / 4.
    assert loss.item() == pytest.approx(0.5 * 4.34 / 4, abs=1e-6)
    assert stats["vf_clipfrac"].item() == pytest.approx(2 / 4), "the clip decided the loss at 0.5 and 0.6"
    loss.backward()
    grad = predicted.grad[0]
    assert grad[0] == 0 and grad[3] == 0, "a clipped prediction gives no gradient"
    assert grad[1] == pytest.approx(0.5 * 2 * (0.1 - 1) / 4) and grad[2] == pytest.approx(0.5 * 2 * (-0.5 - 1) / 4)
    assert grad[4] == 0


def test_chunked_entropy_equals_the_full_softmax_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 11, 50) * 4
    mask = (torch.rand(3, 11) > 0.3).float()
    full = torch.distributions.Categorical(logits=logits).entropy()
    expected = (full * mask).sum() / mask.sum()
    for chunk in (1, 3, 11, 64):
        assert losses.entropy(logits, mask, chunk=chunk).item() == pytest.approx(expected.item(), rel=1e-5), chunk
    uniform = losses.entropy(torch.zeros(2, 5, 16), torch.ones(2, 5), chunk=2)
    assert uniform.item() == pytest.approx(math.log(16), rel=1e-6)


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert losses.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    mean = torch.full_like(returns, 3.0)  # the mean of the real returns: explains nothing
    assert losses.explained_variance(returns, mean, mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_ppo_and_grpo_share_one_schedule_that_warms_up_from_zero(kind):
    """transformers' get_scheduler under the name both take (GRPO/RLOO through TRL's trainer): warmup from 0 over
    ppo.warmup_steps, then constant, linear or cosine decay to the last step."""
    from transformers import get_scheduler

    from align.stages.ppo.common import lr_scheduler_name
    from align.stages.ppo.config import PPOConfig

    ppo = PPOConfig(lr_scheduler_type=kind, warmup_steps=2, steps=6, learning_rate=1.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=ppo.learning_rate)
    scheduler = get_scheduler(lr_scheduler_name(ppo), optimizer, num_warmup_steps=ppo.warmup_steps,
                              num_training_steps=ppo.steps)
    rates = []
    for _ in range(ppo.steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[:3] == pytest.approx([0.0, 0.5, 1.0])
    after = {"constant": [1.0, 1.0, 1.0], "linear": [0.75, 0.5, 0.25],
             "cosine": [0.5 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)]}[kind]
    assert rates[3:] == pytest.approx(after)
