"""`align ppo`: policy optimization against a reward model (InstructGPT stage 3). The modules, one concern each:

- stage.py: the `align ppo` run, read top to bottom: config -> output folder -> prompts / ptx -> policy -> models
  -> trainer -> artifact -> registry row (`check`, `load`, `run`).
- config.py: its run config (PPORunConfig and the sections only PPO has) and the checks of what the chosen algorithm
  cannot honour. Importing it (and this package) stays light: a config mistake is reported before torch loads.
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
  the closing table's rows, the published model and its registry row, the gold measurement.
"""
