"""The `align ppo` package's registry row (stages/ppo/common.publish_policy, on align.run.publish_model): every run
of the `ppo` stage records its algorithm, and `align registry list` / `registry show` show a GRPO or RLOO row as such
(`ppo:1 (grpo)`), so that `ppo:latest` is never a GRPO model without a sign of it. Registered from a stand-in run
folder: no model is trained.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def _register(home, name: str, algorithm: str):
    from align.config import ModelConfig, to_dict
    from align.run import start_run
    from align.stages.ppo.common import publish_policy
    from align.stages.ppo.config import PPORunConfig, PromptDataConfig, RewardModelConfig

    cfg = PPORunConfig(model=ModelConfig(path="sft:1"), reward=RewardModelConfig(path="reward:1"),
                       data=PromptDataConfig(path="prompts.jsonl"), algorithm=algorithm)
    job = start_run("ppo", cfg.output, name)
    job.folder.create()
    (job.work / "adapter_model.safetensors").write_bytes(b"")
    return publish_policy(job, cfg, SimpleNamespace(artifact=None), "base-model", ["a prompt"], to_dict(cfg),
                          {"reward_last": 0.5}, [], [])


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    return tmp_path


def test_grpo_and_rloo_rows_show_their_algorithm_beside_the_stage(home, capsys):
    from align.cli.main import main

    ppo = _register(home, "plain", "ppo")
    grpo = _register(home, "grouped", "grpo")
    rloo = _register(home, "left-out", "rloo")
    assert (ppo.ref, grpo.ref, rloo.ref) == ("ppo:1", "ppo:2", "ppo:3"), "one stage, one version sequence"
    assert [a.metrics["algorithm"] for a in (ppo, grpo, rloo)] == ["ppo", "grpo", "rloo"]
    assert (ppo.algorithm, grpo.algorithm, rloo.algorithm) == (None, "grpo", "rloo"), "ppo is the stage's own"

    capsys.readouterr()
    assert main(["registry", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ppo:2 (grpo)" in listed and "ppo:3 (rloo)" in listed, listed
    assert "ppo:1 " in listed and "(ppo)" not in listed, listed

    assert main(["registry", "show", "ppo:latest"]) == 0
    shown = capsys.readouterr().out
    assert any(line.split() == ["stage", "ppo", "(rloo)"] for line in shown.splitlines()), shown
    assert main(["registry", "show", "ppo:1"]) == 0
    assert any(line.split() == ["stage", "ppo"] for line in capsys.readouterr().out.splitlines())
