"""The PPO loop (`PPOTrainer`), one iteration as named steps: sample a batch of responses from the policy (with
their log-probs, the reference's and the values), score them with the reward model, shape per-token rewards with
the KL to the reference, compute advantages (GAE, whitened), and update: ppo.ppo_epochs passes of the clipped
policy and value losses (+ ptx) over minibatches. The math is stages/ppo/losses.py; checkpoints are
stages/ppo/checkpoints.py; what crosses processes goes through `Distributed`.

Around the steps: the adaptive KL coefficient, the learning-rate schedule (transformers' get_scheduler), the NaN
guard (an iteration with non-finite rewards or losses is skipped; ppo.max_bad_steps in a row stop the run with a
checkpoint), the gold measured after each update (never trained on), and the log lines and samples.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from align.artifacts import RunDir
from align.errors import AlignError
from align.gold import Gold
from align.reporting import console
from align.stages.ppo import losses
from align.stages.ppo.adapters import ValueFunction, decoder_layers, language_model, layer_input
from align.stages.ppo.checkpoints import save_checkpoint
from align.stages.ppo.common import lr_scheduler_name, print_samples, summarize
from align.stages.ppo.config import PPORunConfig
from align.stages.ppo.data import PtxData, epoch_order
from align.stages.ppo.distributed import Distributed


@dataclass
class Rollout:
    """One sampled batch, everything PPO needs, on the training device. Sequences are [left-padded prompt |
    right-padded response]; per-token tensors cover the response positions only."""

    prompts: list[str]
    responses: list[str]
    ids: torch.Tensor  # (B, P + R)
    mask: torch.Tensor  # (B, P + R)
    positions: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) float
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    ended: torch.Tensor | None = None  # (B,) bool: the response ended with EOS or a stop string
    value_inputs: torch.Tensor | None = None  # (B, P + R, hidden): what enters the value's lowest trained layer
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class AdaptiveKL:
    """Ziegler et al. (2019): beta_{t+1} = beta_t * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, episodes: int) -> None:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * episodes / self.horizon


def generate_without_model_defaults(model, generation_config, **inputs) -> torch.Tensor:
    """generate() with `generation_config` and nothing else. generate() fills every field left unset from the
    model's own generation_config.json (a repetition penalty, no_repeat_ngram_size, suppressed tokens, a minimum
    length...): those would sample from another distribution than the policy PPO trains, and put it into the
    recorded log-probs. The model's defaults are set aside for the call (and stay in what is saved)."""
    from transformers import GenerationConfig

    lm = language_model(model)
    own_defaults, lm.generation_config = lm.generation_config, GenerationConfig()
    try:
        return model.generate(generation_config=generation_config, **inputs)
    finally:
        lm.generation_config = own_defaults


class SampledLogprobs:
    """A logits processor that records log softmax(logits / temperature) of every token generate() samples: the
    log-probs PPO trains against, with no second forward pass. Custom processors run before generate's temperature
    and top-k/top-p warpers, so they see the raw logits, and PPO's policy is the untruncated distribution. Step t's
    call sees the token sampled at step t - 1, so it is gathered then; `logprobs` gathers the last one. Cached
    decoding and the update's full forward pass agree to float rounding (~1e-6 in float32, ~1e-3 in bf16), so the
    first PPO epoch's ratio is 1 up to that, as with TRL's PPOTrainer, which also takes them from generate."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # log-probs of the step whose token is not known yet
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def logprobs(self, response: torch.Tensor) -> torch.Tensor:
        """(B, R) for the R generated tokens."""
        steps = self.steps + [self.previous.gather(1, response[:, -1:]).squeeze(1)]
        return torch.stack(steps, dim=1)[:, :response.shape[1]]


class PPOTrainer:
    """InstructGPT PPO: sample, score, shape per-token rewards with the KL to the reference, GAE, clipped updates."""

    def __init__(self, cfg: PPORunConfig, model, reference, value: ValueFunction, reward, tokenizer,
                 queries: list[tuple[str, list[int]]], ptx: PtxData | None, dist: Distributed,
                 gold: Gold | None = None):
        from transformers import get_scheduler

        self.cfg, self.ppo, self.rollout_cfg = cfg, cfg.ppo, cfg.rollout
        self.model, self.reference, self.value, self.reward = model, reference, value, reward
        self.gold = gold  # measured on each iteration's responses after its update; never part of a loss
        self.adapters = value.adapters  # None with full fine-tuning
        self.tokenizer, self.queries, self.ptx, self.dist = tokenizer, queries, ptx, dist
        self.keeps_logits = "logits_to_keep" in inspect.signature(language_model(model).forward).parameters
        self.model.eval()  # no dropout: the sampled log-probs and the trained ones must come from the same function
        self.lora = cfg.lora.enabled
        self.policy_params = [p for n, p in model.named_parameters() if p.requires_grad and ".value." not in n
                              and ".reward." not in n]
        self.value_params = [p for p in value.parameters(model) if all(p is not q for q in self.policy_params)]
        self.params = self.policy_params + self.value_params
        self.trainable_count = sum(p.numel() for p in self.params)
        if self.adapters is not None:  # peft's set_adapter('default') left the value adapter frozen
            self.adapters.train_only(self.params, value.frozen(model))
        value_lr = self.ppo.value_learning_rate if self.ppo.value_learning_rate is not None else self.ppo.learning_rate
        # The value head (never sharded) has a group of its own: an optimizer updates a group's tensors together, and
        # under FSDP the value adapter's are shards.
        head = list(value.head.parameters())
        groups = [(self.policy_params, self.ppo.learning_rate),
                  ([p for p in self.value_params if all(p is not q for q in head)], value_lr), (head, value_lr)]
        self.optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups if params],
                                           weight_decay=self.ppo.weight_decay)
        # One step per iteration; the same schedule GRPO/RLOO get from TRL (which counts optimizer steps).
        self.scheduler = get_scheduler(lr_scheduler_name(self.ppo), self.optimizer,
                                       num_warmup_steps=self.ppo.warmup_steps, num_training_steps=self.ppo.steps)
        self.kl = AdaptiveKL(self.ppo.kl_coef, self.ppo.target_kl if self.ppo.adaptive_kl else None,
                             self.ppo.kl_horizon)
        self.step = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.bad_in_a_row = 0
        self.skipped = 0
        self.train_time = 0.0
        self.gold_time = 0.0  # the current iteration's gold scoring: measurement, not training time
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = set(stop_ids + ([model.generation_config.eos_token_id]
                                       if isinstance(model.generation_config.eos_token_id, int) else
                                       list(model.generation_config.eos_token_id or [])))

    # ---- the loop ----

    def train(self, run_dir: RunDir) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("ppo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), console=console, transient=True,
                      disable=not self.dist.is_main) as progress:
            task = progress.add_task("ppo", total=self.ppo.steps, completed=self.step, status="")
            while self.step < self.ppo.steps:
                started, self.gold_time = time.perf_counter(), 0.0
                entry = self.iteration()
                self.train_time += time.perf_counter() - started - self.gold_time
                self.step += 1
                entry.update(step=self.step, time_s=round(self.train_time, 3))
                self.history.append(entry)
                progress.update(task, advance=1, status=f"reward {entry.get('reward', float('nan')):+.3f}  "
                                                        f"kl {entry.get('kl', float('nan')):.3f}")
                if self.dist.is_main and (self.step % self.ppo.logging_steps == 0 or self.step == self.ppo.steps):
                    progress.console.print(self._log_line(entry))
                if self.dist.is_main and self.ppo.sample_steps and self.step % self.ppo.sample_steps == 0:
                    print_samples(self.samples, self.step, progress.console)
                if self.bad_in_a_row >= self.ppo.max_bad_steps:
                    saved = save_checkpoint(self, run_dir)
                    raise AlignError(f"ppo: {self.bad_in_a_row} iterations in a row had NaN/inf rewards or losses "
                                     f"(last at iteration {self.step}); stopped. Checkpoint kept: {saved}. Lower "
                                     f"ppo.learning_rate, check the reward model, then continue with --resume")
                if self.step % self.ppo.save_steps == 0 and self.step < self.ppo.steps:
                    save_checkpoint(self, run_dir)
        if self.dist.is_main and self.ppo.sample_steps == 0:
            print_samples(self.samples, self.step, console)

    def iteration(self) -> dict:
        """One iteration: sample, score, shape rewards, advantages, update. Returns the iteration's metrics."""
        # Seeded per iteration (and process): a resumed run samples exactly what the uninterrupted one did.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * self.dist.world + self.dist.rank)
        with self.dist.gathered(self.model) if self.rollout_cfg.gather_weights else nullcontext():
            rollout = self.sample()
            raw, scores = self.score(rollout)
        finite = torch.isfinite(scores).all() & torch.isfinite(rollout.logprobs).all() & \
            torch.isfinite(rollout.ref_logprobs).all() & torch.isfinite(rollout.values).all()
        if not bool(self.dist.sum(finite.float().reshape(1)).item() == self.dist.world):
            return self._skip("non-finite rewards or log-probs", rollout, scores)
        kl_per_token = losses.kl_per_token(rollout.logprobs, rollout.ref_logprobs, rollout.response_mask)
        rewards = self.shape_rewards(rollout, scores, kl_per_token)
        self.advantages(rollout, rewards)
        stats = self.update(rollout)
        if stats is None:
            return self._skip("non-finite loss", rollout, scores)
        self.bad_in_a_row = 0
        kl = kl_per_token.sum(1)
        gold = self._gold_scores(rollout)  # after the update: what it measures cannot reach it
        entry = self._reduce({
            "reward": scores.mean(), "reward_std": scores.std(unbiased=False), "reward_raw": raw.mean(),
            "reward_raw_std": raw.std(unbiased=False), **({"gold": gold.mean(), "gold_std": gold.std(unbiased=False)}
                                                         if gold is not None else {}),
            "kl": kl.mean(), "response_length": rollout.response_mask.sum(1).mean(),
            "eos_rate": rollout.ended.float().mean(), **stats})
        entry["kl_coef"] = self.kl.coef
        entry["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.kl.update(entry["kl"], self.ppo.batch_size * self.dist.world)
        self.scheduler.step()
        self._keep_samples(rollout, scores, gold)
        return entry

    def _gold_scores(self, rollout: Rollout) -> torch.Tensor | None:
        """The gold's score of each of this process's responses (to the prompts as written), or None without a gold.
        Every process scores its own; `_reduce` averages the equal-sized batches' means into the iteration's."""
        if self.gold is None:
            return None
        started = time.perf_counter()
        scores = torch.tensor(self.gold.score(rollout.prompts, rollout.responses), dtype=torch.float32)
        self.gold_time += time.perf_counter() - started
        return scores

    def _skip(self, why: str, rollout: Rollout, scores: torch.Tensor) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.skipped += 1
        if self.dist.is_main:
            console.print(f"[yellow]iteration {self.step + 1}: {why}; skipped (no update). {self.bad_in_a_row} in a "
                          f"row, the run stops at {self.ppo.max_bad_steps}[/yellow]")
        self._keep_samples(rollout, scores)
        return {"skipped": 1}

    def _reduce(self, values: dict) -> dict:
        keys = list(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).detach().cpu() for k in keys])
        return dict(zip(keys, self.dist.mean(stacked).tolist()))

    # ---- 1. sample ----

    @torch.no_grad()
    def sample(self) -> Rollout:
        """This process's next ppo.batch_size prompts, a response to each, and the log-probs and values PPO needs."""
        rows = epoch_order(len(self.queries), (self.step * self.dist.world + self.dist.rank) * self.ppo.batch_size,
                           self.ppo.batch_size, self.cfg.seed)
        prompts = [self.queries[i][0] for i in rows]
        query_ids = [self.queries[i][1] for i in rows]
        device = self.dist.device
        pad = self.tokenizer.pad_token_id
        width = max(len(q) for q in query_ids)
        queries = torch.full((len(rows), width), pad, dtype=torch.long)
        query_mask = torch.zeros_like(queries)
        for row, q in enumerate(query_ids):
            queries[row, width - len(q):] = torch.tensor(q)
            query_mask[row, width - len(q):] = 1
        queries, query_mask = queries.to(device), query_mask.to(device)
        r = self.rollout_cfg
        from transformers import GenerationConfig

        sampling = GenerationConfig(do_sample=True, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                    top_k=r.top_k, top_p=r.top_p, pad_token_id=pad, eos_token_id=sorted(self.eos_ids),
                                    stop_strings=r.stop_strings or None)
        # With LoRA the old log-probs are recorded while sampling (one policy forward pass fewer per rollout); full
        # fine-tuning runs that pass anyway, for the hidden states its value head reads.
        recorder = SampledLogprobs(r.temperature) if self.lora else None
        generated = generate_without_model_defaults(
            self.model, sampling, input_ids=queries, attention_mask=query_mask,
            tokenizer=self.tokenizer if r.stop_strings else None, logits_processor=[recorder] if recorder else None,
            # Split layers are gathered by every forward pass: every process runs each step's until all are done.
            synced_gpus=self.dist.sharded and not r.gather_weights)
        response = generated[:, width:]
        sampled_logprobs = recorder.logprobs(response) if recorder else None
        response, response_mask, ended = self._cut_responses(response)
        ids = torch.cat([queries, response], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logprobs, ref_logprobs, values, value_inputs = [], [], [], []
        for start in range(0, len(rows), r.forward_batch_size):
            part = slice(start, start + r.forward_batch_size)
            hidden = None
            if sampled_logprobs is None:
                lp, hidden = self._policy_logprobs(ids[part], mask[part], positions[part], width)
                logprobs.append(lp)
            ref_logprobs.append(self._reference_logprobs(ids[part], mask[part], positions[part], width))
            part_values, inputs = self._values(ids[part], mask[part], positions[part], width, hidden)
            values.append(part_values)
            value_inputs.append(inputs)
        if sampled_logprobs is not None:  # padding after a response's end is masked out everywhere
            logprobs = [sampled_logprobs.masked_fill(response_mask == 0, 0.0)]
        texts = [self.tokenizer.decode(response[i][response_mask[i].bool()], skip_special_tokens=True).strip()
                 for i in range(len(rows))]
        return Rollout(prompts, texts, ids, mask, positions, response_mask.float(), torch.cat(logprobs),
                       torch.cat(ref_logprobs), torch.cat(values), ended,
                       torch.cat(value_inputs) if value_inputs[0] is not None else None)

    def _cut_responses(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each response ends at its first EOS (kept: the model learns to stop) or stop string; what follows is
        padding. Returns (tokens, mask, ended-by-EOS-or-stop)."""
        length = response.shape[1]
        is_eos = torch.zeros_like(response, dtype=torch.bool)
        for token in self.eos_ids:
            is_eos |= response == token
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(response[:, 0], length))
        ends = torch.minimum(first + 1, torch.full_like(first, length))
        ended = first < length
        if self.rollout_cfg.stop_strings:
            for row in range(response.shape[0]):
                stop = self._stop_position(response[row, :ends[row]].tolist())
                if stop is not None:
                    ends[row], ended[row] = stop, True
        mask = torch.arange(length, device=response.device)[None, :] < ends[:, None]
        return response.masked_fill(~mask, self.tokenizer.pad_token_id), mask.long(), ended

    def _stop_position(self, tokens: list[int]) -> int | None:
        """Tokens up to and including the one that completes the first stop string."""
        for count in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            if any(stop in text for stop in self.rollout_cfg.stop_strings):
                return count
        return None

    def _policy_logprobs(self, ids, mask, positions, width):
        """Full fine-tuning's rollout pass: the response tokens' log-probs and the last hidden states (for V)."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         output_hidden_states=True, **self._response_logits(ids, width))
        logits = out.logits[:, -(ids.shape[1] - width) - 1:-1]
        return losses.token_logprobs(logits, ids[:, width:], self.rollout_cfg.temperature), \
            out.hidden_states[-1][:, width - 1:-1]

    def _reference_logprobs(self, ids, mask, positions, width):
        keep = self._response_logits(ids, width)
        if self.reference is not None:
            logits = self.reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                    **keep).logits
        else:
            with self.adapters.use("__base__"):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                    **keep).logits
        return losses.token_logprobs(logits[:, -(ids.shape[1] - width) - 1:-1], ids[:, width:],
                                     self.rollout_cfg.temperature)

    def _response_logits(self, ids, width) -> dict:
        """Ask the model for logits at the response positions only (and the one before): the LM head over the
        prompt tokens is wasted work, ~10-20% of a forward pass for a large vocabulary."""
        return {"logits_to_keep": ids.shape[1] - width + 1} if self.keeps_logits else {}

    def _values(self, ids, mask, positions, width, policy_hidden=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rollout's values at the response positions, and (value adapter trained on its upper layers) the hidden
        states entering the lowest trained layer: they stay valid through the iteration's updates."""
        if self.adapters is None:
            return self.value(self.model, ids, mask, positions, policy_hidden), None
        capture = layer_input(decoder_layers(self.model)[self.value.first_layer]) \
            if self.value.upper is not None else nullcontext([])
        with capture as captured:
            values = self.value(self.model, ids, mask, positions)[:, width - 1:-1]
        return values, (captured[0] if captured else None)

    # ---- 2. score ----

    @torch.no_grad()
    def score(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """The reward model's raw scores of the responses, and the scores PPO trains on: normalized, minus
        rollout.missing_eos_penalty for a response that did not end."""
        raw, normalized = self.reward(self.model, rollout.prompts, rollout.responses)
        device = self.dist.device
        scores = torch.tensor(normalized, dtype=torch.float32, device=device)
        if self.rollout_cfg.missing_eos_penalty:
            scores = scores - self.rollout_cfg.missing_eos_penalty * (~rollout.ended).float()
        return torch.tensor(raw, dtype=torch.float32, device=device), scores

    # ---- 3. shape rewards, 4. advantages ----

    def shape_rewards(self, rollout: Rollout, scores: torch.Tensor, kl_per_token: torch.Tensor) -> torch.Tensor:
        """Per-token reward = -beta * KL_t, plus the reward model's score on the last response token (rescaled over
        every process's tokens with ppo.whiten_rewards)."""
        mask = rollout.response_mask
        rewards = losses.kl_penalized_rewards(scores, kl_per_token, mask, self.kl.coef)
        if self.ppo.whiten_rewards:
            rewards = losses.whiten(rewards, mask, self.dist.sum, shift_mean=False)
        return rewards

    def advantages(self, rollout: Rollout, rewards: torch.Tensor) -> None:
        """GAE advantages (whitened over every process's response tokens) and returns, into the rollout."""
        mask = rollout.response_mask
        advantages, rollout.returns = losses.gae(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)
        rollout.advantages = losses.whiten(advantages, mask, self.dist.sum)

    # ---- 5. update ----

    def update(self, rollout: Rollout) -> dict | None:
        """ppo_epochs passes of clipped policy + value loss (+ ptx) over shuffled minibatches. None if a loss was
        NaN/inf (the weights are left as they were before that minibatch)."""
        ppo, size = self.ppo, rollout.ids.shape[0]
        width = rollout.ids.shape[1] - rollout.response_mask.shape[1]
        order_rng = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        totals: dict[str, float] = {}
        count = 0
        per_iteration = ppo.ppo_epochs * math.ceil(size / ppo.mini_batch_size)  # minibatches: one ptx batch each
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(size, generator=order_rng).tolist()
            for start in range(0, size, ppo.mini_batch_size):
                rows = order[start:start + ppo.mini_batch_size]
                ptx_index = (self.step * per_iteration + count) * self.dist.world + self.dist.rank
                stats = self._minibatch(rollout, rows, width, ptx_index)
                if stats is None:
                    return None
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        mask = rollout.response_mask
        totals = {k: v / count for k, v in totals.items()}
        totals["explained_variance"] = float(losses.explained_variance(rollout.returns, rollout.values, mask))
        totals["value_mean"] = float(losses.masked_mean(rollout.values, mask))
        return totals

    def _minibatch(self, rollout: Rollout, rows: list[int], width: int, ptx_index: int) -> dict | None:
        ppo = self.ppo
        ids, mask, positions = rollout.ids[rows], rollout.mask[rows], rollout.positions[rows]
        response_mask = rollout.response_mask[rows]
        old_logprobs, advantages = rollout.logprobs[rows], rollout.advantages[rows]
        old_values, returns = rollout.values[rows], rollout.returns[rows]
        self.optimizer.zero_grad(set_to_none=True)

        train_policy = self.step >= ppo.value_warmup_steps
        with torch.set_grad_enabled(train_policy):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                             output_hidden_states=not self.lora, **self._response_logits(ids, width))
        logits = out.logits[:, -(ids.shape[1] - width) - 1:-1].float() / self.rollout_cfg.temperature
        logprobs = torch.gather(logits, 2, ids[:, width:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        pg_loss, pg_stats = losses.clipped_policy_loss(logprobs, old_logprobs, advantages, response_mask,
                                                       ppo.cliprange)
        loss = pg_loss
        ptx_loss = None
        if self.ptx is not None and train_policy:
            ptx_ids, ptx_mask, ptx_labels = (t.to(self.dist.device) for t in self.ptx.batch(ptx_index))
            with torch.set_grad_enabled(self.cfg.ptx.coef > 0):  # coef 0: measured, not trained on
                ptx_loss = self.model(input_ids=ptx_ids, attention_mask=ptx_mask, labels=ptx_labels,
                                      use_cache=False).loss
            if self.cfg.ptx.coef > 0:
                loss = loss + self.cfg.ptx.coef * ptx_loss

        if self.lora:  # the value adapter runs its own forward pass: two backward passes, one optimizer step
            if not self._all_finite(loss):
                return None
            if train_policy:
                loss.backward()
            inputs = rollout.value_inputs[rows] if rollout.value_inputs is not None else None
            predicted = self.value(self.model, ids, mask, positions, inputs=inputs)[:, width - 1:-1]
            vf_loss, vf_stats = losses.clipped_value_loss(predicted, old_values, returns, response_mask,
                                                          ppo.cliprange_value)
            if not self._all_finite(vf_loss):
                return None
            (ppo.vf_coef * vf_loss).backward()
        else:
            predicted = self.value(self.model, ids, mask, positions, out.hidden_states[-1][:, width - 1:-1])
            vf_loss, vf_stats = losses.clipped_value_loss(predicted, old_values, returns, response_mask,
                                                          ppo.cliprange_value)
            loss = (loss if train_policy else 0) + ppo.vf_coef * vf_loss
            if not self._all_finite(loss):
                return None
            loss.backward()
        self.dist.average_gradients(self.params)
        # Policy and value are clipped apart: a large value loss early on must not shrink the policy's step.
        grad_norm = torch.stack([self._clip(self.policy_params), self._clip(self.value_params)]).norm()
        if not torch.isfinite(grad_norm):  # the same on every process: gradients were averaged
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        with torch.no_grad():
            stats = {"pg_loss": float(pg_loss), "vf_loss": float(vf_loss),
                     "vf_clipfrac": float(vf_stats["vf_clipfrac"]),
                     "entropy": float(losses.entropy(logits, response_mask)),
                     "clipfrac": float(pg_stats["clipfrac"]), "approx_kl": float(pg_stats["approx_kl"]),
                     "grad_norm": float(grad_norm)}
            if ptx_loss is not None:
                stats["ptx_loss"] = float(ptx_loss)
        return stats

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process: all skip together, or their gradient exchanges would not
        pair up."""
        return bool(self.dist.sum(torch.isfinite(loss.detach()).float().reshape(1).cpu()).item() == self.dist.world)

    def _clip(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Scales the gradients down to a norm of ppo.max_grad_norm when they are above it; returns the norm before."""
        norm = self.dist.grad_norm(params)
        if self.ppo.max_grad_norm and torch.isfinite(norm):
            scale = min(1.0, self.ppo.max_grad_norm / (float(norm) + 1e-6))
            if scale < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return norm

    # ---- the loop's state (saved in checkpoints) and reporting ----

    def loop_state(self) -> dict:
        """What a resumed run needs besides weights, optimizer, scheduler and RNG."""
        return {"step": self.step, "kl_coef": self.kl.coef, "history": self.history, "samples": self.samples,
                "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row, "train_time": self.train_time}

    def restore_loop_state(self, state: dict) -> None:
        self.step, self.kl.coef, self.history = state["step"], state["kl_coef"], state["history"]
        self.samples, self.skipped = state["samples"], state["skipped"]
        self.bad_in_a_row, self.train_time = state["bad_in_a_row"], state["train_time"]

    def _log_line(self, entry: dict) -> str:
        if entry.get("skipped"):
            return f"iteration {self.step}/{self.ppo.steps}: skipped"
        parts = [f"iteration {self.step}/{self.ppo.steps}", f"reward {entry['reward']:+.3f} (raw "
                 f"{entry['reward_raw']:+.3f})", *([f"gold {entry['gold']:+.3f}"] if "gold" in entry else []),
                 f"kl {entry['kl']:.3f}", f"beta {entry['kl_coef']:.3g}",
                 f"entropy {entry['entropy']:.3f}", f"clip {entry['clipfrac']:.3f}", f"approx_kl "
                 f"{entry['approx_kl']:.4f}", f"vf_loss {entry['vf_loss']:.4f}",
                 f"ev {entry['explained_variance']:.2f}",
                 f"len {entry['response_length']:.1f}", f"eos {entry['eos_rate']:.2f}"]
        if "ptx_loss" in entry:
            parts.append(f"ptx {entry['ptx_loss']:.3f}")
        if self.step <= self.ppo.value_warmup_steps:
            parts.append("(value warmup: policy frozen)")
        return "  ".join(parts)

    def _keep_samples(self, rollout: Rollout, scores: torch.Tensor, gold: torch.Tensor | None = None) -> None:
        self.samples = [{"step": self.step + 1, "prompt": p, "response": r, "reward": float(s)}
                        for p, r, s in zip(rollout.prompts, rollout.responses, scores.tolist())]
        if gold is not None:
            for sample, value in zip(self.samples, gold.tolist()):
                sample["gold"] = value

    def summary(self) -> dict:
        return summarize(self.history, self.step, self.step * self.ppo.batch_size * self.dist.world,
                         self.train_time, self.skipped, self.kl.coef)
