"""Kill align at random moments and check that nothing is lost or half-done.

    .venv/bin/python scripts/chaos.py --kills 20            # the long run (README: "Interruptions")
    .venv/bin/python scripts/chaos.py --kills 3 --stages sft,dpo   # what CI runs (tests/test_faults.py)

In a scratch folder with tiny models (tests/tiny_models.py), each stage first runs once uninterrupted: its time and
final metrics are the reference. Then, per kill: a random stage starts under a new output name and gets SIGKILL
after a random share of its reference time (while loading, training, checkpointing, saving or registering). After
every kill, and after the recovery, the invariants are checked:

- the registry opens cleanly (`align registry list` exits 0);
- every registry row's path exists, and every finished-looking output (a folder or file without `.incomplete`,
  `.replaced` or `.tmp` in its name) has a row: 0 orphans either way.

Recovery is what a user does: `--resume` when a complete checkpoint survived, else the same command again. The
recovered run's final metrics must equal the reference's within `--tolerance` (relative; CPU runs resume
bit-for-bit in practice, the tolerance covers float summation order). For `label` (`align label push` to an
embedded Argilla server started here) the recovery is the same push again, and the dataset must hold every prompt
exactly once with its K completions. Exit code 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "reward", "dpo", "ppo", "eval", "label")
LABEL_K = 2
# Metrics that measure the machine, not the run.
TIMING_WORDS = ("runtime", "per_second", "_s", "seconds", "minutes", "time")


@dataclass
class Kill:
    number: int
    stage: str
    after_s: float
    share: float
    left: str = ""  # what the kill left: nothing, checkpoint, unfinished (no checkpoint), finished
    recovery: str = ""
    largest_difference: float = 0.0
    problems: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--earliest", type=float, default=0.05,
                        help="kill no earlier than this share of the stage's reference time (0.5: mostly in training, "
                             "checkpointing, saving and registering rather than while importing and loading)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="relative difference allowed in final metrics")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="align-chaos-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: working in {work}", flush=True)

    configs = _setup(work, stages)
    if "label" in stages:
        _align(work, ["label", "serve", "--port", str(_free_port())], check=True)
    try:
        return _kill_and_recover(work, stages, configs, args)
    finally:
        if "label" in stages:
            _align(work, ["label", "serve", "stop"])


def _kill_and_recover(work: Path, stages: list[str], configs: dict[str, Path], args) -> int:
    reference: dict[str, tuple[float, dict]] = {}
    for stage in stages:
        started = time.monotonic()
        _align(work, _command(stage, configs[stage], "ref"), check=True)
        reference[stage] = (time.monotonic() - started, _metrics(work, stage, "ref"))
        print(f"reference {stage}: {reference[stage][0]:.1f} s", flush=True)

    rng = random.Random(args.seed)
    kills = []
    for number in range(1, args.kills + 1):
        stage = rng.choice(stages)
        share = rng.uniform(args.earliest, 1.0)
        kill = Kill(number, stage, reference[stage][0] * share, share)
        name = f"kill{number}"
        process = subprocess.Popen(_argv(_command(stage, configs[stage], name)), cwd=work, env=_env(work),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            process.wait(timeout=kill.after_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        problems = _invariants(work)
        kill.left = _left(work, stage, name)
        if kill.left == "finished":
            kill.recovery = "none needed"
        else:
            resume = kill.left == "checkpoint"
            kill.recovery = "--resume" if resume else "re-run"
            result = _align(work, _command(stage, configs[stage], name) + (["--resume"] if resume else []))
            if result.returncode != 0:
                problems.append(f"recovery exited {result.returncode}: {_last_line(result.stderr)}")
            problems += _invariants(work)
        if stage == "label" and not any(p.startswith("recovery") for p in problems):
            problems += _label_problems(work, name)
        elif not any(p.startswith("recovery") for p in problems):
            kill.largest_difference, mismatch = _compare(reference[stage][1], _metrics(work, stage, name),
                                                         args.tolerance)
            problems += mismatch
        kill.problems = "; ".join(problems)
        kills.append(kill)
        print(f"kill {number:>2}: {stage:<6} at {kill.after_s:5.1f} s ({share:4.0%}) left {kill.left:<10} "
              f"-> {kill.recovery:<12} max rel. diff {kill.largest_difference:.1e} "
              f"{'OK' if not problems else 'FAILED: ' + kill.problems}", flush=True)

    _summary(kills, args.tolerance)
    return 1 if any(k.problems for k in kills) else 0


# --------------------------------------------------------------------------------------------------
# The scratch project: tiny models, data and one config per stage

def _setup(work: Path, stages: list[str]) -> dict[str, Path]:
    sys.path.insert(0, str(REPO))
    from tests import tiny_models

    model = tiny_models.build_tiny_llama(work / "tiny")
    rng = random.Random(0)
    words = "abcdef"
    sft_rows = [{"prompt": f"reverse: {' '.join(rng.choices(words, k=3))}",
                 "completion": " ".join(rng.choices(words, k=4))} for _ in range(64)]
    pairs = [{"prompt": f"say: {w}", "chosen": f"{w} {w}", "rejected": f"{w}"} for w in words * 6]
    prompts = [{"prompt": f"reverse: {' '.join(rng.choices(words, k=3))}"} for _ in range(16)]
    for name, rows in (("sft.jsonl", sft_rows), ("pairs.jsonl", pairs), ("prompts.jsonl", prompts)):
        tiny_models.write_jsonl(work / name, rows)
    # Long enough for kills to land in training, with a checkpoint every 5 steps to resume from.
    training = {"max_steps": 40, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 5,
                "save_strategy": "steps", "save_steps": 5, "eval_strategy": "steps", "eval_steps": 10,
                "max_length": 64, "disable_tqdm": True}
    configs = {
        "sft": {"model": {"path": model}, "data": {"path": "sft.jsonl", "val_set_size": 8},
                "lora": {"enabled": False}, "training": training},
        "reward": {"model": {"path": model}, "data": {"path": "pairs.jsonl", "val_set_size": 0.25},
                   "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "training": training},
        "dpo": {"model": {"path": model}, "data": {"path": "pairs.jsonl", "val_set_size": 0.25},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "training": training},
        "ppo": {"model": {"path": model}, "reward": {"path": "reward:1"}, "data": {"path": "prompts.jsonl"},
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "rollout": {"max_new_tokens": 8, "max_prompt_length": 32},
                "ppo": {"steps": 12, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-3,
                        "logging_steps": 1, "sample_steps": 0, "save_steps": 3}},
        "eval": {"models": ["sft:1"], "baseline": model, "prompts": {"path": "prompts.jsonl"},
                 "judge": {"path": "reward:1"}, "generation": {"max_new_tokens": 8}},
        "label": {"model": model},  # not a config file: the push command's --model
    }
    paths = {}
    for stage in stages:
        paths[stage] = work / f"{stage}.yaml"
        paths[stage].write_text(yaml.safe_dump(configs[stage], sort_keys=False))
    # ppo and eval score with reward:1 (and eval compares sft:1): made first, outside the kills.
    for stage in ("sft", "reward"):
        if {"ppo", "eval"} & set(stages) and not _rows(work, stage):
            config = work / f"{stage}-base.yaml"
            config.write_text(yaml.safe_dump({**configs[stage], "training": {**training, "save_strategy": "no",
                                                                             "eval_strategy": "no"}}))
            _align(work, [stage, "--config", str(config), "output.name=base"], check=True)
    return paths


def _command(stage: str, config: Path, name: str) -> list[str]:
    if stage == "label":
        model = yaml.safe_load(config.read_text())["model"]
        return ["label", "push", "--model", model, "--prompts", "prompts.jsonl", "--dataset", name, "--k",
                str(LABEL_K), "--max-new-tokens", "8", "--log-every", "2"]
    if stage == "eval":
        return ["eval", "compare", "--config", str(config), f"output.name={name}"]
    return [stage, "--config", str(config), f"output.name={name}"]


def _argv(command: list[str]) -> list[str]:
    return [sys.executable, "-m", "align", *command]


def _env(work: Path) -> dict:
    return {"ALIGN_ARGILLA_VENV": str(REPO / ".venv" / "argilla-server"), **os.environ,
            "ALIGN_HOME": str(work / ".align"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _align(work: Path, command: list[str], check: bool = False) -> subprocess.CompletedProcess:
    result = subprocess.run(_argv(command), cwd=work, env=_env(work), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise SystemExit(f"chaos: `align {' '.join(command)}` failed:\n{result.stderr[-3000:]}")
    return result


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[-1]


# --------------------------------------------------------------------------------------------------
# Checks

def _rows(work: Path, stage: str | None = None) -> list[dict]:
    db = work / ".align" / "registry.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        query = "SELECT * FROM artifacts" + (" WHERE stage = ?" if stage else "")
        return [dict(r) for r in conn.execute(query, (stage,) if stage else ())]


def _invariants(work: Path) -> list[str]:
    """The registry opens; 0 rows without their output; 0 finished-looking outputs without a row."""
    problems = []
    listing = _align(work, ["registry", "list"])
    if listing.returncode != 0:
        problems.append(f"`align registry list` exited {listing.returncode}: {_last_line(listing.stderr)}")
    # What the registry shows is settled (a killed publish is finished or forgotten) by the command above.
    rows = _rows(work)
    registered = {Path(r["path"]) for r in rows}
    problems += [f"row {r['stage']}:{r['version']} has no output at {r['path']}" for r in rows
                 if not Path(r["path"]).exists()]
    for output in (work / "runs").glob("*/*"):
        unfinished = any(mark in output.name for mark in (".incomplete", ".replaced", ".tmp", ".partial"))
        if not unfinished and output.resolve() not in registered:
            problems.append(f"{output.relative_to(work)} looks finished but has no registry row")
    return problems


def _left(work: Path, stage: str, name: str) -> str:
    if stage == "label":
        return "records" if _label_records(work, name) else "nothing"
    final = work / "runs" / stage / name
    if final.exists():
        return "finished"
    unfinished = final.with_name(name + ".incomplete")
    checkpoints = [c for c in (unfinished / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    return "checkpoint" if checkpoints else ("unfinished" if unfinished.exists() else "nothing")


def _label_records(work: Path, name: str) -> list[dict]:
    os.environ["ALIGN_HOME"] = str(work / ".align")  # this process reads the server that the pushes wrote to
    from align.labeling import argilla_api

    api = argilla_api.Api.connect()
    found = argilla_api.find_dataset(api, name, "align")
    return [] if found is None else argilla_api.records(api, found["id"], responses=False)


def _label_problems(work: Path, name: str) -> list[str]:
    """0 lost, 0 duplicates: every prompt once, each record with exactly K non-empty completions."""
    prompts = [json.loads(line)["prompt"] for line in (work / "prompts.jsonl").read_text().splitlines()]
    records = _label_records(work, name)
    logged = [r["fields"]["prompt"] for r in records]
    problems = []
    if sorted(logged) != sorted(prompts):
        problems.append(f"dataset {name}: {len(logged)} records for {len(prompts)} prompts "
                        f"({len(set(prompts) - set(logged))} lost, {len(logged) - len(set(logged))} duplicated)")
    for record in records:
        completions = [v for k, v in record["fields"].items() if k.startswith("completion_") and str(v).strip()]
        if len(completions) != LABEL_K:
            problems.append(f"dataset {name}: a record has {len(completions)} completions, not {LABEL_K}")
    return problems


def _metrics(work: Path, stage: str, name: str) -> dict:
    rows = [r for r in _rows(work, stage) if r["name"] == name]
    return json.loads(rows[-1]["metrics"]) if rows else {}


def _compare(reference: dict, got: dict, tolerance: float) -> tuple[float, list[str]]:
    if not got:
        return 0.0, ["no registry row after recovery"]
    largest, problems = 0.0, []
    for key, value in reference.items():
        if any(word in key for word in TIMING_WORDS) or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        other = got.get(key)
        if not isinstance(other, (int, float)):
            problems.append(f"{key}: missing after recovery")
            continue
        difference = abs(other - value) / max(abs(value), 1e-8)
        if math.isnan(value) and math.isnan(other):
            continue
        largest = max(largest, difference)
        if difference > tolerance:
            problems.append(f"{key}: {other:.6g} after recovery vs {value:.6g} uninterrupted")
    return largest, problems


def _summary(kills: list[Kill], tolerance: float) -> None:
    print(f"\n| # | stage | killed at | left | recovery | max rel. diff (tol {tolerance:g}) | result |")
    print("|---|---|---|---|---|---|---|")
    for k in kills:
        print(f"| {k.number} | {k.stage} | {k.after_s:.1f} s ({k.share:.0%}) | {k.left} | {k.recovery} | "
              f"{k.largest_difference:.1e} | {'OK' if not k.problems else k.problems} |")
    failed = sum(bool(k.problems) for k in kills)
    print(f"\n{len(kills)} kills: {len(kills) - failed} OK, {failed} failed")


if __name__ == "__main__":
    sys.exit(main())
