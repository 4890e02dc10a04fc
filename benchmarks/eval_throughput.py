"""Multiple-choice questions/s of align's batched log-likelihood scorer vs lm-evaluation-harness and vs one forward
pass per option.

One run, same model (a random Llama from config, 4 layers x 256 wide, float32, saved to a folder), same questions
for all three:
  align        `align.evaluation.score_multiple_choice`: each question's context once, its options packed in the
               same input row, logits only at the continuation positions
  hflm         (baseline) EleutherAI lm-evaluation-harness: `HFLM(pretrained=<folder>)`, the same model loaded by
               lm-eval from the folder, `loglikelihood` requests (context, continuation), its batch size the same
  naive_loop   (baseline) each option in its own forward pass with full logits
               (`align.evaluation.reference_loglikelihood`, the way a first evaluation script scores options)

All must pick the same option for every question (checked; the log-likelihoods must agree to 1e-3). Prints
questions/s and the ratios align / naive_loop (target >= 3x) and align / hflm; writes
benchmarks/results/eval_throughput.json.

    python benchmarks/eval_throughput.py            # 200 questions x 4 options, 3 rounds: ~40 s on 2 idle cores
    python benchmarks/eval_throughput.py --quick    # 50 questions, 1 round

Each variant's best (fastest) round is reported: on a shared CPU a burst of other work slows a round 5-20x, and
the fastest round is the one closest to the code's own speed (all rounds are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from align.evaluation import Question, continuation, reference_loglikelihood, score_multiple_choice  # noqa: E402
from benchmarks.generation_throughput import build_model  # noqa: E402
from tests.tiny_models import SAMPLE_TEXTS  # noqa: E402


def make_questions(count: int, options: int, seed: int) -> list[Question]:
    """MMLU-shaped questions: a 8-48-word question and `options` answers of 1-12 words, from real sample text."""
    words = " ".join(SAMPLE_TEXTS).split()
    rng = random.Random(seed)

    def phrase(low: int, high: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    return [Question(f"Question: {phrase(8, 48)}?\nAnswer:", [phrase(1, 12) for _ in range(options)],
                     rng.randrange(options)) for _ in range(count)]


def naive_loop(model, tokenizer, questions: list[Question]) -> tuple[list[int], list[list[float]]]:
    """The baseline: for each question, for each option, one forward pass of context + option."""
    logprobs = [[reference_loglikelihood(model, tokenizer, q.context, continuation(q.context, option))
                 for option in q.options] for q in questions]
    return [max(range(len(s)), key=s.__getitem__) for s in logprobs], logprobs


def run_align(model, tokenizer, questions: list[Question], batch_size: int) -> tuple[list[int], list[list[float]]]:
    result = score_multiple_choice(model, tokenizer, questions, batch_size=batch_size)
    return result.predictions, result.logprobs


def run_hflm(lm, questions: list[Question]) -> tuple[list[int], list[list[float]]]:
    """lm-eval's way: one `loglikelihood` request per option, the option joined as align joins it (`continuation`:
    lm-eval's one-space target delimiter)."""
    from lm_eval.api.instance import Instance

    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(q.context, continuation(q.context, option)),
                         idx=i) for q in questions for i, option in enumerate(q.options)]
    flat = [total for total, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    logprobs, start = [], 0
    for q in questions:
        logprobs.append(flat[start:start + len(q.options)])
        start += len(q.options)
    return [max(range(len(s)), key=s.__getitem__) for s in logprobs], logprobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--options", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (the best is reported)")
    parser.add_argument("--quick", action="store_true", help="50 questions, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.rounds = 50, 1
    torch.set_num_threads(args.threads)

    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        sys.exit("the hflm baseline needs lm-evaluation-harness: pip install -e '.[test]'")

    questions = make_questions(args.questions, args.options, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        model, tokenizer = build_model(Path(folder))
        model.save_pretrained(folder)  # lm-eval loads the model from its folder, as `HFLM(pretrained=...)` is used
        lm = HFLM(pretrained=folder, device="cpu", batch_size=args.batch_size)
    variants = {
        "align": lambda: run_align(model, tokenizer, questions, args.batch_size),
        "hflm": lambda: run_hflm(lm, questions),
        "naive_loop": lambda: naive_loop(model, tokenizer, questions),
    }
    load_before = os.getloadavg()[0]
    # Rounds interleave the variants so that a burst of other load on the machine hits them all.
    timings: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            started = time.perf_counter()
            outputs[name] = fn()
            timings[name].append(time.perf_counter() - started)
    load_after = os.getloadavg()[0]

    align_predictions, align_logprobs = outputs["align"]
    gaps = {}
    for baseline in ("hflm", "naive_loop"):
        predictions, logprobs = outputs[baseline]
        gaps[baseline] = max(abs(a - b) for qa, qb in zip(align_logprobs, logprobs) for a, b in zip(qa, qb))
        assert align_predictions == predictions, f"align and {baseline} chose different options"
        assert gaps[baseline] < 1e-3, f"log-likelihoods of align and {baseline} differ by {gaps[baseline]}"

    results = {}
    for name, seconds_list in timings.items():
        seconds = min(seconds_list)
        results[name] = {"seconds": round(seconds, 3), "all_rounds_s": [round(t, 3) for t in seconds_list],
                         "questions_per_s": args.questions / seconds,
                         "options_per_s": args.questions * args.options / seconds}
    ratio = results["align"]["questions_per_s"] / results["naive_loop"]["questions_per_s"]
    ratio_hflm = results["align"]["questions_per_s"] / results["hflm"]["questions_per_s"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"multiple-choice scoring: {args.questions} questions x {args.options} options, "
                        f"{args.threads} threads, best of {args.rounds} rounds, load {load_before:.1f} -> "
                        f"{load_after:.1f}")
    for column in ("variant", "seconds", "questions/s", "options/s", "vs naive_loop", "align / variant"):
        table.add_column(column, justify="right" if column != "variant" else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['seconds']:.2f}", f"{r['questions_per_s']:.1f}", f"{r['options_per_s']:.1f}",
                      f"{r['questions_per_s'] / results['naive_loop']['questions_per_s']:.2f}x",
                      f"{results['align']['questions_per_s'] / r['questions_per_s']:.2f}x")
    Console().print(table)
    print(f"same predictions: yes ({args.questions} questions; largest log-likelihood gap to hflm "
          f"{gaps['hflm']:.1e}, to naive_loop {gaps['naive_loop']:.1e})")
    print(f"align / naive_loop = {ratio:.2f}x (target >= 3x): {'PASS' if ratio >= 3 else 'MISS'}")
    print(f"align / hflm = {ratio_hflm:.2f}x")
    out = ROOT / "benchmarks" / "results" / "eval_throughput.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "results": results, "ratio_vs_naive_loop": ratio,
                               "ratio_vs_hflm": ratio_hflm, "same_predictions": True,
                               "largest_logprob_gap": gaps["naive_loop"], "largest_logprob_gap_hflm": gaps["hflm"],
                               "load_average": [load_before, load_after]}, indent=2))


if __name__ == "__main__":
    main()
