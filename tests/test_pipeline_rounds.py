"""`align pipeline` with `rounds: 2` (cli/pipeline.py) on tiny random-init models and the REAL Argilla server.

The setup is tests/test_eval_pipeline.py's `pipe` (stage YAMLs sized to seconds, a simulated annotator ranking by the
gold `shorter`), with dpo off to save time. The tests run in file order on one pipeline: bad round settings fail
before anything runs; two rounds register the round lineage (round 2 ranks completions of round 1's PPO policy, its
reward model trains on the rankings of both rounds, the eval compares both rounds' policies with SFT); a re-run skips
both rounds; a round whose rankings all tie stops with one line.

Runs go through `align.cli.main.main` in-process with the test's cwd and the server's ALIGN_HOME.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests import tiny_models

PIPELINE = "rounds"


def _main(*args: str) -> int:
    from align.cli.main import main

    return main(list(args))


def _write_yaml(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _letters(rng: random.Random, k: int, alphabet: str = "abcdef") -> str:
    return " ".join(rng.choices(alphabet, k=k))


@pytest.fixture(scope="module")
def rounds_pipe(argilla_server, tmp_path_factory, tiny_llama):
    """The stage YAMLs (each a few seconds) and a two-round pipeline YAML pointing at them (relative to the cwd)."""
    home = tmp_path_factory.mktemp("rounds")
    rng = random.Random(5)
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
        "training": {**fast, "max_steps": 8, "per_device_train_batch_size": 6}})
    tiny_models.write_jsonl(home / "ppo_prompts.jsonl", [{"prompt": p} for p in prompts])
    _write_yaml(home / "ppo.yaml", {
        "model": {"path": "sft:latest"}, "reward": {"path": "reward:latest"},
        "data": {"path": str(home / "ppo_prompts.jsonl")}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "rollout": {"max_new_tokens": 8, "max_prompt_length": 64},
        "ppo": {"steps": 1, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 5e-3,
                "logging_steps": 1, "sample_steps": 0, "save_steps": 1000}})
    _write_yaml(home / "dpo.yaml", {"model": {"path": "sft:latest"}, "data": preference_data})
    tiny_models.write_jsonl(home / "eval_prompts.jsonl", [{"prompt": f"reverse: {_letters(rng, 3)}"}
                                                          for _ in range(12)])
    # Sampled, so that the policies' responses differ and the gold ranks pairs of them (greedy tiny models often
    # answer alike).
    _write_yaml(home / "eval.yaml", {
        "models": ["sft:latest"], "baseline": "sft:latest", "prompts": {"path": str(home / "eval_prompts.jsonl")},
        "benchmarks": [], "generation": {"max_new_tokens": 8, "batch_size": 12, "temperature": 1.0},
        "samples_in_report": 2})
    pipeline = {
        "name": PIPELINE,
        "rounds": 2,
        "sft": {"config": "sft.yaml"},
        "label": {"prompts": "label_prompts.txt", "k": 3, "max_new_tokens": 8, "batch_size": 12, "temperature": 0.8,
                  "annotators": "simulated", "gold": "shorter"},
        "reward": {"config": "reward.yaml"},
        "ppo": {"config": "ppo.yaml"},
        "dpo": {"config": "dpo.yaml", "enabled": False},
        "eval": {"config": "eval.yaml"},
    }
    _write_yaml(home / "pipeline.yaml", pipeline)
    return SimpleNamespace(home=home, server=argilla_server, prompts=prompts, pipeline=pipeline)


@pytest.fixture
def in_pipe(rounds_pipe, monkeypatch):
    from align.reporting import console

    monkeypatch.chdir(rounds_pipe.home)
    monkeypatch.setattr(console, "width", 400)  # one line per table row, so the tests can match it
    with rounds_pipe.server.applied():  # the session server's home; no external Argilla
        yield rounds_pipe


def _pipeline(capsys, *args: str) -> SimpleNamespace:
    capsys.readouterr()
    code = _main("pipeline", *args)
    out, err = capsys.readouterr()
    how = {}  # {"label (round 2)": "ran", ...} from the closing table
    for line in out.splitlines():
        match = re.search(r"\b((?:sft|label|reward|ppo|dpo|eval)(?: \(round \d+\))?)\s*\S?\s*\w+:\d+ "
                          r"\((ran|resumed|skipped: finished before), [\d.]+ min\)", line)
        if match:
            how[match.group(1)] = match.group(2)
    return SimpleNamespace(code=code, out=out, err=err, how=how)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")
             and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _rows() -> list:
    """This pipeline's registry rows, oldest first."""
    from align.registry import Registry

    return [a for a in reversed(Registry().list()) if a.name.startswith(f"{PIPELINE}-")]


@pytest.mark.parametrize("changes, at, message", [
    ({"rounds": 0}, "rounds:", "rounds: must be at least 1, got 0"),
    ({"rounds": "two"}, "rounds:", "rounds: expected an integer"),
    ({"round_policy": "dpo"}, "round_policy:", "round_policy: dpo samples the next round's completions, but "
                                               "dpo.enabled is false"),
    ({"label": {"budget": 4}}, "  budget:", "label.budget needs label.select too"),
])
def test_rounds_bad_settings_fail_at_their_line_before_anything_runs(in_pipe, capsys, changes, at, message):
    config = {**in_pipe.pipeline, **changes}
    if "label" in changes:
        config["label"] = {**in_pipe.pipeline["label"], **changes["label"]}
    path = in_pipe.home / "bad.yaml"
    _write_yaml(path, config)
    line = next(n for n, row in enumerate(path.read_text().splitlines(), 1) if row.startswith(at))
    result = _pipeline(capsys, "--config", "bad.yaml")
    assert result.code == 2
    err = _error_line(result.err)
    assert f"bad.yaml:{line}" in err and message in err, err
    assert _rows() == [] and not (in_pipe.home / "runs").exists()


def test_two_rounds_register_the_round_lineage(in_pipe, capsys):
    from align.registry import Registry

    result = _pipeline(capsys, "--config", "pipeline.yaml")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how == {step: "ran" for step in ("sft", "label", "reward", "ppo", "label (round 2)",
                                                    "reward (round 2)", "ppo (round 2)", "eval")}, result.how
    rows = {a.name: a for a in _rows()}
    sft, reward1, ppo1 = rows[f"{PIPELINE}-sft"], rows[f"{PIPELINE}-reward"], rows[f"{PIPELINE}-ppo"]
    reward2, ppo2 = (rows[f"{PIPELINE}-round2-{step}"] for step in ("reward", "ppo"))
    evaluation = rows[f"{PIPELINE}-eval"]
    label1, = (a for name, a in rows.items() if name.startswith(f"{PIPELINE}-rankings-sft"))
    label2, = (a for name, a in rows.items() if name.startswith(f"{PIPELINE}-round2-rankings-ppo"))
    both = rows[f"{PIPELINE}-rankings-rounds-1-2"]

    # Round 1 ranks the SFT model's completions; round 2 those of round 1's PPO policy, in a dataset of its own.
    assert label1.parents == [sft.id] and label2.parents == [ppo1.id]
    assert label2.name == f"{PIPELINE}-round2-rankings-{ppo1.stage}{ppo1.version}-" + label1.name.rsplit("-", 1)[1]
    assert label2.metrics["ranked_records"] == len(in_pipe.prompts) and label2.metrics["pairs"] > 0
    # Round 2's reward model: from the SFT model again, on the pairs of both rounds (one file, both as parents).
    assert both.parents == [label1.id, label2.id] and both.kind == "dataset"
    assert both.metrics["pairs"] == label1.metrics["pairs"] + label2.metrics["pairs"]
    assert reward1.config["data"]["path"] == label1.ref and reward2.config["data"]["path"] == both.ref
    assert set(reward2.parents) == {sft.id, both.id} and reward2.config["model"]["path"] == sft.ref
    # Round 2's policy starts from SFT (policy_from: sft, the KL reference) against round 2's reward model.
    assert ppo2.config["model"]["path"] == sft.ref and ppo2.config["reward"]["path"] == reward2.ref
    assert set(ppo2.parents) >= {sft.id, reward2.id}
    # One eval after the last round, with both rounds' policies, judged by the last reward model.
    assert evaluation.config["models"] == [ppo1.ref, ppo2.ref] and evaluation.config["judge"]["path"] == reward2.ref
    # The report compares the rounds' reward models against the gold, on the same gold-ranked pairs.
    assert evaluation.config["reward_models"] == [reward1.ref, reward2.ref]
    assert evaluation.metrics["judge/gold_pairs"] > 0, evaluation.metrics
    assert {f"{r.ref}/gold_pair_accuracy" for r in (reward1, reward2)} <= set(evaluation.metrics)
    report = (Path(evaluation.path) / "report.md").read_text()
    section = report.split("## Reward models against the gold")[1].split("##")[0]
    assert f"| {reward1.ref} | {reward1.name} | {reward1.metrics['train_pairs']} |" in section, section
    assert f"| {reward2.ref} | {reward2.name} | {reward2.metrics['train_pairs']} |" in section, section
    assert [a.id for a in _rows()][-1] == evaluation.id

    # The lineage of round 2's policy: both rounds, as a tree.
    walked = Registry().lineage(ppo2.ref)
    assert {label1.id, label2.id, ppo1.id, reward1.id, reward2.id, both.id} <= {a.id for _, a in walked}
    capsys.readouterr()
    assert _main("registry", "lineage", ppo2.ref) == 0
    tree = capsys.readouterr().out
    for artifact in (ppo2, reward2, both, label1, label2, ppo1, reward1, sft):
        assert artifact.ref in tree, artifact.ref
    assert tree.index(label2.ref) < tree.index(ppo1.ref) < tree.index(reward1.ref), tree  # label2 <- ppo1 <- reward1


def test_rerun_skips_both_rounds(in_pipe, capsys):
    before = _rows()
    result = _pipeline(capsys, "--config", "pipeline.yaml")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert len(result.how) == 8 and set(result.how.values()) == {"skipped: finished before"}, result.how
    assert _rows() == before, "no new registry rows"


def test_a_round_whose_rankings_all_tie_stops_with_one_line(in_pipe, capsys):
    """Gold scores within the tie margin rank as ties: every completion ties, no pair to train on."""
    before = len(_rows())
    result = _pipeline(capsys, "--config", "pipeline.yaml", "rounds=1", "label.gold_tie_margin=1000",
                       "reward.enabled=false", "ppo.enabled=false", "eval.enabled=false")
    assert result.code == 2, result.out[-3000:]
    err = _error_line(result.err)
    assert err.startswith("error: pipeline step 'label' failed: ") and "every ranking ties its completions" in err
    assert "no preference pairs to train on" in err, err
    assert len(_rows()) == before + 1, "the tied rankings are registered (a re-run says the same, without ranking)"


def test_policy_from_previous_continues_round_one_policy(in_pipe, capsys):
    """Only round 2's policy step changes: it starts from round 1's PPO policy (its KL reference too)."""
    rows = {a.name: a for a in _rows()}
    result = _pipeline(capsys, "--config", "pipeline.yaml", "policy_from=previous", "eval.enabled=false")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how == {**{step: "skipped: finished before" for step in (
        "sft", "label", "reward", "ppo", "label (round 2)", "reward (round 2)")}, "ppo (round 2)": "ran"}, result.how
    continued = _rows()[-1]
    assert continued.name == f"{PIPELINE}-round2-ppo" and continued.id != rows[continued.name].id
    assert continued.config["model"]["path"] == rows[f"{PIPELINE}-ppo"].ref
    assert continued.config["reward"]["path"] == rows[f"{PIPELINE}-round2-reward"].ref
    assert rows[f"{PIPELINE}-ppo"].id in continued.parents


def test_selection_spends_a_budget_per_round_by_the_previous_reward_model(in_pipe, capsys):
    """`label.select: uncertainty`: round 1 has no reward model yet (diversity, and it says so); round 2 asks round
    1's reward model which of the pool's prompts it can least tell the completions of apart."""
    before = len(_rows())
    result = _pipeline(capsys, "--config", "pipeline.yaml", "label.select=uncertainty", "label.budget=8",
                       "eval.enabled=false")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how["sft"] == "skipped: finished before" and result.how["label (round 2)"] == "ran", result.how
    text = " ".join(result.out.split())
    assert "no reward model yet: 'uncertainty' falls back to 'diversity'" in text
    assert "8 prompts of the pool chosen by diversity" in text and "8 prompts of the pool chosen by uncertainty" in text
    labels = [a for a in _rows()[before:] if "-rankings-" in a.name and "-rankings-rounds-" not in a.name]
    assert [a.metrics["ranked_records"] for a in labels] == [8, 8]


def test_reward_from_previous_trains_round_one_reward_model_further(in_pipe, capsys):
    """`reward_from: previous`: round 2's reward model continues round 1's, on the rankings of both rounds, even where
    the reward step's own overrides name a backbone (`model.path`: where round 1 starts)."""
    from align.registry import Registry

    sft = next(a for a in _rows() if a.name == f"{PIPELINE}-sft")
    before = len(_rows())
    result = _pipeline(capsys, "--config", "pipeline.yaml", "reward_from=previous", "eval.enabled=false",
                       f"reward.overrides=[model.path={sft.ref}]")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how["reward"] == "skipped: finished before" and result.how["reward (round 2)"] == "ran", result.how
    continued = next(a for a in _rows()[before:] if a.name == f"{PIPELINE}-round2-reward")
    reward1 = Registry().resolve(continued.config["model"]["path"])
    assert reward1.name == f"{PIPELINE}-reward" and reward1.id in continued.parents
    assert Registry().resolve(continued.config["data"]["path"]).name == f"{PIPELINE}-rankings-rounds-1-2"
    assert "its LoRA adapter + score head, trained further" in " ".join(result.out.split())


def test_people_rank_each_round_while_the_pipeline_waits_with_a_clear_status(in_pipe, capsys, monkeypatch):
    """`label.annotators: human`: every round waits for people in Argilla and says where to follow their progress;
    past `wait_timeout_s` it stops in one line saying how far they got. Once round 1 is ranked, the same command
    goes on (reward model, policy) to round 2 and waits there."""
    from align.cli import pipeline
    from align.labeling import rankings

    monkeypatch.setattr(pipeline, "POLL_S", 0.2)
    before = len(_rows())
    wanted = len(in_pipe.prompts)
    args = ("--config", "pipeline.yaml", "label.annotators=human", "label.wait_timeout_s=1", "eval.enabled=false")
    first = _pipeline(capsys, *args)
    assert first.code == 2, first.out[-3000:] + first.err[-3000:]
    assert f"error: pipeline step 'label' failed: label: 0 of {wanted} records ranked after 1 s; run the pipeline " \
           f"again to keep waiting" in _error_line(first.err)
    text = " ".join(first.out.split())
    dataset = re.search(rf"waiting for annotators to rank {wanted} records of '([^']+)' in Argilla", text).group(1)
    assert f"align label status --dataset {dataset}" in text
    assert len(_rows()) == before, "nothing registered while people have not ranked"

    rankings.simulate(dataset, 1, "shorter")  # someone ranks round 1 (the round-2 wait below is what is tested)
    second = _pipeline(capsys, *args)
    assert second.code == 2, second.out[-3000:] + second.err[-3000:]
    assert f"error: pipeline step 'label (round 2)' failed: label (round 2): 0 of {wanted} records ranked after 1 s" \
           in _error_line(second.err)
    text = " ".join(second.out.split())
    assert f"waiting for annotators to rank {wanted} records of '{PIPELINE}-round2-rankings-ppo" in text
    made = {a.name.split("-rankings-")[0] if "-rankings-" in a.name else a.name for a in _rows()[before:]}
    assert made == {PIPELINE, f"{PIPELINE}-reward", f"{PIPELINE}-ppo"}, made  # round 1's label, reward, ppo


def test_disagreement_asks_every_earlier_round_and_says_when_there_is_one(in_pipe, capsys):
    """`label.select: disagreement`: a committee of the earlier rounds' reward models; round 1 has none (diversity),
    round 2 one (its uncertainty), each said."""
    result = _pipeline(capsys, "--config", "pipeline.yaml", "label.select=disagreement", "label.budget=6",
                       "eval.enabled=false")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    text = " ".join(result.out.split())
    assert "no reward model yet: 'disagreement' falls back to 'diversity'" in text
    reward1 = next(a for a in reversed(_rows()) if a.name == f"{PIPELINE}-reward")
    assert f"one reward model so far ({reward1.ref}): 'disagreement' asks a committee of two or more" in text
    assert "6 prompts of the pool chosen by diversity" in text and "6 prompts of the pool chosen by uncertainty" in text


def test_round_mix_ranks_policy_and_sft_completions_together(in_pipe, capsys):
    """`round_mix: 1`: one of round 2's K=3 completions per prompt is the SFT model's; round 1 is unchanged."""
    from align.registry import Registry

    sft = next(a for a in _rows() if a.name == f"{PIPELINE}-sft")
    result = _pipeline(capsys, "--config", "pipeline.yaml", "round_mix=1", "eval.enabled=false")
    assert result.code == 0, result.out[-3000:] + result.err[-3000:]
    assert result.how["label"] == "skipped: finished before" and result.how["label (round 2)"] == "ran", result.how
    label2 = next(a for a in reversed(_rows()) if a.name.startswith(f"{PIPELINE}-round2-rankings-"))
    policy = Registry().resolve(label2.config["model"])
    assert policy.name == f"{PIPELINE}-ppo" and label2.parents == [policy.id, sft.id]
    assert label2.config["mix"] == {"model": sft.ref, "k": 1}
    bad = _pipeline(capsys, "--config", "pipeline.yaml", "round_mix=3")
    assert bad.code == 2 and "round_mix: 3 of label.k: 3 completions from the SFT model leaves none for the " \
                               "policy" in _error_line(bad.err)
