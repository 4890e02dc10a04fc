"""Gold preferences (align/gold.py): built-in rules, Python callables and reward models, checked at start-up; the
ranks a simulated annotator gives; win rates under a gold in the evaluation's statistics."""

from __future__ import annotations

import sys
import textwrap

import pytest

from align.errors import AlignError
from align.gold import load_gold, rank


def test_rules_score_and_rank_as_documented():
    shorter, longer = load_gold("shorter"), load_gold("longer")
    texts = ["aa", "a", "aaa", "bb "]
    assert rank(shorter.score([""] * 4, texts)) == [2, 1, 3, 2]  # "bb " strips to 2 characters: tied with "aa"
    assert rank(longer.score([""] * 4, texts)) == [2, 3, 1, 2]
    keyword = load_gold("keyword:SEA")
    assert rank(keyword.score([""] * 3, ["the sea", "a very long answer", "Sea"])) == [1, 3, 2]
    assert keyword.kind == "rule" and "sea" in keyword.description


def test_sentiment_rule_prefers_the_positive_continuation():
    gold = load_gold("sentiment")
    prompts = ["This movie was"] * 3
    scores = gold.score(prompts, [" a wonderful, moving film.", " released in 1998.", " a boring, awful mess."])
    assert scores[0] > 0.5 and scores[1] == 0.0 and scores[2] < -0.5
    assert rank(scores) == [1, 2, 3]
    assert gold.as_record() == {"spec": "sentiment", "kind": "rule", "description": gold.description}


def test_rank_ties_within_margin_share_a_dense_rank():
    assert rank([0.5, 0.5, 0.1]) == [1, 1, 2]
    assert rank([0.3, 0.25, -1.0], tie_margin=0.1) == [1, 1, 2]
    assert rank([]) == []


@pytest.fixture
def gold_module(tmp_path, monkeypatch):
    (tmp_path / "my_gold.py").write_text(textwrap.dedent("""
        def politeness(prompt, response):
            return float(response.lower().count("please"))
        def broken(prompt, response):
            raise RuntimeError("no model here")
        def wordy(prompt, response):
            return "very good"
        def nan(prompt, response):
            return float("nan")
        def late(prompt, response):
            if "boom" in response:
                raise ValueError("cannot score this")
            return 1.0
        not_a_function = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_gold"
    sys.modules.pop("my_gold", None)


def test_a_python_callable_is_a_gold(gold_module):
    gold = load_gold(f"{gold_module}:politeness")
    assert gold.kind == "callable"
    assert gold.score(["q", "q"], ["please, please", "no"]) == [2.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("my_gold:broken", "gold: my_gold:broken raised RuntimeError: no model here on the response"),
    ("my_gold:wordy", "gold: my_gold:wordy returned 'very good' (str)"),
    ("my_gold:nan", "returned nan (float)"),
    ("my_gold:missing", "gold: my_gold has no function 'missing'"),
    ("my_gold:not_a_function", "gold: my_gold has no function 'not_a_function'"),
    ("no_such_module_xyz:score", "gold: cannot import 'no_such_module_xyz'"),
    ("loudest", "gold: 'loudest' is not a gold preference"),
    ("keyword:", "gold: 'keyword:': give the word"),
    ("", "gold: empty"),
])
def test_a_bad_gold_fails_at_load_in_one_line(gold_module, spec, message):
    with pytest.raises(AlignError) as error:
        load_gold(spec)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_gold_failing_mid_run_names_the_response(gold_module):
    gold = load_gold(f"{gold_module}:late")
    with pytest.raises(AlignError, match="my_gold:late raised ValueError: cannot score this on the response 'boom'"):
        gold.score(["q", "q"], ["fine", "boom"])


def test_a_gold_reward_model_must_be_a_reward_model(tmp_path):
    from tests import tiny_models

    folder = tiny_models.build_tiny_llama(tmp_path / "lm")
    with pytest.raises(AlignError, match="gold: reward model: .* is not a reward model"):
        load_gold(str(folder))


def test_gold_and_proxy_win_rates_from_constructed_scores():
    """Win rates under the gold and under the judge on the same responses, against hand-computed values."""
    from types import SimpleNamespace

    from align.stages.eval import _win_rates

    model = SimpleNamespace(response_tokens=[10] * 5, responses=["a", "b", "c", "d", "e"])
    baseline = SimpleNamespace(response_tokens=[10] * 5, responses=["v", "w", "x", "y", "z"])
    gold = _win_rates([0.9, 0.5, 0.0, -0.2, 0.4], [0.1, 0.5, 0.3, -0.5, 0.2], 0.0, model, baseline)
    assert (gold["wins"], gold["ties"], gold["losses"]) == (3, 1, 1)
    assert gold["win_rate"]["estimate"] == pytest.approx(3.5 / 5)
    proxy = _win_rates([2.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 3.0], 0.0, model, baseline)
    assert (proxy["wins"], proxy["ties"], proxy["losses"]) == (4, 0, 1)
    assert proxy["win_rate"]["estimate"] == pytest.approx(0.8)
    assert proxy["win_rate"]["low"] < 0.8 < proxy["win_rate"]["high"]
    # The same text as the baseline's is a tie, whatever the scores say.
    same = SimpleNamespace(response_tokens=[10] * 5, responses=["a", "w", "c", "d", "e"])
    tied = _win_rates([2.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 3.0], 0.0, same, baseline)
    assert (tied["wins"], tied["ties"], tied["losses"]) == (3, 1, 1)
