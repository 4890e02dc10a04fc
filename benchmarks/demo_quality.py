"""Does the demo's alignment hold? The demo pipeline N times with different seeds, judged under its gold preference.

Each run is `align pipeline --config configs/pipeline-demo.yaml seed=S` (every step re-runs: the seed is part of each
step's config), in its own process, on this machine. Per run and over all runs (mean and range) it prints:

  - PPO's and DPO's win rate against SFT under the gold (VADER sentiment: the simulated annotator's preference, never
    trained on) with its 95% interval, and the length-controlled gold win rate;
  - the reward model's held-out accuracy on gold-ranked pairs (prompts it never saw);
  - the alignment tax on the benchmark of the demo's eval step (200 PIQA questions; points, paired-bootstrap CI);
  - wall time of the whole `align pipeline` process and of each step.

The targets (issue 16) are printed next to each number as PASS / MISS. Writes benchmarks/results/demo_quality.json.

    python benchmarks/demo_quality.py                 # seeds 1 2 3, about 3 x 12 minutes on an idle 2-core CPU
    python benchmarks/demo_quality.py --seeds 4 5     # other seeds
    python benchmarks/demo_quality.py --collect 1 2 3 # only read the finished runs of these seeds (no training)
    python benchmarks/demo_quality.py --rounds 2       # two labeling rounds per seed (issue 19): round 2 ranks
                                                      # round 1's PPO policy; a second table compares the rounds

Runs that finished before are skipped by the pipeline itself, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/pipeline-demo.yaml"
TARGETS = {"gold_win_rate": 0.60, "lc_gold_win_rate": 0.50, "reward_accuracy": 0.75, "tax_points": 1.0,
           "minutes": 12.0}


def run_pipeline(seed: int, python: Path, rounds: int = 1) -> dict:
    """One pipeline run; returns what its last-run summary says (refs, how each step ran, seconds)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS=os.environ.get("COLUMNS", "120"))
    env.setdefault("ALIGN_HOME", str(ROOT / ".align"))
    env.setdefault("ALIGN_ARGILLA_VENV", str(ROOT / ".venv" / "argilla-server"))
    subprocess.run([str(python), "scripts/demo_data.py"], cwd=ROOT, env=env, check=True)
    log = ROOT / "benchmarks" / "results" / f"demo_quality-{_run_name(seed, rounds)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as handle:
        code = subprocess.run([str(python), "-m", "align", "pipeline", "--config", CONFIG, f"seed={seed}",
                               f"rounds={rounds}"],
                              cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"demo_quality: seed {seed}: the pipeline failed (exit {code}); see {log}")
    summary = json.loads((ROOT / "runs" / "pipeline" / "demo" / "last-run.json").read_text())
    summary["wall_s"] = time.monotonic() - started
    return summary


def measure(summary: dict) -> dict:
    """The numbers of one run, from its registry artifacts' folders."""
    from align.registry import Registry

    registry = Registry()
    steps = summary["steps"]
    evaluation = registry.resolve(steps["eval"]["ref"])
    results = json.loads((Path(evaluation.path) / "results.json").read_text())
    reward = registry.resolve(steps["reward"]["ref"])
    skipped = [name for name, s in steps.items() if s["how"].startswith("skipped")]
    row = {"seed": summary.get("seed"), "minutes": summary["wall_s"] / 60, "skipped_steps": skipped,
           "step_minutes": {name: s["seconds"] / 60 for name, s in steps.items()},
           "reward_accuracy": reward.metrics.get("eval_accuracy"), "reward_pairs": reward.metrics.get("eval_pairs"),
           "prompts": results["prompts"]}
    for stage in ("ppo", "dpo"):
        entry = results["models"][steps[stage]["ref"]]
        gold = entry["gold_win_rate"]
        tax = next(iter(entry.get("tax", {}).values()), None)
        row[stage] = {"gold_win_rate": gold["win_rate"], "lc_gold_win_rate": gold["length_controlled"],
                      "judge_win_rate": entry.get("win_rate", {}).get("win_rate"),
                      "tax": tax["acc"] if tax else None, "gold_score": entry.get("gold_score")}
    row["sft_gold_score"] = results["models"][results["baseline"]].get("gold_score")
    for number in range(2, summary.get("rounds", 1) + 1):  # later rounds: their policies in the same eval
        tag = f" (round {number})"
        row[f"round{number}"] = {stage: results["models"][steps[stage + tag]["ref"]]["gold_win_rate"]["win_rate"]
                                 for stage in ("ppo", "dpo")}
        row[f"round{number}"]["reward_accuracy"] = \
            registry.resolve(steps["reward" + tag]["ref"]).metrics.get("eval_accuracy")
    # Read either key: runs written before the eval's `reward_models` section took people's held-out accuracy too.
    measured = results.get("reward_models") or results.get("reward_models_vs_gold", {})
    row["reward_vs_gold"] = [m["gold"]["accuracy"] if "gold" in m else m["accuracy"] for m in measured.values()
                             if "gold" in m or "accuracy" in m]
    return row


def _run_name(seed: int, rounds: int) -> str:
    return f"seed{seed}" if rounds == 1 else f"rounds{rounds}-seed{seed}"


def rounds_table(rows: list[dict], rounds: int) -> str:
    """Round 1 against the last round, per seed: each round's policies' gold win rate against SFT (the same eval,
    the same 100 prompts), the reward model's held-out accuracy in its training and its agreement with the gold on
    the eval's gold-ranked pairs."""
    last = f"round{rounds}"
    lines = [f"| seed | PPO gold win rate, round 1 -> {rounds} | DPO gold win rate, round 1 -> {rounds} | reward "
             f"model held-out accuracy, round 1 -> {rounds} | reward models vs gold on the eval's pairs |",
             "|" + " --- |" * 5]
    for row in rows:
        lines.append(f"| {row['seed']} | {_pct(row['ppo']['gold_win_rate'])} -> {_pct(row[last]['ppo'])} | "
                     f"{_pct(row['dpo']['gold_win_rate'])} -> {_pct(row[last]['dpo'])} | "
                     f"{_fmt(row['reward_accuracy'])} -> {_fmt(row[last]['reward_accuracy'])} | "
                     f"{' -> '.join(_pct(a) for a in row['reward_vs_gold']) or '-'} |")
    lifts = {stage: [100 * (r[last][stage]["estimate"] - r[stage]["gold_win_rate"]["estimate"]) for r in rows]
             for stage in ("ppo", "dpo")}
    lines += [""] + [f"- {stage.upper()} gold win rate, round {rounds} minus round 1 (points): mean "
                     f"{sum(v) / len(v):+.1f} [{min(v):+.1f}, {max(v):+.1f}]" for stage, v in lifts.items()]
    return "\n".join(lines)


def verdicts(row: dict) -> list[str]:
    misses = []
    for stage in ("ppo", "dpo"):
        gold = row[stage]["gold_win_rate"]
        if gold["estimate"] < TARGETS["gold_win_rate"] or gold["low"] <= 0.5:
            misses.append(f"{stage} gold win rate")
        if row[stage]["lc_gold_win_rate"] <= TARGETS["lc_gold_win_rate"]:
            misses.append(f"{stage} LC gold win rate")
        tax = row[stage]["tax"]
        if tax is not None and 100 * tax["estimate"] > TARGETS["tax_points"]:
            misses.append(f"{stage} tax")
    if row["reward_accuracy"] is None or row["reward_accuracy"] < TARGETS["reward_accuracy"]:
        misses.append("reward accuracy")
    if "round2" in row:
        pass  # the time target is the one-round demo's
    elif row["minutes"] > TARGETS["minutes"] or row["skipped_steps"]:
        misses.append("time" if not row["skipped_steps"] else "time not measured (steps skipped: run again with a "
                                                                "new seed)")
    return misses


def table(rows: list[dict]) -> str:
    def pts(i):
        return "-" if i is None else f"{100 * i['estimate']:+.1f} [{100 * i['low']:+.1f}, {100 * i['high']:+.1f}]"

    lines = ["| seed | PPO gold win rate | PPO LC | DPO gold win rate | DPO LC | RM held-out accuracy | PPO tax "
             "| DPO tax | minutes (sft/label/reward/ppo/dpo/eval) | misses |", "|" + " --- |" * 10]
    for row in rows:
        steps = "/".join(f"{row['step_minutes'].get(s, 0):.1f}" for s in ("sft", "label", "reward", "ppo", "dpo",
                                                                           "eval"))
        lines.append(f"| {row['seed']} | {_pct(row['ppo']['gold_win_rate'])} | "
                     f"{100 * row['ppo']['lc_gold_win_rate']:.1f}% | {_pct(row['dpo']['gold_win_rate'])} | "
                     f"{100 * row['dpo']['lc_gold_win_rate']:.1f}% | {_fmt(row['reward_accuracy'])} | "
                     f"{pts(row['ppo']['tax'])} | {pts(row['dpo']['tax'])} | {row['minutes']:.1f} ({steps}) | "
                     f"{', '.join(verdicts(row)) or 'none: PASS'} |")

    def spread(values):
        values = [v for v in values if v is not None]
        return f"{sum(values) / len(values):.3f} [{min(values):.3f}, {max(values):.3f}]" if values else "-"

    lines += ["", "mean [min, max] over the runs:"]
    for label, get in (("PPO gold win rate", lambda r: r["ppo"]["gold_win_rate"]["estimate"]),
                       ("PPO LC gold win rate", lambda r: r["ppo"]["lc_gold_win_rate"]),
                       ("DPO gold win rate", lambda r: r["dpo"]["gold_win_rate"]["estimate"]),
                       ("DPO LC gold win rate", lambda r: r["dpo"]["lc_gold_win_rate"]),
                       ("reward model held-out accuracy", lambda r: r["reward_accuracy"]),
                       ("PPO tax (points)", lambda r: r["ppo"]["tax"] and 100 * r["ppo"]["tax"]["estimate"]),
                       ("DPO tax (points)", lambda r: r["dpo"]["tax"] and 100 * r["dpo"]["tax"]["estimate"]),
                       ("minutes (pipeline)", lambda r: r["minutes"])):
        lines.append(f"- {label}: {spread([get(r) for r in rows])}")
    return "\n".join(lines)


def _pct(interval: dict) -> str:
    return f"{100 * interval['estimate']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--collect", type=int, nargs="+", help="only read the finished runs of these seeds")
    parser.add_argument("--rounds", type=int, default=1, help="labeling rounds per run (2: the rounds compared)")
    parser.add_argument("--out", help="default benchmarks/results/demo_quality[-rounds2].json")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "benchmarks" / "results" /
                               f"demo_quality{'' if args.rounds == 1 else f'-rounds{args.rounds}'}.json")
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("ALIGN_HOME", str(ROOT / ".align"))
    python = ROOT / ".venv" / "bin" / "python"
    rows = []
    for seed in args.collect or args.seeds:
        kept = ROOT / "runs" / "pipeline" / "demo" / f"run-{_run_name(seed, args.rounds)}.json"
        if args.collect:
            summary = json.loads(kept.read_text())
        else:
            summary = run_pipeline(seed, python, args.rounds)
            kept.write_text(json.dumps(summary, indent=2))
        rows.append(measure(summary))
        print(f"seed {seed}: PPO gold {rows[-1]['ppo']['gold_win_rate']['estimate']:.3f}, DPO gold "
              f"{rows[-1]['dpo']['gold_win_rate']['estimate']:.3f}, {rows[-1]['minutes']:.1f} min", flush=True)
    print(table(rows))
    if args.rounds > 1:
        print("\n" + rounds_table(rows, args.rounds))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"targets": TARGETS, "runs": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
