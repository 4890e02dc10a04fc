"""One PPO run with TRL 1.12's experimental `PPOTrainer`: the baseline side of `benchmarks/ppo_vs_trl.py`.

    <trl-1.12 venv>/bin/python benchmarks/ppo_trl112_runner.py SETTINGS.json RESULT.json

Runs in the benchmark's own virtual environment (trl==1.12.0 beside transformers 5.23: TRL removed `PPOTrainer` in
1.13), never in align's. It imports nothing from align. SETTINGS.json (written by ppo_vs_trl.py) holds:

  policy         the SFT policy folder (plain causal LM + tokenizer)
  reward         the reward model as a plain AutoModelForSequenceClassification folder (align's reward adapter merged)
  prompts        a JSON file: the prompts' token ids, already rendered the way align renders them (chat template,
                 assistant turn opened, no extra special tokens)
  output_dir     TRL's output folder (nothing is saved inside the timed loop)
  hyper          the shared hyper-parameters (see HYPER in ppo_vs_trl.py)

How TRL is set up, as its own examples (examples/scripts/ppo/ppo.py) do: the policy gets a LoRA adapter through
`peft_config`, `ref_model=None` (the reference is the policy with its adapter disabled), the value model is a full
copy of the reward model (trained in full, as TRL does), the reward model is a second full copy. Rollout batch =
`per_device_train_batch_size` (gradient_accumulation_steps 1), minibatch = batch / `num_mini_batches`: one optimizer
step per minibatch, as align. TRL 1.12's defaults that would distort a CPU comparison are turned off: bf16 and
gradient checkpointing (defaults True), checkpoint saving, sample generations.

The result JSON: episodes (responses trained on), updates, train_runtime_s (time around `trainer.train()` only),
load_s, the last logged metrics and the response lengths, for the parent to combine with this process's peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(settings_path: str, result_path: str) -> int:
    started = time.perf_counter()
    settings = json.loads(Path(settings_path).read_text())
    hyper = settings["hyper"]

    import torch

    torch.set_num_threads(int(settings.get("threads", 2)))
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(settings["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(settings["policy"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(settings["reward"], num_labels=1,
                                                                      dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(settings["reward"], num_labels=1,
                                                                     dtype=torch.float32)
    prompts = json.loads(Path(settings["prompts"]).read_text())
    dataset = Dataset.from_dict({"input_ids": prompts})

    batch, mini = hyper["batch_size"], hyper["mini_batch_size"]
    if batch % mini:
        raise SystemExit(f"batch_size {batch} is not a multiple of mini_batch_size {mini}")
    config = PPOConfig(
        output_dir=settings["output_dir"],
        # Rollout batch of `batch` prompts; `batch // mini` minibatches, one optimizer step each (with
        # gradient_accumulation_steps > 1, TRL's accelerate accumulation would merge minibatches into one step).
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // mini,
        num_ppo_epochs=hyper["ppo_epochs"],
        total_episodes=batch * hyper["steps"],
        local_rollout_forward_batch_size=hyper["forward_batch_size"],
        response_length=hyper["max_new_tokens"],
        temperature=hyper["temperature"],
        stop_token="eos",
        missing_eos_penalty=hyper["missing_eos_penalty"],
        learning_rate=hyper["learning_rate"],
        lr_scheduler_type=hyper["lr_scheduler_type"],
        warmup_steps=0,
        weight_decay=0.0,
        kl_coef=hyper["kl_coef"],
        kl_estimator="k1",
        cliprange=hyper["cliprange"],
        cliprange_value=hyper["cliprange_value"],
        vf_coef=hyper["vf_coef"],
        gamma=hyper["gamma"],
        lam=hyper["lam"],
        whiten_rewards=False,
        seed=hyper["seed"],
        data_seed=hyper["seed"],
        # TRL 1.12 PPOConfig defaults that do not fit a CPU comparison:
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=True,
    )
    peft_config = LoraConfig(r=hyper["lora_r"], lora_alpha=hyper["lora_alpha"], lora_dropout=hyper["lora_dropout"],
                             target_modules=hyper["lora_target_modules"], bias="none", task_type="CAUSAL_LM")

    history: list[dict] = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         peft_config=peft_config, callbacks=[Keep()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    load_s = time.perf_counter() - started

    train_started = time.perf_counter()
    trainer.train()
    train_runtime = time.perf_counter() - train_started

    episodes = int(trainer.state.episode)
    last = history[-1] if history else {}
    result = {
        "episodes": episodes,
        "updates": int(trainer.state.global_step),
        "train_runtime_s": round(train_runtime, 3),
        "episodes_per_s": round(episodes / train_runtime, 3),
        "load_s": round(load_s, 2),
        "trainable_parameters": trainable,
        "eos_tokens_total": int(sum(log.get("val/num_eos_tokens", 0) for log in history)),
        "score_mean_last": last.get("objective/scores"),
        "kl_last": last.get("objective/kl"),
        "logs": history,
        "versions": _versions(),
    }
    Path(result_path).write_text(json.dumps(result, indent=1))
    print(f"trl 1.12 PPOTrainer: {episodes} episodes in {train_runtime:.1f} s "
          f"({episodes / train_runtime:.2f} episodes/s); loading took {load_s:.1f} s")
    return 0


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "peft", "accelerate", "datasets")}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1], sys.argv[2]))
