"""`align eval human push | status | pull | simulate` (labeling/pairwise.py) against the REAL Argilla server.

One server per test session (tests/conftest.py `argilla_server`). The generations file is constructed by hand:
two registered models on 13 prompts (one with identical responses, one answered by the model only) and a third
model on a few, so every expected rate can be computed by hand. Simulated annotators judge through the REST calls
the web UI makes. The tests run in file order.
"""

from __future__ import annotations

import json
import random

import pytest

from align.errors import AlignError

IDENTICAL = "What is the capital of France?"
LONGER = [f"Question {i}: explain topic {i}" for i in range(7)]  # the model's response is longer
SHORTER = [f"Question {i}: name a thing" for i in range(7, 10)]  # the model's response is shorter
SAME_LENGTH = "Say three letters"  # different responses of equal length
ONLY_MODEL = "Only the model answered this"
PROMPTS = [IDENTICAL, *LONGER, *SHORTER, SAME_LENGTH]  # 12 prompts both answered; 11 differ


@pytest.fixture(scope="module")
def env(argilla_server):
    """This module's environment: the session server's ALIGN_HOME (its registry too), no external Argilla."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in argilla_server.env.items():
            mp.setenv(key, value)
        mp.delenv("ARGILLA_API_URL", raising=False)
        mp.delenv("ARGILLA_API_KEY", raising=False)
        yield argilla_server


@pytest.fixture(scope="module")
def models(env, tmp_path_factory):
    """Two registered models (their folders need not hold weights: nothing is loaded) and an eval run whose folder
    holds the generations file."""
    from align.registry import Registry

    root = tmp_path_factory.mktemp("human_eval")
    registry = Registry()
    (root / "base").mkdir()
    (root / "tuned").mkdir()
    base = registry.add(stage="sft", name="he-base", path=root / "base")
    tuned = registry.add(stage="sft", name="he-tuned", path=root / "tuned", parents=[base.id])
    rows = []
    for i, prompt in enumerate(PROMPTS):
        if prompt == IDENTICAL:
            ours = theirs = "Paris."
        elif prompt in LONGER:
            ours, theirs = f"A careful, complete answer about topic {i}, with an example.", f"Topic {i}."
        elif prompt in SHORTER:
            ours, theirs = f"Thing {i}.", f"Here is a thing, with far too many words around it: thing {i}."
        else:
            ours, theirs = "abc", "xyz"
        rows.append({"model": tuned.ref, "prompt": prompt, "response": ours})
        rows.append({"model": base.ref, "prompt": prompt, "response": theirs})
    rows.append({"model": tuned.ref, "prompt": ONLY_MODEL, "response": "Sure."})
    rows += [{"model": "gpt2", "prompt": p, "response": "?"} for p in PROMPTS[:3]]
    random.Random(0).shuffle(rows)
    run = root / "eval-run"
    run.mkdir()
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation = registry.add(stage="eval", name="compare", kind="evaluation", path=run,
                              parents=[tuned.id, base.id])
    return {"base": base, "tuned": tuned, "eval": evaluation, "file": run / "generations.jsonl"}


def _push(models, dataset: str, annotators: int = 1, source: str | None = None):
    from align.labeling import pairwise

    return pairwise.push_command(source or str(models["file"]), models["tuned"].ref, models["base"].ref, dataset,
                                 annotators_per_record=annotators)


def _api():
    from align.labeling.argilla_api import Api

    return Api.connect()


def _records(name: str) -> list[dict]:
    from align.labeling import argilla_api

    api = _api()
    return argilla_api.records(api, argilla_api.find_dataset(api, name, "align")["id"], responses=False)


def _one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(AlignError) as caught:
        function(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- Push ---------------------------------------------------------------------------------------------------

def test_push_logs_blind_records_with_randomized_sides(models, capsys):
    from align.labeling.pairwise import model_side, record_id

    # Pushed from the eval run's registry ref: its folder holds generations.jsonl.
    result = _push(models, "ab-model", source=models["eval"].ref)
    out = capsys.readouterr().out
    assert "11 prompts to judge, 11 records written" in out
    assert "1 prompt with identical responses from both skipped" in out
    assert result.identical == 1 and result.only_model == 1 and result.only_baseline == 0 and result.created == 11
    assert 0 < result.model_as_a < 11

    records = _records("ab-model")
    assert sorted(r["external_id"] for r in records) == sorted(record_id("ab-model", p) for p in PROMPTS[1:])
    sides = []
    for record in records:
        fields, meta = record["fields"], record["metadata"]
        assert record["external_id"] == record_id("ab-model", fields["prompt"])
        assert meta["model"] == models["tuned"].ref and meta["baseline"] == models["base"].ref
        assert meta["a_is"] == ("model" if model_side(record["external_id"]) == "A" else "baseline")
        model_text = fields["response_a"] if meta["a_is"] == "model" else fields["response_b"]
        if fields["prompt"] in LONGER:
            assert model_text.startswith("A careful")
        sides.append(meta["a_is"])
    assert set(sides) == {"model", "baseline"}  # both assignments occur

    api = _api()
    from align.labeling.argilla_api import find_dataset

    found = find_dataset(api, "ab-model", "align")
    info = found["metadata"]["align"]
    assert info["model_artifact"] == models["tuned"].id and info["baseline_artifact"] == models["base"].id
    assert info["eval_artifact"] == models["eval"].id and info["identical_skipped"] == 1
    assert "Judge the content, not the length" in found["guidelines"]
    questions = {q["name"]: q for q in api.call("GET", f"/api/v1/datasets/{found['id']}/questions", "t")["items"]}
    assert questions["choice"]["settings"]["type"] == "label_selection" and questions["choice"]["required"]
    assert [o["value"] for o in questions["choice"]["settings"]["options"]] == ["A", "B", "tie"]
    assert not questions["comment"]["required"]
    fields = api.call("GET", f"/api/v1/datasets/{found['id']}/fields", "t")["items"]
    assert [(f["name"], f["title"]) for f in fields] == [("prompt", "Prompt"), ("response_a", "Response A"),
                                                         ("response_b", "Response B")]
    properties = api.call("GET", f"/api/v1/me/datasets/{found['id']}/metadata-properties", "t")["items"]
    assert {p["name"] for p in properties} == {"a_is", "model", "baseline"}
    assert not any(p["visible_for_annotators"] for p in properties)


def test_annotators_do_not_see_which_side_is_the_model(models):
    import httpx

    from align.labeling import server
    from align.labeling.argilla_api import find_dataset
    from align.labeling.task import PENDING_VIEW

    password = server.add_user("ann")
    url = server.connect().api_url
    token = httpx.post(f"{url}/api/v1/token", data={"username": "ann", "password": password}).json()["access_token"]
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
    dataset_id = find_dataset(_api(), "ab-model", "align")["id"]
    answer = client.post(f"/api/v1/me/datasets/{dataset_id}/records/search", json=PENDING_VIEW)
    assert answer.status_code == 200, answer.text
    queue = [item["record"] for item in answer.json()["items"]]
    assert len(queue) == 11
    for record in queue:
        assert set(record["fields"]) == {"prompt", "response_a", "response_b"}
        assert not (record.get("metadata") or {}).keys() & {"a_is", "model", "baseline"}


def test_push_again_adds_no_duplicates(models, capsys):
    before = {r["external_id"]: r["fields"] for r in _records("ab-model")}
    result = _push(models, "ab-model", source=models["eval"].ref)
    assert result.created == 0 and result.skipped == 11 and result.changed == 0
    assert "0 records written" in capsys.readouterr().out
    after = _records("ab-model")
    assert len(after) == 11 and {r["external_id"]: r["fields"] for r in after} == before


def test_bad_input_is_a_one_line_error(models, tmp_path, monkeypatch):
    from align.labeling import pairwise

    source = str(models["file"])
    message = _one_line_error(pairwise.push, source, "sft:999", models["base"].ref, "never")
    assert message.startswith("--model 'sft:999' has no responses in") and "'gpt2' (3 prompts)" in message
    assert f"'{models['tuned'].ref}' (13 prompts)" in message
    message = _one_line_error(pairwise.push, str(tmp_path / "missing.jsonl"), "a", "b", "never")
    assert message.startswith("--generations: no generations file at") and "missing.jsonl" in message
    assert _one_line_error(pairwise.push, source, models["tuned"].ref, models["tuned"].ref, "never").startswith(
        "--model and --baseline are the same model")
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"model": "x", "prompt": "p", "response": "r"}\n{"model": "y", "prompt": "q", "response": "s"}\n')
    assert "no prompt in" in _one_line_error(pairwise.push, str(lone), "x", "y", "never")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"model": "x", "prompt": "p", "response": "r"}\n{"model": \n')
    assert _one_line_error(pairwise.push, str(broken), "x", "y", "never").startswith(
        f"--generations: {broken}:2: malformed JSON")
    assert _one_line_error(pairwise.pull, "no-such-dataset", str(tmp_path / "o.jsonl")).endswith(
        "create it with `align eval human push --dataset no-such-dataset ...`")
    assert _one_line_error(pairwise.status, "no-such-dataset").startswith("no dataset 'no-such-dataset' in workspace")
    assert "--rule 'loudest'" in _one_line_error(pairwise.simulate, "ab-model", 1, "loudest")
    # No server in this home: how to start one.
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "no-server"))
    assert "align label serve" in _one_line_error(pairwise.status, "ab-model")
    assert not list(tmp_path.glob("o.jsonl"))


# --- Simulate and pull ------------------------------------------------------------------------------------------

def test_pull_before_any_judgment_writes_nothing(models, tmp_path):
    from align.labeling import pairwise

    message = _one_line_error(pairwise.pull, "ab-model", str(tmp_path / "none.jsonl"))
    assert message.startswith("no submitted judgments in dataset ab-model yet (11 records pending)")
    assert not (tmp_path / "none.jsonl").exists()


def test_an_annotator_who_prefers_the_model_gives_win_rate_one(models, tmp_path, capsys):
    from align.registry import Registry
    from align.labeling import pairwise

    assert pairwise.simulate_command("ab-model", 1, "model") == {"sim-annotator-1": 11}
    assert "sim-annotator-1" in capsys.readouterr().out

    out = tmp_path / "human" / "ab-model.jsonl"
    result = pairwise.pull_command("ab-model", str(out))
    table = capsys.readouterr().out
    assert "model wins" in table and "1.000" in table and "too few prompts for a meaningful CI" in table
    assert "11 judgments come from simulated annotators" in table
    s = result.stats
    assert (s.n, s.wins, s.ties, s.losses) == (11, 11, 0, 0) and s.win_rate.estimate == 1.0
    assert s.win_rate.low < 1.0 == s.win_rate.high  # Wilson: not a point at 100%

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 11 and all(row["judgment"] == "win" and row["simulated"] for row in rows)
    assert all(row["choice"] == row["model_side"] and row["votes"] == {"win": 1, "tie": 0, "loss": 0}
               for row in rows)
    assert {row["prompt"] for row in rows} == set(PROMPTS[1:])
    assert all(row["model"] == models["tuned"].ref and row["baseline"] == models["base"].ref for row in rows)
    longer = next(row for row in rows if row["prompt"] == LONGER[0])
    assert longer["model_response"].startswith("A careful") and longer["baseline_response"] == "Topic 1."

    artifact = Registry().resolve(result.artifact.ref)
    assert artifact.stage == "eval" and artifact.kind == "evaluation" and artifact.config["type"] == "human-eval"
    assert artifact.path == str(out.resolve()) and artifact.name == "ab-model"
    assert artifact.parents == [models["tuned"].id, models["base"].id, models["eval"].id]
    m = artifact.metrics
    assert (m["n"], m["win"], m["tie"], m["loss"], m["win_rate"]) == (11, 1.0, 0.0, 0.0, 1.0)
    assert m["win_rate_low"] == pytest.approx(s.win_rate.low) and m["win_rate_high"] == 1.0
    assert m["simulated"] is True and m["simulated_judgments"] == 11 and m["agreement"] is None

    current = pairwise.status_command("ab-model")
    shown = capsys.readouterr().out
    assert "sim-annotator-1 (simulated)" in shown and "ann" in shown
    assert current["completed"] == 11 and current["users"]["sim-annotator-1"]["submitted"] == 11
    assert current["users"]["ann"] == {"submitted": 0, "draft": 0, "discarded": 0, "pending": 0}


def test_the_longer_rule_gives_the_hand_computed_rates(models, tmp_path, capsys):
    from align.registry import Registry
    from align.labeling import pairwise

    _push(models, "ab-longer", annotators=2)
    assert pairwise.simulate("ab-longer", 2, "longer") == {"sim-annotator-1": 11, "sim-annotator-2": 11}
    progress = pairwise.status("ab-longer")
    assert progress["completed"] == 11 and progress["users"]["sim-annotator-2"]["submitted"] == 11

    # One judgment per prompt: the model is longer on 7, shorter on 3, as long on 1.
    result = pairwise.pull_command("ab-longer", str(tmp_path / "majority.jsonl"))
    s = result.stats
    assert (s.n, s.wins, s.ties, s.losses) == (11, 7, 1, 3)
    assert s.win.estimate == pytest.approx(7 / 11) and s.loss.estimate == pytest.approx(3 / 11)
    assert s.win_rate.estimate == pytest.approx(7.5 / 11)
    assert result.metrics["agreement"] == 1.0 and result.metrics["multi_annotator_records"] == 11
    rows = [json.loads(line) for line in (tmp_path / "majority.jsonl").read_text().splitlines()]
    tie = next(row for row in rows if row["prompt"] == SAME_LENGTH)
    assert tie["judgment"] == "tie" and tie["choice"] == "tie" and tie["votes"] == {"win": 0, "tie": 2, "loss": 0}
    assert "0.682" in capsys.readouterr().out  # 7.5 / 11

    # One per annotator: every count doubles, the rates stay.
    each = pairwise.pull("ab-longer", str(tmp_path / "each.jsonl"), aggregate="each")
    assert (each.stats.n, each.stats.wins, each.stats.ties, each.stats.losses) == (22, 14, 2, 6)
    rows = [json.loads(line) for line in (tmp_path / "each.jsonl").read_text().splitlines()]
    assert len({row["annotator"] for row in rows}) == 2
    assert all(row["judgment"] == ("win" if row["prompt"] in LONGER else "loss" if row["prompt"] in SHORTER
                                   else "tie") for row in rows)
    assert all(row["comment"].startswith("simulated annotator sim-annotator-") for row in rows)
    assert Registry().resolve(each.artifact.ref).metrics["n"] == 22


# --- Pure pieces ------------------------------------------------------------------------------------------------

def test_choice_rules_and_mapping():
    from align.labeling.pairwise import add_noise, choose, judgment, model_side, plurality

    rng = random.Random(0)
    assert choose("long one", "short", "model", "longer", rng) == "A"
    assert choose("long one", "short", "model", "shorter", rng) == "B"
    assert choose(" ab ", "cd", "model", "longer", rng) == "tie"
    assert choose("x", "y", "baseline", "model", rng) == "B" and choose("x", "y", "baseline", "baseline", rng) == "A"
    assert {choose("x", "y", "model", "random", random.Random(i)) for i in range(20)} == {"A", "B"}
    assert add_noise("A", 0.0, rng) == "A" and add_noise("A", 1.0, rng) == "B" and add_noise("tie", 1.0, rng) in "AB"
    assert judgment("A", "model") == "win" and judgment("A", "baseline") == "loss"
    assert judgment("B", "baseline") == "win" and judgment("tie", "model") == "tie"
    assert plurality(["win", "win", "loss"]) == "win" and plurality(["win", "loss"]) == "tie"
    assert plurality(["win", "tie"]) == "tie" and plurality(["loss"]) == "loss"
    sides = [model_side(f"ab-{i}") for i in range(200)]
    assert sides == [model_side(f"ab-{i}") for i in range(200)] and 70 < sides.count("A") < 130


def test_generations_whose_responses_hold_unicode_line_separators_are_read_whole(tmp_path):
    """A model may write U+2028 / U+2029 (SmolLM2 does): JSON lines end at newlines only, not where str.splitlines()
    would split them."""
    import json

    from align.labeling import pairwise

    path = tmp_path / "generations.jsonl"
    rows = [{"model": "a", "prompt": "p", "response": "one\u2028two"},
            {"model": "b", "prompt": "p", "response": "x\u2029"}]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert pairwise.read_generations(str(path)).responses == {"a": {"p": "one\u2028two"}, "b": {"p": "x\u2029"}}
