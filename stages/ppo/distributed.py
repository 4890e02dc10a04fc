"""Running `align ppo` in several processes: data parallel (each process samples its own prompts; gradients are
averaged after each backward pass: gloo on CPU, NCCL on GPUs), with the weights, gradients and optimizer state
split across the processes by PyTorch's FSDP2 when `accelerate launch` runs with an FSDP config. `Distributed` is
one process's view: its rank and device, the reductions PPO needs (mean, sum, gradient averaging, the gradient
norm), and gathering a sharded model's weights to save them. In one process every reduction is the identity."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from align.errors import AlignError
from align.stages.ppo.adapters import decoder_layers, language_model
from align.stages.ppo.config import PPORunConfig


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
            layers = decoder_layers(each)
            if layers is None:
                raise AlignError(f"FSDP: {type(language_model(each)).__name__} keeps no list of decoder layers "
                                 f"(`layers`) to shard; launch with configs/accelerate/ddp.yaml")
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            # The policy's root group stays gathered from a forward pass to its backward pass (FSDP's default for
            # the root); the reference never runs a backward pass, so its root splits after each forward pass.
            root = fully_shard(language_model(each), mesh=mesh,
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
        params = [p for p in params if not is_shard(p)]
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
        layers = list(decoder_layers(model)) if self.sharded else []
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
        return sum((p.to_local() if is_shard(p) else p).numel() * p.dtype.itemsize
                   for model in models if model is not None for p in model.parameters())

    def grad_norm(self, params: list[torch.nn.Parameter]) -> torch.Tensor:
        """The L2 norm of the parameters' whole gradients: shards' squares summed over processes (one all-reduce),
        replicated gradients counted once."""
        def squares(grads: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else \
                torch.zeros((), device=self.device)

        with_grad = [p for p in params if p.grad is not None]
        sharded = squares([p.grad.to_local() for p in with_grad if is_shard(p)])
        if self.sharded:
            sharded = self.sum(sharded)
        return (sharded + squares([p.grad for p in with_grad if not is_shard(p)])).sqrt().cpu()

    def whole(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The tensors of `state` (a sharded model's state dict, or part of it) whole, on the CPU of the main process
        (None elsewhere): every process takes part in gathering each one."""
        gathered = {}
        for name, tensor in state.items():
            tensor = tensor.full_tensor() if is_shard(tensor) else tensor
            if self.is_main:
                gathered[name] = tensor.detach().cpu()
        return gathered if self.is_main else None

    def stop(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def is_shard(tensor) -> bool:
    """Whether a tensor is an FSDP2 shard (a DTensor): this process holds only its part."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
