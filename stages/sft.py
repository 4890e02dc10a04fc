"""`align sft`: supervised fine-tuning on instruction data (InstructGPT stage 1).

Reads top to bottom: config (loaded by the CLI; TRL's checks finished here) -> output folder -> data -> model ->
TRL SFTTrainer (or a seq2seq Trainer for encoder-decoder models) -> artifact (adapter or full model, tokenizer, card,
log, plots) renamed into place -> registry row. The head and tail every stage shares are align/run.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from align.artifacts import CHECKPOINTS, RunDir, evaluate_at_end, evaluate_at_start, mean_train_loss
from align.config import LoadedConfig, read_config, to_dict
from align.data import fingerprint, read_records, split_validation, to_examples, token_lengths
from align.errors import AlignError
from align.memory import SFT_LOGIT_COPIES, check_memory, trainer_workload
from align.modeling import (apply_tuning, load_model, load_tokenizer, match_model_to_tokenizer, parameter_summary,
                            prepare_tokenizer, require_model_kind, resolve_model, save_merged, trainer_defaults,
                            training_config, training_flops)
from align.registry import Artifact
from align.reporting import human_bytes, plot_training_curves, print_table
from align.run import check_training, print_finished, publish_model, save_run_record, start_run
from align.stages.sft_config import SFTRunConfig

STAGE = "sft"


def check(loaded: LoadedConfig) -> SFTRunConfig:
    """The config align has read (`align.config.read_config`), checked in full: every `training:` key against TRL's
    SFTConfig, and the SFTConfig that training uses built once (its own checks, reported at file:line)."""
    from trl import SFTConfig

    return check_training(loaded, STAGE, SFTConfig, training_arguments)


def load(config_path: str, overrides: list[str]) -> SFTRunConfig:
    """The validated config, as `align sft` loads it."""
    return check(read_config(config_path, overrides, SFTRunConfig))


def run(cfg: SFTRunConfig, config_path: str, resume: bool = False) -> Artifact | None:
    """`align sft`: `cfg` checked by `check`, read from `config_path` (its file name is the default run name)."""
    # 1. The run: its name, output folder (and the checkpoint to resume from) and registry; the starting model.
    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume, report_to=cfg.training.get("report_to"))
    source = resolve_model(cfg.model.path, job.registry, cfg.model.gguf_file)
    if source.adapter_of:
        raise AlignError(f"model.path: {cfg.model.path} is a LoRA adapter; fine-tune its merged model instead "
                         f"(run that stage with output.merge=true and use <dir>/merged)")
    require_model_kind(source, "model.path", cfg.model.path, "align sft", hint="a pretrained model folder or hub id",
                       model_cfg=cfg.model)

    # 2. Data: read, format, measure, split. Bad data fails here, before the model loads.
    tokenizer = load_tokenizer(source.path, cfg.model)
    tokenizer_changes = prepare_tokenizer(tokenizer)
    prepared = to_examples(read_records(cfg.data.path, cfg.data.split), cfg.data, cfg.template)
    dropped = prepared.dropped
    if cfg.data.eval_path:
        train = prepared.examples
        held = to_examples(read_records(cfg.data.eval_path, cfg.data.split, "data.eval_path"), cfg.data, cfg.template)
        evaluation, dropped = held.examples, dropped + held.dropped
    else:
        train, evaluation = split_validation(prepared.examples, cfg.data.val_set_size, cfg.data.seed)
    max_length = cfg.training.get("max_length", 1024)
    lengths = token_lengths(train, tokenizer)
    overlong = sum(length > max_length for length in lengths) if max_length else 0
    if overlong and cfg.data.overlong == "drop":
        train = [e for e, length in zip(train, lengths) if length <= max_length]
        lengths = [length for length in lengths if length <= max_length]
        if not train:
            raise AlignError(f"data: every example is longer than training.max_length={max_length} tokens; raise "
                             f"it or set data.overlong: truncate")
    if evaluation and max_length and cfg.data.overlong == "drop":
        evaluation = [e for e, n in zip(evaluation, token_lengths(evaluation, tokenizer)) if n <= max_length]
    data_fingerprint = fingerprint(train)
    args = training_arguments(cfg, job.folder, has_eval=bool(evaluation))  # TrainingArguments' checks, before loading

    # 3. Model: dtype, quantization, LoRA / full / partial.
    quantized = cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit
    model = load_model(source.path, cfg.model, cfg.quantization)
    match_model_to_tokenizer(model, tokenizer)
    seq2seq = bool(model.config.is_encoder_decoder)
    gradient_checkpointing = bool(cfg.training.get("activation_checkpointing",
                                                   cfg.training.get("gradient_checkpointing", False)))
    model = apply_tuning(model, cfg.lora, cfg.model, quantized, gradient_checkpointing)
    params = parameter_summary(model)
    longest = max_length if args.packing and max_length else min(max(lengths), max_length or max(lengths))
    memory = check_memory(model, trainer_workload(args, longest, logit_copies=SFT_LOGIT_COPIES))
    trained_tokens = sum(min(n, max_length or n) for n in lengths)
    epochs = args.num_train_epochs
    if args.max_steps > 0:  # steps, not epochs, end the run
        epochs = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * \
            args.world_size / len(train)
    print_table(f"align sft: {job.name}", [
        ("model", f"{source.path}" + (" (4-bit)" if cfg.quantization.load_in_4bit else
                                      " (8-bit)" if cfg.quantization.load_in_8bit else "")),
        ("method", "LoRA" if cfg.lora.enabled else ("partial" if cfg.model.train_only else "full fine-tuning")),
        ("parameters", f"{params.trainable:,} trainable of {params.total:,} ({params.trainable_share:.2%})"),
        ("memory (weights)", human_bytes(params.memory_bytes)),
        memory,
        ("data", f"{cfg.data.path} [{prepared.format}] {len(train)} train / {len(evaluation)} eval"),
        ("dropped records", dropped.summary()),
        ("over max_length", f"{overlong} ({'dropped' if cfg.data.overlong == 'drop' else 'truncated'})"),
        ("est. training FLOPs", f"{training_flops(params, trained_tokens, epochs):.3e} (~{epochs:.2g} epochs)"),
        *[("tokenizer", change) for change in tokenizer_changes],
        *([("packing", f"1 packed row per forward pass x {args.gradient_accumulation_steps} accumulated "
                       f"(no flash-attention: same loss, less attention compute)")]
          if args.packing and args.per_device_train_batch_size != cfg.training.get("per_device_train_batch_size", 8)
          else []),
        ("output", str(job.final)),
    ])

    # 4. Train.
    job.folder.create()
    if "tensorboard" in str(args.report_to):  # TensorBoard's files belong with the artifact, not its checkpoints
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(job.work / "tensorboard"))
    trainer = _make_trainer(model, tokenizer, args, train, evaluation, seq2seq, cfg)
    eval_before = evaluate_at_start(trainer, job.folder, job.checkpoint, ("eval_loss",))["eval_loss"] \
        if evaluation else None
    result = trainer.train(resume_from_checkpoint=job.checkpoint)
    eval_after = evaluate_at_end(trainer)["eval_loss"] if evaluation else None
    # Every rank takes part in saving: ZeRO-3 / FSDP gather sharded weights (only rank 0 writes).
    trainer.save_model(str(job.work))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return None

    # 5. Artifact: weights, tokenizer, config, card, log, plots; then rename into place and register.
    metrics = {
        "train_loss": mean_train_loss(trainer.state.log_history) or result.training_loss,
        "eval_loss_before": eval_before,
        "eval_loss": eval_after,
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "over_max_length": overlong,
        **dropped.metrics(),
        "steps": result.global_step,
        "trained_tokens": trainer.state.num_input_tokens_seen,
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
    }
    metrics = {k: v for k, v in metrics.items() if v is not None}
    tokenizer.save_pretrained(str(job.work))
    if cfg.output.merge and cfg.lora.enabled:
        save_merged(job.work, source.path, job.work / "merged", cfg.model.dtype, cfg.model.trust_remote_code)
    config = to_dict(cfg)
    # The loss before training is the first point of the eval curve.
    history = ([{"step": 0, "eval_loss": eval_before}] if eval_before is not None else []) + trainer.state.log_history
    save_run_record(job, config, history)
    plots = plot_training_curves(history, job.work)
    base_model = source.artifact.base_model if source.artifact else source.path
    artifact = publish_model(job, config=config, metrics=metrics, plots=plots, base_model=base_model,
                             model_source=cfg.model.path, adapter=cfg.lora.enabled, data_source=cfg.data.path,
                             data_fingerprint=data_fingerprint, parents=[source.artifact],
                             keep_checkpoints=cfg.output.keep_checkpoints)
    print_finished(job, artifact, [
        ("eval loss", f"{eval_before:.4f} -> {eval_after:.4f}" if eval_before is not None and eval_after is not None
         else eval_after if eval_after is not None else "no eval set"),
        ("train loss", metrics["train_loss"]),
        ("steps", result.global_step),
        ("trained tokens", metrics["trained_tokens"]),
        ("tokens/s", metrics["trained_tokens"] / max(metrics["train_runtime_s"], 1e-9)),
    ], plots)
    return artifact


def training_arguments(cfg: SFTRunConfig, run_dir: RunDir, has_eval: bool):
    """TRL's SFTConfig: align's defaults (safe on CPU, explicit about precision) under the user's `training:`."""
    from trl import SFTConfig

    defaults = trainer_defaults(cfg.model, run_dir.work / CHECKPOINTS, cfg.seed, cfg.data.seed, cfg.training)
    defaults["include_num_input_tokens_seen"] = "non_padding"  # trained tokens in the summary and registry
    if cfg.training.get("load_best_model_at_end") and not has_eval:
        raise AlignError("training.load_best_model_at_end needs a validation set: set data.val_set_size or "
                         "data.eval_path")
    if cfg.early_stopping_patience and not cfg.training.get("load_best_model_at_end"):
        raise AlignError("early_stopping_patience needs training.load_best_model_at_end: true (and matching "
                         "training.eval_strategy / save_strategy)")
    values = defaults | cfg.training
    rows = values.get("per_device_train_batch_size", 8)
    flash = (cfg.model.attn_implementation or "").startswith("flash")
    if values.get("packing") and values.get("packing_strategy", "bfd") in ("bfd", "bfd_split") and not flash \
            and rows > 1:
        # BFD packing trains padding-free: the collator joins a micro-batch's packed rows into ONE sequence.
        # Without a varlen attention kernel (flash-attention) that costs dense attention over rows x max_length
        # tokens; one packed row per forward pass, accumulated to the same optimizer batch, gives the same
        # loss and steps for a fraction of the compute.
        values |= dict(per_device_train_batch_size=1, per_device_eval_batch_size=1,
                       gradient_accumulation_steps=values.get("gradient_accumulation_steps", 1) * rows)
    return training_config(SFTConfig, values)


def _make_trainer(model, tokenizer, args, train, evaluation, seq2seq: bool, cfg: SFTRunConfig):
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    callbacks = []
    if cfg.training.get("load_best_model_at_end") and cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold))
    if seq2seq:
        return _seq2seq_trainer(model, tokenizer, args, train, evaluation, callbacks)
    from trl import SFTTrainer

    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def _seq2seq_trainer(model, tokenizer, args, train, evaluation, callbacks):
    """Encoder-decoder models (T5...): prompt -> encoder, completion -> labels; TRL's SFT is decoder-only."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer

    def encode(example):
        prompt = example["prompt"]
        completion = example["completion"]
        if isinstance(prompt, list):  # chat-formatted pairs: the encoder reads the user turn as text
            prompt = "\n".join(m["content"] for m in prompt)
            completion = completion[0]["content"]
        features = tokenizer(prompt, truncation=True, max_length=args.max_length)
        features["labels"] = tokenizer(text_target=completion, truncation=True, max_length=args.max_length)["input_ids"]
        return features

    def dataset(examples):
        if examples and "prompt" not in examples[0]:
            raise AlignError("data: encoder-decoder models need pairs (prompt/completion, question/answer, ...), "
                             "not messages or text")
        return Dataset.from_list(examples).map(encode, remove_columns=list(examples[0]))

    args.remove_unused_columns = False
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset(train),
        eval_dataset=dataset(evaluation) if evaluation else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
