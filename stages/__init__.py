"""The middle layer: one module per InstructGPT stage (ppo/ a package), each read top to bottom like a script, its
config dataclasses beside it (sft_config.py, ...); stages import only the core (`align`), never labeling or the CLI."""
