"""Completions/s of `align label push`'s sampling vs the seeds' one-prompt-at-a-time generate loop.

One run, same model, prompts, K, sampling settings and lengths for every variant:
  align        `align.generation.sample_k`: all K x P generations, length-sorted, left-padded batches
  naive_loop   the seeds' loop: for each prompt, for each of K samples, `model.generate` on that prompt alone
  per_prompt   a middle ground for reference: one `generate` per prompt with num_return_sequences=K

Every completion is forced to exactly --new-tokens tokens (EOS suppressed) so the variants do the same
work; completions/s and generated tokens/s are printed with the ratio align / naive_loop (target >= 5x).

    python benchmarks/generation_throughput.py            # ~1 minute on 2 idle CPU cores
    python benchmarks/generation_throughput.py --quick
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.config import TemplateConfig  # noqa: E402
from align.generation import SamplingConfig, render_prompts, sample_k  # noqa: E402
from tests.tiny_models import SAMPLE_TEXTS, build_tokenizer  # noqa: E402


def build_model(folder: Path):
    """A small random Llama (hidden 256, 4 layers) with a real BPE tokenizer: compute, not overhead, dominates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=1024, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def make_prompts(count: int, seed: int) -> list[str]:
    """Instruction-like prompts of varied length (4-40 words) from the tokenizer's own sample text."""
    words = " ".join(SAMPLE_TEXTS).split()
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        start = rng.randrange(len(words) - 40)
        prompts.append("Explain: " + " ".join(words[start:start + rng.randint(4, 40)]))
    return prompts


def naive_loop(model, tokenizer, prompts, k, sampling, per_prompt_k: bool) -> int:
    """The seeds' way: one prompt per `generate` call (and, unless per_prompt_k, one sample per call)."""
    texts = render_prompts(tokenizer, prompts, TemplateConfig())
    done = 0
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            for _ in range(1 if per_prompt_k else k):
                out = model.generate(**ids, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                                     max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.max_new_tokens,
                                     num_return_sequences=k if per_prompt_k else 1,
                                     pad_token_id=tokenizer.pad_token_id)
                done += out.shape[0]
    return done


def run_align(model, tokenizer, prompts, k, sampling) -> int:
    # Suppressing EOS keeps every completion at exactly max_new_tokens, as in the loops above.
    model.generation_config.min_new_tokens = sampling.max_new_tokens
    samples, _ = sample_k(model, tokenizer, prompts, k, sampling, retries=0)
    model.generation_config.min_new_tokens = None
    return sum(len(s) for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 16 new tokens, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.new_tokens, args.rounds = 8, 16, 1
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = build_model(Path(folder))
    prompts = make_prompts(args.prompts, seed=0)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.95, seed=0,
                              batch_size=args.batch_size)
    variants = {
        "align": lambda: run_align(model, tokenizer, prompts, args.k, sampling),
        "naive_loop": lambda: naive_loop(model, tokenizer, prompts, args.k, sampling, per_prompt_k=False),
        "per_prompt": lambda: naive_loop(model, tokenizer, prompts, args.k, sampling, per_prompt_k=True),
    }
    # Rounds interleave the variants so that a burst of other load on the machine hits all of them; the
    # median round of each is reported.
    timings: dict[str, list[float]] = {name: [] for name in variants}
    completions = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            completions[name] = fn()
            timings[name].append(time.perf_counter() - started)
    results = {}
    for name, seconds_list in timings.items():
        seconds = statistics.median(seconds_list)
        results[name] = {"completions": completions[name], "seconds": round(seconds, 3),
                         "all_rounds_s": [round(t, 3) for t in seconds_list],
                         "completions_per_s": completions[name] / seconds,
                         "tokens_per_s": completions[name] * args.new_tokens / seconds}

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"generation throughput: {args.prompts} prompts x K={args.k}, {args.new_tokens} new tokens, "
                        f"{args.threads} threads")
    for column in ("variant", "completions", "seconds", "completions/s", "tokens/s", "vs naive_loop"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    base = results["naive_loop"]["completions_per_s"]
    for name, r in results.items():
        table.add_row(name, str(r["completions"]), f"{r['seconds']:.2f}", f"{r['completions_per_s']:.2f}",
                      f"{r['tokens_per_s']:.0f}", f"{r['completions_per_s'] / base:.2f}x")
    Console().print(table)
    ratio = results["align"]["completions_per_s"] / base
    print(f"align / naive_loop = {ratio:.2f}x (target >= 5x): {'PASS' if ratio >= 5 else 'MISS'}")
    out = ROOT / "benchmarks" / "results" / "generation_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "results": results, "ratio_vs_naive_loop": ratio}, indent=2))


if __name__ == "__main__":
    main()
