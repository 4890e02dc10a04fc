"""PPO throughput and memory: `align ppo` vs TRL 1.12's experimental `PPOTrainer`, same model, data and settings.

    python benchmarks/ppo_vs_trl.py               # default run: 16 prompts x 8 iterations = 128 episodes per side
    python benchmarks/ppo_vs_trl.py --quick       # smoke run: 16 x 3 = 48 episodes per side
    python benchmarks/ppo_vs_trl.py --repeats 3   # 3 interleaved runs per side; each side's best run is shown
    python benchmarks/ppo_vs_trl.py --layers 4 --hidden 256   # 3.4M parameters: import floor and overhead dominate

What is compared (everything else is identical: the policy's weights, the prompts and their token ids, the reward
model, LoRA r/alpha/targets on the policy, rollout batch, minibatch, PPO epochs, response length, sampling
temperature, learning rate and schedule, KL / clip / value / GAE coefficients, missing-EOS penalty, seed, float32,
OMP threads):

  align  `python -m align ppo --config <generated yaml>` (stages/ppo/), at align's defaults: the policy is the SFT
         folder with a LoRA adapter, the reward model is the LoRA + score-head adapter that `align reward` saved on
         that same base, so `reward.share_base: auto` scores with the policy's own base weights; the value function
         starts as that reward model and trains its top quarter of layers (`ppo.value_layers`). Episodes and
         PPO-loop time come from align's registry row (`episodes`, `train_runtime_s`; `training_log.jsonl` as a
         fallback).
  trl    (**baseline**) TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` (TRL deleted it in 1.13), run by
         benchmarks/ppo_trl112_runner.py in a separate virtual environment that this script builds once
         (benchmarks/results/trl112-venv; torch 2.13.0 CPU pinned first, then trl==1.12.0 beside transformers
         5.23.0, peft 0.21.2, accelerate 1.15.0, datasets 5.2.0). Set up as TRL's own example script does: LoRA via
         `peft_config`, `ref_model=None` (reference = adapter disabled), reward model = align's reward adapter merged
         into a plain sequence-classification model (`align reward` with `output.merge: true` writes it), value
         model = a second full copy of it, trained in full. Its time is measured around `trainer.train()` only.

Both sides train on the same number of responses (episodes). Episodes/s = episodes / the PPO loop's time (sampling,
scoring, advantages and updates; imports, model loading and saving are outside it and show in `wall s`). Each side
runs in its own fresh process; its peak RSS and CPU seconds are that process's own rusage (`os.wait4`). The parent
imports nothing heavy, so no child inherits a large resident size.

Setup (built into benchmarks/results/ppo_vs_trl/, removed afterwards unless --keep or a side fails): a Llama built
from config (8 layers x 512, 25.8M parameters, float32) with the test suite's tokenizer = the SFT policy; 128 short
synthetic prompts; a reward model made by the real `align reward` (a few steps on synthetic preference pairs, LoRA +
score head, normalization off so both sides see the same raw scores, `output.merge: true` for TRL's plain copy).

Targets: align / trl >= 1.5x episodes/s, align / trl <= 0.6x peak RSS. Results: benchmarks/results/ppo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ppo_vs_trl.json"
WORK = ROOT / "benchmarks" / "results" / "ppo_vs_trl"
RUNNER = ROOT / "benchmarks" / "ppo_trl112_runner.py"

# ------------------------------------------------------------------------------------------------
# The baseline's own environment: TRL 1.12 (the last release with PPOTrainer), never installed into align's venv.

TRL_VENV = ROOT / "benchmarks" / "results" / "trl112-venv"
TORCH_SPEC = "torch==2.13.0"  # pinned first: an unpinned torch would pull a multi-GB CUDA build
TRL_SPECS = ("trl==1.12.0", "transformers==5.23.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0")
STAMP_NAME = ".ppo-vs-trl-stamp"

# ------------------------------------------------------------------------------------------------
# The fixed setup shared by both sides

SEED = 42
# 8 layers x 512 (25.8M parameters): small enough for a few minutes on 2 CPU cores, large enough that weights,
# optimizer states and activations, not the ~420 MiB both sides spend on imports, decide the peak RSS, and that
# matrix products, not Python, decide the time (at 4 x 256 both sides are mostly import floor and overhead).
MODEL_CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                    num_key_value_heads=8, max_position_embeddings=512)
PROMPTS = 128
# Hyper-parameters both sides get. batch_size = prompts per iteration (one response each); mini_batch_size = responses
# per optimizer step; forward_batch_size = responses per no-grad forward pass while scoring rollouts.
HYPER = dict(
    steps=8,
    batch_size=16,
    mini_batch_size=8,
    ppo_epochs=4,
    forward_batch_size=16,
    max_new_tokens=32,
    temperature=1.0,
    missing_eos_penalty=1.0,
    learning_rate=1e-4,
    lr_scheduler_type="linear",
    kl_coef=0.05,
    cliprange=0.2,
    cliprange_value=0.2,
    vf_coef=0.1,
    gamma=1.0,
    lam=0.95,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,  # TRL's PPOTrainer disables every dropout module, the LoRA ones included
    lora_target_modules="all-linear",
    seed=SEED,
)
QUICK_STEPS = 3

VARIANTS = ("align", "trl")
# What each side imports (the top-level packages its run ends up importing: `align ppo` loads no trl, datasets or
# pandas; TRL's trainer no matplotlib), measured in a process of its own: peak RSS minus this floor is what the models,
# optimizer states and activations cost. With the default 3.4M-parameter model (13 MiB of float32 weights) the floor
# is most of each side's peak RSS.
FLOOR_IMPORTS = {
    "align": "import torch, transformers, peft, accelerate, matplotlib.pyplot, align.stages.ppo.stage; "
             "from transformers import LlamaForCausalLM, LlamaForSequenceClassification, GenerationConfig; "
             "from peft import PeftModel, get_peft_model",
    "trl": "import torch, transformers, peft, datasets, accelerate; "
           "from trl.experimental.ppo import PPOConfig, PPOTrainer; "
           "from transformers import LlamaForCausalLM, LlamaForSequenceClassification, GenerationConfig; "
           "from peft import PeftModel, get_peft_model",
}
TARGETS = {"episodes_per_s": 1.5, "peak_rss": 0.6}  # align / trl: at least 1.5x the rate, at most 0.6x the memory

# ------------------------------------------------------------------------------------------------
# Synthetic prompts and preference pairs (deterministic)

SUBJECTS = ("the river", "a small town", "the old bridge", "my garden", "the night sky", "a busy market", "the sea",
            "winter mornings", "the library", "a mountain road", "the kitchen", "an empty station", "the forest",
            "a city park", "the harbour", "rainy days")
ASKS = ("Write a short note about {s}.", "Describe {s} in two sentences.", "What do you like about {s}?",
        "Tell me a fact about {s}.", "Give one tip for visiting {s}.", "Why do people remember {s}?",
        "Write a line of a poem about {s} and {t}.", "Compare {s} with {t}.")
GOOD = ("It is calm and bright, and people walk there every day.", "The light is soft and the air is clean.",
        "Many people come to see it, and they always return.", "It is quiet in the morning and busy at noon.")
BAD = ("no", "I do not know.", "whatever", "It is.")


def make_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        s, t = rng.sample(SUBJECTS, 2)
        prompts.append(rng.choice(ASKS).format(s=s, t=t))
    return prompts


def make_preferences(n: int, seed: int = 99) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": prompt, "chosen": rng.choice(GOOD), "rejected": rng.choice(BAD)}
            for prompt in make_prompts(n, seed)]


# ------------------------------------------------------------------------------------------------
# Children (align's venv): `--child build` before `align reward`, `--child prepare` after it

def model_config(layers: int, hidden: int) -> dict:
    """MODEL_CONFIG scaled: `hidden` wide (heads of 64), `layers` deep, MLP 2.6875x as wide (1376 for 512)."""
    return dict(MODEL_CONFIG, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 8 * 8,
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 64))


def child_build(work: Path, shape: dict) -> None:
    """The SFT policy (tokenizer + Llama from config), the prompts and the reward model's preference pairs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import build_tokenizer, write_jsonl

    policy = work / "policy"
    tokenizer = build_tokenizer(policy)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(policy)
    (work / "prompts.txt").write_text("".join(p + "\n" for p in make_prompts(PROMPTS)), encoding="utf-8")
    write_jsonl(work / "preferences.jsonl", make_preferences(64))
    write_result(work, "build", {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)})


def child_prepare(work: Path) -> None:
    """The prompts as token ids for TRL, rendered exactly as align renders prompts for sampling (the policy's chat
    template with the assistant turn opened); the generated align config checked against align's schema."""
    from transformers import AutoTokenizer

    from align.config import TemplateConfig, load_config
    from align.generation import render_prompts
    from align.stages.ppo.config import PPORunConfig

    load_config(work / "align-ppo.yaml", [], PPORunConfig)  # a schema error shows here, not after TRL's run
    tokenizer = AutoTokenizer.from_pretrained(work / "policy")
    prompts = [line for line in (work / "prompts.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = render_prompts(tokenizer, prompts, TemplateConfig())
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    (work / "prompt_ids.json").write_text(json.dumps(ids))
    lengths = sorted(len(x) for x in ids)
    merged = work / "reward" / "merged"
    if not (merged / "config.json").is_file():
        raise SystemExit(f"align reward wrote no merged copy at {merged} (output.merge: true)")
    adapter = json.loads((work / "reward" / "adapter_config.json").read_text())
    write_result(work, "prepare", {
        "prompts": len(ids), "prompt_tokens_min": lengths[0], "prompt_tokens_median": lengths[len(lengths) // 2],
        "prompt_tokens_max": lengths[-1], "reward_adapter_base": adapter.get("base_model_name_or_path"),
        "reward_adapter_task": adapter.get("task_type"), "example_prompt": texts[0],
    })


def write_result(work: Path, name: str, data: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------
# The parent

def run_process(command: list[str], env: dict, log: Path, cwd: Path) -> tuple[float, float, float]:
    """Run `command`; return wall seconds, CPU seconds (user + system) and peak RSS in MiB of that process."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{' '.join(map(str, command))} failed (exit {process.returncode}); log {log}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_stamp() -> str:
    text = "\n".join([TORCH_SPEC, *TRL_SPECS, platform.python_version(), RUNNER.name])
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_trl_venv(venv: Path, say, reinstall: bool = False) -> Path:
    """The TRL 1.12 environment: built once, reused while its stamp matches (delete the folder to rebuild)."""
    python = venv_python(venv)
    stamp = venv / STAMP_NAME
    if not reinstall and python.exists() and stamp.is_file() and stamp.read_text().strip() == venv_stamp():
        return python
    say(f"building the TRL 1.12 environment in {venv} (once; ~1 min): {TORCH_SPEC}, {', '.join(TRL_SPECS)}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)

    def pip(*args: str) -> None:
        done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                              capture_output=True, text=True)
        if done.returncode != 0:
            noise = "is ignored: it is neither a file nor a directory"
            output = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if noise not in line)
            raise SystemExit(f"pip install {' '.join(args)} failed in {venv}:\n{output[-4000:]}")

    pip(TORCH_SPEC)  # torch first, alone: the local CPU build
    installed = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={installed}\n")  # no later requirement may swap in another torch build
    pip("-c", str(constraints), f"torch=={installed}", *TRL_SPECS)
    stamp.write_text(venv_stamp() + "\n")
    return python


def yaml_dump(data: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def reward_config(work: Path) -> Path:
    """`align reward`: LoRA + score head on the policy, a few steps; merged copy for TRL; raw (unnormalized) scores."""
    return yaml_dump({
        "model": {"path": str(work / "policy"), "dtype": "float32"},
        "data": {"path": str(work / "preferences.jsonl"), "val_set_size": 0, "min_pairs": 8},
        "lora": {"r": HYPER["lora_r"], "alpha": HYPER["lora_alpha"], "dropout": 0.0,
                 "target_modules": HYPER["lora_target_modules"]},
        "normalization": {"enabled": False},
        "training": {"num_train_epochs": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                     "max_length": 256, "logging_steps": 4, "save_strategy": "no", "eval_strategy": "no",
                     "disable_tqdm": True, "report_to": "none"},
        "output": {"dir": str(work / "reward"), "name": "bench-reward", "merge": True, "overwrite": True},
        "seed": SEED,
    }, work / "align-reward.yaml")


def align_config(work: Path, hyper: dict) -> Path:
    """The YAML `align ppo` runs: the same policy, prompts, reward model and hyper-parameters as TRL gets."""
    return yaml_dump({
        "model": {"path": str(work / "policy"), "dtype": "float32"},
        "reward": {"path": str(work / "reward"), "share_base": "auto", "batch_size": hyper["forward_batch_size"]},
        "data": {"path": str(work / "prompts.txt")},
        "lora": {"enabled": True, "r": hyper["lora_r"], "alpha": hyper["lora_alpha"],
                 "dropout": hyper["lora_dropout"], "target_modules": hyper["lora_target_modules"]},
        "rollout": {"max_new_tokens": hyper["max_new_tokens"], "forward_batch_size": hyper["forward_batch_size"],
                    "temperature": hyper["temperature"], "top_k": 0,
                    "top_p": 1.0, "missing_eos_penalty": hyper["missing_eos_penalty"]},
        "ppo": {
            "steps": hyper["steps"], "batch_size": hyper["batch_size"], "mini_batch_size": hyper["mini_batch_size"],
            "ppo_epochs": hyper["ppo_epochs"], "learning_rate": hyper["learning_rate"],
            "lr_scheduler_type": hyper["lr_scheduler_type"], "warmup_steps": 0, "weight_decay": 0.0,
            "max_grad_norm": 0.0,  # TRL 1.12's PPO loop clips no gradients
            "gamma": hyper["gamma"], "lam": hyper["lam"], "cliprange": hyper["cliprange"],
            "cliprange_value": hyper["cliprange_value"], "vf_coef": hyper["vf_coef"], "kl_coef": hyper["kl_coef"],
            "adaptive_kl": False, "whiten_rewards": False, "logging_steps": 1, "sample_steps": 0,
            "save_steps": hyper["steps"] + 1000,  # no checkpoint inside the timed loop
        },
        "output": {"dir": str(work / "runs" / "align"), "name": "bench-ppo", "overwrite": True},
        "seed": hyper["seed"],
    }, work / "align-ppo.yaml")


def trl_settings(work: Path, hyper: dict, threads: int) -> Path:
    path = work / "trl-settings.json"
    path.write_text(json.dumps({
        "policy": str(work / "policy"), "reward": str(work / "reward" / "merged"),
        "prompts": str(work / "prompt_ids.json"), "output_dir": str(work / "runs" / "trl"),
        "threads": threads, "hyper": hyper,
    }, indent=1))
    return path


def align_metrics(work: Path, hyper: dict) -> dict:
    """What `align ppo` recorded: the registry row's metrics (`episodes`, `train_runtime_s` = the PPO loop's time,
    `iterations`), falling back to the run folder's training_log.jsonl for anything missing."""
    from align.registry import Registry

    rows = Registry(work / ".align").list(stage="ppo")
    if not rows:
        raise RuntimeError(f"align ppo registered no row in {work / '.align'}")
    row = rows[0]
    metrics = dict(row.metrics or {})
    log = Path(row.path) / "training_log.jsonl"
    history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if "train_runtime_s" not in metrics:
        for entry in reversed(history):
            for key in ("train_runtime_s", "train_runtime"):
                if key in entry:
                    metrics["train_runtime_s"] = entry[key]
                    break
            if "train_runtime_s" in metrics:
                break
    if "train_runtime_s" not in metrics:
        raise RuntimeError(f"align ppo's registry row {row.ref} has no `train_runtime_s` (the PPO loop's time) and "
                           f"{log} has no train_runtime: cannot compute episodes/s. Metrics: {sorted(metrics)}")
    steps = metrics.get("iterations") or metrics.get("steps") or \
        (max((e.get("step", 0) for e in history), default=0) or None)
    episodes = metrics.get("episodes")
    if episodes is None:
        episodes = (steps or hyper["steps"]) * hyper["batch_size"]
        metrics["episodes_note"] = "not in the registry row: iterations x batch_size"
    return {"episodes": int(episodes), "updates": steps, "train_runtime_s": float(metrics["train_runtime_s"]),
            "registry_ref": row.ref, "registry_metrics": {k: v for k, v in metrics.items()
                                                          if isinstance(v, (int, float, str, bool))}}


def measure(variant: str, work: Path, env: dict, run: int, hyper: dict, trl_python: Path | None) -> dict:
    """One run of one side in a fresh process: episodes, PPO-loop time, wall time, CPU time and peak RSS."""
    log = work / f"{variant}-{run}.log"
    if variant == "align":
        shutil.rmtree(work / ".align", ignore_errors=True)  # one ppo row per run: the one just made
        command = [sys.executable, "-m", "align", "ppo", "--config", str(work / "align-ppo.yaml")]
        wall, cpu, rss = run_process(command, {**env, "ALIGN_HOME": str(work / ".align")}, log, work)
        result = align_metrics(work, hyper)
    else:
        out = work / f"trl-{run}.json"
        command = [str(trl_python), str(RUNNER), str(work / "trl-settings.json"), str(out)]
        trl_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        wall, cpu, rss = run_process(command, trl_env, log, work)
        full = json.loads(out.read_text())
        result = {k: full[k] for k in ("episodes", "updates", "train_runtime_s", "load_s", "trainable_parameters",
                                       "eos_tokens_total", "score_mean_last", "kl_last", "versions")}
    result.update(wall_s=round(wall, 1), cpu_s=round(cpu, 1), peak_rss_mib=round(rss),
                  episodes_per_s=round(result["episodes"] / result["train_runtime_s"], 3))
    return result


def measure_floor(variant: str, work: Path, env: dict, trl_python: Path | None) -> int:
    """Peak RSS (MiB) of a process that only imports what `variant` imports: the part of its peak that no PPO
    implementation can save."""
    python = sys.executable if variant == "align" else str(trl_python)
    side_env = env if variant == "align" else {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _, _, rss = run_process([python, "-c", FLOOR_IMPORTS[variant]], side_env, work / f"floor-{variant}.log", work)
    return round(rss)


def summarize(runs: list[dict]) -> dict:
    """The best run (highest episodes/s: outside load only slows a run down), the spread, the highest peak RSS."""
    best = dict(max(runs, key=lambda r: r["episodes_per_s"]))
    rates = [r["episodes_per_s"] for r in runs]
    best.update(episodes_per_s_min=min(rates), episodes_per_s_max=max(rates),
                peak_rss_mib=max(r["peak_rss_mib"] for r in runs), runs=runs)
    return best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({cpu}), {platform.system()} {platform.release()}"


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_STEPS} PPO iterations per side")
    parser.add_argument("--steps", type=int, help=f"PPO iterations per side (default {HYPER['steps']})")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per side, interleaved; the table shows each side's best run (default 1)")
    parser.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"],
                        help=f"policy layers (default {MODEL_CONFIG['num_hidden_layers']})")
    parser.add_argument("--hidden", type=int, default=MODEL_CONFIG["hidden_size"],
                        help=f"policy width, a multiple of 64 (default {MODEL_CONFIG['hidden_size']}); a larger model "
                             f"makes weights and optimizer states, not the import floor, dominate the peak RSS")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch threads for both sides")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="run only these sides")
    parser.add_argument("--trl-venv", type=Path, default=TRL_VENV, help=f"TRL 1.12 environment (default {TRL_VENV})")
    parser.add_argument("--reinstall", action="store_true", help="rebuild the TRL 1.12 environment")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help=f"keep the work folder {WORK} (logs, models, data)")
    parser.add_argument("--child", choices=("build", "prepare"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    shape = model_config(args.layers, args.hidden)
    if args.child == "build":
        child_build(args.workdir, shape)
        return 0
    if args.child == "prepare":
        child_prepare(args.workdir)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    hyper = dict(HYPER, steps=args.steps or (QUICK_STEPS if args.quick else HYPER["steps"]))
    if hyper["steps"] * hyper["batch_size"] > PROMPTS:
        console.print(f"[yellow]note: {hyper['steps'] * hyper['batch_size']} episodes > {PROMPTS} prompts: "
                      f"prompts repeat[/]")
    variants = args.only or list(VARIANTS)
    trl_python = ensure_trl_venv(args.trl_venv, console.print, args.reinstall) if "trl" in variants else None
    if "align" in variants and not (ROOT / "stages" / "ppo" / "stage.py").is_file():
        console.print("[yellow]stages/ppo/stage.py does not exist yet: `align ppo` cannot run; measuring TRL only[/]")
        variants = [v for v in variants if v != "align"]
        if not variants:
            return 1

    work = WORK
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "ALIGN_HOME": str(work / ".align-setup"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    failed = False
    try:
        episodes = hyper["steps"] * hyper["batch_size"]
        console.print(f"[bold]PPO: align vs TRL 1.12[/]: {hyper['batch_size']} prompts x {hyper['steps']} iterations "
                      f"= {episodes} episodes per side, {args.threads} threads, {args.repeats} run(s) per side; "
                      f"work folder {work}")
        if load_before[0] > 0.5:
            console.print(f"[yellow]note: load average {load_before[0]:.1f} before starting: other processes share "
                          f"the CPU, expect noisy timings (use --repeats)[/]")
        me = [sys.executable, str(Path(__file__).resolve())]
        run_process(me + ["--child", "build", "--workdir", str(work), "--layers", str(args.layers), "--hidden",
                          str(args.hidden)], env, work / "build.log", work)
        wall, _, _ = run_process([sys.executable, "-m", "align", "reward", "--config", str(reward_config(work))],
                                 env, work / "reward.log", work)
        console.print(f"reward model: `align reward` (LoRA r={HYPER['lora_r']} + score head, merged copy) "
                      f"in {wall:.0f} s")
        align_config(work, hyper)
        trl_settings(work, hyper, args.threads)
        run_process(me + ["--child", "prepare", "--workdir", str(work)], env, work / "prepare.log", work)
        built = json.loads((work / "build.json").read_text())
        prepared = json.loads((work / "prepare.json").read_text())
        console.print(f"policy: Llama {shape['num_hidden_layers']} layers x {shape['hidden_size']}, "
                      f"{built['parameters']:,} parameters, float32; LoRA r={hyper['lora_r']} alpha="
                      f"{hyper['lora_alpha']} on {hyper['lora_target_modules']}")
        console.print(f"prompts: {prepared['prompts']}, {prepared['prompt_tokens_min']}-{prepared['prompt_tokens_max']}"
                      f" tokens (median {prepared['prompt_tokens_median']}) with the chat template; responses "
                      f"{hyper['max_new_tokens']} tokens at most, temperature {hyper['temperature']}")
        floors = {variant: measure_floor(variant, work, env, trl_python) for variant in variants}
        console.print("import floor (peak RSS of a process that only imports each side's modules): " +
                      ", ".join(f"{v} {mib:,} MiB" for v, mib in floors.items()))
        for run in range(args.repeats):  # interleaved, so a burst of outside load hits both sides alike
            for variant in variants:
                console.print(f"run {run + 1}/{args.repeats}: {variant} ...")
                runs[variant].append(measure(variant, work, env, run, hyper, trl_python))
                r = runs[variant][-1]
                console.print(f"  {r['episodes']} episodes in {r['train_runtime_s']:.1f} s = "
                              f"{r['episodes_per_s']:.2f} episodes/s; wall {r['wall_s']:.0f} s, peak RSS "
                              f"{r['peak_rss_mib']:,} MiB")
        total = time.perf_counter() - started
    except BaseException:
        failed = True
        raise
    finally:
        if args.keep or failed:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = {variant: summarize(r) for variant, r in runs.items()}
    for variant, r in results.items():
        r.update(import_floor_mib=floors[variant], rss_over_floor_mib=r["peak_rss_mib"] - floors[variant])

    table = Table(title=f"PPO: {episodes} episodes ({hyper['batch_size']} prompts x {hyper['steps']} iterations), "
                        f"{hyper['max_new_tokens']} new tokens, {hyper['ppo_epochs']} PPO epochs x minibatch "
                        f"{hyper['mini_batch_size']}, {args.threads} threads"
                        + (f", best of {args.repeats}" if args.repeats > 1 else ""))
    columns = ["variant", "episodes", "train s", "episodes/s"] + (["range"] if args.repeats > 1 else []) + \
        ["vs trl", "wall s", "CPU s", "peak RSS MiB", "over floor"]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    base = results.get("trl")
    for variant, r in results.items():
        spread = [f"{r['episodes_per_s_min']:.2f}-{r['episodes_per_s_max']:.2f}"] if args.repeats > 1 else []
        ratio = "baseline" if variant == "trl" else \
            f"{r['episodes_per_s'] / base['episodes_per_s']:.2f}x" if base else "-"
        table.add_row("align ppo" if variant == "align" else "trl 1.12", str(r["episodes"]),
                      f"{r['train_runtime_s']:.1f}", f"{r['episodes_per_s']:.2f}", *spread, ratio, f"{r['wall_s']:.1f}",
                      f"{r['cpu_s']:.0f}", f"{r['peak_rss_mib']:,}", f"{r['rss_over_floor_mib']:,}")
    console.print(table)

    ratios = {}
    if "align" in results and "trl" in results:
        a, t = results["align"], results["trl"]
        if a["episodes"] != t["episodes"]:
            console.print(f"[yellow]warning: the sides trained on different numbers of episodes: align "
                          f"{a['episodes']}, trl {t['episodes']}[/]")
        speed = a["episodes_per_s"] / t["episodes_per_s"]
        memory = a["peak_rss_mib"] / t["peak_rss_mib"]
        ratios = {
            "align/trl episodes_per_s": {"ratio": round(speed, 3), "target": f">= {TARGETS['episodes_per_s']}",
                                         "pass": speed >= TARGETS["episodes_per_s"]},
            "align/trl peak_rss": {"ratio": round(memory, 3), "target": f"<= {TARGETS['peak_rss']}",
                                   "pass": memory <= TARGETS["peak_rss"]},
        }
        over = a["rss_over_floor_mib"] / t["rss_over_floor_mib"] if t["rss_over_floor_mib"] > 0 else None
        ratios["align/trl rss_over_floor"] = {"ratio": over and round(over, 3), "target": None, "pass": None}
        verdict = lambda ok: "[green]PASS[/]" if ok else "[red]MISS[/]"  # noqa: E731
        console.print(f"align / trl episodes/s: {speed:.2f}x (target >= {TARGETS['episodes_per_s']}x) "
                      f"{verdict(speed >= TARGETS['episodes_per_s'])}")
        console.print(f"align / trl peak RSS:   {memory:.2f}x (target <= {TARGETS['peak_rss']}x) "
                      f"{verdict(memory <= TARGETS['peak_rss'])}")
        if over is not None:
            console.print(f"align / trl peak RSS over the import floor: {over:.2f}x (no target: models, optimizer "
                          f"states and activations only; floors align {a['import_floor_mib']:,} MiB, trl "
                          f"{t['import_floor_mib']:,} MiB)")
    load_after = os.getloadavg()
    console.print(f"total run time {total:.0f} s; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")

    report = {
        "benchmark": "ppo_vs_trl",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": git_commit(),
        "versions": {"align_venv": versions(), "trl_venv": results.get("trl", {}).get("versions")},
        "settings": {"repeats": args.repeats, "threads": args.threads, "quick": args.quick, "prompts": PROMPTS,
                     "model": shape, "hyper": hyper},
        "setup": {"build": built, "prepare": prepared},
        "results": results,
        "ratios": ratios,
        "total_s": round(total, 1),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "parent_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
