"""`align dpo` on tiny random-init models: a learnable preference raises the held-out implicit-reward accuracy, the
reference is the SFT model (the policy with its fresh adapter disabled: one copy of the weights; a frozen copy under
full fine-tuning), the artifact reloads with plain peft and prompts as in SFT, the registry row names the SFT model
and the preference dataset as parents, a killed run resumes, 2 CPU processes write one artifact, and bad input ends
with one line and exit code 2 before anything is written.

The preference (tests/test_reward.py's marker pairs): every chosen response contains the letter `z`, no rejected one
does (same length). One module-scoped run trains on it (policy: an SFT LoRA adapter from the registry, merged into
its base; data: a registered `label` dataset shaped like `align label pull` output); several tests read that run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from tests.test_reward import _config, _fake_sft_artifact, _main, marker_pairs
from tests.tiny_models import write_jsonl


def _wide_console(mp: pytest.MonkeyPatch) -> None:
    """Summary rows unwrapped. A console of its own: COLUMNS is not enough, rich reads it once when the console is
    made if it is set then (pytest-xdist workers set COLUMNS=80)."""
    from rich.console import Console

    mp.setattr("align.reporting.console", Console(highlight=False, width=200))


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Few steps, short sequences, no checkpoints, no progress bars. LoRA at lr 3e-3: held-out accuracy 0.98 after 20
# steps, 1.0 after 40 (beta 0.1).
FAST = dict(max_steps=40, learning_rate=3e-3, per_device_train_batch_size=8, max_length=64, logging_steps=5,
            eval_strategy="steps", eval_steps=20, save_strategy="no", disable_tqdm=True, beta=0.1)


def _capturing(monkeypatch, trainers: list, callback=None):
    """Keep every trainer `align dpo` makes (and add `callback` to it)."""
    from align.stages import dpo

    make = dpo._make_trainer

    def capture(*args, **kwargs):
        trainer = make(*args, **kwargs)
        if callback is not None:
            trainer.add_callback(callback)
        trainers.append(trainer)
        return trainer

    monkeypatch.setattr(dpo, "_make_trainer", capture)


# --------------------------------------------------------------------------------------------------
# One DPO run on the SFT adapter and a registered preference dataset; the tests below read it.

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    from align.registry import Registry

    home = tmp_path_factory.mktemp("dpo_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("ALIGN_HOME", str(home / ".align"))
        _wide_console(mp)
        sft = _fake_sft_artifact(home / "runs" / "sft" / "fake-sft", tiny_llama)
        rows = marker_pairs(80)
        label = Registry().add(stage="label", name="marker", kind="dataset",
                               path=write_jsonl(home / "pairs.jsonl", rows))
        trainers = []
        _capturing(mp, trainers)
        config = _config(home, "marker", "sft:latest", "label:latest", data={"val_set_size": 0.25},
                         lora={"r": 16, "alpha": 32, "dropout": 0.0}, training=FAST)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            assert _main("dpo", "--config", config) == 0
        yield SimpleNamespace(home=home, out=home / "runs" / "dpo" / "marker", row=Registry().resolve("dpo:1"),
                              sft=sft, label=label, trainer=trainers[0], output=output.getvalue(), base=tiny_llama)


def test_learns_the_preference_and_registers_with_lineage(trained):
    row, out = trained.row, trained.out
    m = row.metrics
    # The policy starts as the reference: every implicit reward is exactly 0 (TRL counts the ties as wrong).
    assert m["eval_reward_accuracy_before"] == 0 and m["eval_reward_margin_before"] == 0, m
    assert m["eval_reward_accuracy"] >= 0.9 and m["eval_reward_accuracy"] > m["eval_reward_accuracy_before"], m
    assert m["eval_reward_margin"] > 0.1 and m["eval_loss"] < m["eval_loss_before"] - 0.1, m
    assert m["train_pairs"] + m["eval_pairs"] == 240 and m["dropped_ties"] == 80 and m["steps"] == 40
    assert m["train_loss"] < 0.69 and m["train_runtime_s"] > 0
    assert row.parents == [trained.sft.id, trained.label.id], "the SFT model and the preference dataset"

    adapter = json.loads((out / "adapter_config.json").read_text())
    merged = Path(adapter["base_model_name_or_path"])
    assert adapter["task_type"] == "CAUSAL_LM" and row.base_model == str(merged)
    assert merged.parent == trained.home / ".align" / "models" and (merged / "config.json").is_file(), \
        "the SFT adapter was merged once into a plain folder the DPO adapter loads onto"
    for name in ("adapter_model.safetensors", "tokenizer.json", "README.md", "align_config.yaml",
                 "training_log.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "ref").exists() and not (out / "checkpoints").exists()
    for plot in ("loss.png", "rewards.png"):
        data = (out / "plots" / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot
    card = (out / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "apply_chat_template" in card and "eval_reward_accuracy" in card
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["eval_rewards/accuracies"] == 0, "the metrics before training start the log"
    summary = trained.output
    assert "held-out reward accuracy" in summary and f"0.000 -> {m['eval_reward_accuracy']:.3f}" in summary


def test_reference_is_the_sft_model_with_the_adapter_disabled_one_copy(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trainer = trained.trainer
    policy = trainer.model
    assert trainer.ref_model is None and list(policy.peft_config) == ["default"], "no reference model, no ref adapter"
    assert "the policy with its LoRA adapter disabled (1 copy of the base weights)" in trained.output
    # One copy of the base weights: besides the new LoRA, the policy holds exactly the merged SFT model's parameters.
    merged = AutoModelForCausalLM.from_pretrained(trained.row.base_model).eval()
    assert sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n) == \
        sum(p.numel() for p in merged.parameters())
    # The reference the loss used (adapter disabled) is the SFT model: its base with the SFT adapter.
    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained.base), str(trained.sft.path)).eval()
    ids = torch.tensor([[1, 60, 61, 62, 63, 64, 65, 2]])
    policy.eval()
    with torch.no_grad():
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
        trained_logits = policy(input_ids=ids).logits
        torch.testing.assert_close(reference, sft(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference, trained_logits, atol=1e-4), "the trained adapter changes the policy"


def _completion_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log p(response | prompt), the prompt in the chat template with the assistant turn opened (as in training)."""
    messages = [{"role": "user", "content": prompt}]
    opened = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    start = len(tokenizer(opened, add_special_tokens=False)["input_ids"])
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[start - 1:].sum().item()


def test_artifact_reloads_with_plain_peft_and_ranks_held_out_pairs(trained, monkeypatch):
    """The card's recipe (AutoPeftModelForCausalLM) gives the trained policy; with its adapter disabled as the
    reference, its implicit rewards rank unseen prompts' pairs as the preference does."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    from align.data import read_preferences, read_records, split_by_prompt

    monkeypatch.chdir(trained.home)
    monkeypatch.setenv("ALIGN_HOME", str(trained.home / ".align"))
    model = AutoPeftModelForCausalLM.from_pretrained(str(trained.out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(trained.out))
    ids = torch.tensor([[1, 70, 71, 72, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained.trainer.model.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)
    _, held_out = split_by_prompt(read_preferences(read_records(str(trained.label.path))).pairs, 0.25, 42)
    wins = []
    for pair in held_out[:16]:
        rewards = []
        for response in (pair["chosen"], pair["rejected"]):
            logp = _completion_logp(model, tokenizer, pair["prompt"], response)
            with model.disable_adapter():
                rewards.append(logp - _completion_logp(model, tokenizer, pair["prompt"], response))
        wins.append(rewards[0] > rewards[1])
    assert sum(wins) / len(wins) >= 0.9, wins
    assert "name: chat" in (trained.out / "align_config.yaml").read_text(), "the resolved template, for generate"


# --------------------------------------------------------------------------------------------------
# Full fine-tuning, templates, resume, DDP

def test_full_finetuning_keeps_a_separate_frozen_reference(tmp_path, monkeypatch, tiny_llama):
    from transformers import AutoModelForCausalLM

    from align.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    _wide_console(monkeypatch)
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(12, seed=2))
    trainers = []
    _capturing(monkeypatch, trainers)
    config = _config(tmp_path, "full", tiny_llama, data, lora={"enabled": False},
                     training={**FAST, "max_steps": 3, "learning_rate": 1e-3, "eval_strategy": "no",
                               "loss_type": "ipo"})
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert _main("dpo", "--config", config) == 0
    assert "a separate frozen copy (full fine-tuning: 2 copies of the weights)" in output.getvalue()
    assert "ipo (beta 0.1)" in output.getvalue()
    trainer = trainers[0]
    assert trainer.args.loss_type == ["ipo"]
    reference, policy = trainer.ref_model, trainer.model
    assert reference is not None and reference is not policy
    assert not any(p.requires_grad for p in reference.parameters())
    original = dict(AutoModelForCausalLM.from_pretrained(tiny_llama).named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in reference.named_parameters()), "the reference stays frozen"
    assert any(not torch.equal(p, original[n]) for n, p in policy.named_parameters()), "the policy trained"
    row = Registry().resolve("dpo:latest")
    assert row.parents == [] and row.metrics["steps"] == 3 and "eval_reward_accuracy" in row.metrics
    assert (Path(row.path) / "model.safetensors").is_file() and not (Path(row.path) / "adapter_config.json").exists()


@pytest.mark.parametrize("setup", [
    {"lora": {"r": 8, "dropout": 0.0}, "training": {"label_smoothing": 0.2}},
    {"lora": {"enabled": False}, "training": {}},
], ids=["lora-label-smoothing", "full"])
def test_metrics_before_training_are_what_trl_measures_at_the_start(setup, tmp_path, monkeypatch, tiny_llama):
    """A policy that starts as its reference: the held-out metrics before training are written without a pass over
    the held-out pairs, and they are what TRL measures on the trainer as made (its policy at the start)."""
    from align.registry import Registry
    from align.stages import dpo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    measured, make = [], dpo._make_trainer

    def make_and_measure(*args, **kwargs):
        trainer = make(*args, **kwargs)
        measured.append(trainer.evaluate())
        return trainer

    monkeypatch.setattr(dpo, "_make_trainer", make_and_measure)
    evaluations = []
    monkeypatch.setattr(dpo, "evaluate_at_start", lambda *a: evaluations.append(a) or {})
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(24, seed=4))
    config = _config(tmp_path, "start", tiny_llama, data, data={"val_set_size": 0.25}, lora=setup["lora"],
                     training={**FAST, "max_steps": 2, "eval_strategy": "no", **setup["training"]})
    assert _main("dpo", "--config", config) == 0
    m, start = Registry().resolve("dpo:latest").metrics, measured[0]
    assert not evaluations, "no pass over the held-out pairs before training"
    assert m["eval_loss_before"] == pytest.approx(start["eval_loss"], abs=1e-6)
    assert m["eval_reward_accuracy_before"] == start["eval_rewards/accuracies"] == 0
    assert m["eval_reward_margin_before"] == start["eval_rewards/margins"] == 0


def test_metrics_before_training_are_measured_where_the_loss_at_the_start_differs():
    """IPO's loss at zero log-ratios is not ln 2, and a DoRA start equals its base only up to rounding: measured."""
    from align.stages import dpo

    trainer = SimpleNamespace(aux_loss_enabled=False)
    cfg = SimpleNamespace(lora=SimpleNamespace(use_dora=False))
    args = SimpleNamespace(loss_type=["sigmoid"], use_weighting=False, loss_weights=[0.5])
    assert dpo._metrics_at_reference(args, cfg, trainer)["eval_loss"] == pytest.approx(0.5 * 0.693147, abs=1e-6)
    assert dpo._metrics_at_reference(SimpleNamespace(**{**vars(args), "loss_type": ["ipo"]}), cfg, trainer) is None
    assert dpo._metrics_at_reference(SimpleNamespace(**{**vars(args), "loss_type": ["sigmoid", "sft"]}), cfg,
                                     trainer) is None
    assert dpo._metrics_at_reference(args, SimpleNamespace(lora=SimpleNamespace(use_dora=True)), trainer) is None


def test_named_reference_is_a_separate_frozen_model(tmp_path, monkeypatch, tiny_llama):
    """`reference: sft:latest` with a plain policy: the SFT adapter merged and loaded as a frozen model of its own,
    and a parent of the DPO artifact."""
    from transformers import AutoModelForCausalLM

    from align.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    _wide_console(monkeypatch)
    sft = _fake_sft_artifact(tmp_path / "runs" / "sft" / "fake-sft", tiny_llama)
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(12, seed=4))
    trainers = []
    _capturing(monkeypatch, trainers)
    config = _config(tmp_path, "named", tiny_llama, data, lora={"r": 8}, data={"val_set_size": 0.25},
                     training={**FAST, "max_steps": 2, "eval_strategy": "no"})
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert _main("dpo", "--config", config, "reference=sft:latest") == 0
    assert "sft:latest = " in output.getvalue() and ": a separate frozen model" in output.getvalue()
    reference = trainers[0].ref_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    merged = AutoModelForCausalLM.from_pretrained(next((tmp_path / ".align" / "models").iterdir())).eval()
    ids = torch.tensor([[1, 60, 61, 62, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, merged(input_ids=ids).logits)
    row = Registry().resolve("dpo:latest")
    assert row.parents == [sft.id] and row.base_model == tiny_llama
    assert row.metrics["eval_reward_margin_before"] != 0, "the reference is not the starting policy"


def test_prompts_use_the_sft_template(tmp_path):
    """`template: auto` is the template the SFT model was trained with (its align_config.yaml); with `chat`, text
    prompts and responses become turns of the conversation, so TRL renders them with the chat template."""
    import yaml

    from align.config import TemplateConfig
    from align.modeling import ModelSource
    from align.stages import dpo

    pair = {"prompt": "reverse: a b", "chosen": "b a", "rejected": "a b", "group": 0}
    chat = dpo._dpo_rows([pair], TemplateConfig("chat", system="Be brief."))
    assert chat == [{"prompt": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "reverse: a b"}],
                     "chosen": [{"role": "assistant", "content": "b a"}],
                     "rejected": [{"role": "assistant", "content": "a b"}]}]
    conversational = {**pair, "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                         {"role": "user", "content": "reverse: a b"}]}
    assert dpo._dpo_rows([conversational], TemplateConfig("chat"))[0]["prompt"] == conversational["prompt"]
    qa = dpo._dpo_rows([pair], TemplateConfig("question_answer"))
    assert qa == [{"prompt": "### Question:\nreverse: a b\n### Answer:\n", "chosen": "b a", "rejected": "a b"}]

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "align_config.yaml").write_text(yaml.safe_dump({"template": {"name": "question_answer"}}))
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": str(sft)}, "data": {"path": "pairs.jsonl"}}))
    cfg = dpo.load(str(config), [])
    template, note = dpo._template(cfg, ModelSource(str(sft), None))
    assert template.name == "question_answer" and "the one" in note and "trained with" in note
    cfg = dpo.load(str(config), ["template.name=chat"])
    assert dpo._template(cfg, ModelSource(str(sft), None))[0].name == "chat", "an explicit template wins"


def test_loss_types_are_the_ones_trl_implements():
    import re

    from trl import DPOConfig

    from align.stages.dpo_config import LossType

    documented = set(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert set(typing.get_args(LossType)) == documented


class _StopAt(TrainerCallback):
    """Records the steps done; stops the run (as a kill would) when `step` ends."""

    def __init__(self, step: int | None = None, seen: list | None = None):
        self.step, self.seen = step, seen if seen is not None else []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch, tiny_llama, capsys):
    from align.artifacts import RunDir
    from align.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(16, seed=3))
    config = _config(tmp_path, "resumable", tiny_llama, data, lora={"r": 8, "dropout": 0.0},
                     training={**FAST, "max_steps": 6, "eval_strategy": "no", "save_strategy": "steps",
                               "save_steps": 2, "per_device_train_batch_size": 4,
                               "loss_type": "ipo"})  # measured before training (not known as sigmoid's is)
    final = tmp_path / "runs" / "dpo" / "resumable"
    with monkeypatch.context() as mp:
        _capturing(mp, [], _StopAt(step=3))
        assert _main("dpo", "--config", config) == 130
    work = RunDir(final).work
    assert not final.exists() and RunDir(final).last_checkpoint().endswith("checkpoint-2")
    before = json.loads((work / "eval_before.json").read_text())
    assert Registry().list() == []

    assert _main("dpo", "--config", config) == 2 and "--resume" in capsys.readouterr().err
    steps = []
    with monkeypatch.context() as mp:
        _capturing(mp, [], _StopAt(seen=steps))
        assert _main("dpo", "--config", config, "--resume") == 0
    assert steps == [3, 4, 5, 6], "only the steps after checkpoint-2"
    row = Registry().resolve("dpo:latest")
    assert row.metrics["steps"] == 6 and row.metrics["eval_reward_accuracy_before"] == before["eval_rewards/accuracies"]
    assert final.is_dir() and not work.exists()


def test_ddp_two_processes_merge_once_and_write_one_artifact(tmp_path, monkeypatch, tiny_llama):
    """torchrun, 2 CPU processes over gloo: the SFT adapter is merged by one process while the other waits, and only
    rank 0 writes and registers."""
    from align.registry import Registry

    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    sft = _fake_sft_artifact(tmp_path / "runs" / "sft" / "fake-sft", tiny_llama)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(40, seed=6))
    config = _config(tmp_path, "ddp", "sft:latest", data, lora={"r": 8, "dropout": 0.0},
                     training={**FAST, "max_steps": 8, "eval_steps": 4, "per_device_train_batch_size": 4})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "align", "dpo", "--config", config]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = Registry(tmp_path / ".align").list(stage="dpo")
    assert len(rows) == 1 and rows[0].metrics["steps"] == 8 and rows[0].parents == [sft.id]
    assert [p.name for p in (tmp_path / "runs" / "dpo").iterdir()] == ["ddp"]
    assert len(list((tmp_path / ".align" / "models").iterdir())) == 1, "one merged folder"
    assert rows[0].metrics["eval_reward_accuracy"] > rows[0].metrics["eval_reward_accuracy_before"]
    assert done.stdout.count("align dpo: ddp") == 1, "one summary, from rank 0"


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written (no output folder, no dpo registry row). All but TRL's own checks
# of loss settings (made with the trainer, after the model loads) fail before any model loads: stderr is that line.

GOOD = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
BAD_INPUTS = {
    "too_few_pairs": (GOOD[:5], {}, [], "only 5 usable preference pairs (from 5 records; 0 ties and 0 identical "
                                        "pairs dropped); data.min_pairs is 8"),
    "reference_not_in_registry": (GOOD, {}, ["reference=sft:7"], "reference: registry: no artifact 'sft:7'"),
    "reference_folder_missing": (GOOD, {}, ["reference=./no-such-model"], "reference: folder not found: "),
    "reference_with_another_tokenizer": (GOOD, {}, ["reference=other"],
                                         "reference: other has a different tokenizer from the policy (514 vs 512 "
                                         "tokens, 2 different)"),
    "reward_model_as_policy": (GOOD, {"model": "reward:latest"}, [],
                               "model.path: reward:latest (reward:1) is a reward model (align reward); align dpo "
                               "needs a causal LM (decoder-only)"),
    "loss_type_typo": (GOOD, {"training": {"loss_type": "sigmod"}}, [],
                       "bad.yaml:7: training.loss_type: expected one of 'sigmoid', 'hinge', 'ipo'"),
    "loss_type_typo_in_a_list": (GOOD, {"training": {"loss_type": ["sigmoid", "sft_"]}}, [],
                                 "training.loss_type: 'sft_' is not a loss TRL implements (did you mean 'sft'?)"),
    "exo_pair_without_label_smoothing": (GOOD, {"training": {"loss_type": "exo_pair"}}, [],
                                         "training: Label smoothing must be greater than 0.0 when using 'exo_pair'"),
    "eval_strategy_without_held_out_pairs": (GOOD, {"data": {"val_set_size": 0},
                                                    "training": {"eval_strategy": "steps"}}, [],
                                             "training.eval_strategy / load_best_model_at_end need held-out pairs"),
}
AFTER_LOADING = {"exo_pair_without_label_smoothing"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys, tiny_llama):
    from align.registry import Registry

    rows, sections, overrides, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    reward = tmp_path / "runs" / "reward" / "rm"  # a reward model artifact: a SEQ_CLS adapter
    reward.mkdir(parents=True)
    (reward / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS",
                                                            "base_model_name_or_path": tiny_llama}))
    Registry().add(stage="reward", name="rm", path=reward, base_model=tiny_llama)
    if case == "reference_with_another_tokenizer":  # a model folder (no weights needed) whose vocabulary differs
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        tokenizer.add_tokens(["<new1>", "<new2>"])
        tokenizer.save_pretrained(tmp_path / "other")
        (tmp_path / "other" / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = _config(tmp_path, "bad", sections.get("model", tiny_llama), data,
                     **{k: v for k, v in sections.items() if k not in ("model", "training")},
                     training={"max_steps": 1, **sections.get("training", {})})
    assert _main("dpo", "--config", config, *overrides) == 2
    err = capsys.readouterr().err
    if case in AFTER_LOADING:
        err = err.splitlines(keepends=True)[-1]  # after the model's loading progress bar
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs" / "dpo").exists()
    assert Registry().list(stage="dpo") == []
