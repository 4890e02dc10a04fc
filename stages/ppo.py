"""`align ppo`: InstructGPT stage 3, PPO against the reward model with a per-token KL penalty and PPO-ptx.

Reads top to bottom: config -> output folder -> prompts (and ptx data) -> the SFT policy (a LoRA adapter merged
once into its base, so "adapter disabled" IS the SFT model) -> models: with LoRA, ONE copy of the base weights
holds the policy (adapter `default`, trained), the reference (all adapters disabled), the value function (adapter
`value` + a linear head) and, when it was trained on the same base, the reward model (adapter `reward` + its score
head); otherwise the reward model is loaded on its own and reads responses as text -> the PPO loop (`PPOTrainer`:
sample, score, KL-shaped per-token rewards, GAE, clipped policy and value losses over minibatches, ptx, adaptive
KL, NaN guard, checkpoints) -> artifact (policy adapter or weights, value function, tokenizer, card, log, plots,
samples) renamed into place -> registry row with the SFT model, the reward model and the ptx data as parents.

With `gold` (align/gold.py), every iteration's responses are also scored under a gold preference after the update
(measured, never trained on: nothing of it reaches the rewards, advantages or losses): its mean is logged as `gold`,
each sample keeps its own, and the plots and summary show proxy reward, gold score and KL together (Gao et al.
2022's overoptimization curve).

Distributed: under `torchrun` / `accelerate launch --multi_gpu` every process samples its own prompts and the
gradients are averaged across processes after each backward pass (data parallel, gloo on CPU, NCCL on GPUs). Under
`accelerate launch` with an FSDP config (configs/accelerate/fsdp.yaml) the model's weights (and their gradients and
optimizer state) are also split across the processes with PyTorch's FSDP2: one decoder layer is gathered at a time.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import random
import re
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.artifacts import CHECKPOINTS, RunDir, save_run_config, save_training_log
from align.config import DataConfig, PPORunConfig, TemplateConfig, load_config, to_dict
from align.data import Dropped, read_records, to_examples
from align.errors import AlignError
from align.memory import Workload, check_memory
from align.modeling import (load_tokenizer, merge_adapter, model_files, parameter_summary, prepare_tokenizer,
                            require_model_kind, resolve_model, training_template)
from align.gold import Gold
from align.stages.policy import (PLOT_PANELS, check_reward_artifact, encode_prompts, finished_rows, load_policy,
                          load_run_gold, plot_overoptimization, print_overoptimization, print_samples,
                          read_policy_prompts, register_policy, summarize, write_samples)
from align.registry import Artifact, Registry, resolve_path
from align.reporting import console, human_bytes, plot_metric_grid, print_table
from align.scoring import Normalization, RewardScorer, encode_pair

STAGE = "ppo"
STATE_FILE = "trainer_state.json"
VALUE_FOLDER = "value"
VALUE_HEAD_FILE = "value_head.pt"


def load(config_path: str, overrides: list[str]) -> PPORunConfig:
    """The validated config (what align's PPO cannot honour is refused by align.config, with file:line)."""
    cfg = load_config(config_path, overrides, PPORunConfig)
    if cfg.algorithm != "ppo":
        raise AlignError(f"algorithm: {cfg.algorithm} runs in stages/grpo.py (`align ppo` picks it)")
    return cfg


def run(config_path: str, overrides: list[str], resume: bool = False) -> Artifact | None:
    # 1. Config, output folder, references. Everything the user can get wrong fails here, before models load.
    cfg = load(config_path, overrides)
    dist = Distributed.start(cfg)
    name = cfg.output.name or Path(config_path).stem
    run_dir = RunDir(cfg.output.dir or Path("runs") / STAGE / name, cfg.output.overwrite)
    checkpoint = run_dir.open(resume, dist.is_main)
    registry = Registry()
    policy_source = resolve_model(cfg.model.path, registry)
    require_model_kind(policy_source, "model.path", cfg.model.path, "align ppo", kinds=("causal",),
                       hint="the SFT model (e.g. sft:latest) or a decoder-only model folder", model_cfg=cfg.model)
    reward_source = resolve_model(cfg.reward.path, registry)
    check_reward_artifact(reward_source, cfg.reward.path)
    gold = load_run_gold(cfg, reward_source)  # measured each iteration, never trained on; checked now
    prompt_path, prompt_artifact = resolve_path(cfg.data.path, registry)
    ptx_path, ptx_artifact = resolve_path(cfg.ptx.path, registry) if cfg.ptx.path else (None, None)

    # 2. Prompts and ptx data, rendered as the SFT model was trained (its template, its tokenizer).
    prompts = read_policy_prompts(prompt_path, cfg.data)
    tokenizer = load_tokenizer(policy_source.path, cfg.model)
    tokenizer_changes = prepare_tokenizer(tokenizer) if tokenizer.pad_token is None or \
        tokenizer.pad_token_id == tokenizer.eos_token_id else []
    template = training_template(policy_source.path)
    encoded, truncated_prompts = encode_prompts(tokenizer, prompts, template, cfg.rollout.max_prompt_length)
    queries = [(prompt, ids) for prompt, _, ids in encoded]
    ptx = _ptx_batches(cfg, ptx_path, tokenizer, template) if ptx_path else None

    # 3. Models: one base copy for policy / reference / value (/ reward) with LoRA.
    base_path = merge_adapter(policy_source, cfg.model.dtype) if policy_source.adapter_of else policy_source.path
    share = _share_reward_base(cfg, reward_source, base_path)
    model = load_policy(base_path, cfg, tokenizer)
    reference = None if cfg.lora.enabled else _frozen_copy(model)
    adapters = AdapterSwitch(model) if cfg.lora.enabled else None
    value = ValueFunction.create(model, cfg, adapters, reward_source if share else None)
    reward = SharedBaseReward.attach(model, adapters, reward_source, cfg.reward) if share else \
        TextReward(RewardScorer.load(reward_source.path, registry), cfg.reward)
    device = dist.device
    model.to(device)
    value.head.to(device)
    if reference is not None:
        reference.to(device)
    params = parameter_summary(model)
    copies = base_weight_copies(model, reference, reward.model if isinstance(reward, TextReward) else None)
    if checkpoint:  # weights first, while they are whole; the optimizer's state once the trainer exists
        load_checkpoint_weights(Path(checkpoint), model, value, cfg.lora.enabled, dist)
    dist.shard(model, reference)
    bytes_held = dist.bytes_held(model, reference)  # now, while every group is split (a pass leaves the root whole)
    trainer = PPOTrainer(cfg, model, reference, value, reward, tokenizer, queries, ptx, dist, gold)
    if not value.check_upper(model, _probe(queries, cfg, model.config), dist) and dist.is_main:
        console.print(f"value function: passes over its trained {value.layers_note(model)} alone do not reproduce "
                      f"{type(_language_model(model)).__name__}'s forward pass; they run the whole model")
    weight_bytes = params.memory_bytes + (parameter_summary(reference).memory_bytes if reference is not None else 0)
    longest = max(len(ids) for _, ids in queries) + cfg.rollout.max_new_tokens
    memory = check_memory(model, Workload(
        batch=cfg.ppo.mini_batch_size, length=longest, logit_positions=cfg.rollout.max_new_tokens + 1,
        extra_tokens=cfg.ptx.batch_size * cfg.ptx.max_length if ptx else 0,
        generation_tokens=cfg.ppo.batch_size * longest, shards=dist.world if dist.sharded else 1,
        batch_key="ppo.mini_batch_size", accumulation_key=None, checkpointing_key=None, length_key=None),
        extra_weight_bytes=weight_bytes - params.memory_bytes +
        (parameter_summary(reward.model).memory_bytes if isinstance(reward, TextReward) else 0))
    if dist.is_main:
        print_table(f"align ppo: {name}", [
            ("policy", f"{cfg.model.path} -> {base_path}" + (" (4-bit)" if cfg.quantization.load_in_4bit else
                                                               " (8-bit)" if cfg.quantization.load_in_8bit else "")),
            ("method", "LoRA (adapter 'default')" if cfg.lora.enabled else "full fine-tuning"),
            ("reference (KL)", "the SFT model = the policy with its adapters disabled" if cfg.lora.enabled else
             "a frozen copy of the SFT model"),
            ("value function", f"adapter 'value' (trained on {value.layers_note(model)}) + linear head" +
             (" (initialized from the reward model)" if share else "") if cfg.lora.enabled else
             "linear head on the policy's last hidden states"),
            ("reward model", f"{cfg.reward.path}: " + ("adapter 'reward' on the policy's base (shared weights)" if share
                                                       else reward.describe())),
            ("gold (measured only)", f"{gold.spec}: {gold.description}; scored on every iteration's responses, never "
                                     f"trained on" if gold else "none"),
            ("base weight copies in memory", f"{copies}" + (f", each split across {dist.world} processes (FSDP2)"
                                                            if dist.sharded else "")),
            ("parameters", f"{trainer.trainable_count:,} trainable (policy and value) of {params.total:,} in the "
                           f"policy model"),
            ("memory (weights)", human_bytes(weight_bytes) + (f"; {human_bytes(bytes_held)} "
                                                              f"held by each process" if dist.sharded else "")),
            memory,
            ("prompts", f"{prompt_path}: {len(prompts)}" + (f" ({truncated_prompts} over rollout.max_prompt_length="
                                                            f"{cfg.rollout.max_prompt_length}: kept their last tokens)"
                                                            if truncated_prompts else "")),
            ("ptx", f"{ptx_path}: {len(ptx.rows)} examples, coef {cfg.ptx.coef}; dropped: {ptx.dropped.summary()}"
             if ptx else "off"),
            ("schedule", f"{cfg.ppo.steps} iterations x {cfg.ppo.batch_size} prompts x {dist.world} process(es), "
                         f"{cfg.ppo.ppo_epochs} PPO epochs of minibatch {cfg.ppo.mini_batch_size}"),
            ("KL", f"beta {cfg.ppo.kl_coef}" + (f", adaptive to target {cfg.ppo.target_kl}" if cfg.ppo.adaptive_kl
                                                else ", fixed")),
            *[("tokenizer", change) for change in tokenizer_changes],
            ("output", str(run_dir.final)),
        ])

    # 4. Train.
    if dist.is_main:
        run_dir.create()
    dist.barrier()
    if checkpoint:
        trainer.load_checkpoint(Path(checkpoint))
        console.print(f"resumed from {checkpoint} (iteration {trainer.step})")
    trainer.train(run_dir)
    work = run_dir.work
    trainer.save_policy(work)  # every process: under FSDP each holds a part of the weights
    if not dist.is_main:
        # Wait until rank 0 has saved and registered: a process group torn down under a peer still using it can
        # abort gloo at exit ("terminate called without an active exception").
        dist.barrier()
        dist.stop()
        return None

    # 5. Artifact: policy (adapter or weights), value function, tokenizer, card, log, plots; rename; register.
    tokenizer.save_pretrained(str(work))
    config = to_dict(cfg)
    save_run_config(config, work)
    save_training_log(trainer.history, work)
    write_samples(trainer.samples, work / "samples.jsonl")
    summary = trainer.summary()
    plots = plot_metric_grid(trainer.history, work, "ppo_curves.png", PLOT_PANELS) + \
        plot_overoptimization(trainer.history, work, summary.get("overoptimization"))
    metrics = {**summary, "base_weight_copies": copies, "truncated_prompts": truncated_prompts,
               "prompts": len(prompts), "trainable_parameters": trainer.trainable_count,
               "total_parameters": params.total,
               **({f"ptx_{key}": count for key, count in ptx.dropped.metrics().items()} if ptx else {})}
    artifact = register_policy(run_dir, registry, cfg, name, policy_source, base_path, prompts, metrics, config,
                               plots, [policy_source.artifact, reward_source.artifact, prompt_artifact, ptx_artifact])
    final = Path(artifact.path)
    dist.barrier()
    dist.stop()
    print_table(f"finished: {artifact.ref} ({name})", [
        *finished_rows(summary),
        ("artifact", str(final)),
        ("plots", ", ".join(plots) or "none"),
        ("registry", f"{artifact.ref} (id {artifact.id})"),
    ])
    print_overoptimization(summary)
    return artifact


# --------------------------------------------------------------------------------------------------
# Inputs

@dataclass
class PtxData:
    """Tokenized ptx examples (input ids, labels with -100 on prompt tokens), served in a fixed seeded order."""

    rows: list[tuple[list[int], list[int]]]
    batch_size: int
    seed: int
    dropped: Dropped  # records left out, shown in the start table and kept in the metrics

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        order = _epoch_order(len(self.rows), index * self.batch_size, self.batch_size, self.seed)
        chosen = [self.rows[i] for i in order]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.zeros((len(chosen), width), dtype=torch.long)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chosen), width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(chosen):
            ids[row, :len(tokens)] = torch.tensor(tokens)
            labels[row, :len(targets)] = torch.tensor(targets)
            mask[row, :len(tokens)] = 1
        return ids, mask, labels


def _ptx_batches(cfg: PPORunConfig, path: str, tokenizer, template: TemplateConfig) -> PtxData:
    """ptx examples in any `align sft` format: loss on completions, or on every token of plain text."""
    prepared = to_examples(read_records(path, key="ptx.path"), DataConfig(path=path, columns=cfg.ptx.columns),
                           template)
    rows = []
    for example in prepared.examples:
        if "text" in example:
            ids = tokenizer(example["text"])["input_ids"] + [tokenizer.eos_token_id]
            prompt_len = 0
        elif "messages" in example:
            ids = _chat_ids(tokenizer, example["messages"])
            prompt_len = len(_chat_ids(tokenizer, example["messages"][:-1], generation_prompt=True))
        elif isinstance(example["prompt"], list):
            ids = _chat_ids(tokenizer, example["prompt"] + example["completion"])
            prompt_len = len(_chat_ids(tokenizer, example["prompt"], generation_prompt=True))
        else:
            prompt_ids = tokenizer(example["prompt"])["input_ids"]
            ids = prompt_ids + tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + \
                [tokenizer.eos_token_id]
            prompt_len = len(prompt_ids)
        ids = ids[:cfg.ptx.max_length]
        labels = [-100] * min(prompt_len, len(ids)) + ids[prompt_len:]
        if any(label != -100 for label in labels):
            rows.append((ids, labels))
        else:  # the examples have no line numbers any more: the file names them
            prepared.dropped.add("no_completion_within_ptx_max_length", path)
    if not rows:
        raise AlignError(f"ptx.path: {path}: no example keeps a completion token within ptx.max_length="
                         f"{cfg.ptx.max_length}; raise it")
    return PtxData(rows, cfg.ptx.batch_size, cfg.seed, prepared.dropped)


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _epoch_order(n: int, start: int, count: int, seed: int) -> list[int]:
    """Items `start .. start+count` of an endless sequence of seeded permutations of range(n): every item once per
    epoch, and the same items for the same positions on a resumed run."""
    out = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        out.append(_permutation(n, seed, epoch)[offset])
    return out


_PERMUTATIONS: dict[tuple[int, int, int], list[int]] = {}


def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _PERMUTATIONS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _PERMUTATIONS[key] = order
    return _PERMUTATIONS[key]


# --------------------------------------------------------------------------------------------------
# Models around the one base: reference, value function, reward

def _frozen_copy(model):
    reference = copy.deepcopy(model)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def _share_reward_base(cfg: PPORunConfig, reward_source, base_path: str) -> bool:
    """Whether the reward adapter can run on the policy's base weights: a LoRA reward model trained on exactly the
    folder the policy starts from (what `align reward` on the same SFT model makes)."""
    if cfg.reward.share_base == "false":
        return False
    reward_base = resolve_model(reward_source.adapter_of).path if reward_source.adapter_of else None
    same = bool(reward_base) and Path(reward_base).resolve() == Path(base_path).resolve() and cfg.lora.enabled
    if cfg.reward.share_base == "true" and not same:
        raise AlignError(f"reward.share_base: true, but the reward model {cfg.reward.path} was trained on "
                         f"{reward_base or 'its own full weights'} and the policy starts from {base_path}; set "
                         f"reward.share_base: auto (a separate reward model) or train the reward model on the same "
                         f"SFT model")
    return same


def _language_model(model):
    """The transformers causal LM inside peft's wrappers (the model itself without them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The transformer body (hidden states, no LM head) of a causal LM, through peft's wrappers."""
    lm = _language_model(model)
    return getattr(lm, lm.base_model_prefix)


def _body_for_a_pass(model):
    """The transformer body, to be called on its own (value and reward passes). Under FSDP its own weights
    (embeddings, final norm) belong to the model's root group, which gathers them in the model's forward pass only:
    they are gathered here first (a no-op when they still are)."""
    from torch.distributed.fsdp import FSDPModule

    lm = _language_model(model)
    if isinstance(lm, FSDPModule):
        lm.unshard()
    return _backbone(model)


def _adapter_config(folder: Path, **changes):
    from peft import LoraConfig

    values = json.loads((folder / "adapter_config.json").read_text())
    known = {k: v for k, v in values.items() if k in LoraConfig.__dataclass_fields__}
    return LoraConfig(**{**known, **changes})


def _adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    with model_files(str(folder)):
        if file.is_file():
            return load_file(str(file))
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def _split_score_head(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A SEQ_CLS adapter's LoRA weights and its score head (saved as modules_to_save)."""
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    head = [v for k, v in weights.items() if "lora_" not in k and k.split(".")[-2] in ("score", "classifier")
            and k.endswith("weight")]
    if len(head) != 1:
        raise AlignError("reward model: its adapter holds no single score head (expected `score.weight`, as "
                         "`align reward` saves); set reward.share_base: false")
    return lora, head[0]


def _load_adapter_weights(model, name: str, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise AlignError(f"adapter '{name}': {len(missing)} weights do not fit the model (e.g. {missing[0]})")


def _last_token_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (rows are right-padded)."""
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class AdapterSwitch:
    """Chooses the adapter a forward pass runs through: `value`, `reward`, or none (`__base__`: the reference); the
    policy's `default` is active otherwise. peft's PeftModel.set_adapter walks every module of the model (~11 ms a
    switch at 25M parameters; a PPO iteration switches two dozen times): this switches the adapter layers, found
    once, directly. Either way peft makes the whole active adapter trainable and freezes every other one, so after
    each switch the trained weights (`trainable`) are made trainable again and the rest (`frozen`: the value
    adapter's untrained layers) frozen: a backward pass must not reach them. With modules_to_save (wrapped modules
    whose adapters need peft's own bookkeeping) it uses PeftModel.set_adapter / disable_adapter."""

    def __init__(self, model):
        self.model = model
        self.trainable: list[torch.nn.Parameter] = []
        self.frozen: list[torch.nn.Parameter] = []
        self.layers: list | None = None  # found at the first switch, once every adapter has been added

    def _find_layers(self) -> list:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(self.model.modules())
        if any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules):
            return []
        return [m for m in modules if isinstance(m, BaseTunerLayer)]

    def _switch(self, name: str) -> None:
        for layer in self.layers:
            if name == "__base__":
                layer.enable_adapters(False)
            else:
                layer.set_adapter(name)

    @contextmanager
    def use(self, name: str):
        if self.layers is None:
            self.layers = self._find_layers()
        try:
            if not self.layers:  # peft's own switches
                if name == "__base__":
                    with self.model.disable_adapter():
                        yield
                else:
                    self.model.set_adapter(name)
                    self._keep_flags()
                    try:
                        yield
                    finally:
                        self.model.set_adapter("default")
            else:
                self._switch(name)
                self._keep_flags()
                try:
                    yield
                finally:
                    if name == "__base__":
                        for layer in self.layers:
                            layer.enable_adapters(True)
                    else:
                        self._switch("default")
        finally:
            self._keep_flags()

    def train_only(self, trainable: list[torch.nn.Parameter], frozen: list[torch.nn.Parameter]) -> None:
        """What stays trainable (and what frozen) through every switch; applied now."""
        self.trainable, self.frozen = trainable, frozen
        self._keep_flags()

    def _keep_flags(self) -> None:
        for param in self.trainable:
            param.requires_grad_(True)
        for param in self.frozen:
            param.requires_grad_(False)


def _decoder_layers(model) -> torch.nn.ModuleList | None:
    """The transformer body's decoder layers (`layers` in Llama, Mistral, Qwen, Gemma, ...), or None."""
    layers = getattr(_backbone(model), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def _upper_body(model, first: int):
    """The transformer body from decoder layer `first` up, sharing every module with the model: given the hidden
    states that enter layer `first` as `inputs_embeds`, it returns what the whole body returns."""
    body = _backbone(model)
    upper = copy.copy(body)
    upper._modules = {**body._modules, "layers": torch.nn.ModuleList(list(body.layers)[first:])}
    return upper


@contextmanager
def _layer_input(layer: torch.nn.Module):
    """Collects the hidden states that enter `layer` during the passes run inside the block."""
    captured: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


class ValueFunction:
    """V(s) for every response position: the `value` adapter's (LoRA) or the policy's (full fine-tuning) last hidden
    states through a linear head. With a shared-base reward model it starts as the reward model (InstructGPT): its
    adapter weights, its score head, and the normalization mean as the head's bias.

    With LoRA only the value adapter's top `ppo.value_layers` decoder layers train; the layers below keep their
    starting weights. So what enters the lowest trained layer does not change while an iteration's PPO epochs run:
    the rollout's value pass keeps it, and every training pass of the value function runs only the trained layers
    on it (`upper`, the body from that layer up). Where that shortcut does not reproduce the model's own forward
    pass (checked once, `check_upper`), value passes run the whole model: the same function, slower."""

    def __init__(self, head: torch.nn.Linear, adapters: AdapterSwitch | None, first_layer: int = 0, upper=None):
        self.head = head
        self.adapters = adapters  # None: full fine-tuning, the head reads the policy's hidden states
        self.first_layer = first_layer  # the lowest decoder layer the value function trains
        self.upper = upper  # the body from first_layer up (None: value passes run the whole model)

    @classmethod
    def create(cls, model, cfg: PPORunConfig, adapters: AdapterSwitch | None, reward_source=None) -> ValueFunction:
        hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") \
            else model.config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        if adapters is None:
            return cls(head, None)
        folder = Path(reward_source.path) if reward_source else None
        if folder is not None:
            model.add_adapter("value", _adapter_config(folder, task_type="CAUSAL_LM", modules_to_save=None,
                                                       inference_mode=False))
            lora, score = _split_score_head(_adapter_weights(folder))
            _load_adapter_weights(model, "value", lora)
            with torch.no_grad():
                # V starts as the reward PPO will see: the raw score, normalized the same way.
                normalization = Normalization.load(folder) if cfg.reward.normalized else None
                scale = normalization.apply(1.0) - normalization.apply(0.0) if normalization else 1.0
                head.weight.copy_(score.float() * scale)
                head.bias.fill_(normalization.apply(0.0) if normalization else 0.0)
        else:
            model.add_adapter("value", copy.deepcopy(model.peft_config["default"]))
        model.set_adapter("default")
        layers = _decoder_layers(model)
        count = cfg.ppo.value_layers if cfg.ppo.value_layers is not None else max(1, len(layers or ()) // 4)
        if layers is None or not 0 < count < len(layers):
            return cls(head, adapters)
        first = len(layers) - count
        return cls(head, adapters, first, _upper_body(model, first))

    def check_upper(self, model, probe: list[int], dist: Distributed) -> bool:
        """Whether the upper body on the captured hidden states ends where the whole body does, on `probe` (token
        ids as long as a rollout). Not where an architecture transforms what enters its body (Granite's embedding
        multiplier) or picks a layer's attention by its position in the list: then value passes run the whole
        model."""
        if self.upper is None:
            return True
        ids = torch.tensor([probe], device=dist.device)
        mask = torch.ones_like(ids)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        training = model.training
        model.eval()  # as PPO runs it: an adapter's dropout would make the two passes differ anyway
        try:
            with torch.no_grad(), _layer_input(_decoder_layers(model)[self.first_layer]) as captured:
                whole = self._hidden(model, ids, mask, positions)  # hidden states: a new head is all zeros
                upper = self._hidden(model, ids, mask, positions, inputs=captured[0])
            same = torch.allclose(whole, upper, rtol=1e-3, atol=1e-3)
        except Exception:  # noqa: BLE001 - a body that cannot start mid-way (other inputs, other layer calls)
            same = False
        model.train(training)
        # Every process decides alike: under FSDP they must run the same layers (each pass gathers them together).
        same = dist.sum(torch.tensor([float(same)], device=dist.device)).item() == dist.world
        if not same:
            self.upper = None
        return self.upper is not None

    def layers_note(self, model) -> str:
        total = len(_decoder_layers(model) or ())
        return f"{total - self.first_layer} of {total} decoder layers" if self.first_layer else "every layer"

    def parameters(self, model) -> list[torch.nn.Parameter]:
        """What the value loss trains: the value adapter's upper layers (all of it by default) and the head."""
        adapter = [p for n, p in model.named_parameters() if self._in_adapter(n) and not self._below(n)] \
            if self.adapters else []
        return adapter + list(self.head.parameters())

    def frozen(self, model) -> list[torch.nn.Parameter]:
        """The value adapter's weights below first_layer: they keep their starting values. (Looked up by name each
        time: sharding the model replaces its parameter objects.)"""
        return [p for n, p in model.named_parameters() if self._in_adapter(n) and self._below(n)] \
            if self.adapters else []

    @staticmethod
    def _in_adapter(weight_name: str) -> bool:
        return ".value." in weight_name and "lora_" in weight_name

    def _below(self, weight_name: str) -> bool:
        layer = _layer_index(weight_name)
        return layer is not None and layer < self.first_layer

    def __call__(self, model, ids, mask, positions, policy_hidden: torch.Tensor | None = None,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Values at every position. `inputs`: the hidden states entering the lowest trained layer (kept from the
        rollout's value pass), to run the upper layers only."""
        hidden = policy_hidden if self.adapters is None else self._hidden(model, ids, mask, positions, inputs)
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def _hidden(self, model, ids, mask, positions, inputs: torch.Tensor | None = None) -> torch.Tensor:
        with self.adapters.use("value"):
            body = _body_for_a_pass(model)
            if self.upper is not None and inputs is not None:
                return self.upper(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state
            return body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def _probe(queries: list[tuple[str, list[int]]], cfg: PPORunConfig, model_config) -> list[int]:
    """The first prompt's tokens repeated to the longest rollout (prompt + response): sliding-window or per-layer
    attention differences show only at lengths a rollout reaches."""
    length = min(cfg.rollout.max_prompt_length + cfg.rollout.max_new_tokens,
                 getattr(model_config, "max_position_embeddings", None) or 1 << 30)
    tokens = queries[0][1]
    return (tokens * (length // len(tokens) + 1))[:length]


def _layer_index(weight_name: str) -> int | None:
    """The decoder layer a weight belongs to (`...layers.12.self_attn...` -> 12), or None."""
    found = re.search(r"\.layers\.(\d+)\.", weight_name)
    return int(found.group(1)) if found else None


class SharedBaseReward:
    """The reward model as adapter `reward` + its score head on the policy's base weights: no second copy. Reads
    (prompt, response) formatted exactly as `align reward` trained it (align.scoring.encode_pair)."""

    model = None

    def __init__(self, adapters: AdapterSwitch, tokenizer, score: torch.Tensor, normalization: Normalization | None,
                 normalized: bool, batch_size: int):
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.score = score
        self.normalization = normalization if normalized else None
        self.batch_size = batch_size

    @classmethod
    def attach(cls, model, adapters: AdapterSwitch, source, reward_cfg) -> SharedBaseReward:
        folder = Path(source.path)
        lora, score = _split_score_head(_adapter_weights(folder))
        model.add_adapter("reward", _adapter_config(folder, task_type="CAUSAL_LM", modules_to_save=None,
                                                    inference_mode=True))
        _load_adapter_weights(model, "reward", lora)
        model.set_adapter("default")
        for name, param in model.named_parameters():
            if ".reward." in name:
                param.requires_grad_(False)
        tokenizer = load_tokenizer(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # the score is read at the last real token, found by length
        return cls(adapters, tokenizer, score.float(), Normalization.load(folder), reward_cfg.normalized,
                   reward_cfg.batch_size)

    @torch.no_grad()
    def __call__(self, model, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        encoded = [encode_pair(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        device = next(model.parameters()).device
        raw = [0.0] * len(encoded)
        with self.adapters.use("reward"):
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start:start + self.batch_size]
                width = max(len(ids) for ids in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, tokens in enumerate(chunk):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                    mask[row, :len(tokens)] = 1
                ids, mask = ids.to(device), mask.to(device)
                hidden = _body_for_a_pass(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                values = _last_token_states(hidden, mask).float() @ self.score.to(device).T
                raw[start:start + len(chunk)] = values.squeeze(-1).tolist()
        normalized = [self.normalization.apply(r) for r in raw] if self.normalization else raw
        return raw, normalized


class TextReward:
    """A separately loaded reward model (another base, architecture or tokenizer): responses pass as text."""

    def __init__(self, scorer: RewardScorer, reward_cfg):
        self.scorer = scorer
        self.model = scorer.model
        self.normalized = reward_cfg.normalized
        self.batch_size = reward_cfg.batch_size

    def describe(self) -> str:
        return f"separate model ({type(self.scorer.model).__name__}), reads responses as text with its own tokenizer"

    def __call__(self, model, prompts: list[str], responses: list[str]) -> tuple[list[float], list[float]]:
        raw = self.scorer.score(prompts, responses, self.batch_size, normalized=False)
        norm = self.scorer.normalization
        return raw, [norm.apply(r) for r in raw] if norm is not None and self.normalized else raw


def base_weight_copies(*models) -> int:
    """How many copies of base weights the given models hold in memory: models whose input embeddings are one
    tensor count once (policy, reference and value, and a shared-base reward model, are adapters on one base)."""
    storages = {model.get_input_embeddings().weight.data_ptr() for model in models if model is not None}
    return len(storages)


# --------------------------------------------------------------------------------------------------
# Distributed: data parallel, with the weights sharded (FSDP2) when the launcher asks for it

def _launcher_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() == "true"


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False  # FSDP2: each process holds 1/world of every weight, gradient and optimizer state

    @classmethod
    def start(cls, cfg: PPORunConfig) -> Distributed:
        """Joins the process group the launcher set up. `accelerate launch` passes its config as environment
        variables: an FSDP config turns sharding on; the settings align ppo cannot honour fail here, before any
        model loads."""
        if _launcher_flag("ACCELERATE_USE_DEEPSPEED"):
            raise AlignError("align ppo does not run under DeepSpeed: its trainer runs its own forward and backward "
                             "passes (generation, policy, value, reward on one base), which DeepSpeed's engine would "
                             "have to own. Launch with configs/accelerate/fsdp.yaml (weights, gradients and optimizer "
                             "state sharded across GPUs, as ZeRO-3) or configs/accelerate/ddp.yaml")
        sharded = _launcher_flag("ACCELERATE_USE_FSDP")
        if sharded:
            if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:
                raise AlignError("quantization: FSDP cannot shard a 4/8-bit base (QLoRA); launch with "
                                 "configs/accelerate/ddp.yaml, or drop the quantization section")
            for flag, key in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                              ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing")):
                if _launcher_flag(flag):
                    raise AlignError(f"accelerate config: {key}: true is not supported by align ppo; set it to false")
            # FSDP2 writes true/false, an FSDP1 config its sharding strategy. Kept gathered from the forward to the
            # backward pass, the value adapter's layers got no gradient in align ppo's second backward pass.
            if os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in ("false", "shard_grad_op", "2"):
                raise AlignError("accelerate config: fsdp_reshard_after_forward: false (SHARD_GRAD_OP) is not "
                                 "supported by align ppo; set it to true")
            # With it, transformers may leave all but the first process's weights unloaded, for accelerate to
            # broadcast when it wraps the model; align ppo shards the model itself: every process reads the weights.
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = torch.cuda.is_available()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        return cls(int(os.environ.get("RANK", "0")), world, device, sharded=sharded and world > 1)

    def shard(self, model, reference=None) -> None:
        """FSDP2 over the policy model (and the full-fine-tuning reference): each decoder layer, with the adapters in
        it, is one group gathered for its own forward and backward passes; the rest (embeddings, final norm, LM head)
        is the model's root group. Called once every adapter is added and every weight loaded, before the optimizer
        is built (its parameters become the shards)."""
        if not self.sharded:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for each in (model, reference):
            if each is None:
                continue
            layers = _decoder_layers(each)
            if layers is None:
                raise AlignError(f"FSDP: {type(_language_model(each)).__name__} keeps no list of decoder layers "
                                 f"(`layers`) to shard; launch with configs/accelerate/ddp.yaml")
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            # The policy's root group stays gathered from a forward pass to its backward pass (FSDP's default for
            # the root); the reference never runs a backward pass, so its root splits after each forward pass.
            root = fully_shard(_language_model(each), mesh=mesh,
                               **({"reshard_after_forward": True} if each is reference else {}))
            # FSDP makes the first sharded module to run forward the root: the model's own, not a layer run by a
            # value pass's body on its own. A one-token pass settles it; then every group is split again, so that
            # the model's parameters are the shards the optimizer will hold.
            with torch.no_grad():
                root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.device), use_cache=False)
            for module in root.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over processes."""
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Averages the gradients of the replicated parameters (FSDP already averaged its shards' gradients)."""
        params = [p for p in params if not _is_shard(p)]
        if self.world == 1 or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    @contextmanager
    def gathered(self, model):
        """Under FSDP: each decoder layer of `model` stays gathered from its first forward pass in the block to the
        block's end (one all-gather per layer, not one per forward pass), then is split again."""
        layers = list(_decoder_layers(model)) if self.sharded else []
        for layer in layers:
            layer.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for layer in layers:
                layer.reshard()
                layer.set_reshard_after_forward(True, recurse=False)

    def bytes_held(self, *models) -> int:
        """The bytes of the models' weights this process holds: its shards only, under FSDP."""
        return sum((p.to_local() if _is_shard(p) else p).numel() * p.dtype.itemsize
                   for model in models if model is not None for p in model.parameters())

    def grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The L2 norm of the parameters' whole gradients: shards' squares summed over processes (one all-reduce),
        replicated gradients counted once."""
        def squares(grads: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else \
                torch.zeros((), device=self.device)

        with_grad = [p for p in params if p.grad is not None]
        sharded = squares([p.grad.to_local() for p in with_grad if _is_shard(p)])
        if self.sharded:
            sharded = self.sum(sharded)
        return (sharded + squares([p.grad for p in with_grad if not _is_shard(p)])).sqrt().cpu()

    def whole(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The tensors of `state` (a sharded model's state dict, or part of it) whole, on the CPU of the main process
        (None elsewhere): every process takes part in gathering each one."""
        gathered = {}
        for name, tensor in state.items():
            tensor = tensor.full_tensor() if _is_shard(tensor) else tensor
            if self.is_main:
                gathered[name] = tensor.detach().cpu()
        return gathered if self.is_main else None

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _is_shard(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# --------------------------------------------------------------------------------------------------
# The PPO trainer

@dataclass
class Rollout:
    """One sampled batch, everything PPO needs, on the training device. Sequences are [left-padded prompt |
    right-padded response]; per-token tensors cover the response positions only."""

    prompts: list[str]
    responses: list[str]
    ids: torch.Tensor  # (B, P + R)
    mask: torch.Tensor  # (B, P + R)
    positions: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) float
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    value_inputs: torch.Tensor | None = None  # (B, P + R, hidden): what enters the value's lowest trained layer
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


class AdaptiveKL:
    """Ziegler et al. (2019): beta_{t+1} = beta_t * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, episodes: int) -> None:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * episodes / self.horizon


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float() / temperature
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _generate_without_model_defaults(model, generation_config, **inputs) -> torch.Tensor:
    """generate() with `generation_config` and nothing else. generate() fills every field left unset from the
    model's own generation_config.json (a repetition penalty, no_repeat_ngram_size, suppressed tokens, a minimum
    length...): those would sample from another distribution than the policy PPO trains, and put it into the
    recorded log-probs. The model's defaults are set aside for the call (and stay in what is saved)."""
    from transformers import GenerationConfig

    language_model = _language_model(model)
    own_defaults, language_model.generation_config = language_model.generation_config, GenerationConfig()
    try:
        return model.generate(generation_config=generation_config, **inputs)
    finally:
        language_model.generation_config = own_defaults


class _SampledLogprobs:
    """A logits processor that records log softmax(logits / temperature) of every token generate() samples: the
    log-probs PPO trains against, with no second forward pass. Custom processors run before generate's temperature
    and top-k/top-p warpers, so they see the raw logits, and PPO's policy is the untruncated distribution. Step t's
    call sees the token sampled at step t - 1, so it is gathered then; `logprobs` gathers the last one. Cached
    decoding and the update's full forward pass agree to float rounding (~1e-6 in float32, ~1e-3 in bf16), so the
    first PPO epoch's ratio is 1 up to that, as with TRL's PPOTrainer, which also takes them from generate."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # log-probs of the step whose token is not known yet
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def logprobs(self, response: torch.Tensor) -> torch.Tensor:
        """(B, R) for the R generated tokens."""
        steps = self.steps + [self.previous.gather(1, response[:, -1:]).squeeze(1)]
        return torch.stack(steps, dim=1)[:, :response.shape[1]]


class PPOTrainer:
    """InstructGPT PPO: sample, score, shape per-token rewards with the KL to the reference, GAE, clipped updates."""

    def __init__(self, cfg: PPORunConfig, model, reference, value: ValueFunction, reward, tokenizer,
                 queries: list[tuple[str, list[int]]], ptx: PtxData | None, dist: Distributed,
                 gold: Gold | None = None):
        self.cfg, self.ppo, self.rollout_cfg = cfg, cfg.ppo, cfg.rollout
        self.model, self.reference, self.value, self.reward = model, reference, value, reward
        self.gold = gold  # measured on each iteration's responses after its update; never part of a loss
        self.adapters = value.adapters  # None with full fine-tuning
        self.tokenizer, self.queries, self.ptx, self.dist = tokenizer, queries, ptx, dist
        self.keeps_logits = "logits_to_keep" in inspect.signature(_language_model(model).forward).parameters
        self.model.eval()  # no dropout: the sampled log-probs and the trained ones must come from the same function
        self.lora = cfg.lora.enabled
        self.policy_params = [p for n, p in model.named_parameters() if p.requires_grad and ".value." not in n
                              and ".reward." not in n]
        self.value_params = [p for p in value.parameters(model) if all(p is not q for q in self.policy_params)]
        self.params = self.policy_params + self.value_params
        self.trainable_count = sum(p.numel() for p in self.params)
        if self.adapters is not None:  # peft's set_adapter('default') left the value adapter frozen
            self.adapters.train_only(self.params, value.frozen(model))
        value_lr = self.ppo.value_learning_rate if self.ppo.value_learning_rate is not None else self.ppo.learning_rate
        # The value head (never sharded) has a group of its own: an optimizer updates a group's tensors together, and
        # under FSDP the value adapter's are shards.
        head = list(value.head.parameters())
        groups = [(self.policy_params, self.ppo.learning_rate),
                  ([p for p in self.value_params if all(p is not q for q in head)], value_lr), (head, value_lr)]
        self.optimizer = torch.optim.AdamW([{"params": params, "lr": lr} for params, lr in groups if params],
                                           weight_decay=self.ppo.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.kl = AdaptiveKL(self.ppo.kl_coef, self.ppo.target_kl if self.ppo.adaptive_kl else None,
                             self.ppo.kl_horizon)
        self.step = 0
        self.history: list[dict] = []
        self.samples: list[dict] = []
        self.bad_in_a_row = 0
        self.skipped = 0
        self.train_time = 0.0
        self.gold_time = 0.0  # the current iteration's gold scoring: measurement, not training time
        stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.eos_ids = set(stop_ids + ([model.generation_config.eos_token_id]
                                       if isinstance(model.generation_config.eos_token_id, int) else
                                       list(model.generation_config.eos_token_id or [])))

    def _lr_factor(self, step: int) -> float:
        warmup, total = self.ppo.warmup_steps, self.ppo.steps
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if self.ppo.lr_scheduler_type == "linear":
            return max(0.0, 1 - progress)
        if self.ppo.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # ---- the loop ----

    def train(self, run_dir: RunDir) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("ppo"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), console=console, transient=True,
                      disable=not self.dist.is_main) as progress:
            task = progress.add_task("ppo", total=self.ppo.steps, completed=self.step, status="")
            while self.step < self.ppo.steps:
                started, self.gold_time = time.perf_counter(), 0.0
                entry = self.iteration()
                self.train_time += time.perf_counter() - started - self.gold_time
                self.step += 1
                entry.update(step=self.step, time_s=round(self.train_time, 3))
                self.history.append(entry)
                progress.update(task, advance=1, status=f"reward {entry.get('reward', float('nan')):+.3f}  "
                                                        f"kl {entry.get('kl', float('nan')):.3f}")
                if self.dist.is_main and (self.step % self.ppo.logging_steps == 0 or self.step == self.ppo.steps):
                    progress.console.print(self._log_line(entry))
                if self.dist.is_main and self.ppo.sample_steps and self.step % self.ppo.sample_steps == 0:
                    print_samples(self.samples, self.step, progress.console)
                if self.bad_in_a_row >= self.ppo.max_bad_steps:
                    saved = self.save_checkpoint(run_dir)
                    raise AlignError(f"ppo: {self.bad_in_a_row} iterations in a row had NaN/inf rewards or losses "
                                     f"(last at iteration {self.step}); stopped. Checkpoint kept: {saved}. Lower "
                                     f"ppo.learning_rate, check the reward model, then continue with --resume")
                if self.step % self.ppo.save_steps == 0 and self.step < self.ppo.steps:
                    self.save_checkpoint(run_dir)
        if self.dist.is_main and self.ppo.sample_steps == 0:
            print_samples(self.samples, self.step, console)

    def iteration(self) -> dict:
        """Sample one batch, score it, and run the PPO epochs on it. Returns the iteration's metrics."""
        # Seeded per iteration (and process): a resumed run samples exactly what the uninterrupted one did.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * self.dist.world + self.dist.rank)
        with self.dist.gathered(self.model) if self.rollout_cfg.gather_weights else nullcontext():
            rollout, raw, scores, ended = self.sample()
        finite = torch.isfinite(scores).all() & torch.isfinite(rollout.logprobs).all() & \
            torch.isfinite(rollout.ref_logprobs).all() & torch.isfinite(rollout.values).all()
        if not bool(self.dist.sum(finite.float().reshape(1)).item() == self.dist.world):
            return self._skip("non-finite rewards or log-probs", rollout, scores)
        kl_per_token = (rollout.logprobs - rollout.ref_logprobs) * rollout.response_mask
        self.shape_rewards(rollout, scores, kl_per_token)
        stats = self.update(rollout)
        if stats is None:
            return self._skip("non-finite loss", rollout, scores)
        self.bad_in_a_row = 0
        kl = kl_per_token.sum(1)
        gold = self._gold_scores(rollout)  # after the update: what it measures cannot reach it
        entry = self._reduce({
            "reward": scores.mean(), "reward_std": scores.std(unbiased=False), "reward_raw": raw.mean(),
            "reward_raw_std": raw.std(unbiased=False), **({"gold": gold.mean(), "gold_std": gold.std(unbiased=False)}
                                                         if gold is not None else {}),
            "kl": kl.mean(), "response_length": rollout.response_mask.sum(1).mean(), "eos_rate": ended.float().mean(),
            **stats})
        entry["kl_coef"] = self.kl.coef
        entry["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.kl.update(entry["kl"], self.ppo.batch_size * self.dist.world)
        self.scheduler.step()
        self._keep_samples(rollout, scores, gold)
        return entry

    def _gold_scores(self, rollout: Rollout) -> torch.Tensor | None:
        """The gold's score of each of this process's responses (to the prompts as written), or None without a gold.
        Every process scores its own; `_reduce` averages the equal-sized batches' means into the iteration's."""
        if self.gold is None:
            return None
        started = time.perf_counter()
        scores = torch.tensor(self.gold.score(rollout.prompts, rollout.responses), dtype=torch.float32)
        self.gold_time += time.perf_counter() - started
        return scores

    def _skip(self, why: str, rollout: Rollout, scores: torch.Tensor) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_in_a_row += 1
        self.skipped += 1
        if self.dist.is_main:
            console.print(f"[yellow]iteration {self.step + 1}: {why}; skipped (no update). {self.bad_in_a_row} in a "
                          f"row, the run stops at {self.ppo.max_bad_steps}[/yellow]")
        self._keep_samples(rollout, scores)
        return {"skipped": 1}

    def _reduce(self, values: dict) -> dict:
        keys = list(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32).detach().cpu() for k in keys])
        return dict(zip(keys, self.dist.mean(stacked).tolist()))

    # ---- sampling ----

    @torch.no_grad()
    def sample(self) -> tuple[Rollout, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = _epoch_order(len(self.queries), (self.step * self.dist.world + self.dist.rank) * self.ppo.batch_size,
                            self.ppo.batch_size, self.cfg.seed)
        prompts = [self.queries[i][0] for i in rows]
        query_ids = [self.queries[i][1] for i in rows]
        device = self.dist.device
        pad = self.tokenizer.pad_token_id
        width = max(len(q) for q in query_ids)
        queries = torch.full((len(rows), width), pad, dtype=torch.long)
        query_mask = torch.zeros_like(queries)
        for row, q in enumerate(query_ids):
            queries[row, width - len(q):] = torch.tensor(q)
            query_mask[row, width - len(q):] = 1
        queries, query_mask = queries.to(device), query_mask.to(device)
        r = self.rollout_cfg
        from transformers import GenerationConfig

        sampling = GenerationConfig(do_sample=True, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                    top_k=r.top_k, top_p=r.top_p, pad_token_id=pad, eos_token_id=sorted(self.eos_ids),
                                    stop_strings=r.stop_strings or None)
        # With LoRA the old log-probs are recorded while sampling (one policy forward pass fewer per rollout); full
        # fine-tuning runs that pass anyway, for the hidden states its value head reads.
        recorder = _SampledLogprobs(r.temperature) if self.lora else None
        generated = _generate_without_model_defaults(
            self.model, sampling, input_ids=queries, attention_mask=query_mask,
            tokenizer=self.tokenizer if r.stop_strings else None, logits_processor=[recorder] if recorder else None,
            # Split layers are gathered by every forward pass: every process runs each step's until all are done.
            synced_gpus=self.dist.sharded and not r.gather_weights)
        response = generated[:, width:]
        sampled_logprobs = recorder.logprobs(response) if recorder else None
        response, response_mask, ended = self._cut_responses(response)
        ids = torch.cat([queries, response], dim=1)
        mask = torch.cat([query_mask, response_mask], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logprobs, ref_logprobs, values, value_inputs = [], [], [], []
        for start in range(0, len(rows), r.forward_batch_size):
            part = slice(start, start + r.forward_batch_size)
            hidden = None
            if sampled_logprobs is None:
                lp, hidden = self._policy_logprobs(ids[part], mask[part], positions[part], width)
                logprobs.append(lp)
            ref_logprobs.append(self._reference_logprobs(ids[part], mask[part], positions[part], width))
            part_values, inputs = self._values(ids[part], mask[part], positions[part], width, hidden)
            values.append(part_values)
            value_inputs.append(inputs)
        if sampled_logprobs is not None:  # padding after a response's end is masked out everywhere
            logprobs = [sampled_logprobs.masked_fill(response_mask == 0, 0.0)]
        texts = [self.tokenizer.decode(response[i][response_mask[i].bool()], skip_special_tokens=True).strip()
                 for i in range(len(rows))]
        raw, normalized = self.reward(self.model, prompts, texts)
        scores = torch.tensor(normalized, dtype=torch.float32, device=device)
        if r.missing_eos_penalty:
            scores = scores - r.missing_eos_penalty * (~ended).float()
        rollout = Rollout(prompts, texts, ids, mask, positions, response_mask.float(), torch.cat(logprobs),
                          torch.cat(ref_logprobs), torch.cat(values),
                          torch.cat(value_inputs) if value_inputs[0] is not None else None)
        return rollout, torch.tensor(raw, dtype=torch.float32, device=device), scores, ended

    def _cut_responses(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each response ends at its first EOS (kept: the model learns to stop) or stop string; what follows is
        padding. Returns (tokens, mask, ended-by-EOS-or-stop)."""
        length = response.shape[1]
        is_eos = torch.zeros_like(response, dtype=torch.bool)
        for token in self.eos_ids:
            is_eos |= response == token
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(response[:, 0], length))
        ends = torch.minimum(first + 1, torch.full_like(first, length))
        ended = first < length
        if self.rollout_cfg.stop_strings:
            for row in range(response.shape[0]):
                stop = self._stop_position(response[row, :ends[row]].tolist())
                if stop is not None:
                    ends[row], ended[row] = stop, True
        mask = torch.arange(length, device=response.device)[None, :] < ends[:, None]
        return response.masked_fill(~mask, self.tokenizer.pad_token_id), mask.long(), ended

    def _stop_position(self, tokens: list[int]) -> int | None:
        """Tokens up to and including the one that completes the first stop string."""
        for count in range(1, len(tokens) + 1):
            text = self.tokenizer.decode(tokens[:count], skip_special_tokens=True)
            if any(stop in text for stop in self.rollout_cfg.stop_strings):
                return count
        return None

    def _policy_logprobs(self, ids, mask, positions, width):
        """Full fine-tuning's rollout pass: the response tokens' log-probs and the last hidden states (for V)."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                         output_hidden_states=True, **self._response_logits(ids, width))
        logits = out.logits[:, -(ids.shape[1] - width) - 1:-1]
        return _token_logprobs(logits, ids[:, width:], self.rollout_cfg.temperature), \
            out.hidden_states[-1][:, width - 1:-1]

    def _reference_logprobs(self, ids, mask, positions, width):
        keep = self._response_logits(ids, width)
        if self.reference is not None:
            logits = self.reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                    **keep).logits
        else:
            with self.adapters.use("__base__"):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                                    **keep).logits
        return _token_logprobs(logits[:, -(ids.shape[1] - width) - 1:-1], ids[:, width:], self.rollout_cfg.temperature)

    def _response_logits(self, ids, width) -> dict:
        """Ask the model for logits at the response positions only (and the one before): the LM head over the
        prompt tokens is wasted work, ~10-20% of a forward pass for a large vocabulary."""
        return {"logits_to_keep": ids.shape[1] - width + 1} if self.keeps_logits else {}

    def _values(self, ids, mask, positions, width, policy_hidden=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rollout's values at the response positions, and (value adapter trained on its upper layers) the hidden
        states entering the lowest trained layer: they stay valid through the iteration's updates."""
        if self.adapters is None:
            return self.value(self.model, ids, mask, positions, policy_hidden), None
        capture = _layer_input(_decoder_layers(self.model)[self.value.first_layer]) \
            if self.value.upper is not None else nullcontext([])
        with capture as captured:
            values = self.value(self.model, ids, mask, positions)[:, width - 1:-1]
        return values, (captured[0] if captured else None)

    # ---- advantages ----

    def shape_rewards(self, rollout: Rollout, scores: torch.Tensor, kl_per_token: torch.Tensor) -> None:
        """Per-token reward = -beta * KL_t, plus the reward model's score on the last response token; then GAE."""
        mask = rollout.response_mask
        rewards = -self.kl.coef * kl_per_token
        last = (mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(last)), last] += scores
        if self.ppo.whiten_rewards:
            rewards = self._whiten(rewards, mask, shift_mean=False)
        values = rollout.values * mask
        advantages = torch.zeros_like(rewards)
        gae = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(gae)
            delta = rewards[:, t] + self.ppo.gamma * next_value - values[:, t]
            gae = (delta + self.ppo.gamma * self.ppo.lam * gae) * mask[:, t]
            advantages[:, t] = gae
        rollout.returns = advantages + values
        rollout.advantages = self._whiten(advantages, mask)

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
        """Whitened over every response token of every process."""
        totals = self.dist.sum(torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()]).cpu())
        mean = totals[0] / totals[2].clamp(min=1)
        var = (totals[1] / totals[2].clamp(min=1) - mean ** 2).clamp(min=0)
        whitened = (values - mean.to(values.device)) * torch.rsqrt(var.to(values.device) + 1e-8)
        if not shift_mean:
            whitened = whitened + mean.to(values.device)
        return whitened * mask

    # ---- the update ----

    def update(self, rollout: Rollout) -> dict | None:
        """ppo_epochs passes of clipped policy + value loss (+ ptx) over shuffled minibatches. None if a loss was
        NaN/inf (the weights are left as they were before that minibatch)."""
        ppo, size = self.ppo, rollout.ids.shape[0]
        width = rollout.ids.shape[1] - rollout.response_mask.shape[1]
        order_rng = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        totals: dict[str, float] = {}
        count = 0
        per_iteration = ppo.ppo_epochs * math.ceil(size / ppo.mini_batch_size)  # minibatches: one ptx batch each
        for epoch in range(ppo.ppo_epochs):
            order = torch.randperm(size, generator=order_rng).tolist()
            for start in range(0, size, ppo.mini_batch_size):
                rows = order[start:start + ppo.mini_batch_size]
                ptx_index = (self.step * per_iteration + count) * self.dist.world + self.dist.rank
                stats = self._minibatch(rollout, rows, width, ptx_index)
                if stats is None:
                    return None
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
        mask = rollout.response_mask
        returns, values = rollout.returns, rollout.values
        residual = _masked_var(returns - values, mask)
        totals = {k: v / count for k, v in totals.items()}
        totals["explained_variance"] = float(1 - residual / _masked_var(returns, mask).clamp(min=1e-8))
        totals["value_mean"] = float(_masked_mean(values, mask))
        return totals

    def _minibatch(self, rollout: Rollout, rows: list[int], width: int, ptx_index: int) -> dict | None:
        ppo = self.ppo
        ids, mask, positions = rollout.ids[rows], rollout.mask[rows], rollout.positions[rows]
        response_mask = rollout.response_mask[rows]
        old_logprobs, advantages = rollout.logprobs[rows], rollout.advantages[rows]
        old_values, returns = rollout.values[rows], rollout.returns[rows]
        self.optimizer.zero_grad(set_to_none=True)

        train_policy = self.step >= ppo.value_warmup_steps
        with torch.set_grad_enabled(train_policy):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                             output_hidden_states=not self.lora, **self._response_logits(ids, width))
        logits = out.logits[:, -(ids.shape[1] - width) - 1:-1].float() / self.rollout_cfg.temperature
        logprobs = torch.gather(logits, 2, ids[:, width:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        log_ratio = (logprobs - old_logprobs) * response_mask
        ratio = torch.exp(log_ratio)
        pg_losses = torch.max(-advantages * ratio,
                              -advantages * torch.clamp(ratio, 1 - ppo.cliprange, 1 + ppo.cliprange))
        pg_loss = _masked_mean(pg_losses, response_mask)
        loss = pg_loss
        ptx_loss = None
        if self.ptx is not None and train_policy:
            ptx_ids, ptx_mask, ptx_labels = (t.to(self.dist.device) for t in self.ptx.batch(ptx_index))
            with torch.set_grad_enabled(self.cfg.ptx.coef > 0):  # coef 0: measured, not trained on
                ptx_loss = self.model(input_ids=ptx_ids, attention_mask=ptx_mask, labels=ptx_labels,
                                      use_cache=False).loss
            if self.cfg.ptx.coef > 0:
                loss = loss + self.cfg.ptx.coef * ptx_loss

        def value_loss(predicted):
            clipped = old_values + torch.clamp(predicted - old_values, -ppo.cliprange_value, ppo.cliprange_value)
            return 0.5 * _masked_mean(torch.max((predicted - returns) ** 2, (clipped - returns) ** 2), response_mask), \
                _masked_mean(((predicted - returns) ** 2 > (clipped - returns) ** 2).float(), response_mask)

        if self.lora:  # the value adapter runs its own forward pass: two backward passes, one optimizer step
            if not self._all_finite(loss):
                return None
            if train_policy:
                loss.backward()
            inputs = rollout.value_inputs[rows] if rollout.value_inputs is not None else None
            predicted = self.value(self.model, ids, mask, positions, inputs=inputs)[:, width - 1:-1]
            vf_loss, vf_clipfrac = value_loss(predicted)
            finite = self._all_finite(vf_loss)
            if finite:
                (ppo.vf_coef * vf_loss).backward()
            if not finite:
                return None
        else:
            predicted = self.value(self.model, ids, mask, positions, out.hidden_states[-1][:, width - 1:-1])
            vf_loss, vf_clipfrac = value_loss(predicted)
            loss = (loss if train_policy else 0) + ppo.vf_coef * vf_loss
            if not self._all_finite(loss):
                return None
            loss.backward()
        self.dist.average_gradients(self.params)
        # Policy and value are clipped apart: a large value loss early on must not shrink the policy's step.
        grad_norm = torch.stack([self._clip(self.policy_params), self._clip(self.value_params)]).norm()
        if not torch.isfinite(grad_norm):  # the same on every process: gradients were averaged
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        with torch.no_grad():
            probs = torch.softmax(logits, -1)
            entropy = _masked_mean(torch.logsumexp(logits, -1) - (probs * logits).sum(-1), response_mask)
            stats = {
                "pg_loss": float(pg_loss), "vf_loss": float(vf_loss), "vf_clipfrac": float(vf_clipfrac),
                "entropy": float(entropy),
                "clipfrac": float(_masked_mean(((ratio - 1).abs() > ppo.cliprange).float(), response_mask)),
                "approx_kl": float(_masked_mean(0.5 * log_ratio ** 2, response_mask)),
                "grad_norm": float(grad_norm),
            }
            if ptx_loss is not None:
                stats["ptx_loss"] = float(ptx_loss)
        return stats

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process: all skip together, or their gradient exchanges would not
        pair up."""
        return bool(self.dist.sum(torch.isfinite(loss.detach()).float().reshape(1).cpu()).item() == self.dist.world)

    def _clip(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """Scales the gradients down to a norm of ppo.max_grad_norm when they are above it; returns the norm before."""
        norm = self.dist.grad_norm(params)
        if self.ppo.max_grad_norm and torch.isfinite(norm):
            scale = min(1.0, self.ppo.max_grad_norm / (float(norm) + 1e-6))
            if scale < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return norm

    # ---- reporting ----

    def _log_line(self, entry: dict) -> str:
        if entry.get("skipped"):
            return f"iteration {self.step}/{self.ppo.steps}: skipped"
        parts = [f"iteration {self.step}/{self.ppo.steps}", f"reward {entry['reward']:+.3f} (raw "
                 f"{entry['reward_raw']:+.3f})", *([f"gold {entry['gold']:+.3f}"] if "gold" in entry else []),
                 f"kl {entry['kl']:.3f}", f"beta {entry['kl_coef']:.3g}",
                 f"entropy {entry['entropy']:.3f}", f"clip {entry['clipfrac']:.3f}", f"approx_kl "
                 f"{entry['approx_kl']:.4f}", f"vf_loss {entry['vf_loss']:.4f}",
                 f"ev {entry['explained_variance']:.2f}",
                 f"len {entry['response_length']:.1f}", f"eos {entry['eos_rate']:.2f}"]
        if "ptx_loss" in entry:
            parts.append(f"ptx {entry['ptx_loss']:.3f}")
        if self.step <= self.ppo.value_warmup_steps:
            parts.append("(value warmup: policy frozen)")
        return "  ".join(parts)

    def _keep_samples(self, rollout: Rollout, scores: torch.Tensor, gold: torch.Tensor | None = None) -> None:
        self.samples = [{"step": self.step + 1, "prompt": p, "response": r, "reward": float(s)}
                        for p, r, s in zip(rollout.prompts, rollout.responses, scores.tolist())]
        if gold is not None:
            for sample, value in zip(self.samples, gold.tolist()):
                sample["gold"] = value

    def summary(self) -> dict:
        return summarize(self.history, self.step, self.step * self.ppo.batch_size * self.dist.world,
                         self.train_time, self.skipped, self.kl.coef)

    # ---- checkpoints ----

    def save_checkpoint(self, run_dir: RunDir) -> Path:
        """checkpoints/checkpoint-N: adapters (or weights), value head, optimizer, scheduler, RNG, step, KL
        controller, history. Written to a staging folder and renamed: a kill never leaves a half checkpoint. Under
        FSDP each process also writes its shard of the optimizer's state there."""
        folder = run_dir.work / CHECKPOINTS / f"checkpoint-{self.step}"
        staging = folder.with_name(folder.name + ".partial")
        if self.dist.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.dist.barrier()
        self.save_policy(staging)
        optimizer = self.optimizer.state_dict()
        if self.dist.sharded:  # this process's shards, as plain tensors (the live state stays as it is)
            optimizer["state"] = {key: {k: v.to_local() if _is_shard(v) else v for k, v in values.items()}
                                  for key, values in optimizer["state"].items()}
            torch.save(optimizer, staging / f"optimizer-rank{self.dist.rank}.pt")
        elif self.dist.is_main:
            torch.save(optimizer, staging / "optimizer.pt")
        self.dist.barrier()
        if not self.dist.is_main:
            self.dist.barrier()
            return folder
        torch.save(self.scheduler.state_dict(), staging / "scheduler.pt")
        torch.save({"torch": torch.random.get_rng_state(), "python": random.getstate()}, staging / "rng.pt")
        (staging / STATE_FILE).write_text(json.dumps({
            "step": self.step, "kl_coef": self.kl.coef, "history": self.history, "samples": self.samples,
            "skipped": self.skipped, "bad_in_a_row": self.bad_in_a_row, "train_time": self.train_time,
            "value_first_layer": self.value.first_layer, "sharded_processes": self.dist.world if self.dist.sharded
            else 0}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        checkpoints = sorted((p for p in folder.parent.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                             key=lambda p: int(p.name.split("-")[-1]))
        for old in checkpoints[:-self.ppo.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return folder

    def load_checkpoint(self, folder: Path) -> None:
        """Everything but the weights (load_checkpoint_weights put them in before the model was sharded)."""
        state = json.loads((folder / STATE_FILE).read_text())
        if self.dist.sharded:
            from torch.distributed.tensor import DTensor

            self._load_optimizer(folder / f"optimizer-rank{self.dist.rank}.pt")
            for param, values in self.optimizer.state.items():  # the shards were saved as plain local tensors
                if _is_shard(param):
                    values.update({k: DTensor.from_local(v.to(param.device), param.device_mesh, param.placements,
                                                             shape=param.shape, stride=param.stride())
                                   for k, v in values.items() if torch.is_tensor(v) and v.dim() > 0})
        else:
            self._load_optimizer(folder / "optimizer.pt")
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=False)
        torch.random.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        self.step, self.kl.coef, self.history = state["step"], state["kl_coef"], state["history"]
        self.samples, self.skipped = state["samples"], state["skipped"]
        self.bad_in_a_row, self.train_time = state["bad_in_a_row"], state["train_time"]

    def _load_optimizer(self, file: Path) -> None:
        try:
            self.optimizer.load_state_dict(torch.load(file, weights_only=True))
        except ValueError as error:  # another parameter layout: other adapters, or an older align ppo
            raise AlignError(f"--resume: {file} does not fit this run's optimizer ({error}); resume with the "
                             f"checkpoint's settings or start a new run") from None

    def save_policy(self, folder: Path) -> None:
        """The policy in a standard format (a peft adapter on the SFT weights, or full weights) at `folder`, the
        value function (adapter + head) in `folder/value/`. Every process calls it; the main one writes."""
        given = {"state_dict": self._whole_weights()} if self.dist.sharded else {}
        if not self.dist.is_main:
            return
        (folder / VALUE_FOLDER).mkdir(parents=True, exist_ok=True)
        if self.lora:
            self.model.save_pretrained(str(folder), selected_adapters=["default"], **given)
            self.model.save_pretrained(str(folder / VALUE_FOLDER), selected_adapters=["value"], **given)
            nested = folder / VALUE_FOLDER / "value"  # peft writes non-default adapters into a subfolder
            if nested.is_dir():
                for item in nested.iterdir():
                    os.replace(item, folder / VALUE_FOLDER / item.name)
                nested.rmdir()
        else:
            self.model.save_pretrained(str(folder), **given)
        torch.save(self.value.head.state_dict(), folder / VALUE_FOLDER / VALUE_HEAD_FILE)

    def _whole_weights(self) -> dict[str, torch.Tensor] | None:
        """Under FSDP: what save_pretrained writes, gathered from the shards: peft's selection for the two adapters
        (LoRA weights, modules_to_save, resized embeddings), or every weight."""
        state = self.model.state_dict()
        if self.lora:
            from peft import get_peft_model_state_dict

            chosen = {id(tensor) for adapter in ("default", "value")
                      for tensor in get_peft_model_state_dict(self.model, state, adapter).values()}
            state = {name: tensor for name, tensor in state.items() if id(tensor) in chosen}
        return self.dist.whole(state)


def load_checkpoint_weights(folder: Path, model, value: ValueFunction, lora: bool, dist: Distributed) -> None:
    """A checkpoint's policy and value weights into the (not yet sharded) model and the value head, once the
    checkpoint is known to fit this run."""
    state = json.loads((folder / STATE_FILE).read_text())
    saved_shards = state.get("sharded_processes", 0)
    if saved_shards != (dist.world if dist.sharded else 0):
        saved = f"{saved_shards} processes under FSDP" if saved_shards else "without FSDP"
        now = f"{dist.world} processes under FSDP" if dist.sharded else "without FSDP"
        raise AlignError(f"--resume: {folder} holds the optimizer's state as saved by {saved}, this run runs {now}; "
                         f"resume with the launcher config the checkpoint was written with")
    saved_first = state.get("value_first_layer", 0)
    if saved_first != value.first_layer:
        raise AlignError(f"--resume: {folder} trained the value function from decoder layer {saved_first}, this "
                         f"run from layer {value.first_layer} (ppo.value_layers changed); resume with the "
                         f"checkpoint's setting or start a new run")
    if lora:
        _load_adapter_weights(model, "default", _adapter_weights(folder))
        _load_adapter_weights(model, "value", _adapter_weights(folder / VALUE_FOLDER))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())
    value.head.load_state_dict(torch.load(folder / VALUE_FOLDER / VALUE_HEAD_FILE, weights_only=True))


def _masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = _masked_mean(values, mask)
    return _masked_mean((values - mean) ** 2, mask)
