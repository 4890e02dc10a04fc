"""How long `align` takes to answer: help, the registry, and a one-key config typo in each stage.

Users iterate on configs; a typo should be reported in seconds, not after torch, transformers and TRL have imported.
Each command runs in a fresh process (cwd: the repository, an empty ALIGN_HOME, offline), the commands interleaved
round by round so that a burst of other load hits all of them; the median round of each is reported, beside two
baselines timed in the same run: `python -c pass` (the interpreter alone) and `python -c "import torch"`.

    python benchmarks/cli_latency.py             # 5 rounds, ~1 min on 2 idle CPU cores
    python benchmarks/cli_latency.py --quick     # 1 round: a smoke run (CI), no timing targets checked

Targets: every typo reported in <= 2 s; `--help` and `registry list` stay under 1 s. Each typo command must also end
as align's product rule says (exit code 2, one `error:` line naming the key); otherwise the script exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIGN = [sys.executable, "-m", "align"]
TYPO_TARGET_S = 2.0
FAST_TARGET_S = 1.0


# name -> (command, expected exit code, text its one error line must contain, or None when it succeeds)
COMMANDS: dict[str, tuple[list[str], int, str | None]] = {
    "python -c pass": ([sys.executable, "-c", "pass"], 0, None),
    "import torch": ([sys.executable, "-c", "import torch"], 0, None),
    "align --help": ([*ALIGN, "--help"], 0, None),
    "align registry list": ([*ALIGN, "registry", "list"], 0, None),
    "typo: sft": ([*ALIGN, "sft", "--config", "configs/sft-smollm2-lora.yaml", "lora.rank=8"], 2,
                  "lora.rank: unknown key"),
    "typo: reward": ([*ALIGN, "reward", "--config", "configs/reward.yaml", "lora.rank=8"], 2,
                     "lora.rank: unknown key"),
    "typo: ppo": ([*ALIGN, "ppo", "--config", "configs/ppo.yaml", "lora.rank=8"], 2, "lora.rank: unknown key"),
    "typo: dpo": ([*ALIGN, "dpo", "--config", "configs/dpo.yaml", "training.lr=1e-5"], 2,
                  "training.lr: unknown key for DPOConfig"),
    "typo: eval compare": ([*ALIGN, "eval", "compare", "--config", "configs/eval.yaml", "prompts.max_example=5"], 2,
                           "prompts.max_example: unknown key"),
    # In the config of the pipeline's LAST step: reported before the first step runs.
    "typo: pipeline": ([*ALIGN, "pipeline", "--config", "configs/pipeline-demo.yaml",
                        "eval.overrides=[prompts.max_example=5]"], 2,
                       "pipeline step 'eval': override 'prompts.max_example=5': prompts.max_example: unknown key"),
}
BASELINES = ("python -c pass", "import torch")


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return time.perf_counter() - started, proc


def problem(name: str, proc: subprocess.CompletedProcess) -> str | None:
    """How the command's outcome breaks what is expected of it, or None."""
    _, code, expected = COMMANDS[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != code:
        return f"exit code {proc.returncode}, expected {code}: {proc.stderr.strip()[-500:]}"
    if expected is not None and (len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0]):
        return f"expected one 'error: ...{expected}...' line on stderr, got {lines}"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, every command once each (median shown)")
    parser.add_argument("--quick", action="store_true", help="1 round; a smoke run: no timing targets checked")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_latency.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1

    with tempfile.TemporaryDirectory() as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "ALIGN_"))}
        env.update(ALIGN_HOME=home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        timings: dict[str, list[float]] = {name: [] for name in COMMANDS}
        problems: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, (command, _, _) in COMMANDS.items():
                seconds, proc = run_once(command, env)
                timings[name].append(seconds)
                if problem(name, proc):
                    problems[name] = problem(name, proc)
    load = os.getloadavg()

    results = {}
    python_s, torch_s = (statistics.median(timings[b]) for b in BASELINES)
    for name, seconds_list in timings.items():
        seconds = statistics.median(seconds_list)
        target = None if name in BASELINES else TYPO_TARGET_S if name.startswith("typo") else FAST_TARGET_S
        results[name] = {"median_s": round(seconds, 3), "rounds_s": [round(t, 3) for t in seconds_list],
                         "vs_python": round(seconds / python_s, 2), "vs_import_torch": round(seconds / torch_s, 2),
                         "target_s": target, "met": None if target is None else seconds <= target}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"align CLI latency: median of {args.rounds} round(s); load average {load[0]:.2f} "
                        f"{load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} CPUs)")
    for column in ("command", "median s", "min s", "max s", "x python -c pass", "x import torch", "target"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, r in results.items():
        verdict = "" if r["target_s"] is None else f"<= {r['target_s']:g} s " + (
            "(not checked)" if args.quick else "PASS" if r["met"] else "MISS")
        table.add_row(name, f"{r['median_s']:.2f}", f"{min(r['rounds_s']):.2f}", f"{max(r['rounds_s']):.2f}",
                      f"{r['vs_python']:.1f}x", f"{r['vs_import_torch']:.2f}x", verdict)
    Console(width=120).print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "load_average": load, "cpus": os.cpu_count(),
                               "results": results, "problems": problems}, indent=2) + "\n")
    for name, text in problems.items():
        print(f"{name}: {text}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
