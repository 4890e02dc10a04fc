#!/usr/bin/env bash
# The static checks the test command runs before pytest: ruff ([tool.ruff] in pyproject.toml) and the layer
# contracts ([tool.importlinter]). Run alone: bash scripts/lint.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

.venv/bin/ruff check --quiet .

# import-linter follows a package's folder, but align.stages, align.labeling and align.cli live in folders of their
# own (package-dir) that an editable install maps only at import time: so the contracts are checked on a copy laid
# out as `pip install` lays it out, from inside that copy (import-linter puts the working folder on sys.path).
installed="$(mktemp -d)"
trap 'rm -rf "$installed"' EXIT
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --no-compile \
  --target "$installed" . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
cd "$installed"
status=0
report="$(PYTHONPATH="$installed" "$ROOT/.venv/bin/lint-imports" --no-cache "$ROOT/pyproject.toml" 2>&1)" || status=$?
if [[ $status -ne 0 ]]; then
  echo "$report" | sed -n '/^Contracts$/,$p' >&2
  echo "lint: a layer contract is broken (pyproject.toml [tool.importlinter]; layers in README.md)" >&2
  exit "$status"
fi
