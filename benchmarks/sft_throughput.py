"""SFT training throughput: `align sft` vs the seeds' recipe vs plain TRL, on one model and one data set.

    python benchmarks/sft_throughput.py            # default run (256 examples, ~1.5 min on an idle 2-core CPU)
    python benchmarks/sft_throughput.py --quick    # smoke run (64 examples)

What is compared (everything else is identical: model weights, data, learning rate, batch size, one epoch over
the same examples, seed, float32, OMP threads):

  align        `python -m align sft --config <generated yaml>`: the real CLI at align's recommended settings for
               this data: `training.packing: true` (TRL's BFD packing, padding-free: transformers builds the
               block-diagonal attention mask from position_ids), max_length 512, loss on the completion only.
               Tokens and train time come from align's registry row (`trained_tokens`, `train_runtime_s`).
  seeds_recipe How the project's seed scripts fine-tune: a plain transformers `Trainer`, every example tokenized
               with `padding="max_length"` to 512, no packing, labels = input_ids with pad and prompt positions
               set to -100.
  plain_trl    TRL's `SFTTrainer` used directly (own model loading, dataset, trainer) with exactly the SFTConfig
               values align resolves for this run (`stages/sft.py: training_arguments`, read once during setup:
               bf16 off, gradient checkpointing off, ..., and align's own adjustments, e.g. packed rows one per
               forward pass). align / plain_trl is align's own overhead.
  trl_batch8   The same, but with the hyper-parameters as given and nothing adjusted (SFTConfig = align's
               defaults + `training:`), as a TRL user would write it: 8 packed rows per forward pass. No target;
               align / trl_batch8 is what align's adjustments are worth.

Each variant runs in its own fresh process; its peak RSS and CPU seconds are that process's own rusage, read with
`os.wait4`. Throughput = real (non-pad) tokens trained, prompt tokens included / the trainer's train time (imports,
model loading, data preparation and saving are not included; they show in the `wall s` column). Every variant
counts tokens the same way, with the Trainer's `include_num_input_tokens_seen="non_padding"`; the script warns unless
every count equals the data's token count. `--repeats N` interleaves N runs of each variant and reports each one's
best run (outside load only slows a run down) with the range: timings on a shared machine are noisy (the load
average before and after is printed and saved).

Targets: align / seeds_recipe >= 2.0x, align / plain_trl >= 0.95x. Results: benchmarks/results/sft_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sft_throughput.json"

# ------------------------------------------------------------------------------------------------
# The fixed setup shared by all variants

MAX_LENGTH = 512
SEED = 42
# A Llama built from config, wide enough that the matmuls (not Python overhead) dominate a step.
MODEL_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=MAX_LENGTH)
# Hyper-parameters every variant gets (TrainingArguments fields).
TRAINING = dict(
    learning_rate=5e-4,
    per_device_train_batch_size=8,
    num_train_epochs=1,
    logging_steps=10,
    save_strategy="no",  # no checkpoint writes inside the timed training loop
    disable_tqdm=True,
)
# The SFTConfig defaults align sets in stages/sft.py `training_arguments` (CPU run, no eval set), for the seeds'
# recipe (all are TrainingArguments fields: only the data pipeline differs) and trl_batch8. plain_trl uses the values
# align actually resolves instead; setup records where those differ from these (`align_sftconfig.adjusted`).
ALIGN_DEFAULTS = dict(
    bf16=False,
    fp16=False,
    gradient_checkpointing=False,
    report_to="none",
    seed=SEED,
    data_seed=SEED,
    include_num_input_tokens_seen="non_padding",
    per_device_eval_batch_size=TRAINING["per_device_train_batch_size"],
    save_only_model=False,
    dataloader_pin_memory=False,
)
# align's recommended SFT settings for short instruction pairs (plain TRL gets the same).
SFT_SETTINGS = dict(packing=True, max_length=MAX_LENGTH, completion_only_loss=True)

VARIANTS = ("align", "seeds_recipe", "plain_trl", "trl_batch8")
TARGETS = {"seeds_recipe": 2.0, "plain_trl": 0.95}  # minimum ratio align / variant

# ------------------------------------------------------------------------------------------------
# Deterministic synthetic instruction data with a skewed (log-normal) length distribution

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "not word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down side "
    "been now find any new work part take get place made live where after back little only round man year came "
    "show every good me give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well also play small "
    "end put home read hand port large spell add even land here must big high such follow act why ask men change "
    "went light kind off need house picture try us again animal point mother world near build self earth father "
    "model train data loss batch token gradient layer weight function value answer question explain example"
).split()


def _text(rng: random.Random, target_tokens: int, word_tokens: dict[str, int]) -> str:
    """Sentences of Zipf-distributed words, about `target_tokens` tokens long."""
    words, count, sentence = [], 0, 0
    while count < target_tokens:
        word = WORDS[min(int(rng.paretovariate(1.1)) - 1, len(WORDS) - 1)] if rng.random() < 0.7 \
            else rng.choice(WORDS)
        words.append(word)
        count += word_tokens[word]
        sentence += 1
        if sentence >= rng.randint(6, 16):
            words[-1] += "."
            count += 1
            sentence = 0
    return " ".join(words).capitalize()


def make_records(n: int, tokenizer, seed: int = 1234) -> list[dict]:
    """`n` prompt/completion pairs: prompts ~22 tokens (median), answers ~75, long tail; ~30-400 tokens per example
    with the chat template."""
    word_tokens = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in WORDS}
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt_len = min(max(int(rng.lognormvariate(math.log(22), 0.7)), 4), 150)
        completion_len = min(max(int(rng.lognormvariate(math.log(75), 0.85)), 4), 380 - prompt_len)
        records.append({"prompt": _text(rng, prompt_len, word_tokens),
                        "completion": _text(rng, completion_len, word_tokens)})
    return records


def conversational(record: dict) -> dict:
    """The pair as align's default `template: chat` hands it to TRL (chat-format prompt/completion)."""
    return {"prompt": [{"role": "user", "content": record["prompt"]}],
            "completion": [{"role": "assistant", "content": record["completion"]}]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Children: each runs in its own process (`--child NAME --workdir DIR`) and writes DIR/NAME.json

def child_setup(work: Path, examples: int) -> None:
    """Build the model, tokenizer and data once (every variant loads them from `work`), and resolve the SFTConfig
    align will use for the generated config."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import build_tokenizer, write_jsonl

    model_dir = work / "model"
    tokenizer = build_tokenizer(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    records = make_records(examples, tokenizer)
    write_jsonl(work / "data.jsonl", records)
    lengths = sorted(len(tokenizer.apply_chat_template(conversational(r)["prompt"] + conversational(r)["completion"],
                                                       tokenize=True, return_dict=True)["input_ids"])
                     for r in records)
    write_result(work, "setup", {
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": len(records),
        "tokens": sum(lengths),
        "length_min": lengths[0], "length_median": lengths[len(lengths) // 2],
        "length_mean": round(sum(lengths) / len(lengths), 1),
        "length_p90": lengths[int(0.9 * (len(lengths) - 1))], "length_max": lengths[-1],
        "padding_share_at_512": round(1 - sum(lengths) / (len(lengths) * MAX_LENGTH), 3),
    })
    resolve_align_sftconfig(work)


def resolve_align_sftconfig(work: Path) -> None:
    """align's SFTConfig for the generated YAML, as `align sft` builds it: written as the fields that differ from
    TRL's defaults (plain_trl passes exactly these), plus how it differs from the hyper-parameters as given."""
    from align.artifacts import RunDir
    from align.stages.sft import load, training_arguments
    from trl import SFTConfig

    resolved = training_arguments(load(str(work / "align-sft.yaml"), []), RunDir(work / "probe"),
                                  has_eval=False).to_dict()
    trl_default = SFTConfig(output_dir="unused", bf16=False).to_dict()  # bf16: TRL's default fails on CPU
    as_given = SFTConfig(output_dir="unused", **ALIGN_DEFAULTS, **TRAINING, **SFT_SETTINGS).to_dict()
    skip = {"output_dir", "logging_dir"}
    write_result(work, "align_sftconfig", {
        "non_default": {"bf16": False} | {k: v for k, v in resolved.items()
                                          if k not in skip and trl_default.get(k) != v},
        "adjusted": {k: [as_given.get(k), v] for k, v in resolved.items() if k not in skip and as_given.get(k) != v},
    })


def _load(work: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    return model, tokenizer


def child_seeds_recipe(work: Path) -> None:
    """Plain transformers Trainer; every example padded to 512; labels masked at pad and prompt positions."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    model, tokenizer = _load(work)
    columns = {"input_ids": [], "attention_mask": [], "labels": []}
    for record in read_jsonl(work / "data.jsonl"):
        pair = conversational(record)
        text = tokenizer.apply_chat_template(pair["prompt"] + pair["completion"], tokenize=False)
        prompt = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        # The chat template already writes <s>: add no special tokens on top.
        encoded = tokenizer(text, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                            add_special_tokens=False)
        prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = [token if keep else -100 for token, keep in zip(encoded["input_ids"], encoded["attention_mask"])]
        labels[:prompt_len] = [-100] * prompt_len
        columns["input_ids"].append(encoded["input_ids"])
        columns["attention_mask"].append(encoded["attention_mask"])
        columns["labels"].append(labels)
    args = TrainingArguments(output_dir=str(work / "seeds_recipe"), **ALIGN_DEFAULTS, **TRAINING)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(columns),
                      data_collator=default_data_collator)
    _report(work, "seeds_recipe", trainer, trainer.train())


def child_plain_trl(work: Path) -> None:
    """TRL's SFTTrainer called directly, with exactly the SFTConfig values align resolved (see setup)."""
    values = json.loads((work / "align_sftconfig.json").read_text())["non_default"]
    _trl(work, "plain_trl", values)


def child_trl_batch8(work: Path) -> None:
    """TRL's SFTTrainer with align's defaults and the hyper-parameters as given, nothing adjusted."""
    _trl(work, "trl_batch8", {**ALIGN_DEFAULTS, **TRAINING, **SFT_SETTINGS})


def _trl(work: Path, name: str, values: dict) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = _load(work)
    dataset = Dataset.from_list([conversational(r) for r in read_jsonl(work / "data.jsonl")])
    args = SFTConfig(**values | {"output_dir": str(work / name)})
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    _report(work, name, trainer, trainer.train())


def _report(work: Path, name: str, trainer, result) -> None:
    write_result(work, name, {"trained_tokens": trainer.state.num_input_tokens_seen,
                              "train_runtime_s": round(result.metrics["train_runtime"], 2),
                              "steps": result.global_step, "train_loss": result.training_loss})


def write_result(work: Path, name: str, data: dict) -> None:
    (work / f"{name}.json").write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------------
# The parent: setup, one measured process per variant and run, table, JSON. It imports nothing heavy: a child started
# from a large parent would inherit the parent's resident size in its ru_maxrss.

def align_config(work: Path) -> Path:
    """The YAML `align sft` runs: the same model, data and hyper-parameters, full fine-tuning."""
    import yaml

    config = {
        "model": {"path": str(work / "model")},
        "data": {"path": str(work / "data.jsonl")},
        "template": {"name": "chat"},
        "lora": {"enabled": False},
        "training": {**TRAINING, **SFT_SETTINGS},
        "output": {"dir": str(work / "runs" / "align"), "name": "sft-throughput", "overwrite": True},
        "seed": SEED,
    }
    path = work / "align-sft.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_process(command: list[str], work: Path, env: dict, log: Path) -> tuple[float, float, float]:
    """Run `command`; return wall seconds, CPU seconds (user + system) and peak RSS in MiB of that process."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"{' '.join(command)} failed (exit {process.returncode}); log {log}:\n{tail}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux reports ru_maxrss in KiB


def measure(variant: str, work: Path, env: dict, run: int) -> dict:
    """One run of one variant in a fresh process: its tokens, train time, wall time and peak RSS."""
    log = work / f"{variant}-{run}.log"
    if variant == "align":
        command = [sys.executable, "-m", "align", "sft", "--config", str(work / "align-sft.yaml"),
                   f"output.name=run-{run}"]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--workdir", str(work)]
    wall, cpu, rss = run_process(command, work, env, log)
    if variant == "align":
        from align.registry import Registry

        metrics = Registry(work / ".align").resolve("sft:latest").metrics
        result = {k: metrics[k] for k in ("trained_tokens", "train_runtime_s", "steps", "train_loss")}
    else:
        result = json.loads((work / f"{variant}.json").read_text())
    result.update(wall_s=round(wall, 1), cpu_s=round(cpu, 1), peak_rss_mib=round(rss),
                  tokens_per_s=round(result["trained_tokens"] / result["train_runtime_s"], 1))
    return result


def summarize(runs: list[dict]) -> dict:
    """The best run's numbers (highest tokens/s: outside load only ever slows a run down), the spread of tokens/s
    over the runs, the highest peak RSS, and every run."""
    best = dict(max(runs, key=lambda r: r["tokens_per_s"]))
    rates = [r["tokens_per_s"] for r in runs]
    best.update(tokens_per_s_min=min(rates), tokens_per_s_max=max(rates),
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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("align", "torch", "transformers", "trl", "datasets", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 examples")
    parser.add_argument("--examples", type=int, help="number of training examples (default 256, 64 with --quick)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per variant, interleaved; the table shows each variant's best run (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch threads for every variant")
    parser.add_argument("--only", nargs="+", choices=VARIANTS, help="run only these variants")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, model, data)")
    parser.add_argument("--child", choices=("setup",) + VARIANTS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child == "setup":
            child_setup(args.workdir, args.examples)
        else:
            {"seeds_recipe": child_seeds_recipe, "plain_trl": child_plain_trl,
             "trl_batch8": child_trl_batch8}[args.child](args.workdir)
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    examples = args.examples or (64 if args.quick else 256)
    variants = args.only or list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="sft-throughput-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "ALIGN_HOME": str(work / ".align"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        console.print(f"[bold]SFT throughput[/]: {examples} examples, {args.threads} threads, "
                      f"{args.repeats} run(s) per variant; work folder {work}")
        if load_before[0] > 0.5:
            console.print(f"[yellow]note: load average {load_before[0]:.1f} before starting: other processes share "
                          f"the CPU, expect noisy timings (use --repeats)[/]")
        align_config(work)
        run_process([sys.executable, str(Path(__file__).resolve()), "--child", "setup", "--workdir", str(work),
                     "--examples", str(examples)], work, env, work / "setup.log")
        data = json.loads((work / "setup.json").read_text())
        sftconfig = json.loads((work / "align_sftconfig.json").read_text())
        console.print(f"model: Llama {MODEL_CONFIG['num_hidden_layers']} layers x {MODEL_CONFIG['hidden_size']}, "
                      f"{data['parameters']:,} parameters, float32, full fine-tuning")
        console.print(f"data: {data['examples']} pairs, {data['tokens']:,} tokens; length min {data['length_min']} / "
                      f"median {data['length_median']} / mean {data['length_mean']} / p90 {data['length_p90']} / "
                      f"max {data['length_max']}; padded to {MAX_LENGTH} that is "
                      f"{data['padding_share_at_512']:.0%} pad")
        adjusted = ", ".join(f"{k} {given} -> {used}" for k, (given, used) in sftconfig["adjusted"].items())
        console.print(f"align's SFTConfig (plain_trl uses it too) differs from the values as given (trl_batch8): "
                      f"{adjusted or 'no differences'}")
        for run in range(args.repeats):  # interleaved, so a burst of outside load hits every variant alike
            for variant in variants:
                console.print(f"run {run + 1}/{args.repeats}: {variant} ...")
                runs[variant].append(measure(variant, work, env, run))
        total = time.perf_counter() - started
    finally:
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results = {variant: summarize(r) for variant, r in runs.items()}

    table = Table(title=f"SFT throughput: {examples} examples, 1 epoch, batch "
                        f"{TRAINING['per_device_train_batch_size']}, max_length {MAX_LENGTH}, {args.threads} threads"
                        + (f", best of {args.repeats}" if args.repeats > 1 else ""))
    columns = ["variant", "real tokens", "train s", "tokens/s"] + (["tokens/s range"] if args.repeats > 1 else []) + \
        ["steps", "loss", "wall s", "CPU s", "peak RSS MiB"]
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=column == "variant")
    for variant, r in results.items():
        spread = [f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}"] if args.repeats > 1 else []
        table.add_row(variant, f"{r['trained_tokens']:,}", f"{r['train_runtime_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                      *spread, str(r["steps"]), f"{r['train_loss']:.3f}", f"{r['wall_s']:.1f}",
                      f"{r['cpu_s']:.0f}", f"{r['peak_rss_mib']:,}")
    console.print(table)

    counts = {r["trained_tokens"] for rs in runs.values() for r in rs}
    tokens_agree = counts == {data["tokens"]}
    if not tokens_agree:
        console.print(f"[yellow]warning: the variants did not all train on the data's {data['tokens']:,} tokens: "
                      f"{ {v: [r['trained_tokens'] for r in rs] for v, rs in runs.items()} }[/]")
    ratios = {}
    if "align" in results:
        for other in VARIANTS[1:]:
            if other not in results:
                continue
            ratio = results["align"]["tokens_per_s"] / results[other]["tokens_per_s"]
            target = TARGETS.get(other)
            ratios[f"align/{other}"] = {"ratio": round(ratio, 3), "target": target,
                                        "pass": None if target is None else ratio >= target}
            verdict = "(no target)" if target is None else \
                f"(target >= {target}x) " + ("[green]PASS[/]" if ratio >= target else "[red]MISS[/]")
            console.print(f"align / {other}: {ratio:.2f}x tokens/s {verdict}")
    load_after = os.getloadavg()
    console.print(f"total run time {total:.0f} s; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")

    report = {
        "benchmark": "sft_throughput",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "settings": {"examples": examples, "repeats": args.repeats, "threads": args.threads, "quick": args.quick,
                     "model": MODEL_CONFIG, "training": TRAINING, "sft": SFT_SETTINGS,
                     "align_defaults": ALIGN_DEFAULTS},
        "data": data,
        "align_sftconfig": sftconfig,
        "results": results,
        "tokens_agree": tokens_agree,
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
