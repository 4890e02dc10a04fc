"""`align label push --select ... --budget N` (labeling/rankings.py + labeling/selection.py) against the REAL Argilla
server: the prompts file is a pool, only the chosen prompts become records, and each record keeps why it was chosen
(metadata `selection`, `selection_score`, `selection_rank`), which `label status` shows."""

from __future__ import annotations

import pytest

from align.cli.main import main

POOL = ["reverse: a b c", "reverse: d e f", "Write a haiku about the sea", "Explain gravity to a child",
        "REVERSE:  a b c"]  # the last one repeats the first (case and spacing aside)


@pytest.fixture(scope="module")
def env(argilla_server):
    with argilla_server.applied():
        yield argilla_server


@pytest.fixture(scope="module")
def models(env, tiny_llama, tmp_path_factory):
    """The tiny Llama as an SFT artifact, and two reward models on it whose score heads differ (seeds 0 and 1)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.registry import Registry

    registry = Registry()
    sft = registry.add(stage="sft", name="select-sft", path=tiny_llama, config={})
    rewards = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(f"reward{seed}")
        scorer = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
        scorer.config.pad_token_id = scorer.config.pad_token_id or 0
        scorer.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
        rewards.append(registry.add(stage="reward", name=f"select-rm{seed}", path=str(folder), config={}))
    return sft, rewards


@pytest.fixture(scope="module")
def pool_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "pool.txt"
    path.write_text("\n".join(POOL) + "\n")
    return str(path)


def _push(sft, pool_file, dataset, *extra):
    return main(["label", "push", "--model", sft.ref, "--prompts", pool_file, "--k", "3", "--dataset", dataset,
                 "--max-new-tokens", "8", *extra])


def _records(dataset):
    from align.labeling import argilla_api

    api = argilla_api.Api.connect()
    return argilla_api.records(api, argilla_api.find_dataset(api, dataset, "align")["id"], responses=False)


def test_uncertainty_pushes_the_budget_with_the_scores_behind_each_choice(models, pool_file, capsys):
    from align.labeling.selection import pair_entropy
    from align.scoring import RewardScorer

    sft, (reward, _) = models
    assert _push(sft, pool_file, "chosen", "--select", "uncertainty", "--budget", "2", "--reward-model",
                 reward.ref) == 0
    out = capsys.readouterr().out
    assert "1 prompts of the pool repeat another" in out and "2 prompts of the pool chosen by uncertainty" in out
    records = _records("chosen")
    assert len(records) == 2
    scorer = RewardScorer.load(reward.ref)
    for record in records:
        meta, fields = record["metadata"], record["fields"]
        assert meta["selection"] == "uncertainty" and meta["selection_rank"] in (1, 2)
        completions = [fields[f"completion_{p}"] for p in (1, 2, 3)]
        # The stored score is the pair entropy of exactly the completions annotators see, under that reward model.
        rewards = scorer.score([fields["prompt"]] * 3, completions)
        assert meta["selection_score"] == pytest.approx(pair_entropy(rewards), abs=1e-4)
    assert sorted(r["metadata"]["selection_rank"] for r in records) == [1, 2]
    first, second = sorted(records, key=lambda r: r["metadata"]["selection_rank"])
    assert first["metadata"]["selection_score"] >= second["metadata"]["selection_score"]

    assert main(["label", "status", "--dataset", "chosen"]) == 0
    assert "uncertainty: 2" in capsys.readouterr().out


def test_a_budget_above_the_pool_takes_the_pool_and_diversity_needs_no_reward_model(models, pool_file, capsys):
    sft, _ = models
    assert _push(sft, pool_file, "spread", "--select", "diversity", "--budget", "10") == 0
    out = capsys.readouterr().out
    assert "budget 10 is more than the pool's 4 prompts: all of them are used" in out
    records = _records("spread")
    assert len(records) == 4 and {r["metadata"]["selection"] for r in records} == {"diversity"}
    assert _push(sft, pool_file, "fallback", "--select", "uncertainty", "--budget", "1") == 0
    assert "no reward model yet: 'uncertainty' falls back to 'diversity'" in capsys.readouterr().out
    assert [r["metadata"]["selection"] for r in _records("fallback")] == ["diversity"]


@pytest.mark.parametrize("extra, message", [
    (["--select", "disagreement", "--budget", "2", "--reward-model", "REWARD0"],
     "--select disagreement asks an ensemble: give --reward-model at least twice"),
    (["--budget", "2"], "--budget / --reward-model choose prompts from a pool: give --select"),
    (["--select", "random"], "--select random: give --budget N"),
    (["--select", "random", "--budget", "0"], "at least 1, got 0"),
    (["--select", "uncertainty", "--budget", "2", "--reward-model", "SFT"],
     "is a causal LM; align label push needs a reward model: give a reward model"),
])
def test_bad_selection_arguments_are_one_line_before_any_work(models, pool_file, capsys, extra, message):
    from align.labeling import argilla_api

    sft, (reward, _) = models
    extra = [{"REWARD0": reward.ref, "SFT": sft.ref}.get(word, word) for word in extra]
    assert _push(sft, pool_file, "never-selected", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    api = argilla_api.Api.connect()
    assert argilla_api.find_dataset(api, "never-selected", "align") is None


def test_a_dataset_made_before_selection_gets_the_selection_properties(models, pool_file, tmp_path, monkeypatch,
                                                                       capsys):
    from align.labeling import rankings

    sft, _ = models
    first = tmp_path / "first.txt"
    first.write_text(POOL[0] + "\n")
    current = rankings.layout  # a dataset created before `--select` existed had no selection properties
    monkeypatch.setattr(rankings, "layout", lambda k: {**current(k), "metadata": [
        m for m in current(k)["metadata"] if not m["name"].startswith("selection")]})
    assert _push(sft, str(first), "older") == 0
    monkeypatch.undo()
    assert _push(sft, pool_file, "older", "--select", "random", "--budget", "4") == 0
    assert "4 prompts of the pool chosen by random" in capsys.readouterr().out
    records = _records("older")
    assert len(records) == 4
    assert sorted(bool(r["metadata"].get("selection")) for r in records) == [False, True, True, True]
