"""Tiny random-init models and a learnable toy task, built offline, for fast CPU tests.

Every builder writes a standard Hugging Face folder (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files) that ``AutoModel*.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load with no hub access. Builds are deterministic and take
well under a second.

The toy task is letter reversal: ``"reverse: a b c\\n"`` -> ``"c b a"`` (3-4 letters from a-f).
A 2-layer, 64-wide Llama trained 100 AdamW steps (lr 3e-3, batch 8) cuts held-out loss on the
completion tokens from ~6.2 to ~0.2 and greedily reverses ~75-90% of unseen prompts exactly.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

LETTERS = "abcdef"
INSTRUCTION = "Reverse the letters."

# Every turn renders as "<|role|>\n{content}</s>\n" (plain-text markers, not special tokens).
# Assistant turns sit in {% generation %} so return_assistant_tokens_mask covers content + eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Question: What is the answer? Answer: The answer is 42.",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "<|system|>\nYou are a helpful assistant.\n<|user|>\nhi\n<|assistant|>\nhello\n",
    "This is a test sentence, with some numbers: 0 1 2 3 4 5 6 7 8 9 (and 10, 100, 3.14).",
]


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` deterministic (letters, reversed letters) pairs, e.g. ("a b c", "c b a")."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        letters = rng.choices(LETTERS, k=rng.randint(3, 4))
        pairs.append((" ".join(letters), " ".join(reversed(letters))))
    return pairs


def toy_task_records(n: int, seed: int = 0) -> list[dict]:
    """Prompt/completion records: ``{"prompt": "reverse: a b c\\n", "completion": "c b a"}``.

    The prompt ends with a newline so plain string concatenation tokenizes cleanly.
    """
    return [{"prompt": f"reverse: {x}\n", "completion": y} for x, y in _pairs(n, seed)]


def toy_qa_records(n: int, seed: int = 0) -> list[dict]:
    """The toy task as ``{"question": "reverse: a b c", "answer": "c b a"}``."""
    return [{"question": f"reverse: {x}", "answer": y} for x, y in _pairs(n, seed)]


def toy_instruction_records(n: int, seed: int = 0) -> list[dict]:
    """The toy task in Alpaca format; odd-numbered records have an empty ``input``."""
    return [
        {"instruction": INSTRUCTION, "input": x, "output": y}
        if i % 2 == 0
        else {"instruction": f"reverse: {x}", "input": "", "output": y}
        for i, (x, y) in enumerate(_pairs(n, seed))
    ]


def toy_messages_records(n: int, seed: int = 0) -> list[dict]:
    """The toy task as one user/assistant exchange: ``{"messages": [{role, content}, ...]}``."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"reverse: {x}"},
                {"role": "assistant", "content": y},
            ]
        }
        for x, y in _pairs(n, seed)
    ]


def toy_text_records(n: int, seed: int = 0) -> list[dict]:
    """The toy task as plain text: ``{"text": "reverse: a b c\\nc b a"}``."""
    return [{"text": f"reverse: {x}\n{y}"} for x, y in _pairs(n, seed)]


def write_jsonl(path: str | Path, records: list[dict]) -> str:
    """Write ``records`` one JSON object per line; returns the path as a string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def build_tokenizer(
    out_dir: str | Path, *, add_bos: bool = True, add_eos: bool = False, pad: bool = True
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (512 tokens; never emits ``<unk>``) and save it.

    Special tokens: ``<unk>``=0, ``<s>``=1 (bos), ``</s>``=2 (eos), ``<pad>``=3 (omitted when
    ``pad=False``). ``add_bos``/``add_eos`` choose what encoding adds around the text
    (Llama-like: bos only; T5-like: eos only). With ``add_bos`` the chat template also starts
    with bos, as real Llama templates do.
    """
    specials = ["<unk>", "<s>", "</s>"] + (["<pad>"] if pad else [])
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = SAMPLE_TEXTS + [
        string.ascii_lowercase,
        " ".join(string.ascii_lowercase),
        string.ascii_uppercase,
        string.digits,
        string.punctuation,
    ]
    corpus += [r["text"] for r in toy_text_records(200)] + [INSTRUCTION]
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad else None,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        model_max_length=512,
        chat_template=("{{ bos_token }}" if add_bos else "") + CHAT_TEMPLATE,
    )
    tok.save_pretrained(out_dir)
    return tok


def _save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, out_dir: str | Path) -> str:
    """Save weights (safetensors), generation config and tokenizer together."""
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def _special_ids(tok: PreTrainedTokenizerFast) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def build_tiny_llama(out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> str:
    """A 2-layer, 64-wide Llama (GQA: 4 heads, 2 kv heads) with the Llama-like tokenizer.

    ``tokenizer_dir`` reuses an existing tokenizer (so several models can share one vocab).
    """
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer(out_dir)
    return _llama(tok, out_dir)


def build_tiny_llama_no_pad(out_dir: str | Path) -> str:
    """Like :func:`build_tiny_llama`, but the tokenizer has no pad token at all (like Llama 2)."""
    return _llama(build_tokenizer(out_dir, pad=False), out_dir)


def _llama(tok: PreTrainedTokenizerFast, out_dir: str | Path) -> str:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=len(tok),
        **_special_ids(tok),
    )
    torch.manual_seed(0)
    return _save(LlamaForCausalLM(config), tok, out_dir)


def build_tiny_gpt_neox(out_dir: str | Path) -> str:
    """A 2-layer, 64-wide GPT-NeoX; its tokenizer adds no bos/eos (like Pythia's)."""
    tok = build_tokenizer(out_dir, add_bos=False)
    config = GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        vocab_size=len(tok),
        **_special_ids(tok),
    )
    torch.manual_seed(0)
    return _save(GPTNeoXForCausalLM(config), tok, out_dir)


def build_tiny_t5(out_dir: str | Path) -> str:
    """A 2+2-layer, 64-wide T5 (no dropout); its tokenizer appends eos (like T5's)."""
    tok = build_tokenizer(out_dir, add_bos=False, add_eos=True)
    config = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return _save(T5ForConditionalGeneration(config), tok, out_dir)
