"""Batched generation: left-padded batches, chat template applied, sampling controls.

Used by `align generate` for a quick look at a model, and by later stages (completions to rank,
evaluation) that need many completions fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from align.config import TemplateConfig
from align.data import format_prompt
from align.errors import AlignError

MAX_SEED = 2**32 - 1  # numpy's limit, as for every other seed align passes on

# What each SamplingConfig value may be: (whole numbers only, test, the rule in words). One rule for every way in:
# `align generate` / `align label push` options (argparse types in cli/main.py) and configs that build one.
SAMPLING_RULES = {
    "max_new_tokens": (True, lambda v: v >= 1, "a whole number >= 1"),
    "temperature": (False, lambda v: v >= 0, "a number >= 0 (0: greedy decoding)"),
    "top_p": (False, lambda v: 0 < v <= 1, "a number above 0 and at most 1 (the probability mass sampled from; "
                                           "1: all)"),
    "top_k": (True, lambda v: v >= 0, "a whole number >= 0 (0: off)"),
    "repetition_penalty": (False, lambda v: v > 0, "a number above 0 (1: off; above 1 discourages repeats)"),
    "seed": (True, lambda v: 0 <= v <= MAX_SEED, f"a whole number from 0 to {MAX_SEED}"),
    "batch_size": (True, lambda v: v >= 1, "a whole number >= 1"),
}


def sampling_problem(name: str, value) -> str | None:
    """What is wrong with `value` as SamplingConfig's `name` ("must be ..., got ..."), or None."""
    whole, test, rule = SAMPLING_RULES[name]
    number = isinstance(value, int) if whole else isinstance(value, (int, float))
    if number and not isinstance(value, bool) and math.isfinite(value) and test(value):
        return None
    return f"must be {rule}, got {value:g}" if isinstance(value, float) else f"must be {rule}, got {value!r}"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128  # Tokens generated per prompt at most.
    temperature: float = 0.7  # 0 means greedy decoding.
    top_p: float = 0.95  # Nucleus sampling mass.
    top_k: int = 0  # Keep only the k most likely tokens (0: off).
    repetition_penalty: float = 1.0  # > 1 discourages repeats.
    seed: int = 0  # Sampling seed: the same seed gives the same completions.
    batch_size: int = 16  # Prompts per forward pass.

    def __post_init__(self):
        for f in fields(self):
            problem = sampling_problem(f.name, getattr(self, f.name))
            if problem:
                raise AlignError(f"{f.name}: {problem}")


def render_prompts(tokenizer, prompts: list[str], template: TemplateConfig) -> list[str]:
    """Prompts as the model saw them in training: its chat template (assistant turn opened) or the named template."""
    if template.name != "chat":
        return [format_prompt(template, prompt) for prompt in prompts]
    if not tokenizer.chat_template:
        return prompts
    rendered = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": template.system}] if template.system else []) + \
            [{"role": "user", "content": prompt}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], sampling: SamplingConfig, template: TemplateConfig | None = None,
             progress=None) -> list[str]:
    """Completions for `prompts`, in order. Prompts are sorted by length into batches so padding stays small.

    `template`: how prompts are wrapped (default: the chat template; `TemplateConfig(name="plain")` for raw text).
    """
    template = template or TemplateConfig()
    seq2seq = bool(model.config.is_encoder_decoder)
    if seq2seq and template.name == "chat":  # align sft feeds an encoder the messages' text, no chat markup
        texts = [f"{template.system}\n{p}" if template.system else p for p in prompts]
    else:
        texts = render_prompts(tokenizer, prompts, template)
    templated = not seq2seq and template.name == "chat" and bool(tokenizer.chat_template)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    device = next(model.parameters()).device
    greedy = sampling.temperature <= 0
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(sampling.seed)
    try:
        for start in range(0, len(order), sampling.batch_size):
            batch = order[start:start + sampling.batch_size]
            # Chat templates already hold the special tokens a model expects at the start.
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=not templated).to(device)
            generated = model.generate(
                **encoded,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or not sampling.top_k else sampling.top_k,
                repetition_penalty=sampling.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
            )
            # A decoder-only model returns prompt + continuation; an encoder-decoder only the continuation.
            new_tokens = generated if seq2seq else generated[:, encoded["input_ids"].shape[1]:]
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(batch))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
    return outputs


def sample_k(model, tokenizer, prompts: list[str], k: int, sampling: SamplingConfig,
             template: TemplateConfig | None = None, retries: int = 3,
             progress=None) -> tuple[list[list[str]], list[int]]:
    """``k`` sampled completions per prompt (InstructGPT: K outputs to rank), all k * len(prompts) in one `generate`.

    A completion identical (after strip) to an earlier one for the same prompt is sampled again with a new seed,
    all such redos batched together, up to ``retries`` rounds; whatever is still identical then is kept. Returns the
    completions per prompt (in sampling order) and, per prompt, how many identical ones were kept. ``progress``
    counts the first k * len(prompts) generations only.
    """
    rows = [prompt for prompt in prompts for _ in range(k)]
    flat = generate(model, tokenizer, rows, sampling, template=template, progress=progress)
    samples = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
    for attempt in range(1, retries + 1):
        redo = [(i, j) for i, texts in enumerate(samples) for j in _repeats(texts)]
        if not redo or sampling.temperature <= 0:  # greedy decoding would repeat itself
            break
        again = generate(model, tokenizer, [prompts[i] for i, _ in redo],
                         replace(sampling, seed=(sampling.seed + 1_000_003 * attempt) % (MAX_SEED + 1)),
                         template=template)
        for (i, j), text in zip(redo, again):
            samples[i][j] = text
    return samples, [len(_repeats(texts)) for texts in samples]


def _repeats(texts: list[str]) -> list[int]:
    """Positions whose text (stripped) already appeared earlier in ``texts``."""
    seen, repeats = set(), []
    for j, text in enumerate(texts):
        key = text.strip()
        if key in seen:
            repeats.append(j)
        seen.add(key)
    return repeats
