"""`align eval reward`: how good is a reward model? Accuracy on preference pairs, and whether it learned the
preference or only that longer responses win.

Reads top to bottom: inputs (the reward model's reference resolved, every preference file read in the formats
`align reward` reads, plus RewardBench's `subset` field; bad input fails here, before the model loads) -> the reward
model (align.scoring.RewardScorer: decoder or encoder, its own tokenizer and formatting) gives every distinct
(prompt, response) one raw score -> statistics (align/evaluation.py): accuracy with ties counted half, per subset,
length bias beside the "longer response wins" heuristic, calibration (ECE of sigmoid(margin)), mean margin, each with
a 95% CI -> results.json, report.md, scores.jsonl (one row per pair) and plots/ written in `<dir>.incomplete` and
renamed into place -> registry row (stage `eval`, kind `evaluation`, parents: the reward model and the registered
datasets). The head and tail every stage shares are align/run.py.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from align.config import OutputConfig
from align.data import Preferences, read_preferences, read_records
from align.errors import AlignError
from align.evaluation import (CALIBRATION_BINS, Interval, PairwiseStats, RewardModelMetrics, reward_model_metrics,
                              sigmoid)
from align.registry import Artifact, Registry, resolve_path
from align.reporting import console, plot_reliability, print_table, pyplot
from align.run import print_finished, publish_evaluation, start_run

STAGE = "eval"
LENGTH_UNIT = "characters"  # of the response text (a message list: as align.scoring.as_text writes it)
LONGER_WINS = '"the longer response wins"'
LENGTH_RULE = f"a reward model that does not beat {LONGER_WINS} has learned length, not preference"
RESULTS = {"win": "correct", "tie": "tie", "loss": "wrong"}


@dataclass
class Source:
    """One --data argument, read."""

    given: str  # as the user wrote it
    label: str  # the subset of its pairs that have no `subset` field: the registry reference, else the file name
    path: str
    artifact: Artifact | None
    prefs: Preferences


def run(model: str, data: list[str], out: str | None = None, batch_size: int = 16, tie_margin: float = 0.0) -> Artifact:
    """`align eval reward --model M --data FILE [FILE ...]`: reward model `model` (folder or registry reference) on
    the preference files `data`; the folder `out` (default runs/eval/reward-<model>) and a registry row `eval:N`."""
    # 1. Inputs: the model reference, the output folder and every preference file, checked before the model loads.
    from align.modeling import resolve_model

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AlignError(f"--batch-size: must be a whole number >= 1, got {batch_size}")
    if not tie_margin >= 0:  # NaN too
        raise AlignError(f"--tie-margin: must be 0 or more, got {tie_margin}")
    if not data:
        raise AlignError("--data: give at least one preference file")
    registry = Registry()
    source = resolve_model(model, registry)
    model_artifact = source.artifact or _registered(source.path, registry)
    model_ref = model_artifact.ref if model_artifact else model
    run_name = Path(out).name if out else f"reward-{_short(model_artifact.ref if model_artifact else model)}"
    folder = Path(out or Path("runs") / STAGE / run_name).absolute()
    if folder.exists():
        raise AlignError(f"--out: {folder} already exists (an earlier evaluation); give another --out folder or "
                         f"delete that one")
    sources = _read(data, registry)
    pairs = [(pair, s) for s in sources for pair in s.prefs.pairs]
    locations = [where for s in sources for where in s.prefs.locations]
    # The run's head: clears what a killed run left in <dir>.incomplete.
    job = start_run(STAGE, OutputConfig(dir=str(folder), name=run_name), run_name, registry=registry)

    # 2. Scores: each distinct (prompt, response) once, raw, by the reward model with its own tokenizer.
    from align.scoring import RewardScorer, as_text

    scorer = RewardScorer.load(model, registry)  # not a reward model: fails here, before anything is written
    print_table(f"align eval reward: {job.name}", [
        ("reward model", model_ref + (f" ({source.path})" if source.path != model_ref else "")),
        *[("data", f"{s.label}: {len(s.prefs.pairs)} pairs [{s.prefs.format}]" + _dropped(s.prefs)) for s in sources],
        ("scores", f"raw (not normalized), {'encoder' if scorer.is_encoder else 'decoder'} with its own tokenizer; "
                   f"a tie when |score_chosen - score_rejected| <= {tie_margin:g}"),
        ("output", str(job.final)),
    ])
    slots: dict[str, int] = {}
    items: list[tuple] = []

    def slot(prompt, response) -> int:
        key = json.dumps([prompt, response], sort_keys=True, ensure_ascii=False)
        if key not in slots:
            slots[key] = len(items)
            items.append((prompt, response))
        return slots[key]

    chosen_slots = [slot(pair["prompt"], pair["chosen"]) for pair, _ in pairs]
    rejected_slots = [slot(pair["prompt"], pair["rejected"]) for pair, _ in pairs]
    rewards = _score(scorer, items, batch_size)
    truncated = scorer.truncated
    del scorer
    gc.collect()
    chosen = [rewards[i] for i in chosen_slots]
    rejected = [rewards[i] for i in rejected_slots]

    # 3. Statistics (align/evaluation.py): accuracy, subsets, length bias, calibration, margin; 95% CIs.
    chosen_lengths = [len(as_text(pair["chosen"])) for pair, _ in pairs]
    rejected_lengths = [len(as_text(pair["rejected"])) for pair, _ in pairs]
    subsets = [pair.get("subset") or s.label for pair, s in pairs]
    metrics = reward_model_metrics(chosen, rejected, chosen_lengths, rejected_lengths, subsets, tie_margin,
                                   CALIBRATION_BINS)
    results = _results(metrics, model_ref, source.path, sources, tie_margin, truncated)

    # 4. The folder: results.json, report.md, scores.jsonl, plots/; renamed into place only when complete.
    job.folder.create()
    work = job.work
    try:
        (work / "results.json").write_text(json.dumps(_json_safe(results), indent=2, ensure_ascii=False) + "\n")
        with (work / "scores.jsonl").open("w", encoding="utf-8") as handle:
            for i, ((pair, s), where) in enumerate(zip(pairs, locations)):
                margin = chosen[i] - rejected[i]
                handle.write(json.dumps({
                    "data": s.label, "where": where, "subset": subsets[i], "prompt": pair["prompt"],
                    "chosen": pair["chosen"], "rejected": pair["rejected"], "score_chosen": chosen[i],
                    "score_rejected": rejected[i], "margin": margin, "p_chosen": sigmoid(margin),
                    "result": RESULTS[metrics.judgments[i]], f"chosen_{LENGTH_UNIT}": chosen_lengths[i],
                    f"rejected_{LENGTH_UNIT}": rejected_lengths[i]}, ensure_ascii=False) + "\n")
        plots = _plot_accuracy(metrics, work) + plot_reliability(metrics.calibration.bins, metrics.ece.estimate, work)
        (work / "report.md").write_text(_markdown(results, metrics, sources, plots))

        # 5. Into place with its registry row (parents: the reward model and registered datasets); the summary.
        config = {"evaluation": "reward", "model": model_ref, "data": [s.label for s in sources],
                  "batch_size": batch_size, "tie_margin": tie_margin, "length_unit": LENGTH_UNIT}
        artifact = publish_evaluation(job, config=config, metrics=registry_metrics(metrics, results["label_ties"]),
                                      parents=[model_artifact, *(s.artifact for s in sources)])
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
        raise
    print_finished(job, artifact, _summary_rows(metrics, job.final))
    return artifact


# --------------------------------------------------------------------------------------------------
# Inputs

def _read(data: list[str], registry: Registry) -> list[Source]:
    """Every --data argument (file, folder or registry reference) as preference pairs; the first bad one fails."""
    sources = []
    for given in data:
        path, artifact = resolve_path(given, registry)
        prefs = read_preferences(read_records(path), use_margin=False)
        label = artifact.ref if artifact else Path(path).name
        path = str(Path(path).resolve()) if Path(path).exists() else path  # (a hub dataset has no path)
        sources.append(Source(given, label, path, artifact or _registered(path, registry), prefs))
    labels = [s.label for s in sources]
    for s in sources:
        if labels.count(s.label) > 1:  # two files of one name in different folders: their paths tell them apart
            s.label = s.given
    return sources


def _registered(path: str, registry: Registry) -> Artifact | None:
    """The newest registry row for this path (a reward model or dataset given as a path rather than a reference)."""
    if not Path(path).exists():
        return None
    resolved = str(Path(path).resolve())
    return next((a for a in registry.list() if a.path == resolved), None)


def _short(name: str) -> str:
    """`reward:3` -> `reward3`; a folder -> its name."""
    return Path(name).name if "/" in name else name.replace(":", "")


def _dropped(prefs: Preferences) -> str:
    notes = [f"{prefs.dropped_ties} label ties not scored" if prefs.dropped_ties else "",
             f"{prefs.dropped_identical} with chosen == rejected dropped" if prefs.dropped_identical else "",
             f"from {prefs.rankings} rankings" if prefs.rankings else ""]
    notes = [n for n in notes if n]
    return f" ({'; '.join(notes)})" if notes else ""


def _score(scorer, items: list[tuple], batch_size: int) -> list[float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    rewards: list[float] = []
    step = batch_size * 8
    with Progress(TextColumn("scoring responses"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("score", total=len(items))
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            rewards += scorer.score([p for p, _ in chunk], [r for _, r in chunk], batch_size, normalized=False)
            progress.advance(task, len(chunk))
    return rewards


# --------------------------------------------------------------------------------------------------
# Results: results.json and the registry's flat metrics

def _interval(interval: Interval) -> dict:
    return {"estimate": interval.estimate, "low": interval.low, "high": interval.high}


def _accuracy(stats: PairwiseStats) -> dict:
    return {"pairs": stats.n, "accuracy": _interval(stats.win_rate), "correct": stats.wins, "ties": stats.ties,
            "wrong": stats.losses, "correct_rate": _interval(stats.win), "tie_rate": _interval(stats.tie),
            "wrong_rate": _interval(stats.loss), "warning": stats.warning}


def _results(metrics: RewardModelMetrics, model_ref: str, model_path: str, sources: list[Source], tie_margin: float,
             truncated: int) -> dict:
    length = metrics.length
    return {
        "reward_model": model_ref, "reward_model_path": model_path, "scores": "raw", "tie_margin": tie_margin,
        "length_unit": LENGTH_UNIT, "calibration_bins": CALIBRATION_BINS, "truncated_inputs": truncated,
        "data": [{"given": s.given, "label": s.label, "path": s.path, "format": s.prefs.format,
                  "records": s.prefs.records, "pairs": len(s.prefs.pairs), "label_ties": s.prefs.dropped_ties,
                  "identical_dropped": s.prefs.dropped_identical} for s in sources],
        "pairs": metrics.pairs, "label_ties": sum(s.prefs.dropped_ties for s in sources),
        **_accuracy(metrics.accuracy),
        "margin": _interval(metrics.margin),
        "ece": _interval(metrics.ece),
        "calibration": [{"predicted": p, "observed": o, "count": n} for p, o, n in metrics.calibration.bins],
        "length": {
            "unit": LENGTH_UNIT,
            "chosen_longer": {"pairs": length.chosen_longer_pairs, "accuracy": _interval(length.chosen_longer)},
            "chosen_shorter": {"pairs": length.chosen_shorter_pairs, "accuracy": _interval(length.chosen_shorter)},
            "same_length": {"pairs": length.same_length_pairs, "accuracy": _interval(length.same_length)},
            "longer_wins_accuracy": _interval(length.longer_wins),
            "advantage_over_longer_wins": _interval(length.advantage),
            "verdict": _length_verdict(metrics),
        },
        "subsets": {name: {**_accuracy(sub.accuracy), "longer_wins_accuracy": _interval(sub.longer_wins),
                           "margin": _interval(sub.margin)} for name, sub in metrics.subsets.items()},
    }


def registry_metrics(metrics: RewardModelMetrics, label_ties: int = 0) -> dict:
    """Flat numbers for the registry row: `accuracy`, `accuracy_low`, `accuracy_high`, `longer_wins_accuracy`, `ece`,
    ..., and `accuracy[<subset>]`. Numbers that do not exist (no pairs with a longer chosen response) are left out."""
    length = metrics.length
    intervals = {"accuracy": metrics.accuracy.win_rate, "longer_wins_accuracy": length.longer_wins,
                 "ece": metrics.ece, "margin": metrics.margin, "advantage_over_longer_wins": length.advantage,
                 "accuracy_chosen_longer": length.chosen_longer, "accuracy_chosen_shorter": length.chosen_shorter}
    # The first three are what `align registry list` shows as key metrics.
    flat: dict[str, float | int] = {key: interval.estimate for key, interval in intervals.items()}
    flat |= {"pairs": metrics.pairs, "ties": metrics.accuracy.ties, "label_ties": label_ties}
    for key, interval in intervals.items():
        flat |= {f"{key}_low": interval.low, f"{key}_high": interval.high}
    for name, sub in metrics.subsets.items():
        flat[f"accuracy[{name}]"] = sub.accuracy.win_rate.estimate
    return {k: v for k, v in flat.items() if not (isinstance(v, float) and math.isnan(v))}


def _json_safe(value):
    """NaN (an empty group) as null: results.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# Report: verdict, report.md, plots, summary

def _pct(interval: Interval) -> str:
    if math.isnan(interval.estimate):
        return "n/a"
    return f"{100 * interval.estimate:.1f}% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _pts(interval: Interval) -> str:
    return f"{100 * interval.estimate:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def _num(interval: Interval) -> str:
    return f"{interval.estimate:.3g} [{interval.low:.3g}, {interval.high:.3g}]"


def _length_verdict(metrics: RewardModelMetrics) -> str:
    """Model accuracy - heuristic accuracy on the same pairs: does the model beat "the longer response wins"?"""
    advantage = metrics.length.advantage
    points = f"{_pts(advantage)} points"
    if advantage.low > 0:
        return f"beats {LONGER_WINS} by {points}: it has learned more than length"
    if advantage.high < 0:
        return f"worse than {LONGER_WINS} ({points}): it has learned length at best, not preference"
    return f"does not beat {LONGER_WINS} ({points}; the CI includes 0): no evidence it has learned more than length"


def _markdown(results: dict, metrics: RewardModelMetrics, sources: list[Source], plots: list[str]) -> str:
    length, accuracy = metrics.length, metrics.accuracy
    lines = [
        f"# Reward model evaluation: {results['reward_model']}",
        "",
        f"`align eval reward` on {metrics.pairs} preference pairs from {', '.join(s.label for s in sources)}. "
        f"Accuracy is the share of pairs whose chosen response the reward model scores higher (50% is chance); a "
        f"tie, |score_chosen - score_rejected| <= {results['tie_margin']:g}, counts half. Scores are raw (not "
        f"normalized); lengths are {LENGTH_UNIT} of the response.",
        "",
        "| metric | value [95% CI] |",
        "| --- | --- |",
        f"| accuracy (chosen scored higher; ties half) | {_pct(accuracy.win_rate)} |",
        f"| correct / tie / wrong | {accuracy.wins} / {accuracy.ties} / {accuracy.losses} |",
        f"| {LONGER_WINS} on the same pairs | {_pct(length.longer_wins)} |",
        f"| accuracy - longer wins (points) | {_pts(length.advantage)} |",
        f"| expected calibration error (ECE) | {_num(metrics.ece)} |",
        f"| mean margin (score_chosen - score_rejected) | {_num(metrics.margin)} |",
        "",
        f"**Length:** the reward model {_length_verdict(metrics)}. {LENGTH_RULE.capitalize()}.",
        "",
    ]
    if accuracy.warning:
        lines += [f"> warning: {accuracy.warning}", ""]
    lines += ["## Accuracy per subset", "",
              "Subsets are the `subset` field of each pair (RewardBench), else the file (or dataset) it came from.", "",
              f"| subset | pairs | accuracy [95% CI] | ties | {LONGER_WINS} | mean margin |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, sub in metrics.subsets.items():
        lines.append(f"| {_cell(name)} | {sub.pairs} | {_pct(sub.accuracy.win_rate)} | {sub.accuracy.ties} | "
                     f"{_pct(sub.longer_wins)} | {sub.margin.estimate:.3g} |")
    lines += ["", f"## Length bias ({LENGTH_UNIT})", "",
              "The model's accuracy split by which response is longer. A model that learned length is right when the "
              "chosen response is the longer and wrong when it is the shorter; one that learned the preference does "
              "about as well on both.", "",
              "| pairs where the chosen response is | pairs | accuracy [95% CI] |", "| --- | --- | --- |",
              f"| longer | {length.chosen_longer_pairs} | {_pct(length.chosen_longer)} |",
              f"| shorter | {length.chosen_shorter_pairs} | {_pct(length.chosen_shorter)} |",
              f"| as long | {length.same_length_pairs} | {_pct(length.same_length)} |",
              "", "## Calibration", "",
              "P(chosen preferred) = sigmoid(score_chosen - score_rejected), each pair counted in both orders, in "
              f"{CALIBRATION_BINS} equal-width bins; ECE is the bins' share-weighted gap between predicted and "
              "observed (0 is perfect; the CI is a bootstrap over pairs). Over- or under-confident scores (margins too "
              "large or too small) show up here, not in the accuracy.", "",
              "| mean predicted | observed | predictions |", "| --- | --- | --- |"]
    lines += [f"| {p:.3f} | {o:.3f} | {n} |" for p, o, n in metrics.calibration.bins]
    lines += ["", "## Data", "", "| data | format | records | pairs | label ties (not scored) | chosen == rejected |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {_cell(s.label)} | {s.prefs.format} | {s.prefs.records} | {len(s.prefs.pairs)} | "
              f"{s.prefs.dropped_ties} | {s.prefs.dropped_identical} |" for s in sources]
    if results["truncated_inputs"]:
        lines += ["", f"{results['truncated_inputs']} inputs were longer than the reward model's positions and cut "
                      f"to fit."]
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in plots], "",
              "Per-pair scores: `scores.jsonl`; every number above: `results.json`.", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _plot_accuracy(metrics: RewardModelMetrics, folder: Path) -> list[str]:
    """plots/accuracy.png: accuracy with its 95% CI, overall and per subset, beside "the longer response wins"."""
    plt = pyplot()
    rows = [(f"all pairs ({metrics.pairs})", metrics.accuracy.win_rate, metrics.length.longer_wins)]
    if len(metrics.subsets) > 1:
        rows += [(f"{name} ({sub.pairs})", sub.accuracy.win_rate, sub.longer_wins)
                 for name, sub in metrics.subsets.items()]
    fig, ax = plt.subplots(figsize=(6.4, 1.4 + 0.4 * len(rows)))
    for y, (_, interval, heuristic) in enumerate(rows):
        below, above = interval.estimate - interval.low, interval.high - interval.estimate
        ax.errorbar(interval.estimate, y, xerr=[[below], [above]], fmt="o", color="tab:blue", capsize=4,
                    label="reward model, 95% CI" if y == 0 else None)
        ax.plot(heuristic.estimate, y, "x", color="tab:red", markersize=8,
                label="the longer response wins" if y == 0 else None)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pairwise accuracy (ties count half); 0.5 = chance")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25 - 0.5 / len(rows)), ncol=2, frameon=False)
    fig.tight_layout()
    (folder / "plots").mkdir(exist_ok=True)
    fig.savefig(folder / "plots" / "accuracy.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["plots/accuracy.png"]


def _summary_rows(metrics: RewardModelMetrics, final: Path) -> list[tuple[str, str]]:
    """The closing table's rows: accuracy beside "the longer response wins", calibration, subsets; the report."""
    length, accuracy = metrics.length, metrics.accuracy
    subsets = metrics.subsets if len(metrics.subsets) > 1 else {}
    return [
        ("accuracy", f"{_pct(accuracy.win_rate)} ({metrics.pairs} pairs, {accuracy.ties} ties)"),
        (LONGER_WINS, f"{_pct(length.longer_wins)} on the same pairs"),
        ("length", _length_verdict(metrics)),
        ("chosen longer / shorter", f"accuracy {_pct(length.chosen_longer)} ({length.chosen_longer_pairs} pairs) / "
                                    f"{_pct(length.chosen_shorter)} ({length.chosen_shorter_pairs}), in {LENGTH_UNIT}"),
        ("calibration error (ECE)", _num(metrics.ece)),
        ("mean margin (raw)", _num(metrics.margin)),
        *[(f"accuracy [{name}]", f"{_pct(sub.accuracy.win_rate)} ({sub.pairs} pairs; longer wins "
                                 f"{100 * sub.longer_wins.estimate:.1f}%)") for name, sub in subsets.items()],
        *([("warning", accuracy.warning)] if accuracy.warning else []),
        ("note", LENGTH_RULE),
        ("report", f"{final / 'report.md'} (results.json, scores.jsonl, plots/)"),
    ]
