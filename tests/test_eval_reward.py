"""`align eval reward` (stages/eval_reward.py) and its statistics (align/evaluation.py).

Pure functions first: accuracy with ties, subsets, length bias and the "longer response wins" baseline, CIs and
ECE on constructed scores against hand-computed values. Then one CLI run on a tiny random-init reward model (a Llama
sequence classifier built from the tiny Llama's config, registered as `reward:1`, with a normalization file so raw
scores are told from normalized ones) over three files in different formats: `align label pull` pairs registered as
`label:1` (with tied rows), a RewardBench-style file with subsets (one conversational), an implicit-prompt file.
Bad input ends with one line and exit code 2 before the model loads, and writes nothing.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest

from align import evaluation as ev
from tests.tiny_models import write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Z = ev.z_value()  # 1.959964


def _main(*args: str) -> int:
    from align.cli.main import main

    return main(list(args))


def _normal(values: list[float]) -> tuple[float, float, float]:
    """mean +- z * sample sd / sqrt(n), by hand."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, mean - Z * sd / math.sqrt(n), mean + Z * sd / math.sqrt(n)


# --------------------------------------------------------------------------------------------------
# Statistics on constructed scores

def test_accuracy_counts_score_ties_half_and_splits_subsets():
    # margins: 2, 0.05, -1, 0, 3, -0.5; with tie_margin 0.1: correct, tie, wrong, tie, correct, wrong
    chosen = [3.0, 1.05, 0.0, 2.0, 4.0, 0.0]
    rejected = [1.0, 1.0, 1.0, 2.0, 1.0, 0.5]
    lengths = [5] * 6
    m = ev.reward_model_metrics(chosen, rejected, lengths, lengths, ["a", "b", "a", "b", "a", "b"], tie_margin=0.1)
    assert m.judgments == ["win", "tie", "loss", "tie", "win", "loss"]
    acc = m.accuracy
    assert (acc.n, acc.wins, acc.ties, acc.losses) == (6, 2, 2, 2)
    assert acc.win_rate.estimate == pytest.approx(0.5)
    mean, low, high = _normal([1, 0.5, 0, 0.5, 1, 0])
    assert (acc.win_rate.low, acc.win_rate.high) == (pytest.approx(low), pytest.approx(high))
    assert acc.win == ev.wilson_interval(2, 6) and acc.warning == "too few pairs for a meaningful CI (6 < 30 pairs)"
    assert list(m.subsets) == ["a", "b"]  # in order of first appearance
    a, b = m.subsets["a"], m.subsets["b"]
    assert (a.pairs, a.accuracy.win_rate.estimate, a.accuracy.ties) == (3, pytest.approx(2 / 3), 0)
    assert (b.pairs, b.accuracy.win_rate.estimate, b.accuracy.ties) == (3, pytest.approx(1 / 3), 2)
    assert a.margin.estimate == pytest.approx((2 - 1 + 3) / 3) and b.margin.estimate == pytest.approx((0.05 - 0.5) / 3)
    # exact equality is a tie even with no margin; a hair above is not
    assert ev.reward_model_metrics([1.0, 1.0 + 1e-9], [1.0, 1.0], [1, 1], [1, 1]).judgments == ["tie", "win"]


def test_mean_margin_interval_is_unclipped_and_calibration_error_matches_hand_computed_bins():
    margins = [2.0, 2.0, -1.0, 0.0]
    m = ev.reward_model_metrics([c + 10 for c in margins], [10.0] * 4, [1] * 4, [1] * 4)
    mean, low, high = _normal(margins)
    assert (m.margin.estimate, m.margin.low, m.margin.high) == (pytest.approx(mean), pytest.approx(low),
                                                               pytest.approx(high))
    assert low < 0  # a margin interval is not a rate: no clipping to [0, 1]

    def s(x):
        return 1 / (1 + math.exp(-x))

    # Each pair in both orders, 8 predictions: (s(2), 1) x2 in bin 8, (s(-2), 0) x2 in bin 1, (s(-1), 1) in bin 2,
    # (s(1), 0) in bin 7, and (0.5, 1), (0.5, 0) together in bin 5 (gap 0).
    expected = (2 * (1 - s(2)) + 2 * s(-2) + (1 - s(-1)) + s(1)) / 8
    assert m.calibration.ece == pytest.approx(expected) and m.ece.estimate == pytest.approx(expected)
    assert [n for _, _, n in m.calibration.bins] == [2, 1, 2, 1, 2]
    assert m.calibration.bins[2] == (pytest.approx(0.5), pytest.approx(0.5), 2)
    assert 0 <= m.ece.low <= m.ece.estimate <= m.ece.high <= 1
    assert ev.calibration_error_interval(margins) == ev.calibration_error_interval(margins)  # seeded

    # P = 0.75 on every pair and right on 3 of 4: calibrated, ECE 0. Right on all 4: off by 0.25 everywhere.
    log3 = math.log(3)
    assert ev.calibration([log3, log3, log3, -log3]).ece == pytest.approx(0.0, abs=1e-12)
    assert ev.calibration([log3] * 4).ece == pytest.approx(0.25)
    assert ev.calibration([0.0] * 5).ece == 0.0


def test_length_bias_and_the_longer_wins_baseline():
    # pairs 0-3: chosen longer (model right on 3 of 4); 4-7: chosen shorter (right on 1 of 4); 8-9: as long.
    chosen_len = [9, 9, 9, 9, 2, 2, 2, 2, 5, 5]
    rejected_len = [1, 1, 1, 1, 8, 8, 8, 8, 5, 5]
    right = [1, 1, 1, 0, 1, 0, 0, 0, 1, 0]
    chosen = [1.0 if r else -1.0 for r in right]
    m = ev.reward_model_metrics(chosen, [0.0] * 10, chosen_len, rejected_len)
    length = m.length
    assert ev.longer_wins(chosen_len, rejected_len) == [1.0] * 4 + [0.0] * 4 + [0.5] * 2
    assert (length.chosen_longer_pairs, length.chosen_shorter_pairs, length.same_length_pairs) == (4, 4, 2)
    assert length.chosen_longer.estimate == pytest.approx(0.75) and length.chosen_shorter.estimate == 0.25
    assert length.same_length.estimate == 0.5
    assert length.chosen_longer == ev.mean_interval([1, 1, 1, 0])
    assert length.longer_wins.estimate == pytest.approx(0.5)  # (4 + 0 + 2 * 0.5) / 10
    assert length.longer_wins == ev.mean_interval([1.0] * 4 + [0.0] * 4 + [0.5] * 2)
    assert m.accuracy.win_rate.estimate == pytest.approx(0.5)
    assert length.advantage.estimate == pytest.approx(0.0)  # model 0.5 - heuristic 0.5
    assert length.advantage.low < 0 < length.advantage.high

    # A "reward model" that IS length: right whenever the chosen is longer. It ties the heuristic exactly.
    by_length = ev.reward_model_metrics([float(c) for c in chosen_len], [float(r) for r in rejected_len], chosen_len,
                                        rejected_len)
    assert by_length.accuracy.win_rate.estimate == by_length.length.longer_wins.estimate == pytest.approx(0.5)
    assert by_length.length.chosen_longer.estimate == 1.0 and by_length.length.chosen_shorter.estimate == 0.0
    assert by_length.length.advantage == ev.Interval(0.0, 0.0, 0.0)
    # No pairs where the chosen is shorter: that group is empty (NaN), not an error.
    assert math.isnan(ev.reward_model_metrics([1.0], [0.0], [3], [1]).length.chosen_shorter.estimate)


# --------------------------------------------------------------------------------------------------
# One CLI run on a tiny reward model and three files in different formats

def _tiny_reward_model(folder: Path, base: str) -> str:
    """A random-init Llama sequence classifier (one label) on the tiny Llama's config and tokenizer, with a
    normalization file whose mean (100) would show in every score if normalized scores were used."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from align.scoring import Normalization

    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(base, num_labels=1)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)  # scores spread over a few units, so the margins vary
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    Normalization(mean=100.0, std=1.0, count=1).save(folder)
    return str(folder)


REWARDBENCH = [
    {"prompt": "Say hi.", "chosen": "hi there", "rejected": "go away now, I am busy", "subset": "chat-easy",
     "id": 1},
    {"prompt": "Name a colour.", "chosen": "red", "rejected": "a b c d e f", "subset": "chat-easy", "id": 2},
    {"prompt": "Count to three.", "chosen": "one two three", "rejected": "three", "subset": "chat-easy", "id": 3},
    {"prompt": [{"role": "user", "content": "Is the sky blue?"}],
     "chosen": [{"role": "assistant", "content": "Yes, on a clear day."}],
     "rejected": [{"role": "assistant", "content": "No."}], "subset": "refusals", "id": 4},
    {"prompt": [{"role": "user", "content": "Add 2 and 2."}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5, I think"}], "subset": "refusals", "id": 5},
]
IMPLICIT = [{"chosen": "The answer is four", "rejected": "The answer is five or so"},
            {"chosen": "Paris is the capital", "rejected": "Paris is a city in Texas"}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_llama):
    from align.registry import Registry
    from align.reporting import console
    from tests.test_reward import marker_pairs

    home = tmp_path_factory.mktemp("eval_reward")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("ALIGN_HOME", str(home / ".align"))
        mp.setattr(console, "width", 400)
        registry = Registry()
        reward = registry.add(stage="reward", name="tiny-rm", path=_tiny_reward_model(home / "rm", tiny_llama),
                              base_model=tiny_llama)
        rows = marker_pairs(4)  # 12 pairs + 4 rows with "tie": true
        label = registry.add(stage="label", name="marker", kind="dataset", path=write_jsonl(home / "pairs.jsonl", rows))
        write_jsonl(home / "rewardbench.jsonl", REWARDBENCH)
        write_jsonl(home / "implicit.jsonl", IMPLICIT)
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            code = _main("eval", "reward", "--model", "reward:latest", "--data", "label:latest", "rewardbench.jsonl",
                         "implicit.jsonl", "--batch-size", "4")
        assert code == 0, buffer.getvalue()
        yield SimpleNamespace(home=home, reward=reward, label=label, rows=rows, stdout=buffer.getvalue(),
                              folder=home / "runs" / "eval" / "reward-reward1", row=Registry().resolve("eval:1"),
                              env=mp)


def test_cli_writes_the_folder_and_numbers_that_follow_from_the_scores(evaluated):
    folder = evaluated.folder
    assert sorted(p.name for p in folder.iterdir()) == ["plots", "report.md", "results.json", "scores.jsonl"]
    assert not folder.with_name(folder.name + ".incomplete").exists()
    for plot in ("accuracy.png", "calibration.png"):
        assert (folder / "plots" / plot).read_bytes().startswith(PNG_MAGIC)
    results = json.loads((folder / "results.json").read_text())
    scored = [json.loads(line) for line in (folder / "scores.jsonl").read_text().splitlines()]
    assert results["pairs"] == len(scored) == 12 + 5 + 2 and results["label_ties"] == 4
    assert [d["label"] for d in results["data"]] == ["label:1", "rewardbench.jsonl", "implicit.jsonl"]
    assert list(results["subsets"]) == ["label:1", "chat-easy", "refusals", "implicit.jsonl"]
    assert results["scores"] == "raw" and results["length_unit"] == "characters"
    # Every number follows from the per-pair scores.
    recomputed = ev.reward_model_metrics([r["score_chosen"] for r in scored], [r["score_rejected"] for r in scored],
                                         [r["chosen_characters"] for r in scored],
                                         [r["rejected_characters"] for r in scored], [r["subset"] for r in scored])
    assert results["accuracy"]["estimate"] == pytest.approx(recomputed.accuracy.win_rate.estimate)
    assert results["correct"] + results["ties"] + results["wrong"] == 19
    assert results["ece"]["estimate"] == pytest.approx(recomputed.ece.estimate)
    assert results["length"]["longer_wins_accuracy"]["estimate"] == pytest.approx(
        recomputed.length.longer_wins.estimate)
    assert results["subsets"]["refusals"]["pairs"] == 2
    first = scored[0]
    assert first["where"].endswith("pairs.jsonl:1") and first["result"] in ("correct", "tie", "wrong")
    assert first["chosen_characters"] == len(evaluated.rows[0]["chosen"])
    assert first["p_chosen"] == pytest.approx(1 / (1 + math.exp(-first["margin"])))
    conversational = next(r for r in scored if r["subset"] == "refusals")
    assert conversational["chosen_characters"] == len("Yes, on a clear day.")
    # Raw scores from the reward model's own scorer (not normalized: its normalization would subtract 100).
    evaluated.env.chdir(evaluated.home)
    from align.scoring import RewardScorer

    scorer = RewardScorer.load("reward:1")
    raw = scorer.score([r["prompt"] for r in scored[:3]], [r["chosen"] for r in scored[:3]], normalized=False)
    assert [r["score_chosen"] for r in scored[:3]] == pytest.approx(raw, abs=1e-4)
    assert abs(raw[0]) < 50  # the normalized scores would be near -100
    report = (folder / "report.md").read_text()
    assert "has learned length, not preference" in report and "![accuracy](plots/accuracy.png)" in report
    assert "| refusals | 2 |" in report


def test_registers_an_evaluation_of_the_reward_model_that_registry_show_lists(evaluated, capsys, monkeypatch):
    row = evaluated.row
    assert (row.stage, row.kind, row.name) == ("eval", "evaluation", "reward-reward1")
    assert row.parents == [evaluated.reward.id, evaluated.label.id]
    assert row.path == str(evaluated.folder)
    m = row.metrics
    results = json.loads((evaluated.folder / "results.json").read_text())
    assert m["accuracy"] == pytest.approx(results["accuracy"]["estimate"])
    assert m["accuracy_low"] <= m["accuracy"] <= m["accuracy_high"]
    for key in ("longer_wins_accuracy", "ece", "margin", "advantage_over_longer_wins", "accuracy[chat-easy]"):
        assert key in m, key
    assert m["pairs"] == 19 and m["label_ties"] == 4
    assert row.config["model"] == "reward:1" and row.config["tie_margin"] == 0.0
    # The summary table.
    out = evaluated.stdout
    assert "finished: eval:1 (reward-reward1)" in out and '"the longer response wins"' in out
    assert "has learned length, not preference" in out and "accuracy [refusals]" in out
    monkeypatch.chdir(evaluated.home)
    monkeypatch.setenv("ALIGN_HOME", str(evaluated.home / ".align"))
    from align.reporting import console

    monkeypatch.setattr(console, "width", 400)
    capsys.readouterr()
    assert _main("registry", "show", "reward:1") == 0
    shown = capsys.readouterr().out
    line = next((line for line in shown.splitlines() if "eval:1 (reward-reward1)" in line), None)
    assert line is not None, shown
    assert f"accuracy={m['accuracy']:.4g} [{m['accuracy_low']:.3g}, {m['accuracy_high']:.3g}]" in line, line
    assert "longer_wins_accuracy=" in line and "ece=" in line and "pairs=19" in line, line
    assert _main("registry", "show", "label:1") == 0
    assert "eval:1 (reward-reward1): reward:1 accuracy=" in capsys.readouterr().out
    # The same folder again: refused, nothing changes.
    assert _main("eval", "reward", "--model", "reward:1", "--data", "implicit.jsonl") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out: ") and "already exists" in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before the model loads; no folder, no registry row

GOOD = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
BAD_INPUTS = {
    "missing_file": (None, ["nope.jsonl"], "data: nope.jsonl: file not found"),
    "all_ties": ([{**g, "tie": True} for g in GOOD], None,
                 "prefs.jsonl: no usable preference pairs: all 3 records were ties (3 pairs) or had chosen identical "
                 "to rejected (0); expected pairs whose chosen and rejected responses differ"),
    "empty_file": ([], None, "prefs.jsonl has no records"),
    "malformed_line": ("malformed", None, "prefs.jsonl:2: malformed JSON"),
    "not_preferences": ([{"prompt": "q", "completion": "a"}], None,
                        "prefs.jsonl:1: no preference format in fields [prompt, completion]"),
    "missing_field": (GOOD + [{"prompt": "q", "chosen": "c"}], None, "prefs.jsonl:4: field 'rejected' is missing"),
    "missing_model_ref": (GOOD, None, "registry: no artifact 'reward:7'"),
    "not_a_reward_model": (GOOD, None, "is not a reward model"),
    "bad_batch_size": (GOOD, None, "--batch-size: must be a whole number >= 1, got 0"),
    "bad_tie_margin": (GOOD, None, "--tie-margin: must be 0 or more, got -1.0"),
    "bad_data_ref": (GOOD, ["label:3"], "registry: no artifact 'label:3'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys, tiny_llama):
    from align.registry import Registry
    from align.scoring import RewardScorer

    rows, data, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    if rows == "malformed":
        (tmp_path / "prefs.jsonl").write_text(json.dumps(GOOD[0]) + "\n{\"prompt\": \"q\", \"chosen\": \n")
    elif rows is not None:
        write_jsonl(tmp_path / "prefs.jsonl", rows)
    model = {"missing_model_ref": "reward:7", "not_a_reward_model": tiny_llama}.get(case, str(tmp_path / "rm"))
    if case != "not_a_reward_model":  # bad data fails before the model loads (there is none to load)
        monkeypatch.setattr(RewardScorer, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    options = {"bad_batch_size": ["--batch-size", "0"], "bad_tie_margin": ["--tie-margin", "-1"]}.get(case, [])
    code = _main("eval", "reward", "--model", model, "--data", *(data or ["prefs.jsonl"]), *options)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()
    assert Registry().list() == []
