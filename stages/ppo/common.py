"""What `align ppo` (stage.py) and its `--algorithm grpo|rloo` (grpo.py) share: the policy they start from and the
prompts they read, the learning-rate schedule's name, their per-iteration metrics' summary, plots and closing table
rows, the samples file, the published model and its registry row, and the gold preference they measure each
iteration's responses under (`gold`: never trained on), with the overoptimization curve it draws (Gao et al. 2022)
and the test that says when the gold fell while the proxy reward rose."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from align.config import TemplateConfig
from align.data import fingerprint, read_prompts
from align.errors import AlignError
from align.generation import render_prompts
from align.gold import Gold, load_gold
from align.registry import Artifact, Registry
from align.run import Run, publish_model
from align.stages.ppo.config import PPOConfig, PPORunConfig, PromptDataConfig

# One PNG of the per-iteration curves; a panel whose metric a run did not log stays out.
PLOT_PANELS = [
    ("reward (normalized)", ["reward"]), ("gold score (never trained on)", ["gold"]),
    ("KL to SFT (nats/response)", ["kl"]), ("KL coefficient", ["kl_coef"]),
    ("entropy (nats/token)", ["entropy"]), ("policy clip fraction", ["clipfrac"]), ("approx. KL (old||new)",
                                                                                    ["approx_kl"]),
    ("value loss", ["vf_loss"]), ("explained variance", ["explained_variance"]),
    ("response length (tokens)", ["response_length"]), ("EOS rate", ["eos_rate"]), ("ptx loss", ["ptx_loss"]),
]


def lr_scheduler_name(ppo: PPOConfig) -> str:
    """ppo.lr_scheduler_type as transformers' get_scheduler names it: align's schedules all warm up first (for
    ppo.warmup_steps, from 0), and transformers' "constant" would ignore the warmup."""
    return "constant_with_warmup" if ppo.lr_scheduler_type == "constant" else ppo.lr_scheduler_type


def summarize(history: list[dict], iterations: int, episodes: int, train_time: float, skipped: int,
              kl_coef: float) -> dict:
    """First and last few iterations' means of the headline metrics (one iteration is mostly sampling noise), the
    largest KL, and the throughput."""
    done = [e for e in history if not e.get("skipped")]
    window = max(1, min(5, len(done) // 3))

    def mean(key, part):
        values = [e[key] for e in part if key in e]
        return sum(values) / len(values) if values else float("nan")

    summary = {"window": window, "iterations": iterations, "skipped_steps": skipped, "episodes": episodes,
               "train_runtime_s": round(train_time, 2), "episodes_per_s": episodes / max(train_time, 1e-9),
               "kl_max": max((e["kl"] for e in done if "kl" in e), default=float("nan")), "kl_coef_last": kl_coef}
    for key in ("reward", "reward_raw", "gold", "kl", "length", "eos_rate", "ptx_loss", "entropy"):
        source = "response_length" if key == "length" else key
        having = [e for e in done if source in e]  # ptx_loss: not during a value warmup
        if having:
            summary[f"{key}_first"] = mean(source, having[:window])
            summary[f"{key}_last"] = mean(source, having[-window:])
    if "gold_last" in summary:
        verdict = overoptimization(done, window)
        summary["overoptimized"] = verdict is not None
        if verdict is not None:
            summary["overoptimization"] = verdict
    return summary


def overoptimization(history: list[dict], window: int) -> str | None:
    """One line when the gold score fell while the proxy reward rose (Gao et al. 2022), else None.

    Compares the first and the last `window` iterations' means (iterations that logged both `reward` and `gold`;
    the windows must not overlap). Each change must exceed twice its noise: the standard error of a difference of
    two window means, sqrt(2 / window) x the per-iteration spread, which is estimated from successive differences
    (sigma^2 = mean((x[t+1] - x[t])^2) / 2, von Neumann): a steady trend hardly inflates it, unlike a plain standard
    deviation."""
    done = [e for e in history if not e.get("skipped") and _finite(e.get("reward")) and _finite(e.get("gold"))]
    window = max(1, int(window))
    if len(done) < 2 * window:
        return None
    changes = {}
    for key in ("reward", "gold"):
        values = [float(e[key]) for e in done]
        first, last = sum(values[:window]) / window, sum(values[-window:]) / window
        spread = math.sqrt(sum((b - a) ** 2 for a, b in zip(values, values[1:])) / (2 * (len(values) - 1)))
        changes[key] = (first, last, 2 * spread * math.sqrt(2 / window))
    (reward_first, reward_last, reward_noise), (gold_first, gold_last, gold_noise) = changes["reward"], changes["gold"]
    if not (reward_last - reward_first > reward_noise and gold_first - gold_last > gold_noise):
        return None
    means = [sum(float(e["gold"]) for e in done[i:i + window]) / window for i in range(len(done) - window + 1)]
    peak = max(range(len(means)), key=means.__getitem__)
    steps = [e.get("step", i + 1) for i, e in enumerate(done)]
    return (f"overoptimization: the gold score fell {gold_first:.3f} -> {gold_last:.3f} (beyond its noise, "
            f"{gold_noise:.3f}) while the proxy reward rose {reward_first:.3f} -> {reward_last:.3f} (first -> last "
            f"{window} iterations): the policy exploits the reward model. The gold peaked around iteration "
            f"{steps[peak + window // 2]} ({means[peak]:.3f}); stop earlier or raise ppo.kl_coef")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def finished_rows(summary: dict) -> list[tuple[str, object]]:
    """The closing table's rows about the run itself."""
    return [
        ("reward (normalized)", f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f} (first -> last "
                                f"{summary['window']} iterations' mean)"),
        *([("gold score", f"{summary['gold_first']:.3f} -> {summary['gold_last']:.3f} (first -> last; never trained "
                          f"on)" + ("; OVEROPTIMIZED: fell while the proxy rose" if summary.get("overoptimized")
                                    else ""))] if "gold_last" in summary else []),
        ("KL to SFT (nats/response)", f"{summary['kl_last']:.3f} (max {summary['kl_max']:.3f}); beta "
                                      f"{summary['kl_coef_last']:.4g}" if "kl_last" in summary else
         "not measured (beta 0)"),
        ("response length", f"{summary['length_first']:.1f} -> {summary['length_last']:.1f} tokens"),
        ("EOS rate", f"{summary['eos_rate_first']:.2f} -> {summary['eos_rate_last']:.2f}"),
        *([("ptx loss", f"{summary['ptx_loss_first']:.3f} -> {summary['ptx_loss_last']:.3f}")]
          if "ptx_loss_last" in summary else []),
        ("skipped iterations (NaN/inf)", summary["skipped_steps"]),
        ("episodes", f"{summary['episodes']:,} in {summary['train_runtime_s']:.1f} s "
                     f"({summary['episodes_per_s']:.2f}/s)"),
    ]


def resolve_models(cfg: PPORunConfig, registry: Registry):
    """The SFT policy (decoder-only) and the reward model the config names, resolved and checked before anything
    loads: (policy source, reward source), as align.modeling.resolve_model gives them."""
    from align.modeling import require_model_kind, resolve_model

    policy_source = resolve_model(cfg.model.path, registry)
    require_model_kind(policy_source, "model.path", cfg.model.path, "align ppo", kinds=("causal",),
                       hint="the SFT model (e.g. sft:latest) or a decoder-only model folder", model_cfg=cfg.model)
    reward_source = resolve_model(cfg.reward.path, registry)
    check_reward_artifact(reward_source, cfg.reward.path)
    return policy_source, reward_source


def check_reward_artifact(source, given: str) -> None:
    """A LoRA reward model is a SEQ_CLS adapter (what `align reward` saves), not an SFT one."""
    if source.adapter_of:
        task = json.loads((Path(source.path) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise AlignError(f"reward.path: {given} is a {task} adapter, not a reward model (train one with "
                             f"`align reward`)")


def load_run_gold(cfg: PPORunConfig, reward_source) -> Gold | None:
    """The run's gold preference (`gold`), checked now, before any model loads: a spec that cannot be imported,
    raises, returns no number, or names no reward model ends in one line. The proxy itself (`reward.path`) is
    refused: the policy is optimized against it, so it cannot measure what that optimization did."""
    if not cfg.gold:
        return None
    from align.modeling import resolve_model
    from align.registry import looks_like_ref

    spec = str(cfg.gold).strip()
    if looks_like_ref(spec) or Path(spec).expanduser().exists():  # a reward model: compared before it loads
        try:
            same = Path(resolve_model(spec).path).resolve() == Path(reward_source.path).resolve()
        except AlignError:
            same = False  # load_gold says what is wrong with it
        if same:
            raise AlignError(f"gold: {cfg.gold} is the reward model the policy is optimized against (reward.path "
                             f"{cfg.reward.path}); a gold must be a preference no model trained on: give another "
                             f"gold or unset it")
    return load_gold(spec, option="gold")


def plot_overoptimization(history: list[dict], folder: Path, verdict: str | None = None) -> list[str]:
    """plots/overoptimization.png (Gao et al. 2022): the proxy reward and the gold score against the KL to the SFT
    model, and against the iteration; each on its own axis (their scales differ). Nothing without a logged gold."""
    done = [e for e in history if not e.get("skipped") and _finite(e.get("reward")) and _finite(e.get("gold"))]
    if not done:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_kl = [e for e in done if _finite(e.get("kl"))]
    panels = [("kl", "KL to SFT (nats/response)", with_kl)] if with_kl else []
    panels.append(("step", "iteration", done))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 3.8), squeeze=False)
    for ax, (x_key, x_label, rows) in zip(axes[0], panels):
        xs = [e.get(x_key, i + 1) for i, e in enumerate(rows)]
        # Against KL: one point per iteration (KL goes up and down; lines in iteration order would scribble).
        style = dict(linestyle="none", marker="o", markersize=3, alpha=0.7) if x_key == "kl" else \
            dict(marker="o" if len(rows) < 30 else None, markersize=3)
        ax.plot(xs, [e["reward"] for e in rows], color="tab:blue", linewidth=1, label="proxy reward (trained on)",
                **style)
        ax.set_xlabel(x_label)
        ax.set_ylabel("proxy reward", color="tab:blue")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(xs, [e["gold"] for e in rows], color="tab:red", linewidth=1.5, label="gold score (never trained on)",
                  **{**style, "marker": "s" if x_key == "kl" else style["marker"]})
        twin.set_ylabel("gold score", color="tab:red")
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
        ax.set_title(f"against {x_label}", fontsize=10)
    fig.suptitle("overoptimization: the gold fell while the proxy rose" if verdict else
                 "proxy reward and gold score (Gao et al. 2022)", fontsize=11,
                 color="tab:red" if verdict else "black")
    fig.tight_layout()
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / "plots" / "overoptimization.png", dpi=100)
    plt.close(fig)
    return ["plots/overoptimization.png"]


def read_policy_prompts(path: str, data: PromptDataConfig) -> list[str]:
    """The prompts file's prompts, or `data.max_examples` of them drawn with `data.seed` (kept in file order)."""
    prompts = read_prompts(path, option="data.path")
    if data.max_examples and data.max_examples < len(prompts):
        keep = sorted(random.Random(data.seed).sample(range(len(prompts)), data.max_examples))
        prompts = [prompts[i] for i in keep]
    return prompts


def load_policy_tokenizer(path: str, cfg: PPORunConfig):
    """The SFT model's tokenizer, given a pad token of its own where it has none or pads with EOS (a response's EOS
    must stay visible); and what was changed, for the start table."""
    from align.modeling import load_tokenizer, prepare_tokenizer

    tokenizer = load_tokenizer(path, cfg.model)
    changes = prepare_tokenizer(tokenizer) if tokenizer.pad_token is None or \
        tokenizer.pad_token_id == tokenizer.eos_token_id else []
    return tokenizer, changes


def encode_prompts(tokenizer, prompts: list[str], template: TemplateConfig,
                   max_length: int) -> tuple[list[tuple[str, str, list[int]]], int]:
    """(prompt as written, rendered as the SFT model saw its prompts, its token ids), and how many were too long.
    Longer prompts keep their LAST tokens: the end holds the question and the opened assistant turn the response
    continues; their rendering is then the text of the tokens kept."""
    rendered = render_prompts(tokenizer, prompts, template)
    templated = template.name == "chat" and bool(tokenizer.chat_template)
    encoded, truncated = [], 0
    for prompt, text in zip(prompts, rendered):
        ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
        if len(ids) > max_length:
            ids = ids[-max_length:]
            text = tokenizer.decode(ids)
            truncated += 1
        encoded.append((prompt, text, ids))
    return encoded, truncated


def load_policy(base_path: str, cfg: PPORunConfig, tokenizer):
    """The SFT policy to optimize, with new LoRA / QLoRA adapters (seeded) or full weights; decoder-only (the stages
    check its kind with `require_model_kind` before anything loads)."""
    from transformers import set_seed

    from align.modeling import apply_tuning, load_model, match_model_to_tokenizer

    set_seed(cfg.seed)  # the new adapter (and value-head) weights
    model = load_model(base_path, cfg.model, cfg.quantization)
    match_model_to_tokenizer(model, tokenizer)
    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    return apply_tuning(model, cfg.lora, cfg.model, quantized, gradient_checkpointing=False)


def publish_policy(job: Run, cfg: PPORunConfig, policy_source, base_path: str, prompts: list[str], config: dict,
                   metrics: dict, plots: list[str], parents: list) -> Artifact:
    """The finished run published (align.run.publish_model): model card, the folder renamed into place, the registry
    row (stage ppo) with `parents` (artifacts or None) as its lineage. The row's metrics record the algorithm (ppo,
    grpo, rloo): `align registry list` shows a GRPO/RLOO row as `ppo:N (grpo)`."""
    base_model = policy_source.artifact.base_model if policy_source.artifact and policy_source.artifact.base_model \
        else base_path
    return publish_model(job, config=config, metrics={**metrics, "algorithm": cfg.algorithm}, plots=plots,
                         base_model=base_model, model_source=cfg.model.path, adapter=cfg.lora.enabled,
                         data_source=cfg.data.path, data_fingerprint=fingerprint([{"prompt": p} for p in prompts]),
                         parents=parents, keep_checkpoints=cfg.output.keep_checkpoints)


def print_samples(samples: list[dict], iteration: int, target) -> None:
    """A table of the first few (prompt, response, reward[, gold]) samples, printed on `target` (a rich console)."""
    from rich.table import Table

    gold = any("gold" in sample for sample in samples[:4])
    table = Table(title=f"samples at iteration {iteration}", title_justify="left")
    table.add_column("prompt", overflow="fold", max_width=40)
    table.add_column("response", overflow="fold", max_width=60)
    table.add_column("reward", justify="right")
    if gold:
        table.add_column("gold", justify="right")
    for sample in samples[:4]:
        table.add_row(sample["prompt"], sample["response"] or "(empty)", f"{sample['reward']:+.3f}",
                      *([_score(sample.get("gold"))] if gold else []))
    target.print(table)


def _score(value) -> str:
    return f"{value:+.3f}" if _finite(value) else "-"


def print_overoptimization(summary: dict) -> None:
    """The summary's overoptimization line, if the gold fell while the proxy rose."""
    from align.reporting import console

    if summary.get("overoptimization"):
        console.print(f"[bold yellow]{summary['overoptimization']}[/bold yellow]", highlight=False)


def write_samples(samples: list[dict], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample, ensure_ascii=False) + "\n")
