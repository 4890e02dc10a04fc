"""The policy model's parts and the adapters on its one base: where the language model, its transformer body and
its decoder layers are (through peft's wrappers); `AdapterSwitch`, which picks the adapter a forward pass runs
through; and `ValueFunction`, V(s) as the `value` adapter (or the policy's hidden states) through a linear head.
The peft adapter files (`adapter_config.json`, the weights, a reward model's score head) are read here too."""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from align.errors import AlignError
from align.modeling import model_files
from align.scoring import Normalization
from align.stages.ppo.config import PPORunConfig

if TYPE_CHECKING:
    from align.stages.ppo.distributed import Distributed


# --------------------------------------------------------------------------------------------------
# Where a model's parts are

def language_model(model):
    """The transformers causal LM inside peft's wrappers (the model itself without them)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The transformer body (hidden states, no LM head) of a causal LM, through peft's wrappers."""
    lm = language_model(model)
    return getattr(lm, lm.base_model_prefix)


def body_for_a_pass(model):
    """The transformer body, to be called on its own (value and reward passes). Under FSDP its own weights
    (embeddings, final norm) belong to the model's root group, which gathers them in the model's forward pass only:
    they are gathered here first (a no-op when they still are)."""
    from torch.distributed.fsdp import FSDPModule

    lm = language_model(model)
    if isinstance(lm, FSDPModule):
        lm.unshard()
    return backbone(model)


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The transformer body's decoder layers (`layers` in Llama, Mistral, Qwen, Gemma, ...), or None."""
    layers = getattr(backbone(model), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def base_weight_copies(*models) -> int:
    """How many copies of base weights the given models hold in memory: models whose input embeddings are one
    tensor count once (policy, reference and value, and a shared-base reward model, are adapters on one base)."""
    storages = {model.get_input_embeddings().weight.data_ptr() for model in models if model is not None}
    return len(storages)


def last_token_states(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state of each row's last real token (rows are right-padded)."""
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@contextmanager
def layer_input(layer: torch.nn.Module):
    """Collects the hidden states that enter `layer` during the passes run inside the block."""
    captured: list[torch.Tensor] = []

    def keep(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _upper_body(model, first: int):
    """The transformer body from decoder layer `first` up, sharing every module with the model: given the hidden
    states that enter layer `first` as `inputs_embeds`, it returns what the whole body returns."""
    body = backbone(model)
    upper = copy.copy(body)
    upper._modules = {**body._modules, "layers": torch.nn.ModuleList(list(body.layers)[first:])}
    return upper


def _layer_index(weight_name: str) -> int | None:
    """The decoder layer a weight belongs to (`...layers.12.self_attn...` -> 12), or None."""
    found = re.search(r"\.layers\.(\d+)\.", weight_name)
    return int(found.group(1)) if found else None


# --------------------------------------------------------------------------------------------------
# Adapter files: an `align reward` LoRA adapter becomes adapter `value` or `reward` on the policy's base

def adapter_config(folder: Path, **changes):
    from peft import LoraConfig

    values = json.loads((folder / "adapter_config.json").read_text())
    known = {k: v for k, v in values.items() if k in LoraConfig.__dataclass_fields__}
    return LoraConfig(**{**known, **changes})


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    with model_files(str(folder)):
        if file.is_file():
            return load_file(str(file))
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def split_score_head(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A SEQ_CLS adapter's LoRA weights and its score head (saved as modules_to_save)."""
    lora = {k: v for k, v in weights.items() if "lora_" in k}
    head = [v for k, v in weights.items() if "lora_" not in k and k.split(".")[-2] in ("score", "classifier")
            and k.endswith("weight")]
    if len(head) != 1:
        raise AlignError("reward model: its adapter holds no single score head (expected `score.weight`, as "
                         "`align reward` saves); set reward.share_base: false")
    return lora, head[0]


def load_adapter_weights(model, name: str, weights: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise AlignError(f"adapter '{name}': {len(missing)} weights do not fit the model (e.g. {missing[0]})")


# --------------------------------------------------------------------------------------------------
# Switching adapters

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


# --------------------------------------------------------------------------------------------------
# The value function

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
            model.add_adapter("value", adapter_config(folder, task_type="CAUSAL_LM", modules_to_save=None,
                                                      inference_mode=False))
            lora, score = split_score_head(adapter_weights(folder))
            load_adapter_weights(model, "value", lora)
            with torch.no_grad():
                # V starts as the reward PPO will see: the raw score, normalized the same way.
                normalization = Normalization.load(folder) if cfg.reward.normalized else None
                scale = normalization.apply(1.0) - normalization.apply(0.0) if normalization else 1.0
                head.weight.copy_(score.float() * scale)
                head.bias.fill_(normalization.apply(0.0) if normalization else 0.0)
        else:
            model.add_adapter("value", copy.deepcopy(model.peft_config["default"]))
        model.set_adapter("default")
        layers = decoder_layers(model)
        count = cfg.ppo.value_layers if cfg.ppo.value_layers is not None else max(1, len(layers or ()) // 4)
        if layers is None or not 0 < count < len(layers):
            return cls(head, adapters)
        first = len(layers) - count
        return cls(head, adapters, first, _upper_body(model, first))

    def check_upper(self, model, probe: list[int], dist: Distributed) -> bool:
        """Whether the upper body on the captured hidden states ends where the whole body does, on `probe` (token
        ids as long as a rollout, `value_probe`). Not where an architecture transforms what enters its body
        (Granite's embedding multiplier) or picks a layer's attention by its position in the list: then value
        passes run the whole model."""
        if self.upper is None:
            return True
        ids = torch.tensor([probe], device=dist.device)
        mask = torch.ones_like(ids)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        training = model.training
        model.eval()  # as PPO runs it: an adapter's dropout would make the two passes differ anyway
        try:
            with torch.no_grad(), layer_input(decoder_layers(model)[self.first_layer]) as captured:
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
        total = len(decoder_layers(model) or ())
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
            body = body_for_a_pass(model)
            if self.upper is not None and inputs is not None:
                return self.upper(inputs_embeds=inputs, attention_mask=mask, position_ids=positions,
                                  use_cache=False).last_hidden_state
            return body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def value_probe(queries: list[tuple[str, list[int]]], cfg: PPORunConfig, model_config) -> list[int]:
    """The first prompt's tokens repeated to the longest rollout (prompt + response), for `check_upper`:
    sliding-window or per-layer attention differences show only at lengths a rollout reaches."""
    length = min(cfg.rollout.max_prompt_length + cfg.rollout.max_new_tokens,
                 getattr(model_config, "max_position_embeddings", None) or 1 << 30)
    tokens = queries[0][1]
    return (tokens * (length // len(tokens) + 1))[:length]
