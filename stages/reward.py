"""`align reward`: a reward model from human preference pairs (InstructGPT stage 2).

Reads top to bottom: config -> output folder -> preference data (rankings expanded to all their pairs, ties and
identical pairs dropped, whole prompts held out) -> tokenizer and encoding (align.scoring.encode_pair, the same
formatting the scorer uses) -> backbone (an SFT LoRA adapter is merged once into plain weights) with a new score
head (AutoModelForSequenceClassification, num_labels=1), or a reward model trained before, continued -> LoRA
(SEQ_CLS: the head is trained in full and saved with the adapter) / QLoRA / full -> TRL RewardTrainer, batches built
from whole prompts (InstructGPT) -> reward normalization and held-out metrics with the scorer -> artifact (weights,
tokenizer, normalization, card, log, plots) renamed into place -> registry row. The config is loaded by the CLI
(TRL's checks finished by `check`); the head and tail every stage shares are align/run.py.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from align.artifacts import CHECKPOINTS, RunDir, evaluate_at_end, evaluate_at_start, mean_train_loss
from align.config import LoadedConfig, read_config, to_dict
from align.data import (fingerprint, read_preferences, read_prompt_responses, read_records, split_by_prompt)
from align.errors import AlignError
from align.evaluation import CALIBRATION_BINS, calibration
from align.memory import check_memory, trainer_workload
from align.modeling import (ModelSource, apply_tuning, load_tokenizer, match_model_to_tokenizer, parameter_summary,
                            merge_adapter, prepare_tokenizer, resolve_model, torch_dtype, trainer_defaults,
                            training_config)
from align.registry import Artifact, Registry, resolve_path
from align.reporting import human_bytes, plot_reliability, plot_training_curves, print_table, pyplot
from align.run import check_training, print_finished, publish_model, save_run_record, start_run
from align.scoring import Normalization, RewardScorer, as_text, encode_pair, load_sequence_classifier
from align.stages.reward_config import RewardRunConfig

STAGE = "reward"


def check(loaded: LoadedConfig) -> RewardRunConfig:
    """The config align has read (`align.config.read_config`), checked in full: every `training:` key against TRL's
    RewardConfig, and the RewardConfig that training uses built once (its own checks, reported at file:line)."""
    from trl import RewardConfig

    return check_training(loaded, STAGE, RewardConfig, training_arguments)


def load(config_path: str, overrides: list[str]) -> RewardRunConfig:
    """The validated config, as `align reward` loads it."""
    return check(read_config(config_path, overrides, RewardRunConfig))


def run(cfg: RewardRunConfig, config_path: str, resume: bool = False) -> Artifact | None:
    """`align reward`: `cfg` checked by `check`, read from `config_path` (its file name is the default run name)."""
    # 1. The run: its name, output folder (and the checkpoint to resume from) and registry; references resolved.
    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume, report_to=cfg.training.get("report_to"))
    source = resolve_model(cfg.model.path, job.registry, cfg.model.gguf_file)
    data_path, data_artifact = resolve_path(cfg.data.path, job.registry)
    eval_path, eval_artifact = resolve_path(cfg.data.eval_path, job.registry) if cfg.data.eval_path else (None, None)

    # 2. Data: every format to pairs, rankings to all their pairs, ties and identical pairs dropped; prompts are
    #    held out whole. Bad data fails here, before any model loads.
    prefs = read_preferences(read_records(data_path, cfg.data.split), cfg.data.columns, cfg.data.use_margin)
    if len(prefs.pairs) < cfg.data.min_pairs:
        raise AlignError(f"data: {data_path}: only {len(prefs.pairs)} usable preference pairs (from {prefs.records} "
                         f"records; {prefs.dropped_ties} ties and {prefs.dropped_identical} identical pairs dropped); "
                         f"data.min_pairs is {cfg.data.min_pairs}. A reward model needs more comparisons")
    eval_overlap, dropped = 0, prefs.dropped
    if eval_path:
        held = read_preferences(read_records(eval_path, cfg.data.split, "data.eval_path"), cfg.data.columns,
                                cfg.data.use_margin)
        dropped += held.dropped
        train_prompts = {json.dumps(p["prompt"], sort_keys=True) for p in prefs.pairs}
        evaluation = [p for p in held.pairs if json.dumps(p["prompt"], sort_keys=True) not in train_prompts]
        eval_overlap = len(held.pairs) - len(evaluation)
        train = prefs.pairs
    else:
        train, evaluation = split_by_prompt(prefs.pairs, cfg.data.val_set_size, cfg.data.seed)
    reference = _reference_set(cfg, train, job.registry)

    # 3. Tokenizer and encoding: the reward model's own tokenizer, formatted as the scorer will format (one function).
    tokenizer = load_tokenizer(source.path, cfg.model)
    tokenizer_changes = _prepare_pad(tokenizer)
    max_length = cfg.training.get("max_length", 1024)
    train_rows, _, over_train = _encode(train, tokenizer, max_length)
    eval_rows, eval_pairs, over_eval = _encode(evaluation, tokenizer, max_length)
    if not train_rows:
        raise AlignError(f"data: every training pair is longer than training.max_length={max_length} tokens; raise it")
    data_fingerprint = fingerprint([{k: p[k] for k in ("prompt", "chosen", "rejected", "margin") if k in p}
                                    for p in train])
    args = training_arguments(cfg, job.folder, has_eval=bool(eval_rows))  # TrainingArguments' checks, before loading
    batches = PromptGroupedBatchSampler([r["group"] for r in train_rows], args.per_device_train_batch_size,
                                        args.data_seed if args.data_seed is not None else args.seed)

    # 4. Model: the backbone (an SFT adapter merged once) with a new score head; LoRA / QLoRA / full. Or a reward
    #    model trained before, continued: its LoRA adapter and score head (or all its weights).
    backbone, backbone_note = _backbone(source, cfg)
    continued = source.adapter_task == "SEQ_CLS"  # a LoRA reward model: its own adapter trains on, not a new one
    adapter = continued or cfg.lora.enabled
    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    from transformers import set_seed

    set_seed(cfg.seed)  # the new score head and LoRA weights
    model = load_sequence_classifier(backbone, cfg.model, cfg.quantization)
    resized = len(tokenizer) > model.get_input_embeddings().num_embeddings  # a pad token was added
    match_model_to_tokenizer(model, tokenizer)
    gradient_checkpointing = bool(cfg.training.get("gradient_checkpointing", False))
    if continued:
        from peft import PeftModel

        if quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        model = PeftModel.from_pretrained(model, source.path, is_trainable=True)
    else:
        model = apply_tuning(model, cfg.lora, cfg.model, quantized, gradient_checkpointing, task_type="SEQ_CLS")
    params = parameter_summary(model)
    longest = max(len(ids) for r in train_rows for ids in (r["chosen_ids"], r["rejected_ids"]))
    memory = check_memory(model, trainer_workload(args, longest, sequences_per_item=2, logit_positions=0))
    train_groups = len({r["group"] for r in train_rows})
    print_table(f"align reward: {job.name}", [
        ("model", backbone + (" (4-bit)" if cfg.quantization.load_in_4bit else
                              " (8-bit)" if cfg.quantization.load_in_8bit else "")),
        *([("backbone", backbone_note)] if backbone_note else []),
        ("method", "its LoRA adapter + score head, trained further" if continued else
         "LoRA + score head" if cfg.lora.enabled else
         ("partial" if cfg.model.train_only else "full fine-tuning")),
        ("parameters", f"{params.trainable:,} trainable of {params.total:,} ({params.trainable_share:.2%})"),
        ("memory (weights)", human_bytes(params.memory_bytes)),
        memory,
        ("data", f"{cfg.data.path} [{prefs.format}{', conversational' if prefs.conversational else ''}] "
                 f"{len(prefs.pairs)} pairs, {prefs.prompts} prompts"),
        *([("rankings", f"{prefs.rankings} expanded into all their pairs")] if prefs.rankings else []),
        ("dropped", dropped.summary()),
        ("split (by prompt)", f"{len(train_rows)} train / {len(eval_rows)} held-out pairs "
                              f"({train_groups} / {len({r['group'] for r in eval_rows})} prompts)"
                              + (f"; {eval_overlap} eval pairs left out (prompt in train)" if eval_overlap else "")),
        ("over max_length", f"{over_train + over_eval} pairs dropped (> {max_length} tokens)"),
        ("batches", f"{len(batches)} per epoch of whole prompts, <= {args.per_device_train_batch_size} pairs"
                    + (f"; {batches.split_groups} prompts larger than a batch split" if batches.split_groups else "")),
        *[("tokenizer", change) for change in tokenizer_changes],
        ("output", str(job.final)),
    ])

    # 5. Train.
    job.folder.create()
    if "tensorboard" in str(args.report_to):
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(job.work / "tensorboard"))
    trainer = _make_trainer(model, tokenizer, args, train_rows, eval_rows)
    if quantized:
        _match_head_dtype(trainer.model, cfg)
    before = evaluate_at_start(trainer, job.folder, job.checkpoint, ("eval_loss", "eval_accuracy", "eval_margin")) \
        if eval_rows else None
    result = trainer.train(resume_from_checkpoint=job.checkpoint)
    after = evaluate_at_end(trainer) if eval_rows else None
    trainer.save_model(str(job.work))  # every rank takes part (ZeRO-3 / FSDP gather); rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None
    work = job.work
    tokenizer.save_pretrained(str(work))

    # 6. Normalization and held-out metrics, with the scorer PPO and evaluation will use.
    scorer = _scorer(trainer, tokenizer, work)
    batch_size = args.per_device_eval_batch_size
    normalization = None
    if cfg.normalization.enabled:
        raw = scorer.score(reference.prompts, reference.responses, batch_size, normalized=False)
        normalization = Normalization.fit(raw, cfg.normalization.divide_by_std, reference.name)
        normalization.save(work)
        scorer.normalization = normalization
    heldout = _heldout(scorer, eval_rows, eval_pairs, batch_size) if eval_rows else None

    # 7. Artifact: weights, tokenizer, normalization, config, card, log, plots; renamed into place, registered.
    metrics = {
        "eval_accuracy_before": before and before.get("eval_accuracy"),
        "eval_accuracy": heldout and heldout.metrics["accuracy"],
        "eval_margin": heldout and heldout.metrics["margin"],
        "eval_ece": heldout and heldout.metrics["ece"],
        "eval_length_correlation": heldout and heldout.metrics["length_correlation"],
        **({f"eval_accuracy[{c}]": a for c, a in heldout.metrics["by_category"].items()} if heldout else {}),
        "eval_loss_before": before and before.get("eval_loss"),
        "eval_loss": after and after.get("eval_loss"),
        "train_loss": mean_train_loss(trainer.state.log_history) or result.training_loss,
        "reward_mean_reference": normalization and normalization.mean,
        "reward_std_reference": normalization and normalization.std,
        "reference_examples": normalization and normalization.count,
        "train_pairs": len(train_rows),
        "eval_pairs": len(eval_rows),
        "train_prompts": train_groups,
        "eval_prompts": len({r["group"] for r in eval_rows}),
        **dropped.metrics(),
        "over_max_length": over_train + over_eval,
        "steps": result.global_step,
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    if cfg.output.merge and adapter:
        _save_merged(work, cfg)
    config = to_dict(cfg)
    history = ([{"step": 0, **before}] if before else []) + trainer.state.log_history
    save_run_record(job, config, history)
    plots = plot_training_curves(history, work) + _plot_accuracy(history, work)
    if heldout:
        plots += _plot_rewards(heldout, normalization, work)
        plots += plot_reliability(heldout.calibration, heldout.metrics["ece"], work)
    artifact = publish_model(job, config=config, metrics=metrics, plots=plots, base_model=backbone,
                             model_source=_described(cfg.model.path, source.artifact, source.path),
                             adapter=adapter, data_source=_described(cfg.data.path, data_artifact, data_path),
                             data_fingerprint=data_fingerprint, parents=[source.artifact, data_artifact, eval_artifact],
                             keep_checkpoints=cfg.output.keep_checkpoints,
                             usage=_reward_card_usage(job.final, backbone, adapter, resized))
    m = metrics
    print_finished(job, artifact, [
        ("held-out accuracy", f"{m['eval_accuracy_before']:.3f} -> {m['eval_accuracy']:.3f}"
         if "eval_accuracy_before" in m and "eval_accuracy" in m else m.get("eval_accuracy", "no held-out set")),
        *([("held-out margin", m["eval_margin"]), ("calibration error (ECE)", m["eval_ece"]),
           ("reward ~ length (Pearson r)", m.get("eval_length_correlation", "n/a"))] if heldout else []),
        *[(f"accuracy [{c}]", a) for c, a in (heldout.metrics["by_category"].items() if heldout else [])],
        ("eval loss", f"{m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}"
         if "eval_loss" in m and "eval_loss_before" in m else m.get("eval_loss", "no eval set")),
        ("train loss", metrics["train_loss"]),
        ("steps", result.global_step),
        ("normalization", f"reference mean {normalization.mean:.4g}, std {normalization.std:.4g} "
                          f"({normalization.count} {reference.name})" if normalization else "off (raw rewards)"),
    ], plots)
    return artifact


# --------------------------------------------------------------------------------------------------
# Data

@dataclass
class Reference:
    """What normalization scores: (prompt, response) pairs and what they are, for the card."""

    prompts: list
    responses: list
    name: str


def _reference_set(cfg: RewardRunConfig, train: list[dict], registry: Registry) -> Reference:
    """`normalization.reference` (read now, so a bad file fails before training), else the distinct chosen
    responses of the training pairs; at most `normalization.max_examples`, a seeded random subset."""
    if cfg.normalization.reference:
        path, _ = resolve_path(cfg.normalization.reference, registry)
        prompts, responses, _ = read_prompt_responses(path, "normalization.reference")
        name = f"responses from {cfg.normalization.reference}"
    else:
        seen = {}
        for pair in train:
            seen.setdefault(json.dumps([pair["prompt"], pair["chosen"]], sort_keys=True), pair)
        prompts = [p["prompt"] for p in seen.values()]
        responses = [p["chosen"] for p in seen.values()]
        name = "chosen training responses"
    limit = cfg.normalization.max_examples
    if limit and len(prompts) > limit:
        keep = sorted(random.Random(cfg.data.seed).sample(range(len(prompts)), limit))
        prompts, responses = [prompts[i] for i in keep], [responses[i] for i in keep]
    return Reference(prompts, responses, name)


def _prepare_pad(tokenizer) -> list[str]:
    """A pad token distinct from EOS (the score is read at the last non-pad token), via prepare_tokenizer, but the
    tokenizer's own chat template, or none, stays: the reward model reads text exactly as the scorer formats it."""
    template = tokenizer.chat_template
    changes = [c for c in prepare_tokenizer(tokenizer) if "chat template" not in c]
    tokenizer.chat_template = template
    return changes


def _encode(pairs: list[dict], tokenizer, max_length: int | None) -> tuple[list[dict], list[dict], int]:
    """Pairs -> RewardTrainer's tokenized rows (chosen_ids, rejected_ids, group[, margin]); over-long pairs dropped
    (as TRL would) and counted. Also returns the kept pairs, in the same order."""
    rows, kept, over = [], [], 0
    for pair in pairs:
        chosen = encode_pair(tokenizer, pair["prompt"], pair["chosen"])
        rejected = encode_pair(tokenizer, pair["prompt"], pair["rejected"])
        if max_length and max(len(chosen), len(rejected)) > max_length:
            over += 1
            continue
        row = {"chosen_ids": chosen, "rejected_ids": rejected, "group": pair["group"]}
        if "margin" in pair:
            row["margin"] = pair["margin"]
        rows.append(row)
        kept.append(pair)
    return rows, kept, over


class PromptGroupedBatchSampler:
    """Batches of whole prompts, as in InstructGPT: all pairs of one prompt (the K-choose-2 comparisons of one
    ranking) are in the same batch, so no completion is seen in several gradient steps of an epoch.

    Prompt groups are packed, in a seeded random order, into batches of at most `max_pairs` pairs (a group that does
    not fit starts a new batch). A group with more pairs than `max_pairs` is split into consecutive batches of
    `max_pairs` pairs that hold only that prompt: memory stays bounded by the batch size, and its pairs still meet no
    other prompt's. The packing is fixed for the run, so the number of batches (and the learning-rate schedule
    planned from it) is known; the order of the batches is reshuffled every epoch.
    """

    batch_size = None  # batches vary in size: accelerate's BatchSamplerShard then hands out whole batches per rank
    drop_last = False

    def __init__(self, groups: list[int], max_pairs: int, seed: int = 0):
        self.max_pairs, self.seed, self.epoch, self.split_groups = max_pairs, seed, 0, 0
        members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        order = list(members)
        random.Random(seed).shuffle(order)
        self.batches: list[list[int]] = []
        current: list[int] = []
        for group in order:
            indices = members[group]
            if len(indices) > max_pairs:
                self.split_groups += 1
                self.batches += [indices[i:i + max_pairs] for i in range(0, len(indices), max_pairs)]
                continue
            if len(current) + len(indices) > max_pairs:
                self.batches.append(current)
                current = []
            current = current + indices
        if current:
            self.batches.append(current)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(len(self.batches)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        for i in order:
            yield list(self.batches[i])

    def __len__(self) -> int:
        return len(self.batches)


# --------------------------------------------------------------------------------------------------
# Model

def _backbone(source: ModelSource, cfg: RewardRunConfig) -> tuple[str, str | None]:
    """The folder the score head goes on (or, for a LoRA reward model trained before, the base its adapter and
    head load onto), and a note for the summary. An SFT LoRA adapter is merged into its base once (its own `merged/`
    folder when it has one, else a cached folder under the align home), so the reward adapter's base is a plain
    folder that loads with transformers alone. A full reward model is its own backbone: its head loads with it."""
    label = source.artifact.ref if source.artifact else source.path
    if not source.adapter_of:
        trained = source.artifact is not None and source.artifact.stage == "reward"
        return source.path, f"{label}: a reward model, all its weights trained further" if trained else None
    if source.adapter_task == "SEQ_CLS":
        return resolve_model(source.adapter_of).path, f"{label}: a reward model, trained further"
    if source.adapter_task != "CAUSAL_LM":
        raise AlignError(f"model.path: {cfg.model.path} is a {source.adapter_task} adapter; a reward model "
                         f"starts from a causal LM (an SFT model), a plain decoder / encoder model, or a reward "
                         f"model to train further")
    merged = Path(source.path) / "merged"
    if (merged / "config.json").is_file():
        return str(merged), f"{label}: its merged/ folder"
    return merge_adapter(source, cfg.model.dtype), f"{label}: adapter merged into its base (cached)"


# --------------------------------------------------------------------------------------------------
# Training

def training_arguments(cfg: RewardRunConfig, run_dir: RunDir, has_eval: bool):
    """TRL's RewardConfig: align's defaults (safe on CPU, explicit about precision, one epoch as InstructGPT) under
    the user's `training:`."""
    from trl import RewardConfig

    defaults = trainer_defaults(cfg.model, run_dir.work / CHECKPOINTS, cfg.seed, cfg.data.seed, cfg.training)
    defaults["num_train_epochs"] = 1  # InstructGPT: reward models overfit after one epoch
    strategy = cfg.training.get("eval_strategy")
    if not has_eval and (cfg.training.get("load_best_model_at_end") or
                         (strategy is not None and str(strategy).lower() != "no")):
        raise AlignError("training.eval_strategy / load_best_model_at_end need held-out pairs: set data.val_set_size "
                         "or data.eval_path (or eval_strategy: no)")
    return training_config(RewardConfig, defaults | cfg.training)


@dataclass
class RankingCollator(DataCollatorForPreference):
    """Preference pairs -> each distinct sequence of the batch once, with the pairs as indices into them: a prompt's
    ranking of K completions costs K forward passes for its K(K-1)/2 pairs (InstructGPT, section 3.5), where TRL's
    collator stacks every pair's chosen and rejected sequence (K(K-1) passes)."""

    def torch_call(self, examples):
        from trl.trainer.utils import pad

        distinct: dict[tuple[int, ...], int] = {}
        chosen = [distinct.setdefault(tuple(e["chosen_ids"]), len(distinct)) for e in examples]
        rejected = [distinct.setdefault(tuple(e["rejected_ids"]), len(distinct)) for e in examples]
        sequences = [torch.tensor(ids) for ids in distinct]
        batch = {name: pad(tensors, padding_value=value, padding_side="right",
                           pad_to_multiple_of=self.pad_to_multiple_of)
                 for name, tensors, value in (("input_ids", sequences, self.pad_token_id),
                                              ("attention_mask", [torch.ones_like(s) for s in sequences], 0))}
        batch["chosen_index"], batch["rejected_index"] = torch.tensor(chosen), torch.tensor(rejected)
        for key, dtype in (("margin", torch.float), ("group", torch.long)):  # group: the prompt, for tests and logs
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=dtype)
        return batch


class GroupedRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer whose training batches are whole prompts (PromptGroupedBatchSampler), each distinct
    completion scored once (RankingCollator)."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "group"]

    def get_train_dataloader(self):
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import seed_worker

        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = PromptGroupedBatchSampler(dataset["group"], self.args.per_device_train_batch_size, seed)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
                            persistent_workers=self.args.dataloader_persistent_workers,
                            worker_init_fn=partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                                   rank=self.args.process_index))
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL 1.16's Bradley-Terry loss and logged metrics, with two changes: the pairs index the batch's distinct
        sequences (RankingCollator); batches of whole prompts differ in size between ranks, so the rewards are padded
        (NaN, ignored) before they are gathered for the min/mean/max reward logs (TRL gathers them as they are, which
        needs the same batch size on every rank)."""
        chosen, rejected, wanted_margin, _ = (inputs.pop(key, None)
                                              for key in ("chosen_index", "rejected_index", "margin", "group"))
        mode = "train" if self.model.training else "eval"
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits.squeeze(-1)
        rewards_chosen, rewards_rejected = rewards[chosen], rewards[rejected]
        margin = rewards_chosen - rewards_rejected
        loss = -torch.nn.functional.logsigmoid(margin if wanted_margin is None else margin - wanted_margin).mean()
        if self.args.center_rewards_coefficient is not None:
            loss += self.args.center_rewards_coefficient * torch.mean((rewards_chosen + rewards_rejected) ** 2)
        accelerator = self.accelerator
        if mode == "train":
            tokens = accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            rewards = accelerator.gather(accelerator.pad_across_processes(outputs.logits.float(), dim=0,
                                                                          pad_index=float("nan")))
            rewards = rewards[~rewards.isnan()]
            self._metrics[mode]["min_reward"].append(rewards.min().item())
            self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            self._metrics[mode]["max_reward"].append(rewards.max().item())
            accuracy = accelerator.gather_for_metrics((margin > 0).float().mean()).mean().item()
            self._metrics[mode]["accuracy"].append(accuracy)
            self._metrics[mode]["margin"].append(accelerator.gather_for_metrics(margin.mean()).mean().item())
        return (loss, outputs) if return_outputs else loss


def _make_trainer(model, tokenizer, args, train_rows: list[dict], eval_rows: list[dict]) -> GroupedRewardTrainer:
    from datasets import Dataset

    return GroupedRewardTrainer(
        model=model,
        args=args,
        data_collator=RankingCollator(pad_token_id=tokenizer.pad_token_id,
                                                pad_to_multiple_of=args.pad_to_multiple_of),
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )


def _match_head_dtype(model, cfg: RewardRunConfig) -> None:
    """TRL casts every trainable parameter of a quantized model to bf16 (QLoRA's recipe). LoRA layers cast their
    input, but the score head (modules_to_save) is a plain Linear fed the backbone's hidden states: it must have
    their dtype, the 4-bit compute dtype (fp32 on CPU)."""
    quant = cfg.quantization
    compute = torch_dtype(cfg.model.dtype if quant.compute_dtype == "auto" else quant.compute_dtype)
    for name, param in model.named_parameters():
        if "modules_to_save" in name and param.dtype != compute:
            param.data = param.data.to(compute)


def _scorer(trainer, tokenizer, work: Path) -> RewardScorer:
    """The trained model as a scorer; sharded weights (ZeRO-3 / FSDP) are reloaded from the saved artifact."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return RewardScorer.load(str(work))
    return RewardScorer(trainer.accelerator.unwrap_model(trainer.model), tokenizer, source=str(work))


def _save_merged(work: Path, cfg: RewardRunConfig) -> None:
    """The adapter merged into full-precision base weights (also after QLoRA) in `merged/`: a plain
    sequence-classification model, with the tokenizer and normalization."""
    scorer = RewardScorer.load(str(work), device="cpu", dtype=cfg.model.dtype)
    merged = scorer.model.merge_and_unload()
    merged.save_pretrained(str(work / "merged"))
    scorer.tokenizer.save_pretrained(str(work / "merged"))
    if scorer.normalization is not None:
        scorer.normalization.save(work / "merged")


# --------------------------------------------------------------------------------------------------
# Held-out metrics

@dataclass
class Heldout:
    chosen: list[float]  # raw rewards
    rejected: list[float]
    metrics: dict
    calibration: list[tuple[float, float, int]]  # per bin: mean predicted P(first preferred), observed rate, count


def _heldout(scorer: RewardScorer, rows: list[dict], pairs: list[dict], batch_size: int) -> Heldout:
    chosen = scorer.score_ids([r["chosen_ids"] for r in rows], batch_size)
    rejected = scorer.score_ids([r["rejected_ids"] for r in rows], batch_size)

    def length(response) -> int:
        return len(scorer.tokenizer(as_text(response), add_special_tokens=False)["input_ids"])

    metrics, reliability = preference_metrics(
        chosen, rejected, categories=[p.get("category") for p in pairs],
        lengths=([length(p["chosen"]) for p in pairs], [length(p["rejected"]) for p in pairs]))
    return Heldout(chosen, rejected, metrics, reliability)


def preference_metrics(chosen: list[float], rejected: list[float], categories: list[str | None] | None = None,
                       lengths: tuple[list[int], list[int]] | None = None, bins: int = CALIBRATION_BINS):
    """Pairwise accuracy (a tie counts half), mean margin r_chosen - r_rejected, expected calibration error of
    P(chosen preferred) = sigmoid(margin), Pearson r of reward with response length (over chosen and rejected
    responses; a reward-hacking signal), accuracy per category. Returns (metrics, calibration bins).

    ECE: `align.evaluation.calibration` (each pair counted in both orders, 10 equal-width bins), as `align eval
    reward` reports it.
    """
    margins = [c - r for c, r in zip(chosen, rejected)]
    wins = [1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins]
    metrics = {"accuracy": sum(wins) / len(wins), "margin": sum(margins) / len(margins)}
    reliability = calibration(margins, bins)
    metrics["ece"] = reliability.ece
    metrics["length_correlation"] = _pearson(chosen + rejected, lengths[0] + lengths[1]) if lengths else None
    by_category: dict[str, list[float]] = {}
    for category, win in zip(categories or [], wins):
        if category is not None:
            by_category.setdefault(category, []).append(win)
    metrics["by_category"] = {c: sum(v) / len(v) for c, v in sorted(by_category.items())}
    return metrics, reliability.bins


def _pearson(xs: list[float], ys: list[float]) -> float | None:
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


# --------------------------------------------------------------------------------------------------
# Plots and the model card

def _plot_accuracy(history: list[dict], folder: Path) -> list[str]:
    """plots/accuracy.png: training-batch and held-out pairwise accuracy by step."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn = False
    for label, key in (("train (batches)", "accuracy"), ("held-out", "eval_accuracy")):
        points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
            drawn = True
    written = []
    if drawn:
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("pairwise accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        (folder / "plots").mkdir(exist_ok=True)
        fig.savefig(folder / "plots" / "accuracy.png", dpi=110)
        written.append("plots/accuracy.png")
    plt.close(fig)
    return written


def _plot_rewards(heldout: Heldout, normalization: Normalization | None, folder: Path) -> list[str]:
    """plots/reward_histogram.png: rewards of held-out chosen vs rejected responses."""
    plt = pyplot()
    shift = normalization.apply if normalization else (lambda r: r)
    chosen, rejected = [shift(r) for r in heldout.chosen], [shift(r) for r in heldout.rejected]
    low, high = min(chosen + rejected), max(chosen + rejected)
    edges = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {sum(chosen) / len(chosen):.2f})", color="tab:green")
    ax.hist(rejected, bins=edges, alpha=0.6, label=f"rejected (mean {sum(rejected) / len(rejected):.2f})",
            color="tab:red")
    ax.set_xlabel("reward" + (" (normalized: reference mean = 0)" if normalization else " (raw)"))
    ax.set_ylabel("held-out responses")
    ax.set_title(f"held-out accuracy {heldout.metrics['accuracy']:.3f}, {len(chosen)} pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    (folder / "plots").mkdir(exist_ok=True)
    fig.savefig(folder / "plots" / "reward_histogram.png", dpi=110)
    plt.close(fig)
    return ["plots/reward_histogram.png"]


def _described(given: str, artifact: Artifact | None, path: str) -> str:
    """`label:latest` -> `label:3 (name) = /path/pairs.jsonl`, for the card."""
    return f"{given} ({artifact.ref} {artifact.name} = {path})" if artifact else given


def _reward_card_usage(final: Path, base: str, adapter: bool, resized: bool) -> str:
    """The card's `## Use` section for a reward model (the generic card shows a causal LM)."""
    load = (f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1)\n"
            + ("base.resize_token_embeddings(len(tokenizer))\n" if resized else "")
            + "base.config.pad_token_id = tokenizer.pad_token_id\n"
            f"model = PeftModel.from_pretrained(base, {str(final)!r}).eval()\n") if adapter else \
        f"model = AutoModelForSequenceClassification.from_pretrained({str(final)!r}).eval()\n"
    imports = "from peft import PeftModel\n" if adapter else ""
    usage = f"""With align (the same formatting as in training; normalized so reference responses average 0):

```python
from align.scoring import RewardScorer

scorer = RewardScorer.load({str(final)!r})  # or its registry reference, e.g. "reward:latest"
rewards = scorer.score(["What is the capital of France?"], ["Paris."])
```

With plain transformers{' and peft' if adapter else ''}: the input is the tokenizer's chat template over the user
prompt and the assistant response (without a chat template: `prompt + "\\n\\n" + response`, plus EOS where the
tokenizer has one); the reward is `logits[0, 0]`; subtract `mean` from `reward_normalization.json` to normalize.

```python
{imports}from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained({str(final)!r})
{load}```"""
    return usage
