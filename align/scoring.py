"""Reward models as scorers: the one way a (prompt, response) pair becomes reward-model input, and `RewardScorer`.

`format_pair` / `encode_pair` build the training pairs of `align reward` (stages/reward.py) AND the inputs that
`RewardScorer.score` scores, so a reward model always sees text exactly as it was trained: through its own chat
template when its tokenizer has one, else as ``prompt + "\\n\\n" + response`` (+ EOS for decoders). Prompts and
responses may be texts or message lists; the reward model's own tokenizer is applied, so a policy with a
different tokenizer can still be scored.

`RewardScorer.load(ref_or_path)` loads a reward artifact with plain transformers/peft (a SEQ_CLS LoRA adapter with
its score head onto its base model, or full weights) and its `reward_normalization.json`. This is what PPO and the
evaluation harness call:

    scorer = RewardScorer.load("reward:latest")
    rewards = scorer.score(prompts, responses)  # normalized: the reference outputs average 0
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from align.files import write_jsonl
from align.config import ModelConfig, QuantizationConfig
from align.errors import AlignError
from align.modeling import (keep_cpu_4bit_trainable, load_tokenizer, match_model_to_tokenizer, model_config,
                            model_files, resolve_model, torch_dtype)
from align.registry import Registry, resolve_path

NORMALIZATION_FILE = "reward_normalization.json"


# --------------------------------------------------------------------------------------------------
# Formatting: shared by training and scoring

def as_messages(value: str | list[dict], role: str) -> list[dict]:
    """A text as one message of `role`; a message list as it is."""
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def as_text(value: str | list[dict]) -> str:
    """A message list as plain text (one message: its content; several: `Role: content` blocks)."""
    if isinstance(value, str):
        return value
    if len(value) == 1:
        return value[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in value)


def format_pair(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> str:
    """The text a reward model reads for one (prompt, response): its chat template (user turn(s), then the
    assistant turn) when the tokenizer has one, else ``prompt + "\\n\\n" + response``."""
    if tokenizer.chat_template:
        messages = as_messages(prompt, "user") + as_messages(response, "assistant")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{as_text(prompt)}\n\n{as_text(response)}"


def encode_pair(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> list[int]:
    """Token ids of `format_pair`. A chat template writes its own special tokens; plain text gets the tokenizer's
    (BOS / [CLS] ... [SEP]) and ends with EOS where the tokenizer has one, so a decoder reads its reward at EOS."""
    text = format_pair(tokenizer, prompt, response)
    if tokenizer.chat_template:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


# --------------------------------------------------------------------------------------------------
# Normalization: reference outputs average 0

@dataclass
class Normalization:
    """``(reward - mean) [/ std]`` with the mean/std of the reward model's raw rewards on a reference set."""

    mean: float
    std: float
    divide_by_std: bool = False
    count: int = 0
    reference: str = ""

    @classmethod
    def fit(cls, rewards: list[float], divide_by_std: bool = False, reference: str = "") -> Normalization:
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(len(rewards) - 1, 1))
        return cls(mean, std, divide_by_std, len(rewards), reference)

    def apply(self, reward: float) -> float:
        scale = self.std if self.divide_by_std and self.std > 0 else 1.0
        return (reward - self.mean) / scale

    def save(self, folder: Path) -> None:
        (Path(folder) / NORMALIZATION_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> Normalization | None:
        path = Path(folder) / NORMALIZATION_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise AlignError(f"reward model: {path} is not a valid normalization file ({e})") from None


# --------------------------------------------------------------------------------------------------
# Loading

@contextlib.contextmanager
def _quiet_load():
    """transformers prints a load report for the new score head (and the unused LM head): expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_sequence_classifier(path: str, model_cfg: ModelConfig | None = None, quant: QuantizationConfig | None = None,
                             dtype: str | None = None):
    """`AutoModelForSequenceClassification(num_labels=1)` from a folder or hub id: a new score head on a decoder or
    encoder backbone, or a saved reward model. Quantized with bitsandbytes when `quant` asks for it."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    model_cfg = model_cfg or ModelConfig(path=path)
    torch_type = torch_dtype(dtype or model_cfg.dtype)
    kwargs = dict(num_labels=1, dtype=torch_type, revision=model_cfg.revision,
                  trust_remote_code=model_cfg.trust_remote_code)
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if quant is not None and (quant.load_in_4bit or quant.load_in_8bit):
        compute = torch_type if quant.compute_dtype == "auto" else torch_dtype(quant.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quant.load_in_4bit, load_in_8bit=quant.load_in_8bit, bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        with model_files(path), _quiet_load():
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise AlignError(f"model: {path}: transformers has no sequence-classification (reward) head for this "
                             f"architecture; use a decoder-only or encoder (BERT-family) model") from None
        raise
    if quant is not None and quant.load_in_4bit:
        keep_cpu_4bit_trainable(model)
    return model


# --------------------------------------------------------------------------------------------------
# The scorer

class RewardScorer:
    """Batched rewards for (prompt, response) TEXTS from a reward model and its own tokenizer."""

    def __init__(self, model, tokenizer, normalization: Normalization | None = None, source: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.normalization = normalization
        self.source = source
        self.truncated = 0  # inputs longer than the model's positions, cut to fit (see `score_ids`)
        config = getattr(model, "config", None)
        self.max_positions = getattr(config, "max_position_embeddings", None)
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        self.is_encoder = getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES  # BERT family

    @classmethod
    def load(cls, ref_or_path: str, registry: Registry | None = None, device: str | None = None,
             dtype: str = "auto") -> RewardScorer:
        """A reward artifact (folder or registry reference): LoRA adapter + saved score head onto its base model, or
        a full sequence-classification model, with its normalization when it has one."""
        source = resolve_model(ref_or_path, registry)
        folder = Path(source.path)
        tokenizer = load_tokenizer(source.path)
        if source.adapter_of:
            if source.adapter_task != "SEQ_CLS":
                raise AlignError(f"reward model: {ref_or_path} is a {source.adapter_task} adapter, not a reward "
                                 f"model (train one with `align reward`)")
            from peft import PeftModel

            base = load_sequence_classifier(resolve_model(source.adapter_of, registry).path, dtype=dtype)
            _set_pad(base, tokenizer)
            with model_files(source.path):
                model = PeftModel.from_pretrained(base, str(folder))
        else:
            config = model_config(source.path)
            architectures = getattr(config, "architectures", None) or []
            if getattr(config, "num_labels", None) != 1 or not any("SequenceClassification" in a
                                                                    for a in architectures):
                raise AlignError(f"reward model: {ref_or_path} is not a reward model (architectures "
                                 f"{', '.join(architectures) or 'unknown'}, {config.num_labels} labels); expected a "
                                 f"sequence-classification model with one output, as `align reward` saves")
            model = load_sequence_classifier(source.path, dtype=dtype)
            _set_pad(model, tokenizer)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        model.eval()
        return cls(model, tokenizer, Normalization.load(folder), source=str(folder))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompt: str | list[dict], response: str | list[dict]) -> list[int]:
        return encode_pair(self.tokenizer, prompt, response)

    def score(self, prompts: list, responses: list, batch_size: int = 16, normalized: bool = True) -> list[float]:
        """One reward per (prompt, response): texts or message lists. Normalized (reference mean 0) when the model
        has a normalization and `normalized` is true, else raw."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        rewards = self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)], batch_size)
        if normalized and self.normalization is not None:
            rewards = [self.normalization.apply(r) for r in rewards]
        return rewards

    def score_ids(self, encoded: list[list[int]], batch_size: int = 16) -> list[float]:
        """Raw rewards of token id lists, in length-sorted batches, right-padded as in training. Inputs longer than
        the model's positions are cut: encoders keep the start ([CLS]), decoders the end (the response)."""
        pad = self.tokenizer.pad_token_id
        limit = self.max_positions
        if limit:
            fitted = []
            for ids in encoded:
                if len(ids) > limit:
                    self.truncated += 1
                    ids = ids[:limit] if self.is_encoder else ids[-limit:]
                fitted.append(ids)
            encoded = fitted
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        rewards = [0.0] * len(encoded)
        was_training = self.model.training
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + batch_size]
                width = len(encoded[chunk[0]])
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    use_cache=False).logits
                for row, i in enumerate(chunk):
                    rewards[i] = float(logits[row, 0].float())
        self.model.train(was_training)
        return rewards


def _set_pad(model, tokenizer) -> None:
    """A reward model finds its last real token by the pad id: the model and tokenizer must agree on it."""
    if tokenizer.pad_token is None:
        from align.modeling import prepare_tokenizer

        template = tokenizer.chat_template
        prepare_tokenizer(tokenizer)
        tokenizer.chat_template = template  # only the pad token; the formatting stays the model's own
    match_model_to_tokenizer(model, tokenizer)


# --------------------------------------------------------------------------------------------------
# `align score`

def score_command(model: str, data: str, out: str | None = None, raw: bool = False, batch_size: int = 16) -> Path:
    """Score a file of (prompt, response) records, write them back with a `reward` field, print a summary."""
    from align.data import read_prompt_responses
    from align.reporting import console, print_table

    if batch_size < 1:
        raise AlignError(f"--batch-size: must be at least 1, got {batch_size}")
    data_path, _ = resolve_path(data)
    prompts, responses, records = read_prompt_responses(data_path)  # bad data fails before the model loads
    target = Path(out) if out else Path(f"{Path(records.source).stem}.scores.jsonl")
    scorer = RewardScorer.load(model)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rewards: list[float] = []
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                  transient=True) as progress:
        task = progress.add_task("score", total=len(prompts))
        step = max(batch_size * 8, 1)
        for start in range(0, len(prompts), step):
            rewards += scorer.score(prompts[start:start + step], responses[start:start + step], batch_size,
                                    normalized=not raw)
            progress.advance(task, len(prompts[start:start + step]))
    write_jsonl(target, ({**row, "reward": reward} for row, reward in zip(records.rows, rewards)))
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(len(rewards) - 1, 1))
    normalized = not raw and scorer.normalization is not None
    print_table(f"align score: {len(rewards)} responses", [
        ("reward model", scorer.source),
        ("data", records.source),
        ("rewards", "normalized (reference mean 0)" if normalized else
         "raw" + (" (the model has no reward_normalization.json)" if not raw else "")),
        ("mean", mean),
        ("std", std),
        ("min / max", f"{min(rewards):.4g} / {max(rewards):.4g}"),
        *([("truncated inputs", scorer.truncated)] if scorer.truncated else []),
        ("written", str(target)),
    ])
    return target
