"""`align ppo`: policy optimization against a reward model (InstructGPT stage 3). The modules, one concern each:

- stage.py: the `align ppo` run, read top to bottom: config -> output folder -> prompts / ptx -> policy -> models
  -> trainer -> artifact -> registry row. `run` and `load` below are its.
- trainer.py: the PPO loop, one iteration as named steps: sample, score, shape rewards, advantages, update.
- losses.py: the math as pure functions (KL-shaped rewards, GAE, whitening, clipped policy and value losses,
  entropy), tested without any distributed code.
- adapters.py: the model's parts, switching adapters on the one base, the value function.
- rewards.py: the reward model on the shared base (SharedBaseReward) or loaded on its own (TextReward).
- data.py: ptx examples and the seeded order prompts and ptx batches are served in.
- distributed.py: data parallel and FSDP2 plumbing (reductions, gradient averaging, gathering weights).
- checkpoints.py: saving the policy and checkpoints, and resuming from them.
- grpo.py: `align ppo --algorithm grpo|rloo`, TRL's GRPO/RLOO trainers with the same inputs, log and artifact.
- common.py: what stage.py and grpo.py share: prompts, the policy, the lr schedule's name, summary, plots, samples,
  the gold measurement, the registry row.
"""

from align.stages.ppo.stage import load, run

__all__ = ["load", "run"]
