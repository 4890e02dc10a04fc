"""Peak training memory, estimated before a stage trains, against what the machine (or GPU) has.

A run that clearly cannot fit is refused with one line that names settings that would fit, instead of growing until
the kernel kills it (exit 137, no message, nothing saved). Every stage calls `check_memory` once, after its model is
loaded and before anything is written; the same estimate is the start table's "memory (est. peak)" row.

The estimate (`estimate`, a pure function) adds: the runtime (Python, torch, transformers, TRL), the weights, AdamW's
two states and the gradients of the trainable parameters, and the activations kept for the backward pass: per token
and decoder layer, the tensors a transformer layer saves (counted with autograd's saved-tensor hooks: about
10 x hidden + 4 x intermediate values; LoRA's dropout copies and adapter outputs add about 7 x hidden + 1 x
intermediate), the full-vocabulary logits and their log-softmax where the loss reads them, and eager attention's
score matrices. On CPU, what the process holds (peak RSS) is more than what autograd keeps: freed temporaries stay in
the C heap. The factors below were measured on this project's embedded model (SmolLM2-135M, fp32, LoRA and full,
`align reward` / `align sft` short runs and longer runs of varying lengths); the numbers are in tests/test_memory.py.

Environment:
- ALIGN_SKIP_MEMORY_CHECK=1: train even when the estimate exceeds what is available (the row still shows it).
- ALIGN_MEMORY_LIMIT=<GiB>: the memory to plan for, when less than the machine has (a shared machine; tests).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from align.errors import AlignError
from align.reporting import human_bytes

SKIP_ENV = "ALIGN_SKIP_MEMORY_CHECK"
LIMIT_ENV = "ALIGN_MEMORY_LIMIT"
GIB = 2 ** 30

# Values saved for backward per token and decoder layer, in units of (hidden, intermediate).
SAVED_PER_LAYER = (10, 4)
LORA_SAVED_PER_LAYER = (7, 1)
# Peak RSS over what autograd keeps, on CPU: glibc keeps some freed temporaries in the heap (measured 1.2).
CPU_HEAP_FACTOR = 1.25
# With gradient checkpointing, the share of the activations' peak RSS that remains on CPU (measured; the recomputed
# layers' temporaries fragment the heap). On a GPU: the layer inputs plus one layer's activations.
CPU_CHECKPOINTED_SHARE = 0.45
# Eager attention: score matrices (heads x length^2) per sequence and layer: scores, masked, softmax, dropout.
EAGER_ATTENTION_COPIES = 4
# fp32 vocabulary-sized tensors per logit position at peak: logits, the loss's log-softmax and its gradient. TRL's
# SFT and DPO losses also compute entropy and token accuracy from them (measured: peak RSS over a score head's run,
# SmolLM2's 49k vocabulary).
LOGIT_COPIES = 4
SFT_LOGIT_COPIES = 9.5
DPO_LOGIT_COPIES = 5  # policy and reference logits of both responses (measured)
RUNTIME_BYTES = {"cpu": int(0.5 * GIB), "cuda": int(0.5 * GIB)}  # interpreter + libraries / CUDA context
CUDA_HEAP_FACTOR = 1.1  # the caching allocator's rounding and fragmentation


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # key/value width of a layer (grouped-query attention: fewer heads than the queries)
    vocab: int
    weight_bytes: int  # every copy of the weights held in memory (reference models, reward models)
    trainable_bytes: int
    value_bytes: int  # bytes of one activation value: 2 in bf16/fp16, 4 in fp32
    lora: bool
    eager_attention: bool

    @classmethod
    def of(cls, model, extra_weight_bytes: int = 0) -> ModelShape | None:
        """The shape of a transformers model (PEFT-wrapped or not); None when its config names its sizes otherwise."""
        from align.modeling import parameter_summary

        config = model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden, heads, layers, vocab = (_config_int(config, *names) for names in (
            ("hidden_size", "n_embd", "d_model"), ("num_attention_heads", "n_head", "num_heads"),
            ("num_hidden_layers", "n_layer", "num_layers"), ("vocab_size",)))
        if None in (hidden, heads, layers, vocab):
            return None
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        return cls(
            layers=layers + (getattr(config, "num_decoder_layers", 0) or 0),  # encoder-decoder: both stacks
            hidden=hidden, heads=heads, vocab=vocab,
            intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or
            getattr(config, "d_ff", None) or 4 * hidden,
            kv_dim=(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
            weight_bytes=parameter_summary(model).memory_bytes + extra_weight_bytes,
            trainable_bytes=sum(p.numel() * p.element_size() for _, p in trainable),
            value_bytes=model.get_input_embeddings().weight.element_size(),
            lora=any("lora_" in name for name, _ in trainable),
            eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        )


def _config_int(config, *names: str) -> int | None:
    return next((getattr(config, name) for name in names if isinstance(getattr(config, name, None), int)), None)


@dataclass(frozen=True)
class Workload:
    """What one micro-batch runs, and where its numbers come from in the config (None: not a setting to suggest)."""

    batch: int  # items per micro-batch: rows, pairs, responses
    length: int  # tokens per sequence as padded: the data's longest, at most max_length
    sequences_per_item: int = 1  # 2: a chosen and a rejected response
    logit_positions: int | None = None  # per sequence, where the loss reads full-vocabulary logits (None: all; 0: none)
    logit_copies: float = LOGIT_COPIES  # fp32 vocabulary-sized values per such position (logits, log-softmax, ...)
    accumulation: int = 1
    gradient_checkpointing: bool = False
    extra_tokens: int = 0  # tokens of a second pass held at the same time, with their logits (PPO's ptx batch)
    generation_tokens: int = 0  # sequences x length sampled at once (their key/value cache)
    shards: int = 1  # processes that split the weights, gradients and optimizer state (FSDP, DeepSpeed)
    batch_key: str | None = "training.per_device_train_batch_size"
    accumulation_key: str | None = "training.gradient_accumulation_steps"
    checkpointing_key: str | None = "training.gradient_checkpointing"
    length_key: str | None = "training.max_length"

    @property
    def sequences(self) -> int:
        return self.batch * self.sequences_per_item


@dataclass(frozen=True)
class Estimate:
    runtime: int
    weights: int
    optimizer: int  # AdamW's two states
    gradients: int
    activations: int  # kept for backward, with the logits, attention matrices and any key/value cache
    accumulating: bool  # gradients kept across micro-batches

    @property
    def total(self) -> int:
        # Gradients are set to None after each optimizer step: without accumulation they grow as the backward pass
        # frees activations; with it, they stay while the next micro-batch's activations build up.
        training = self.gradients + self.activations if self.accumulating else max(self.gradients, self.activations)
        return self.runtime + self.weights + self.optimizer + training


def trainer_workload(args, length: int, **fields) -> Workload:
    """The workload of a transformers / TRL trainer run with TrainingArguments `args`, sequences of `length`."""
    return Workload(batch=args.per_device_train_batch_size, length=length,
                    accumulation=args.gradient_accumulation_steps, gradient_checkpointing=args.gradient_checkpointing,
                    shards=args.world_size if args.fsdp or args.deepspeed else 1, **fields)


def estimate(shape: ModelShape, work: Workload, device: str = "cpu") -> Estimate:
    """Peak memory of one process training `shape` on `work`, on `device` ("cpu" or "cuda")."""
    hidden_units, intermediate_units = SAVED_PER_LAYER
    if shape.lora:
        hidden_units += LORA_SAVED_PER_LAYER[0]
        intermediate_units += LORA_SAVED_PER_LAYER[1]
    per_token_layer = hidden_units * shape.hidden + intermediate_units * shape.intermediate
    tokens = work.sequences * work.length + work.extra_tokens
    layers = tokens * shape.layers * per_token_layer
    if shape.eager_attention:
        layers += EAGER_ATTENTION_COPIES * work.sequences * shape.heads * work.length ** 2 * shape.layers
    if work.gradient_checkpointing:
        kept = shape.hidden * shape.layers + 2 * per_token_layer  # layer inputs + the layer being recomputed
        layers *= CPU_CHECKPOINTED_SHARE if device == "cpu" else kept / (per_token_layer * shape.layers)
    positions = work.length if work.logit_positions is None else work.logit_positions
    # A stage's measured copies include temporaries the CPU heap keeps; a GPU's caching allocator reuses them.
    copies = work.logit_copies if device == "cpu" else min(work.logit_copies, LOGIT_COPIES)
    logits = (work.sequences * positions + work.extra_tokens) * shape.vocab * 4 * copies
    heap = CPU_HEAP_FACTOR if device == "cpu" else CUDA_HEAP_FACTOR
    activations = heap * layers * shape.value_bytes + logits
    activations += 2 * work.generation_tokens * shape.layers * shape.kv_dim * shape.value_bytes
    return Estimate(runtime=RUNTIME_BYTES[device], weights=shape.weight_bytes // work.shards,
                    optimizer=2 * shape.trainable_bytes // work.shards, gradients=shape.trainable_bytes // work.shards,
                    activations=int(activations), accumulating=work.accumulation > 1)


def available_memory(device: str) -> tuple[int, str]:
    """The bytes this process can use, and what they are: the GPU's memory (less what other processes hold), else
    the RAM available now (within a cgroup's limit) plus what this process already holds; at most ALIGN_MEMORY_LIMIT.
    """
    import psutil

    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        found, what = free + torch.cuda.memory_reserved(), "GPU memory"
    else:
        own = psutil.Process().memory_info().rss
        found, what = psutil.virtual_memory().available + own, "RAM"
        cgroup = _cgroup_room()
        if cgroup is not None and cgroup + own < found:
            found, what = cgroup + own, "RAM (cgroup limit)"
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        try:
            limit_bytes = int(float(limit) * GIB)
        except ValueError:
            raise AlignError(f"{LIMIT_ENV}={limit!r}: not a number of GiB (e.g. {LIMIT_ENV}=16)") from None
        if limit_bytes < found:
            found, what = limit_bytes, f"{what} ({LIMIT_ENV})"
    return found, what


def _cgroup_room() -> int | None:
    """Bytes left under a cgroup v2 memory limit (inactive page cache counts as free: the kernel reclaims it)."""
    folder = Path("/sys/fs/cgroup")
    try:
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return None
    return max(int(limit) - used + int(stat.get("inactive_file", 0)), 0)


def check_memory(model, work: Workload, extra_weight_bytes: int = 0, processes: int | None = None) -> tuple[str, str]:
    """The start table's row for `model` training on `work`; raises AlignError, naming settings that would fit, when
    the estimate exceeds the memory available. On CPU, the processes of one machine (LOCAL_WORLD_SIZE) share its RAM.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if processes is None:
        processes = 1 if device == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    shape = ModelShape.of(model, extra_weight_bytes)
    if shape is None:
        return "memory (est. peak)", "not estimated (the model's config names no hidden size, heads or layers)"
    available, what = available_memory(device)

    def needs(candidate: Workload) -> int:
        return estimate(shape, candidate, device).total * processes

    need = needs(work)
    row = f"{human_bytes(need)} of {human_bytes(available)} {what} available"
    if need <= available:
        return "memory (est. peak)", row
    if os.environ.get(SKIP_ENV) == "1":
        return "memory (est. peak)", f"{row}: may not fit ({SKIP_ENV}=1)"
    parts = estimate(shape, work, device)
    fits = suggestions(work, lambda candidate: needs(candidate) <= available)
    raise AlignError(
        f"memory: training needs about {human_bytes(need)} at peak but {human_bytes(available)} of {what} is "
        f"available ({work.sequences} sequences x {work.length} tokens per micro-batch: activations "
        f"{human_bytes(parts.activations)}, weights {human_bytes(parts.weights)}, gradients and optimizer state "
        f"{human_bytes(parts.gradients + parts.optimizer)}"
        + (f"; x {processes} processes" if processes > 1 else "") + "). "
        + (f"Settings that would fit: {'; or '.join(fits)}" if fits else
           "Nothing within these settings fits: a smaller model, LoRA, 4-bit quantization or a larger machine")
        + f" (or set {SKIP_ENV}=1 to train anyway)")


def suggestions(work: Workload, fits) -> list[str]:
    """Changes of `work`'s settings for which `fits(workload)` holds, each as the user would write it: the largest
    micro-batch (with accumulation to keep the effective batch), gradient checkpointing, the longest max_length;
    combined only when no single change fits."""
    found = []
    batch = _largest_fitting_batch(work, fits)
    if batch:
        found.append(batch)
    checkpointed = replace(work, gradient_checkpointing=True)
    if work.checkpointing_key and not work.gradient_checkpointing and fits(checkpointed):
        found.append(f"{work.checkpointing_key}=true")
    if work.length_key:
        lengths = [2 ** k for k in range(int(math.log2(max(work.length - 1, 1))), 4, -1)]
        length = next((n for n in lengths if fits(replace(work, length=n))), None)
        if length:
            found.append(f"{work.length_key}={length}")
    if not found and work.checkpointing_key and not work.gradient_checkpointing:
        batch = _largest_fitting_batch(checkpointed, fits)
        if batch:
            found.append(f"{batch} and {work.checkpointing_key}=true")
    return found


def _largest_fitting_batch(work: Workload, fits) -> str | None:
    """The largest divisor of the micro-batch that fits, with the accumulation that keeps the effective batch where
    accumulation is a setting (without it, the divisor splits each batch evenly)."""
    if not work.batch_key:
        return None
    for batch in range(work.batch - 1, 0, -1):
        if work.batch % batch:
            continue
        accumulation = work.accumulation * work.batch // batch if work.accumulation_key else work.accumulation
        if fits(replace(work, batch=batch, accumulation=accumulation)):
            if not work.accumulation_key:
                return f"{work.batch_key}={batch}"
            return f"{work.batch_key}={batch} with {work.accumulation_key}={accumulation} (same effective batch)"
    return None
