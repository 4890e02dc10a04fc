"""align: InstructGPT-style alignment (SFT, reward model, PPO/DPO) as one CLI."""

__version__ = "0.1.0"
