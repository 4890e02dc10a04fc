"""Loading models and tokenizers for every stage: local folders, hub ids, GGUF files, registry artifacts.

One place decides dtype, quantization (bitsandbytes 4/8 bit), LoRA / full / partial fine-tuning, and
makes the tokenizer safe to train with (a pad token distinct from EOS, a chat template).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from align.config import ConfigError, LoraConfig, ModelConfig, QuantizationConfig, TemplateConfig
from align.errors import AlignError
from align.registry import Artifact, Registry, registry_home, resolve_path

# Used when a tokenizer has no chat template: plain-text role markers, so no new tokens (and no
# embedding resize) are needed, and each assistant turn ends with EOS so the model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def resolve_package_path(path: str) -> str:
    """`pkg:<package>/<file>` -> the file's path inside the installed package.

    The package is located without importing it: data/model packages often import heavy or missing
    dependencies in their `__init__`.
    """
    if not path.startswith("pkg:"):
        return path
    package, _, inner = path[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # "a.b" whose parent "a" is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AlignError(f"'{path}': package '{package}' is not installed (run the README's setup command, "
                         f"or pip install it)")
    root = Path(next(iter(spec.submodule_search_locations)))
    target = root / inner
    if not target.exists():
        raise AlignError(f"'{path}': no file '{inner}' in package '{package}' ({root})")
    return str(target)


@dataclass
class ModelSource:
    """Where a model's weights are, after references are resolved."""

    path: str  # local folder or hub id
    artifact: Artifact | None  # the registry row it came from, if any
    adapter_of: str | None = None  # base model path when `path` is a PEFT adapter folder
    adapter_task: str | None = None  # the adapter's peft task_type (CAUSAL_LM, SEQ_CLS, ...)


def resolve_model(ref: str, registry: Registry | None = None, gguf_file: str | None = None) -> ModelSource:
    """Turn what a user wrote (path, hub id, gguf, registry ref, pkg:) into a loadable folder or hub id."""
    path, artifact = resolve_path(resolve_package_path(ref), registry)
    if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise AlignError(f"model: folder not found: {path} (relative to {Path.cwd()}); check model.path")
    if path.endswith(".gguf") and Path(path).is_file():
        path, gguf_file = str(Path(path).parent), Path(path).name
    if gguf_file:
        path = gguf_to_folder(path, gguf_file)
    if Path(path).exists():
        path = str(Path(path).resolve())  # artifacts record where their base is: absolute, so they load anywhere
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        try:
            adapter = json.loads(adapter_config.read_text(encoding="utf-8"))
        except ValueError as e:
            raise AlignError(_damaged(adapter_config, f"invalid JSON: {_first_sentence(e)}")) from None
        if not isinstance(adapter, dict) or not adapter.get("base_model_name_or_path"):
            raise AlignError(_damaged(adapter_config, "no base_model_name_or_path"))
        return ModelSource(path, artifact, adapter_of=adapter["base_model_name_or_path"],
                           adapter_task=adapter.get("task_type"))
    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise AlignError(f"model: '{path}' is a folder without config.json (not a transformers model; "
                         f"for a GGUF folder set model.gguf_file)")
    return ModelSource(path, artifact)


def cached_model_folder(name: str, identity: str, what: str, build) -> str:
    """A derived model folder `<align home>/models/<name>-<digest of identity>/`, built once by `build(folder)`.

    Written to a staging folder and renamed, so a half-built folder is never picked up; reused while
    `identity` (what it was built from) is unchanged.
    """
    target = registry_home() / "models" / f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
    if (target / "config.json").is_file():
        return str(target)
    print(f"{what} (once): {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    build(staging)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging, ignore_errors=True)  # another process (a DDP rank) finished the same folder first
    return str(target)


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def gguf_to_folder(folder: str, gguf_file: str) -> str:
    """De-quantize a GGUF model once into a standard folder under the align home and return that folder.

    A GGUF-loaded model cannot `save_pretrained`; a plain folder makes every artifact built on it
    (adapters, merged models) loadable with plain transformers and peft.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(folder) / gguf_file
    if not source.is_file():
        raise AlignError(f"model: GGUF file not found: {source}")

    def build(staging: Path) -> None:
        with _gguf_name_maps_built_once():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        config = model.config
        del config.quantization_config  # the weights are plain floats now; keeping it makes loaders expect GGUF
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    return cached_model_folder(source.stem, _file_identity(source),
                               f"Converting {source.name} to a standard transformers folder", build)


@contextlib.contextmanager
def _gguf_name_maps_built_once():
    """transformers rebuilds gguf's tensor-name map for every module of the model (397 times for SmolLM2-135M: 13 s of
    a 35 s conversion here); the map depends only on (architecture, layers) and is only read, so it is built once."""
    import functools

    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def save_merged(adapter_folder: Path, base_path: str, out: Path, dtype: str = "auto",
                trust_remote_code: bool = False) -> None:
    """Merge a causal or seq2seq LoRA adapter into full-precision base weights (also after QLoRA) and save the
    model and the adapter's tokenizer to `out`: loadable without peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    adapter_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    auto = AutoModelForSeq2SeqLM if adapter_config.get("task_type") == "SEQ_2_SEQ_LM" else AutoModelForCausalLM
    with model_files(base_path):
        base = auto.from_pretrained(base_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code)
    with model_files(str(adapter_folder)):
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_folder))
        match_model_to_tokenizer(base, tokenizer)
        merged = PeftModel.from_pretrained(base, str(adapter_folder)).merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def merge_adapter(source: ModelSource, dtype: str = "auto") -> str:
    """Merge a causal-LM LoRA adapter into its base once, into `<align home>/models/<adapter>-merged-<digest>/`
    (reused while the adapter is unchanged). Returns the folder."""
    folder = Path(source.path)
    weights = next((p for p in (folder / "adapter_model.safetensors", folder / "adapter_model.bin") if p.is_file()),
                   None)
    if weights is None:
        raise AlignError(f"model: {folder} has adapter_config.json but no adapter weights")
    base = resolve_model(source.adapter_of).path
    return cached_model_folder(f"{folder.name}-merged", f"{_file_identity(weights)}:{torch_dtype(dtype)}",
                               f"Merging the adapter {folder} into its base",
                               lambda staging: save_merged(folder, base, staging, dtype))


def _hub_error(path: str, error: Exception) -> AlignError:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    hint = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such model"
    return AlignError(f"model: '{path}' is not a local folder or file, and loading it from the Hugging Face hub "
                      f"failed ({hint}). Check the name, or download the model and set model.path to its folder.")


def _first_sentence(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text.split(". ")[0][:300] if any(c.isalpha() for c in text) else type(error).__name__


def _damaged(file: Path, detail: str) -> str:
    return (f"model: {file} is damaged ({detail}), e.g. cut short by an interrupted save, copy or download: re-run "
            f"the stage that wrote it, copy or download it again, or restore it from a checkpoint")


def damaged_file(folder: Path) -> tuple[Path, str] | None:
    """The first file of a model folder that cannot be read in full, and what is wrong with it: JSON that does not
    parse (or a config.json without model_type), a safetensors file whose header is unreadable or whose tensors run
    past its end, a PyTorch checkpoint that does not unpickle. Only headers are read (a zip checkpoint is
    memory-mapped), so it is quick."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.iterdir(), key=lambda p: (p.suffix != ".json", p.name)):  # config.json first
        try:
            if path.suffix == ".json":
                try:
                    values = json.loads(path.read_text(encoding="utf-8"))
                except ValueError as e:
                    return path, f"invalid JSON: {_first_sentence(e)}"
                if path.name == "config.json" and not (isinstance(values, dict) and values.get("model_type")):
                    return path, "no model_type: not a transformers model config"
            elif path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt"):
                        pass
                except SafetensorError as e:
                    return path, f"safetensors: {_first_sentence(e).removeprefix('Error while deserializing header: ')}"
            elif path.suffix == ".bin" and path.name.startswith(("pytorch_model", "adapter_model")):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
                except (RuntimeError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
                    return path, f"not a readable PyTorch checkpoint: {_first_sentence(e)}"
        except OSError:
            continue  # unreadable (permissions): not damage; the loader's own error says so
    return None


@contextlib.contextmanager
def model_files(path: str, what: str = ""):
    """Around loading from `path` (a folder or hub id): a failure whose cause is the user's to fix becomes one line.
    A damaged file in the folder is named with what to do; a hub model that could not be fetched says so. Any other
    error passes unchanged (a bug shows its traceback). `what`: what was loaded, for the message ("a tokenizer")."""
    try:
        yield
    except AlignError:
        raise
    except Exception as e:
        folder = Path(path)
        damaged = damaged_file(folder) if folder.is_dir() else None
        if damaged:
            raise AlignError(_damaged(*damaged)) from None
        if isinstance(e, OSError):
            if folder.exists():
                raise AlignError(f"model: cannot load {what + ' from ' if what else ''}{path}: {e}") from None
            raise _hub_error(path, e) from None
        raise


def torch_dtype(name: str) -> torch.dtype:
    """`auto` -> bfloat16 on a GPU that supports it, float32 elsewhere (CPU training is fastest in fp32)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def trainer_defaults(model_cfg: ModelConfig, output_dir: Path, seed: int, data_seed: int, training: dict) -> dict:
    """align's defaults for any TRL/transformers training config, under the user's `training:` values.

    Explicit about precision (TRL defaults to bf16 and gradient checkpointing, also on CPU), quiet about
    tracking, and DDP over gloo when torchrun starts several CPU processes.
    """
    defaults = dict(
        output_dir=str(output_dir),
        bf16=torch_dtype(model_cfg.dtype) == torch.bfloat16 and torch.cuda.is_available(),
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=10,
        seed=seed,
        data_seed=data_seed,
        per_device_eval_batch_size=training.get("per_device_train_batch_size", 8),
        save_only_model=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # torchrun on CPU: without use_cpu, accelerate sets up no process group (DistributedType.NO) and
        # every rank trains alone and writes its own artifact; with it, DDP over gloo.
        defaults["use_cpu"] = True
    return defaults


def training_config(config_class: type, values: dict):
    """`config_class(**values)`, with TrainingArguments' own consistency checks as one-line user errors (at the
    file:line of the key they are about when a stage's `load` builds it, through `LoadedConfig.finish(check=...)`)."""
    try:
        return config_class(**values)
    except ValueError as e:
        raise ConfigError("training", " ".join(str(e).split())) from None


def load_tokenizer(path: str, model_cfg: ModelConfig | None = None):
    from transformers import AutoTokenizer

    with model_files(path, what="a tokenizer"):
        return AutoTokenizer.from_pretrained(
            path,
            revision=model_cfg.revision if model_cfg else None,
            trust_remote_code=bool(model_cfg and model_cfg.trust_remote_code),
        )


def prepare_tokenizer(tokenizer) -> list[str]:
    """Make a tokenizer safe for training; returns what was changed, for the run log.

    - pad token distinct from EOS: padding with EOS makes anything that masks pad positions (token
      counts, some collators) also drop the real EOS, and the model may never learn to stop.
      Preference: an existing pad token, else the unk token, else a new `<|pad|>` token (see
      `match_model_to_tokenizer`; its embedding row is never trained).
    - a chat template: the plain-text one above when the model has none.
    """
    changes = []
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
            changes.append(f"pad token set to the unk token {tokenizer.unk_token!r} (distinct from EOS)")
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            changes.append("pad token '<|pad|>' added (distinct from EOS); embeddings resized")
    if not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        changes.append("no chat template in the tokenizer: using align's plain '### User:/### Assistant:' one")
    return changes


def match_model_to_tokenizer(model, tokenizer) -> None:
    """Resize embeddings for tokens `prepare_tokenizer` added and tell the model its pad token."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def model_config(path: str, model_cfg: ModelConfig | None = None):
    """The model's transformers config (config.json): what it is, without loading weights."""
    from transformers import AutoConfig

    with model_files(path, what="config.json"):
        return AutoConfig.from_pretrained(path, trust_remote_code=bool(model_cfg and model_cfg.trust_remote_code),
                                          revision=model_cfg.revision if model_cfg else None)


def is_encoder_decoder(path: str, model_cfg: ModelConfig | None = None) -> bool:
    return bool(getattr(model_config(path, model_cfg), "is_encoder_decoder", False))


def model_kind(source: ModelSource, model_cfg: ModelConfig | None = None) -> tuple[str, str]:
    """What a resolved model is, from its registry row, adapter_config.json or config.json (no weights load):
    (`causal` | `seq2seq` | `reward` | `other`, how to name it in a message)."""
    if source.artifact is not None and source.artifact.stage == "reward":
        return "reward", "a reward model (align reward)"
    if source.adapter_of and source.adapter_task is None:  # a peft adapter with no task: what its base model is
        return model_kind(resolve_model(source.adapter_of), model_cfg)
    if source.adapter_of:
        return {"CAUSAL_LM": ("causal", "a causal LM adapter"),
                "SEQ_2_SEQ_LM": ("seq2seq", "an encoder-decoder adapter"),
                "SEQ_CLS": ("reward", "a SEQ_CLS adapter (a reward model)")}.get(
            source.adapter_task, ("other", f"a {source.adapter_task} adapter"))
    config = model_config(source.path, model_cfg)
    if any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        return "reward", "a sequence classifier (a reward model)"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq", "an encoder-decoder model"
    return "causal", "a causal LM"


LANGUAGE_MODELS = ("causal", "seq2seq")


def require_model_kind(source: ModelSource, option: str, given: str, command: str,
                       kinds: tuple[str, ...] = LANGUAGE_MODELS, hint: str = "e.g. sft:latest, or a model folder",
                       model_cfg: ModelConfig | None = None) -> str:
    """`source`'s kind when it is one of `kinds`, else an AlignError naming what was given (`option`: `given`),
    what it is, and what `command` needs. Call it right after `resolve_model`: it reads no weights."""
    kind, description = model_kind(source, model_cfg)
    if kind in kinds:
        return kind
    label = f"{given} ({source.artifact.ref})" if source.artifact and source.artifact.ref != given else given
    needed = {("causal",): "a causal LM (decoder-only)", ("reward",): "a reward model"}.get(
        kinds, "a language model (causal or encoder-decoder)")
    raise AlignError(f"{option}: {label} is {description}; {command} needs {needed}: give {hint}")


def load_model(path: str, model_cfg: ModelConfig, quant: QuantizationConfig):
    """Load a causal or encoder-decoder LM with the configured dtype and quantization."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, BitsAndBytesConfig

    dtype = torch_dtype(model_cfg.dtype)
    kwargs = dict(dtype=dtype, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant.load_in_4bit and quant.load_in_8bit:
        raise AlignError("quantization: choose one of load_in_4bit and load_in_8bit")
    if quant.load_in_4bit or quant.load_in_8bit:
        compute = dtype if quant.compute_dtype == "auto" else torch_dtype(quant.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant.load_in_4bit,
            load_in_8bit=quant.load_in_8bit,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(path, model_cfg) else AutoModelForCausalLM
    with model_files(path):
        model = auto.from_pretrained(path, **kwargs)
    if quant.load_in_4bit:
        keep_cpu_4bit_trainable(model)
    return model


def keep_cpu_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit CPU weights for inference.

    On CPUs with AVX512-BF16, the first no-grad eval/generate pass repacks a Linear4bit weight in
    place, after which no gradient flows through that layer (LoRA grads silently become 0).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_tuning(model, lora: LoraConfig, model_cfg: ModelConfig, quantized: bool, gradient_checkpointing: bool,
                 task_type: str | None = None):
    """LoRA adapters, full fine-tuning, or full fine-tuning of `model.train_only` parameters.

    `task_type`: peft's task (`SEQ_CLS` for reward models: the score head is then trained in full and saved
    with the adapter); default CAUSAL_LM, or SEQ_2_SEQ_LM for encoder-decoders.
    """
    if quantized:
        from peft import prepare_model_for_kbit_training

        if not lora.enabled:
            raise AlignError("quantization: a 4/8-bit model can only train adapters; set lora.enabled: true")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora.enabled:
        if model_cfg.train_only:
            raise AlignError("model.train_only: selects layers for full fine-tuning; set lora.enabled: false")
        from peft import LoraConfig as PeftLoraConfig
        from peft import TaskType, get_peft_model

        task = TaskType(task_type) if task_type else \
            TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
        peft_config = PeftLoraConfig(
            task_type=task, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, modules_to_save=lora.modules_to_save, bias=lora.bias,
            use_rslora=lora.use_rslora, use_dora=lora.use_dora,
        )
        try:
            return get_peft_model(model, peft_config)
        except ValueError as e:
            raise AlignError(f"lora.target_modules: {e}") from None
    if model_cfg.train_only:
        matched = 0
        for name, param in model.named_parameters():
            param.requires_grad = any(part in name for part in model_cfg.train_only)
            matched += param.requires_grad
        if not matched:
            raise AlignError(f"model.train_only: no parameter name contains any of {model_cfg.train_only} "
                             f"(names look like {next(iter(dict(model.named_parameters())))!r})")
    return model


@dataclass
class ParameterSummary:
    trainable: int
    total: int
    memory_bytes: int

    @property
    def trainable_share(self) -> float:
        return self.trainable / max(self.total, 1)


def parameter_summary(model) -> ParameterSummary:
    trainable = total = 0
    for param in model.parameters():
        # 4-bit weights are packed two per byte: count logical parameters.
        count = param.numel() * (2 if param.dtype == torch.uint8 and param.__class__.__name__ == "Params4bit" else 1)
        total += count
        trainable += count if param.requires_grad else 0
    memory = sum(p.numel() * p.element_size() for p in model.parameters())
    memory += sum(b.numel() * b.element_size() for b in model.buffers())
    return ParameterSummary(trainable, total, memory)


def training_flops(summary: ParameterSummary, tokens: int, epochs: float) -> float:
    """Estimated training FLOPs: forward 2N + backward 2N per token, plus 2N for weight gradients of
    trainable parameters (Kaplan et al.'s 6N for full fine-tuning; ~4N for LoRA)."""
    per_token = 4 * summary.total + 2 * summary.trainable
    return per_token * tokens * epochs


@dataclass
class InferenceModel:
    """A model ready to generate, with the prompt template it was trained with."""

    model: object
    tokenizer: object
    source: ModelSource
    template: TemplateConfig  # from the artifact's align_config.yaml; the chat template otherwise


GENERATION_HINT = "e.g. sft:latest or ppo:latest, or a model folder (a reward model scores text: align score)"


def load_for_inference(ref: str, registry: Registry | None = None, dtype: str = "auto",
                       option: str = "model") -> InferenceModel:
    """A plain model, or a base model with its LoRA adapter merged in; causal or encoder-decoder (anything else, such
    as a reward model, is refused as `option`, before weights load). Merged, the adapter costs nothing per forward
    pass (unmerged, every linear layer runs two more matmuls and peft's dispatch)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = resolve_model(ref, registry)
    require_model_kind(source, option, ref, "generating text", hint=GENERATION_HINT)
    weights = resolve_model(source.adapter_of, registry).path if source.adapter_of else source.path
    auto = AutoModelForSeq2SeqLM if is_encoder_decoder(weights) else AutoModelForCausalLM
    with model_files(weights):
        model = auto.from_pretrained(weights, dtype=torch_dtype(dtype))
    tokenizer = load_tokenizer(source.path)
    if tokenizer.pad_token is None:
        prepare_tokenizer(tokenizer)
    if source.adapter_of:
        from peft import PeftModel

        match_model_to_tokenizer(model, tokenizer)
        with model_files(source.path):
            model = PeftModel.from_pretrained(model, source.path).merge_and_unload()
    model.eval()
    return InferenceModel(model, tokenizer, source, training_template(source.path))


def training_template(path: str) -> TemplateConfig:
    saved = Path(path) / "align_config.yaml"
    if not saved.is_file():
        return TemplateConfig()
    template = (yaml.safe_load(saved.read_text()) or {}).get("template") or {}
    return TemplateConfig(**template)

