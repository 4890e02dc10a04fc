#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh, a no-op when nothing changed) and run the test suite.
# Extra arguments go to pytest:  bash scripts/test.sh tests/test_configs.py -k mistral -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
# The embedded Argilla server's environment, built by setup.sh (see labeling/server.py).
export ALIGN_ARGILLA_VENV="${ALIGN_ARGILLA_VENV:-$PWD/.venv/argilla-server}"

# Tests never reach the Hugging Face hub (it fails fast instead of retrying), and each process runs
# single-threaded: on small CPUs extra OpenMP threads fight each other and make tests several times slower.
# Instead, one pytest worker per core (at most 4), each taking whole test files (module-scoped fixtures
# train models once per file). `-n 0` among the arguments runs everything in this one process.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

# ruff and the layer contracts first (seconds): a broken layer fails before ten minutes of tests.
bash scripts/lint.sh

status=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n auto --maxprocesses 4 --dist loadfile "$@" \
  || status=$?
if [[ $status -eq 5 ]]; then
  # pytest's "no tests collected": a test run that ran nothing must not look green.
  echo "test.sh: error: pytest collected no tests (exit 5); failing on purpose" >&2
  exit 1
fi
exit "$status"
