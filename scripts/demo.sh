#!/usr/bin/env bash
# The main job, end to end on this machine (CPU is enough): set up, fine-tune the embedded default
# model (SmolLM2-135M-Instruct, shipped inside a PyPI package) with LoRA on real data, generate with
# the result, and list the registry.
# Extra arguments are config overrides for the SFT run:  bash scripts/demo.sh training.max_steps=5
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
# The embedded Argilla server's environment, built by setup.sh (see labeling/server.py).
export ALIGN_ARGILLA_VENV="${ALIGN_ARGILLA_VENV:-$PWD/.venv/argilla-server}"

# Everything the demo needs is installed locally; the hub is unreachable here (fail fast, not retry).
export HF_HUB_OFFLINE=1
export ALIGN_HOME="${ALIGN_HOME:-$PWD/.align}"   # the registry and converted models live here
# Piped into a file or CI log, tables would be cut to 80 columns; a terminal keeps its own width.
[[ -t 1 ]] || export COLUMNS="${COLUMNS:-120}"

echo "demo: align sft (outputs under runs/sft/, registry in $ALIGN_HOME/registry.db)"
# output.overwrite=true: a re-run replaces the previous finished run instead of refusing.
.venv/bin/align sft --config configs/sft-smollm2-lora.yaml output.overwrite=true "$@"

echo "demo: align generate with the model just trained (sft:latest)"
.venv/bin/align generate --model sft:latest --prompt "What happens if you crack your knuckles a lot?" \
  --max-new-tokens 48 --temperature 0

echo "demo: align registry list"
.venv/bin/align registry list
