"""Saving and resuming `align ppo`: the policy in a standard format (a peft adapter on the SFT weights, or full
weights) with its value function beside it, and checkpoints/checkpoint-N (that, plus optimizer, scheduler, RNG and
the loop's state), written to a staging folder and renamed, so that a kill never leaves a half checkpoint. Resuming
is two steps: the weights go into the model before it is sharded (`load_checkpoint_weights`), everything else into
the trainer once it exists (`load_checkpoint_state`). Under FSDP each process writes and reads its own shard of the
optimizer's state; the weights are gathered to the main process, which writes them."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from align.artifacts import CHECKPOINTS, RunDir
from align.errors import AlignError
from align.stages.ppo.adapters import ValueFunction, adapter_weights, load_adapter_weights
from align.stages.ppo.distributed import Distributed, is_shard

if TYPE_CHECKING:
    from align.stages.ppo.trainer import PPOTrainer

STATE_FILE = "trainer_state.json"
VALUE_FOLDER = "value"
VALUE_HEAD_FILE = "value_head.pt"


def save_policy(folder: Path, model, value: ValueFunction, lora: bool, dist: Distributed) -> None:
    """The policy at `folder` (a peft adapter on the SFT weights, or full weights), the value function (adapter +
    head) in `folder/value/`. Every process calls it; the main one writes."""
    given = {"state_dict": _whole_weights(model, lora, dist)} if dist.sharded else {}
    if not dist.is_main:
        return
    (folder / VALUE_FOLDER).mkdir(parents=True, exist_ok=True)
    if lora:
        model.save_pretrained(str(folder), selected_adapters=["default"], **given)
        model.save_pretrained(str(folder / VALUE_FOLDER), selected_adapters=["value"], **given)
        nested = folder / VALUE_FOLDER / "value"  # peft writes non-default adapters into a subfolder
        if nested.is_dir():
            for item in nested.iterdir():
                os.replace(item, folder / VALUE_FOLDER / item.name)
            nested.rmdir()
    else:
        model.save_pretrained(str(folder), **given)
    torch.save(value.head.state_dict(), folder / VALUE_FOLDER / VALUE_HEAD_FILE)


def _whole_weights(model, lora: bool, dist: Distributed) -> dict[str, torch.Tensor] | None:
    """Under FSDP: what save_pretrained writes, gathered from the shards: peft's selection for the two adapters
    (LoRA weights, modules_to_save, resized embeddings), or every weight."""
    state = model.state_dict()
    if lora:
        from peft import get_peft_model_state_dict

        chosen = {id(tensor) for adapter in ("default", "value")
                  for tensor in get_peft_model_state_dict(model, state, adapter).values()}
        state = {name: tensor for name, tensor in state.items() if id(tensor) in chosen}
    return dist.whole(state)


def save_checkpoint(trainer: PPOTrainer, run_dir: RunDir) -> Path:
    """checkpoints/checkpoint-N: adapters (or weights), value head, optimizer, scheduler, RNG, the loop's state
    (step, KL controller, history...). Every process calls it; ppo.save_total_limit checkpoints are kept."""
    dist = trainer.dist
    folder = run_dir.work / CHECKPOINTS / f"checkpoint-{trainer.step}"
    staging = folder.with_name(folder.name + ".partial")
    if dist.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    save_policy(staging, trainer.model, trainer.value, trainer.lora, dist)
    optimizer = trainer.optimizer.state_dict()
    if dist.sharded:  # this process's shards, as plain tensors (the live state stays as it is)
        optimizer["state"] = {key: {k: v.to_local() if is_shard(v) else v for k, v in values.items()}
                              for key, values in optimizer["state"].items()}
        torch.save(optimizer, staging / f"optimizer-rank{dist.rank}.pt")
    elif dist.is_main:
        torch.save(optimizer, staging / "optimizer.pt")
    dist.barrier()
    if not dist.is_main:
        dist.barrier()
        return folder
    torch.save(trainer.scheduler.state_dict(), staging / "scheduler.pt")
    torch.save({"torch": torch.random.get_rng_state(), "python": random.getstate()}, staging / "rng.pt")
    (staging / STATE_FILE).write_text(json.dumps({
        **trainer.loop_state(), "value_first_layer": trainer.value.first_layer,
        "sharded_processes": dist.world if dist.sharded else 0}))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    checkpoints = sorted((p for p in folder.parent.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                         key=lambda p: int(p.name.split("-")[-1]))
    for old in checkpoints[:-trainer.ppo.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load_checkpoint_weights(folder: Path, model, value: ValueFunction, lora: bool, dist: Distributed) -> None:
    """Resume, step 1: a checkpoint's policy and value weights into the (not yet sharded) model and the value head,
    once the checkpoint is known to fit this run."""
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
        load_adapter_weights(model, "default", adapter_weights(folder))
        load_adapter_weights(model, "value", adapter_weights(folder / VALUE_FOLDER))
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict())
    value.head.load_state_dict(torch.load(folder / VALUE_FOLDER / VALUE_HEAD_FILE, weights_only=True))


def load_checkpoint_state(trainer: PPOTrainer, folder: Path) -> None:
    """Resume, step 2: everything but the weights into the trainer (optimizer, scheduler, RNG, the loop's state)."""
    dist = trainer.dist
    if dist.sharded:
        from torch.distributed.tensor import DTensor

        load_optimizer(trainer.optimizer, folder / f"optimizer-rank{dist.rank}.pt")
        for param, values in trainer.optimizer.state.items():  # the shards were saved as plain local tensors
            if is_shard(param):
                values.update({k: DTensor.from_local(v.to(param.device), param.device_mesh, param.placements,
                                                     shape=param.shape, stride=param.stride())
                               for k, v in values.items() if torch.is_tensor(v) and v.dim() > 0})
    else:
        load_optimizer(trainer.optimizer, folder / "optimizer.pt")
    trainer.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng.pt", weights_only=False)
    torch.random.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    trainer.restore_loop_state(json.loads((folder / STATE_FILE).read_text()))


def load_optimizer(optimizer: torch.optim.Optimizer, file: Path) -> None:
    try:
        optimizer.load_state_dict(torch.load(file, weights_only=True))
    except ValueError as error:  # another parameter layout: other adapters, or an older align ppo
        raise AlignError(f"--resume: {file} does not fit this run's optimizer ({error}); resume with the "
                         f"checkpoint's settings or start a new run") from None
