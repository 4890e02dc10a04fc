"""`align label push | status | pull | simulate` (labeling/rankings.py) against the REAL Argilla server.

One server per test session (tests/conftest.py `argilla_server`); a tiny random-init Llama writes the
completions (K=3 per prompt, 8 new tokens). Annotators submit through the REST calls the web UI makes.
The tests run in file order: push, re-push, errors, pull before any submission, then rankings and pull.
"""

from __future__ import annotations

import json
import random
import socket

import pytest

from align.cli.main import main
from align.errors import AlignError

PROMPTS = ["reverse: a b c", "reverse: d e f", "Write a haiku about the sea", "Explain gravity to a child"]
DATASET = "ranked"


@pytest.fixture(scope="module")
def env(argilla_server):
    """This module's environment: the session server's ALIGN_HOME (its registry too), no external Argilla."""
    with argilla_server.applied():
        yield argilla_server


@pytest.fixture(scope="module")
def model(env, tiny_llama):
    """The tiny Llama as a registered SFT artifact (the parent of the pulled preference data)."""
    from align.registry import Registry

    return Registry().add(stage="sft", name="tiny-sft", path=tiny_llama, config={"note": "test"})


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _push(model, prompts_file, dataset=DATASET, *extra: str) -> int:
    return main(["label", "push", "--model", model.ref, "--prompts", prompts_file, "--k", "3", "--dataset", dataset,
                 "--annotators-per-record", "2", "--max-new-tokens", "8", *extra])


@pytest.fixture(scope="module")
def pushed(model, prompts_file):
    assert _push(model, prompts_file) == 0
    return _dataset(DATASET)


def _api():
    from align.labeling import argilla_api

    return argilla_api.Api.connect()


def _dataset(name: str) -> dict:
    from align.labeling import argilla_api

    return argilla_api.find_dataset(_api(), name, "align")


def _records(name: str, responses: bool = False) -> list[dict]:
    from align.labeling import argilla_api

    return argilla_api.records(_api(), _dataset(name)["id"], responses=responses)


def _login(username: str, password: str):
    import httpx

    from align.labeling import server

    answer = httpx.post(f"{server.connect().api_url}/api/v1/token", data={"username": username, "password": password})
    answer.raise_for_status()
    return httpx.Client(base_url=server.connect().api_url,
                        headers={"Authorization": f"Bearer {answer.json()['access_token']}"})


def _queue(client, dataset_id: str) -> list[dict]:
    from align.labeling.task import PENDING_VIEW

    answer = client.post(f"/api/v1/me/datasets/{dataset_id}/records/search", json=PENDING_VIEW)
    assert answer.status_code == 200, answer.text
    return [item["record"] for item in answer.json()["items"]]


def _respond(client, record_id: str, status: str, ranks: dict[str, int] | None = None) -> None:
    body = {"status": status}
    if ranks is not None:
        body["values"] = {"ranking": {"value": [{"value": key, "rank": rank} for key, rank in ranks.items()]}}
    answer = client.post(f"/api/v1/records/{record_id}/responses", json=body)
    assert answer.status_code == 201, answer.text


def _by_length(fields: dict) -> dict[str, int]:
    """The `longer` rule, written independently: longer first (this data has no equal lengths)."""
    keys = sorted((key for key in fields if key.startswith("completion_")), key=lambda key: -len(fields[key].strip()))
    return {key: rank for rank, key in enumerate(keys, 1)}


# --- Push ---------------------------------------------------------------------------------------------------

def test_push_logs_k_distinct_completions_in_a_shuffled_order(pushed, model):
    from align.labeling.rankings import record_id, shuffled_order

    records = _records(DATASET)
    assert sorted(r["external_id"] for r in records) == sorted(record_id(DATASET, p) for p in PROMPTS)
    orders = []
    for record in records:
        fields, meta = record["fields"], record["metadata"]
        assert fields["prompt"] in PROMPTS and record["external_id"] == record_id(DATASET, fields["prompt"])
        completions = [fields[f"completion_{p}"] for p in (1, 2, 3)]
        assert len({c.strip() for c in completions}) == 3 and all(c.strip() for c in completions)
        order = [int(x) for x in meta["order"].split(",")]
        assert sorted(order) == [0, 1, 2] and order == shuffled_order(record["external_id"], 3)
        orders.append(order)
        assert meta["model"] == model.ref and meta["duplicates"] == 0
        assert meta["sampling"] == ("temperature=1 top_p=0.95 top_k=0 max_new_tokens=8 repetition_penalty=1 "
                                    "seed=0")
        assert "model_input" not in meta  # chat model: the prompt is the user message
    assert any(order != [0, 1, 2] for order in orders)  # positions really are shuffled

    info = pushed["metadata"]["align"]
    assert info["k"] == 3 and info["model"] == model.ref and info["conversational"] is True
    assert pushed["distribution"] == {"strategy": "overlap", "min_submitted": 2}
    assert all(word in pushed["guidelines"] for word in ("Helpful", "Truthful", "Harmless", "best (1)"))

    api = _api()
    questions = {q["name"]: q for q in api.call("GET", f"/api/v1/datasets/{pushed['id']}/questions", "t")["items"]}
    assert [o["value"] for o in questions["ranking"]["settings"]["options"]] == ["completion_1", "completion_2",
                                                                                  "completion_3"]
    assert questions["ranking"]["required"] is True
    assert [o["value"] for o in questions["quality"]["settings"]["options"]] == list(range(1, 8))
    assert not questions["quality"]["required"] and not questions["flags"]["required"]
    assert questions["comment"]["settings"]["type"] == "text"
    fields = api.call("GET", f"/api/v1/datasets/{pushed['id']}/fields", "t")["items"]
    assert [f["name"] for f in fields] == ["prompt", "completion_1", "completion_2", "completion_3"]
    assert fields[0]["settings"]["use_markdown"] is True
    properties = api.call("GET", f"/api/v1/me/datasets/{pushed['id']}/metadata-properties", "t")["items"]
    assert {p["name"] for p in properties} >= {"model", "sampling", "order", "duplicates"}
    assert not any(p["visible_for_annotators"] for p in properties)


def test_push_again_adds_no_duplicates(pushed, model, prompts_file, capsys):
    before = {r["external_id"]: r["fields"] for r in _records(DATASET)}
    assert _push(model, prompts_file) == 0
    assert "0 records written, 4 already there" in capsys.readouterr().out
    after = _records(DATASET)
    assert len(after) == 4 and {r["external_id"]: r["fields"] for r in after} == before


def test_push_interrupted_by_a_server_restart_completes_without_loss_or_duplicates(env, model, prompts_file,
                                                                                   monkeypatch, capsys):
    from align.labeling import argilla_api, rankings, server

    real_upsert = argilla_api.upsert_records
    calls = []

    def upsert_then_stop_the_server(api, dataset_id, items):
        real_upsert(api, dataset_id, items)
        calls.append(len(items))
        if len(calls) == 2:  # two prompts are in: the server goes down mid-push
            server.stop()

    monkeypatch.setattr(argilla_api, "upsert_records", upsert_then_stop_the_server)
    assert _push(model, prompts_file, "resumable", "--log-every", "1") == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"error: the Argilla server at {env.url} stopped responding during push after 2 of 4 "
                           "prompts were logged; nothing lost; start it again with `align label serve` and re-run "
                           "the same command to continue")
    monkeypatch.setattr(argilla_api, "upsert_records", real_upsert)

    server.serve(port=env.port)
    first = {r["external_id"]: r["fields"] for r in _records("resumable")}
    assert len(first) == 2
    assert _push(model, prompts_file, "resumable", "--log-every", "1") == 0
    assert "2 records written, 2 already there" in capsys.readouterr().out
    records = _records("resumable")
    assert sorted(r["external_id"] for r in records) == sorted(rankings.record_id("resumable", p) for p in PROMPTS)
    assert {r["external_id"]: r["fields"] for r in records if r["external_id"] in first} == first


def test_push_to_a_dataset_with_other_settings_is_a_clear_error(pushed, model, prompts_file, capsys):
    url = _api().url
    assert main(["label", "push", "--model", model.ref, "--prompts", prompts_file, "--k", "4", "--dataset", DATASET,
                 "--max-new-tokens", "8"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: dataset '{DATASET}' on {url} already exists with different settings: it shows 3 completions per "
        "prompt, this push asks for --k 4. Push to a new --dataset name (or repeat the original command to "
        "continue that dataset)")
    assert _push(model, prompts_file, DATASET, "--temperature", "0.5") == 2
    assert "its completions come from sampling 'temperature=1 " in capsys.readouterr().err
    assert len(_records(DATASET)) == 4


def test_bad_prompts_and_arguments_fail_before_any_work(env, model, tmp_path, capsys):
    broken = tmp_path / "prompts.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": \n')
    assert _push(model, str(broken), "never") == 2
    assert f"{broken}:2: malformed JSON" in capsys.readouterr().err
    no_field = tmp_path / "rows.jsonl"
    no_field.write_text('{"prompt": "fine"}\n{"answer": "x"}\n')
    assert _push(model, str(no_field), "never") == 2
    assert f"--prompts: {no_field}:2: no prompt field" in capsys.readouterr().err
    assert main(["label", "push", "--model", model.ref, "--prompts", str(no_field), "--k", "1", "--dataset", "x"]) == 2
    assert "--k 1: rank between 2 and" in capsys.readouterr().err
    assert _dataset("never") is None


def test_wrong_api_key_or_unreachable_server(env, model, prompts_file, monkeypatch, capsys):
    monkeypatch.setenv("ARGILLA_API_URL", env.url)
    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-key")
    assert main(["label", "status", "--dataset", DATASET]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: the Argilla server at {env.url} rejected the API key from $ARGILLA_API_KEY")
    assert _push(model, prompts_file) == 2
    assert "rejected the API key" in capsys.readouterr().err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("ARGILLA_API_URL", dead)
    assert main(["label", "pull", "--dataset", DATASET, "--out", "unused.jsonl"]) == 2
    assert f"cannot reach the Argilla server at {dead}" in capsys.readouterr().err


# --- Pull ------------------------------------------------------------------------------------------------------

def test_pull_with_no_submitted_ranking_writes_nothing(pushed, tmp_path, capsys):
    from align.registry import Registry
    from align.labeling import server

    # A draft and a discard do not count.
    cal = _login("cal", server.add_user("cal"))
    first, second = _queue(cal, pushed["id"])[:2]
    _respond(cal, first["id"], "draft", {"completion_1": 1, "completion_2": 2, "completion_3": 3})
    _respond(cal, second["id"], "discarded")

    out = tmp_path / "prefs.jsonl"
    assert main(["label", "pull", "--dataset", DATASET, "--out", str(out)]) == 2
    url = f"{_api().url}/dataset/{pushed['id']}/annotation-mode"
    assert capsys.readouterr().err.strip() == (
        f"error: no submitted rankings in dataset {DATASET} yet (4 records pending; drafts, not counted until "
        f"submitted: 1); annotators rank at {url}")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # The session's server (and registry) is shared with other modules: only this dataset must be missing.
    assert [a for a in Registry().list(stage="label") if a.name == DATASET] == []


def test_rankings_become_exact_pairs_agreement_and_a_registered_dataset(pushed, model, tmp_path, capsys):
    from align.data import fingerprint
    from align.registry import Registry
    from align.labeling import server

    # sim-annotator-1 ranks everything by length (noise 0) through the UI's REST calls.
    assert main(["label", "simulate", "--dataset", DATASET, "--annotators", "1", "--rule", "longer"]) == 0
    assert "sim-annotator-1" in capsys.readouterr().out

    # bea ranks by length too, except that on the first prompt she swaps her top two.
    bea = _login("bea", server.add_user("bea"))
    queue = _queue(bea, pushed["id"])
    assert len(queue) == 4
    expected = {}  # (prompt, annotator) -> [(chosen, rejected), ...]
    for record in queue:
        fields = record["fields"]
        lengths = [len(fields[f"completion_{p}"].strip()) for p in (1, 2, 3)]
        assert len(set(lengths)) == 3, "this test's data has distinct lengths per prompt"
        ranks = _by_length(fields)
        best = [key for key, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
        pairs = [(fields[best[i]], fields[best[j]]) for i, j in ((0, 1), (0, 2), (1, 2))]
        expected[(fields["prompt"], "sim")] = pairs
        if fields["prompt"] == PROMPTS[0]:
            ranks[best[0]], ranks[best[1]] = 2, 1
            pairs = [(fields[best[1]], fields[best[0]]), (fields[best[1]], fields[best[2]]),
                     (fields[best[0]], fields[best[2]])]
        expected[(fields["prompt"], "bea")] = pairs
        _respond(bea, record["id"], "submitted", ranks)
    assert _queue(bea, pushed["id"]) == []

    out = tmp_path / "out" / "prefs.jsonl"
    assert main(["label", "pull", "--dataset", DATASET, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "0.9167" in table and "0.8333" in table  # 11/12 and (1 + 1 + 1 + 1/3) / 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24  # 2 annotators x 4 prompts x 3 pairs; cal's draft and discard ignored
    annotators = {row["annotator"] for row in rows}
    assert len(annotators) == 2 and all(len(a) == 12 for a in annotators)
    got = {}
    for row in rows:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["chosen_rank"] < row["rejected_rank"] and "tie" not in row
        who = "sim" if row["simulated"] else "bea"
        got.setdefault((row["prompt"][0]["content"], who), []).append(
            (row["chosen"][0]["content"], row["rejected"][0]["content"]))
    assert got == expected
    # chosen_index / rejected_index are original sample indices: the record's `order` metadata maps them back.
    shown = {}
    for record in _records(DATASET):
        order = [int(x) for x in record["metadata"]["order"].split(",")]
        shown[record["external_id"]] = {order[p]: record["fields"][f"completion_{p + 1}"] for p in range(3)}
    for row in rows:
        assert shown[row["record_id"]][row["chosen_index"]] == row["chosen"][0]["content"]
        assert shown[row["record_id"]][row["rejected_index"]] == row["rejected"][0]["content"]
    sim_rows = [row for row in rows if row["simulated"]]
    assert len(sim_rows) == 12 and all(3 <= row["best_quality"] <= 7 for row in sim_rows)
    assert all(row["gold"] == "longer" for row in sim_rows) and not any("gold" in row for row in rows
                                                                         if not row["simulated"])

    artifact = Registry().resolve("label:latest")
    assert artifact.kind == "dataset" and artifact.name == DATASET and artifact.parents == [model.id]
    assert artifact.path == str(out.resolve()) and artifact.data_fingerprint == fingerprint(rows)
    assert artifact.metrics["pairs"] == 24 and artifact.metrics["rankings"] == 8
    assert artifact.metrics["agreement"] == pytest.approx(11 / 12)
    assert artifact.metrics["kendall_tau"] == pytest.approx(5 / 6)
    assert artifact.metrics["drafts_ignored"] == 1 and artifact.metrics["discarded_ignored"] == 1
    assert artifact.metrics["simulated_rankings"] == 4 and artifact.metrics["multi_annotator_records"] == 4
    assert artifact.config["simulated_gold"] == "longer"
    assert [a.id for _, a in Registry().lineage(artifact.ref)] == [artifact.id, model.id]

    # One majority vote per pair, ties kept: bea's swap makes one 1-1 pair a tie.
    majority_out = tmp_path / "majority.jsonl"
    assert main(["label", "pull", "--dataset", DATASET, "--out", str(majority_out), "--aggregate", "majority",
                 "--ties", "keep"]) == 0
    votes = [json.loads(line) for line in majority_out.read_text().splitlines()]
    assert len(votes) == 12 and sum(v["tie"] for v in votes) == 1
    tie = next(v for v in votes if v["tie"])
    assert tie["prompt"][0]["content"] == PROMPTS[0] and tie["votes"] == {"chosen": 1, "rejected": 1, "tie": 0}
    assert all(v["votes"] == {"chosen": 2, "rejected": 0, "tie": 0} for v in votes if not v["tie"])
    assert all(len(v["annotators"]) == 2 and v["simulated"] is False for v in votes)
    assert Registry().resolve("label:latest").metrics["ties"] == 1

    assert main(["label", "status", "--dataset", DATASET]) == 0
    status = capsys.readouterr().out
    assert "sim-annotator-1 (simulated)" in status and "bea" in status and "cal" in status
    from align.labeling import rankings

    progress = rankings.status(DATASET)
    assert progress["completed"] == 4 and progress["users"]["bea"]["submitted"] == 4
    assert progress["users"]["cal"] == {"submitted": 0, "draft": 1, "discarded": 1}


def test_simulate_reuses_its_annotators_and_keeps_their_passwords_private(pushed, capsys):
    import stat

    from align.labeling import rankings

    before = json.loads(rankings.simulated_users_file().read_text())
    # sim-annotator-1 has ranked everything; sim-annotator-2 is new; both find an empty queue (records complete).
    assert rankings.simulate(DATASET, 2, "longer", noise=0.5) == {"sim-annotator-1": 0, "sim-annotator-2": 0}
    # Another gold for the same annotator on the same dataset would mix two preferences under one name.
    with pytest.raises(AlignError, match="sim-annotator-1 already ranked dataset .* by the gold longer"):
        rankings.simulate(DATASET, 1, "shorter")
    stored = json.loads(rankings.simulated_users_file().read_text())
    url = _api().url
    assert stored[url]["sim-annotator-1"] == before[url]["sim-annotator-1"] and "sim-annotator-2" in stored[url]
    assert stat.S_IMODE(rankings.simulated_users_file().stat().st_mode) == 0o600
    with pytest.raises(AlignError, match="--gold: 'loudest' is not a gold preference"):
        rankings.simulate(DATASET, 1, "loudest")


# --- Pure pieces: simulation rules, K samples per prompt --------------------------------------------------------

def test_simulation_noise():
    from align.labeling.rankings import add_noise

    rng = random.Random(0)
    assert add_noise([1, 2, 3], 0.0, rng) == [1, 2, 3]
    assert add_noise([1, 2, 3], 1.0, rng) == [3, 1, 2]  # every adjacent pair swapped, best to worst
    assert add_noise([1, 1, 2], 1.0, random.Random(0)) == [2, 1, 1]


def test_sample_k_resamples_identical_completions(monkeypatch):
    from align import generation
    from align.generation import SamplingConfig, sample_k

    seeds = []

    def fake_generate(model, tokenizer, prompts, sampling, template=None, progress=None):
        seeds.append(sampling.seed)
        if sampling.seed == 0:  # first round: "p" repeats itself, "q" is fine
            return ["same", "same ", "other", "x", "y", "z"]
        return [f"new-{sampling.seed}-{i}" for i in range(len(prompts))]

    monkeypatch.setattr(generation, "generate", fake_generate)
    samples, repeats = sample_k(None, None, ["p", "q"], 3, SamplingConfig(seed=0))
    assert samples == [["same", "new-1000003-0", "other"], ["x", "y", "z"]] and repeats == [0, 0]
    assert seeds == [0, 1000003]

    def always_a(model, tokenizer, prompts, sampling, template=None, progress=None):
        return ["a"] * len(prompts)

    monkeypatch.setattr(generation, "generate", always_a)
    samples, repeats = sample_k(None, None, ["p"], 3, SamplingConfig(seed=0), retries=2)
    assert samples == [["a", "a", "a"]] and repeats == [2]  # kept after the retries, and counted



def test_push_mixes_a_second_model_into_each_ranking(env, model, tiny_gpt_neox, prompts_file, tmp_path, capsys):
    """`--mix-model M --mix-k 1`: of each prompt's K=3 completions, one is M's (sample index 2, the dataset says so);
    the pulled rankings have both models as parents. A different mix is another dataset; bad --mix-k is one line."""
    from align.registry import Registry

    mixed = Registry().add(stage="sft", name="tiny-other", path=tiny_gpt_neox, config={"note": "test"})
    assert _push(model, prompts_file, "mixed", "--mix-model", mixed.ref, "--mix-k", "1") == 0
    info = _dataset("mixed")["metadata"]["align"]
    assert info["model"] == model.ref and info["mix"] == {"model": mixed.ref, "k": 1}
    records = _records("mixed")
    assert len(records) == len(PROMPTS) and all(len(r["fields"]) == 4 for r in records)
    assert _push(model, prompts_file, "mixed", "--mix-model", mixed.ref, "--mix-k", "2") == 2
    assert f"its completions come from mix '{{'model': '{mixed.ref}', 'k': 1}}'" in capsys.readouterr().err
    for extra, message in ((("--mix-model", mixed.ref, "--mix-k", "3"), "--mix-k 3: how many of the --k 3 "
                            "completions per prompt --mix-model"), (("--mix-k", "1"), "--mix-k 1: give --mix-model")):
        assert _push(model, prompts_file, "never", *extra) == 2
        assert message in capsys.readouterr().err
    assert _dataset("never") is None

    assert main(["label", "simulate", "--dataset", "mixed", "--annotators", "1", "--rule", "longer"]) == 0
    assert main(["label", "pull", "--dataset", "mixed", "--out", str(tmp_path / "mixed.jsonl")]) == 0
    pulled = Registry().resolve("label:latest")
    assert pulled.parents == [model.id, mixed.id] and pulled.config["mix"] == {"model": mixed.ref, "k": 1}
