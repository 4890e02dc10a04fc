"""`align dpo`: Direct Preference Optimization (Rafailov et al. 2023) of the SFT model on preference pairs.

Reads top to bottom: config -> output folder -> policy and reference (an SFT LoRA adapter is merged once into plain
weights; a reward model or an encoder-decoder is refused) -> preference data (rankings expanded to all their pairs,
ties and identical pairs dropped, whole prompts held out) rendered with the SFT model's training template -> policy
with a fresh LoRA / QLoRA / full -> reference: the policy with its adapter disabled (one copy of the weights), a frozen
copy (full fine-tuning) or a named artifact -> TRL DPOTrainer -> held-out implicit-reward accuracy and margin before
and after -> artifact (adapter, tokenizer, card, log, plots) renamed into place -> registry row. The config is loaded
by the CLI (TRL's checks finished by `check`); the head and tail every stage shares are align/run.py.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

from align.artifacts import CHECKPOINTS, RunDir, evaluate_at_end, evaluate_at_start, mean_train_loss
from align.config import LoadedConfig, TemplateConfig, read_config, to_dict
from align.data import Dropped, fingerprint, format_prompt, read_preferences, read_records, split_by_prompt
from align.errors import AlignError
from align.memory import DPO_LOGIT_COPIES, check_memory, trainer_workload
from align.modeling import (ModelSource, apply_tuning, load_model, load_tokenizer, match_model_to_tokenizer,
                            merge_adapter, parameter_summary, prepare_tokenizer, require_model_kind, resolve_model,
                            save_merged, trainer_defaults, training_config, training_template)
from align.registry import Artifact, Registry, resolve_path
from align.reporting import human_bytes, plot_training_curves, print_table
from align.run import check_training, print_finished, publish_model, save_run_record, start_run
from align.scoring import as_messages, as_text
from align.stages.dpo_config import DPORunConfig

STAGE = "dpo"

# TRL's held-out metrics (implicit reward r = beta * log(pi / pi_ref) of chosen and rejected responses).
EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
             "eval_rewards/rejected")


def check(loaded: LoadedConfig) -> DPORunConfig:
    """The config align has read (`align.config.read_config`), checked in full: every `training:` key against TRL's
    DPOConfig (loss_type and f_divergence_type against the values TRL implements: stages/dpo_config.py), and the
    DPOConfig that training uses built once (its own checks, reported at file:line)."""
    from trl import DPOConfig

    return check_training(loaded, STAGE, DPOConfig, training_arguments)


def load(config_path: str, overrides: list[str]) -> DPORunConfig:
    """The validated config, as `align dpo` loads it."""
    return check(read_config(config_path, overrides, DPORunConfig))


def run(cfg: DPORunConfig, config_path: str, resume: bool = False) -> Artifact | None:
    """`align dpo`: `cfg` checked by `check`, read from `config_path` (its file name is the default run name)."""
    # 1. The run: its name, output folder (and the checkpoint to resume from) and registry; references resolved;
    #    the policy and the reference must be causal LMs.
    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume, report_to=cfg.training.get("report_to"))
    source = resolve_model(cfg.model.path, job.registry, cfg.model.gguf_file)
    _require_causal_lm(source, "model.path", cfg.model.path, cfg)
    reference = _reference_source(cfg, job.registry, source)
    data_path, data_artifact = resolve_path(cfg.data.path, job.registry)
    eval_path, eval_artifact = resolve_path(cfg.data.eval_path, job.registry) if cfg.data.eval_path else (None, None)

    # 2. Data: every format to pairs, ties and identical pairs dropped, prompts held out whole; rendered with the
    #    template the SFT model was trained with. Bad data fails here, before any model loads.
    prefs = read_preferences(read_records(data_path, cfg.data.split), cfg.data.columns, cfg.data.use_margin)
    if len(prefs.pairs) < cfg.data.min_pairs:
        raise AlignError(f"data: {data_path}: only {len(prefs.pairs)} usable preference pairs (from {prefs.records} "
                         f"records; {prefs.dropped_ties} ties and {prefs.dropped_identical} identical pairs dropped); "
                         f"data.min_pairs is {cfg.data.min_pairs}. DPO needs more comparisons")
    train, evaluation, eval_overlap, held_dropped = _split(prefs.pairs, cfg, eval_path)
    dropped = prefs.dropped + held_dropped
    template, template_note = _template(cfg, source)
    tokenizer = load_tokenizer(source.path, cfg.model)
    if reference is not None:
        _require_same_vocabulary(tokenizer, reference, cfg)
    tokenizer_changes = prepare_tokenizer(tokenizer)
    train_rows, eval_rows = _dpo_rows(train, template), _dpo_rows(evaluation, template)
    data_fingerprint = fingerprint([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in train])
    args = training_arguments(cfg, job.folder, has_eval=bool(eval_rows))  # TrainingArguments' checks, before loading

    # 3. Models: the policy (an SFT adapter merged once) with a fresh LoRA / QLoRA / full; the reference.
    with args.main_process_first(desc="merging the SFT adapter"):  # one process merges, the others reuse it
        backbone, backbone_note = _plain_folder(source, cfg)
        reference_path = _plain_folder(reference, cfg)[0] if reference is not None else None
    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    from transformers import set_seed

    set_seed(cfg.seed)  # the new LoRA weights
    model = load_model(backbone, cfg.model, cfg.quantization)
    match_model_to_tokenizer(model, tokenizer)
    model = apply_tuning(model, cfg.lora, cfg.model, quantized, bool(cfg.training.get("gradient_checkpointing")))
    params = parameter_summary(model)
    ref_model, reference_note = _reference_model(reference_path, backbone, cfg, args, tokenizer)

    # 4. Train. TRL's own checks of the loss settings run as the trainer is made, before the folder is created.
    if "tensorboard" in str(args.report_to):
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(job.work / "tensorboard"))
    trainer = _make_trainer(model, ref_model, tokenizer, args, train_rows, eval_rows)
    rows = trainer.train_dataset
    longest = max((len(p) + max(len(c), len(r)) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"],
                                                                    rows["rejected_ids"])), default=0)
    memory = check_memory(trainer.model, trainer_workload(args, min(longest, args.max_length or longest),
                                                          sequences_per_item=2, logit_copies=DPO_LOGIT_COPIES),
                          extra_weight_bytes=parameter_summary(ref_model).memory_bytes if ref_model is not None else 0)
    job.folder.create()
    max_length = args.max_length
    truncated_train, dropped_train = _over_length(trainer.train_dataset, len(train_rows), max_length)
    truncated_eval, dropped_eval = _over_length(trainer.eval_dataset, len(eval_rows), max_length)
    if not len(trainer.train_dataset):
        raise AlignError(f"data: every training prompt alone fills training.max_length={max_length} tokens; raise it")
    train_prompts = len({p["group"] for p in train})
    if trainer.is_world_process_zero():  # one summary, not one per process
        print_table(f"align dpo: {job.name}", [
            ("policy", backbone + (" (4-bit)" if cfg.quantization.load_in_4bit else
                                   " (8-bit)" if cfg.quantization.load_in_8bit else "")),
            *([("backbone", backbone_note)] if backbone_note else []),
            ("reference", reference_note),
            ("method", "LoRA" if cfg.lora.enabled else ("partial" if cfg.model.train_only else "full fine-tuning")),
            ("loss", f"{' + '.join(args.loss_type)} (beta {args.beta:g})"),
            ("parameters", f"{params.trainable:,} trainable of {params.total:,} ({params.trainable_share:.2%})"),
            ("memory (weights)", human_bytes(params.memory_bytes)),
            memory,
            ("template", template_note),
            ("data", f"{cfg.data.path} [{prefs.format}{', conversational' if prefs.conversational else ''}] "
                     f"{len(prefs.pairs)} pairs, {prefs.prompts} prompts"),
            *([("rankings", f"{prefs.rankings} expanded into all their pairs")] if prefs.rankings else []),
            ("dropped", dropped.summary()),
            *([("margins", "in the data but unused (DPO has no margin term)")] if "margin" in prefs.pairs[0] else []),
            ("split (by prompt)", f"{len(trainer.train_dataset)} train / {len(eval_rows) - dropped_eval} held-out "
                                  f"pairs ({train_prompts} / {len({p['group'] for p in evaluation})} prompts)"
                                  + (f"; {eval_overlap} held-out pairs left out (prompt in train)"
                                     if eval_overlap else "")),
            ("over max_length", f"{truncated_train + truncated_eval} pairs truncated, {dropped_train + dropped_eval} "
                                f"dropped (prompt alone >= {max_length} tokens)"),
            *[("tokenizer", change) for change in tokenizer_changes],
            ("output", str(job.final)),
        ])
    before = None
    if eval_rows:
        before = ((reference_path is None and _metrics_at_reference(args, cfg, trainer))
                  or evaluate_at_start(trainer, job.folder, job.checkpoint, EVAL_KEYS))
    result = trainer.train(resume_from_checkpoint=job.checkpoint)
    after = evaluate_at_end(trainer) if eval_rows else None
    trainer.save_model(str(job.work))  # every rank takes part (ZeRO-3 / FSDP gather); rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None

    # 5. Artifact: adapter (or weights), tokenizer, config (with the template resolved, so `align generate` and a
    #    later stage prompt as trained), card, log, plots; renamed into place, registered.
    work = job.work
    tokenizer.save_pretrained(str(work))
    metrics = {
        "eval_reward_accuracy_before": _get(before, "eval_rewards/accuracies"),
        "eval_reward_accuracy": _get(after, "eval_rewards/accuracies"),
        "eval_reward_margin_before": _get(before, "eval_rewards/margins"),
        "eval_reward_margin": _get(after, "eval_rewards/margins"),
        "eval_loss_before": _get(before, "eval_loss"),
        "eval_loss": _get(after, "eval_loss"),
        "train_loss": mean_train_loss(trainer.state.log_history) or result.training_loss,
        "train_pairs": len(trainer.train_dataset),
        "eval_pairs": len(eval_rows) - dropped_eval,
        "train_prompts": train_prompts,
        "eval_prompts": len({p["group"] for p in evaluation}),
        **dropped.metrics(),
        "truncated": truncated_train + truncated_eval,
        "over_max_length": dropped_train + dropped_eval,
        "steps": result.global_step,
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    if cfg.output.merge and cfg.lora.enabled:
        save_merged(work, backbone, work / "merged", cfg.model.dtype, cfg.model.trust_remote_code)
    config = to_dict(replace(cfg, template=replace(cfg.template, name=template.name, prompt=template.prompt,
                                                   system=template.system)))
    history = ([{"step": 0, **before}] if before else []) + trainer.state.log_history
    save_run_record(job, config, history)
    plots = plot_training_curves(history, work) + _plot_rewards(history, work)
    artifact = publish_model(job, config=config, metrics=metrics, plots=plots, base_model=backbone,
                             model_source=_described(cfg.model.path, source.artifact, source.path),
                             adapter=cfg.lora.enabled, data_source=_described(cfg.data.path, data_artifact, data_path),
                             data_fingerprint=data_fingerprint,
                             parents=[source.artifact, data_artifact, eval_artifact, reference and reference.artifact],
                             keep_checkpoints=cfg.output.keep_checkpoints,
                             usage=_card_usage(job.final, cfg.lora.enabled, template))
    m = metrics
    print_finished(job, artifact, [
        *([("held-out reward accuracy", f"{m['eval_reward_accuracy_before']:.3f} -> {m['eval_reward_accuracy']:.3f}"
            + (" (at the start the policy is the reference: every implicit reward is 0)"
               if m["eval_reward_margin_before"] == 0 else "")),
           ("held-out reward margin", f"{m['eval_reward_margin_before']:.4g} -> {m['eval_reward_margin']:.4g}"),
           ("eval loss", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}")]
          if "eval_reward_accuracy" in m and "eval_reward_accuracy_before" in m else
          [("held-out metrics", "none (no held-out pairs: data.val_set_size or data.eval_path)")]),
        ("train loss", metrics["train_loss"]),
        ("steps", result.global_step),
        ("runtime", f"{m['train_runtime_s']:.1f} s"),
    ], plots)
    return artifact


# --------------------------------------------------------------------------------------------------
# Policy and reference

def _require_causal_lm(source: ModelSource, key: str, given: str, cfg: DPORunConfig) -> None:
    """DPO compares a causal LM's log-probabilities: a reward model (score head) or an encoder-decoder is refused
    before anything loads."""
    require_model_kind(source, key, given, "align dpo", kinds=("causal",),
                       hint="the SFT model (e.g. sft:latest) or a decoder-only model folder", model_cfg=cfg.model)


def _reference_source(cfg: DPORunConfig, registry: Registry, policy: ModelSource) -> ModelSource | None:
    """`reference:` resolved and checked; None when it is the policy itself (the default)."""
    if cfg.reference is None:
        return None
    try:
        path, _ = resolve_path(cfg.reference, registry)
    except AlignError as e:
        raise AlignError(f"reference: {e}") from None
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise AlignError(f"reference: folder not found: {path} (relative to {Path.cwd()}); give a registry reference "
                         f"(sft:1) or a model folder")
    reference = resolve_model(cfg.reference, registry)
    _require_causal_lm(reference, "reference", cfg.reference, cfg)
    return None if reference.path == policy.path else reference


def _require_same_vocabulary(tokenizer, reference: ModelSource, cfg: DPORunConfig) -> None:
    """Log-probabilities of the same token ids are compared: the reference must share the policy's tokenizer (a
    special token only one of them has, like an added pad token, is never scored)."""
    other = load_tokenizer(reference.path, cfg.model)
    ours, theirs = tokenizer.get_vocab(), other.get_vocab()
    moved = sum(ours[t] != i for t, i in theirs.items() if t in ours)
    extra = (set(ours) ^ set(theirs)) - set(tokenizer.all_special_tokens) - set(other.all_special_tokens)
    if moved or extra:
        raise AlignError(f"reference: {cfg.reference} has a different tokenizer from the policy ({len(theirs):,} vs "
                         f"{len(ours):,} tokens, {moved + len(extra):,} different); DPO compares log-probabilities "
                         f"of the same tokens: give a model with the policy's tokenizer")


def _plain_folder(source: ModelSource, cfg: DPORunConfig) -> tuple[str, str | None]:
    """A folder that loads with transformers alone, and a note for the summary: a LoRA adapter is merged into its
    base once (its own `merged/` folder when it has one, else a cached folder under the align home)."""
    if not source.adapter_of:
        return source.path, None
    label = source.artifact.ref if source.artifact else source.path
    merged = Path(source.path) / "merged"
    if (merged / "config.json").is_file():
        return str(merged), f"{label}: its merged/ folder"
    return merge_adapter(source, cfg.model.dtype), f"{label}: adapter merged into its base (cached)"


def _reference_model(path: str | None, backbone: str, cfg: DPORunConfig, args, tokenizer):
    """The frozen reference model to hand TRL (None: TRL uses the policy itself) and how it is held, for the log."""
    precomputed = ", log-probs precomputed before training" if args.precompute_ref_log_probs else ""
    if path is None and cfg.lora.enabled:
        return None, f"the SFT model = the policy with its LoRA adapter disabled (1 copy of the base weights)" \
                     f"{precomputed}"
    if path is None and args.precompute_ref_log_probs:
        return None, "the SFT model: its log-probs precomputed before training (no copy kept)"
    reference = load_model(path or backbone, cfg.model, cfg.quantization)
    match_model_to_tokenizer(reference, tokenizer)
    reference.eval().requires_grad_(False)
    if path:
        where = "" if Path(cfg.reference).resolve() == Path(path) else f" = {path}"
        return reference, f"{cfg.reference}{where}: a separate frozen model{precomputed}"
    return reference, "the SFT model: a separate frozen copy (full fine-tuning: 2 copies of the weights)"


def _metrics_at_reference(args, cfg: DPORunConfig, trainer) -> dict | None:
    """The held-out metrics of a policy that starts as its own reference (no `reference:`), known without a pass over
    the held-out pairs (23 s of the demo's DPO step): every log-ratio log(pi / pi_ref) is exactly 0 (a fresh LoRA
    adapter adds exactly 0; a full copy has the same weights), so every implicit reward and margin is 0, no pair counts
    as ranked right (TRL's strict >), and the sigmoid loss is ln 2 (label smoothing mixes two ln 2 terms). None where
    that is not so: other losses (their value at 0 differs), WPO weighting, a router aux loss, DoRA (its start equals
    the base only up to rounding)."""
    if list(args.loss_type) != ["sigmoid"] or args.use_weighting or trainer.aux_loss_enabled or cfg.lora.use_dora:
        return None
    weight = (args.loss_weights or [1.0])[0]
    return {"eval_loss": weight * math.log(2), "eval_rewards/accuracies": 0.0, "eval_rewards/margins": 0.0,
            "eval_rewards/chosen": 0.0, "eval_rewards/rejected": 0.0}


# --------------------------------------------------------------------------------------------------
# Data

def _split(pairs: list[dict], cfg: DPORunConfig,
           eval_path: str | None) -> tuple[list[dict], list[dict], int, Dropped]:
    """(train, held-out, eval pairs left out, what the eval file dropped): `data.eval_path` minus the prompts also in
    training, else `data.val_set_size` of the prompts, all pairs of a prompt on one side."""
    if not eval_path:
        return *split_by_prompt(pairs, cfg.data.val_set_size, cfg.data.seed), 0, Dropped()
    held = read_preferences(read_records(eval_path, cfg.data.split, "data.eval_path"), cfg.data.columns,
                            cfg.data.use_margin)
    train_prompts = {json.dumps(p["prompt"], sort_keys=True) for p in pairs}
    evaluation = [p for p in held.pairs if json.dumps(p["prompt"], sort_keys=True) not in train_prompts]
    return pairs, evaluation, len(held.pairs) - len(evaluation), held.dropped


def _template(cfg: DPORunConfig, source: ModelSource) -> tuple[TemplateConfig, str]:
    """The prompt template, and where it came from: `auto` is the one the SFT model was trained with."""
    given = cfg.template
    if given.name != "auto":
        return TemplateConfig(given.name, given.prompt, given.system), f"{given.name} (template: in the config)"
    template = training_template(source.path)
    if given.system:
        template = replace(template, system=given.system)
    label = source.artifact.ref if source.artifact else cfg.model.path
    if (Path(source.path) / "align_config.yaml").is_file():
        return template, f"{template.name}: the one {label} was trained with"
    return template, f"{template.name} (no align_config.yaml in {label}: the tokenizer's chat template)"


def _dpo_rows(pairs: list[dict], template: TemplateConfig) -> list[dict]:
    """Pairs -> TRL's explicit-prompt preference rows, as the SFT model saw its prompts. `chat`: message lists (a
    text prompt becomes a user turn after `template.system`, a text response an assistant turn), which TRL renders
    with the tokenizer's chat template, the prompt with the assistant turn opened. Other templates: the prompt text
    in that template, responses as text (TRL appends EOS)."""
    rows = []
    for pair in pairs:
        prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
        if template.name == "chat":
            prompt = as_messages(prompt, "user")
            if template.system and prompt[0]["role"] != "system":
                prompt = [{"role": "system", "content": template.system}] + prompt
            chosen, rejected = as_messages(chosen, "assistant"), as_messages(rejected, "assistant")
        else:
            prompt = format_prompt(template, as_text(prompt))
            chosen, rejected = as_text(chosen), as_text(rejected)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _over_length(dataset, rows: int, max_length: int | None) -> tuple[int, int]:
    """(pairs TRL truncates to max_length, pairs it dropped because the prompt alone fills it) of a tokenized set."""
    if dataset is None or not max_length:
        return 0, 0
    truncated = sum(len(p) + max(len(c), len(r)) > max_length
                    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))
    return truncated, rows - len(dataset)


# --------------------------------------------------------------------------------------------------
# Training

def training_arguments(cfg: DPORunConfig, run_dir: RunDir, has_eval: bool):
    """TRL's DPOConfig: align's defaults (safe on CPU, explicit about precision) under the user's `training:`."""
    from trl import DPOConfig

    defaults = trainer_defaults(cfg.model, run_dir.work / CHECKPOINTS, cfg.seed, cfg.data.seed, cfg.training)
    strategy = cfg.training.get("eval_strategy")
    if not has_eval and (cfg.training.get("load_best_model_at_end") or
                         (strategy is not None and str(strategy).lower() != "no")):
        raise AlignError("training.eval_strategy / load_best_model_at_end need held-out pairs: set data.val_set_size "
                         "or data.eval_path (or eval_strategy: no)")
    return training_config(DPOConfig, defaults | cfg.training)


def _make_trainer(model, ref_model, tokenizer, args, train_rows: list[dict], eval_rows: list[dict]):
    """TRL's DPOTrainer. Its configuration checks (loss-specific settings) end as one-line errors. For a PEFT policy
    TRL copies the adapter as a frozen `ref` adapter; ours is new (an exact identity update), so the copy is dropped
    and the reference is the policy with its adapter disabled: the SFT model, with no second copy of anything."""
    from datasets import Dataset
    from trl import DPOTrainer

    try:
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
        )
    except (ValueError, NotImplementedError) as e:
        raise AlignError("training: " + " ".join(str(e).split())) from None
    if ref_model is None and "ref" in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter("ref")
    return trainer


def _get(metrics: dict | None, key: str):
    return metrics.get(key) if metrics else None


# --------------------------------------------------------------------------------------------------
# Plots and the model card

def _plot_rewards(history: list[dict], folder: Path) -> list[str]:
    """plots/rewards.png: implicit-reward accuracy and margin by step, training batches and held-out pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn = False
    for ax, metric, label in ((axes[0], "rewards/accuracies", "implicit reward accuracy"),
                              (axes[1], "rewards/margins", "implicit reward margin")):
        for split, key in (("train (batches)", metric), ("held-out", f"eval_{metric}")):
            points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=split)
                drawn = True
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    written = []
    if drawn:
        axes[0].set_ylim(-0.02, 1.02)
        fig.tight_layout()
        (folder / "plots").mkdir(exist_ok=True)
        fig.savefig(folder / "plots" / "rewards.png", dpi=110)
        written.append("plots/rewards.png")
    plt.close(fig)
    return written


def _described(given: str, artifact: Artifact | None, path: str) -> str:
    """`sft:latest` -> `sft:latest (sft:3 name = /path)`, for the card."""
    return f"{given} ({artifact.ref} {artifact.name} = {path})" if artifact else given


def _card_usage(final: Path, adapter: bool, template: TemplateConfig) -> str:
    """The card's `## Use`: with align (the training template applied for you), and with plain transformers/peft."""
    auto, module = ("AutoPeftModelForCausalLM", "peft") if adapter else ("AutoModelForCausalLM", "transformers")
    question = "What is the capital of France?"
    if template.name == "chat":
        messages = ([{"role": "system", "content": template.system}] if template.system else []) + \
            [{"role": "user", "content": question}]
        render = (f"text = tokenizer.apply_chat_template({messages!r}, tokenize=False, add_generation_prompt=True)\n"
                  f"inputs = tokenizer(text, add_special_tokens=False, return_tensors=\"pt\")\n")
    else:
        render = (f"text = {format_prompt(template, question)!r}  # the `{template.name}` template it was trained "
                  f"with\ninputs = tokenizer(text, return_tensors=\"pt\")\n")
    return f"""With align (prompts are wrapped in the template the model was trained with):

```bash
align generate --model {str(final)!r} --prompt {question!r}
```

With plain transformers{' and peft' if adapter else ''}:

```python
from {module} import {auto}
from transformers import AutoTokenizer

model = {auto}.from_pretrained({str(final)!r})
tokenizer = AutoTokenizer.from_pretrained({str(final)!r})
{render}output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""
