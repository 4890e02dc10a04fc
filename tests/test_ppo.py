"""`align ppo` on a tiny Llama: PPO raises the reward while the KL to the SFT model stays bounded, a large KL
coefficient keeps the policy near the reference, the ptx term holds the SFT loss, a killed run resumes to the same
numbers, one base copy serves policy/reference/value/reward, full fine-tuning with a separate reward model, 2-process
DDP, the NaN guard, the artifact, bad input; and the pure pieces (GAE, adaptive KL, response cutting, prompt order)
on constructed tensors.

The setup (module fixture `dev`, ~10 s): an `align sft` FULL fine-tune of the tiny Llama on "reverse: a b c" ->
4 letters drawn from "abcdefz" (so the policy writes short letter sequences, with `z` sometimes), `align reward` on
that SFT model with the marker preference of tests/test_reward.py (chosen responses contain `z`: a LoRA SEQ_CLS
adapter on the SFT folder, held-out accuracy 1.0), and 64 prompts. PPO's job: write more `z`s.

Runs go through `align.cli.main.main` in-process, or a fresh process where one has to die (resume) or several have to
cooperate (torchrun). Measured margins (seeds, values) are next to each threshold.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from align.artifacts import read_json
from tests import tiny_models
from tests.test_reward import marker_pairs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Small and fast: 16 prompts x 12 new tokens per iteration, 4 PPO epochs of 2 minibatches. lr 5e-3 on the LoRA
# policy learns the marker in a few dozen iterations (the config default, 1e-5, is for real models). lr 1e-2 learns
# faster but is on the edge: 1 seed of 8 collapsed (one update with approx_kl ~5 -> near-uniform policy, KL 55, no EOS).
# 60 iterations (~6-10 s): on an Intel Xeon the fixture's SFT and reward models come out differently than on the AMD
# EPYC the thresholds were first measured on, and 30 iterations gained only 0.8-2.7 there.
BASE = {
    "model": {"path": "sft:1"},
    "reward": {"path": "reward:1"},
    "data": {"path": "prompts.jsonl"},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
    "rollout": {"max_new_tokens": 12, "max_prompt_length": 64},
    "ppo": {"steps": 60, "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 4, "learning_rate": 5e-3,
            "kl_coef": 0.05, "logging_steps": 5, "sample_steps": 0, "save_steps": 1000},
}


def _main(*args: str) -> int:
    from align.cli.main import main

    return main(list(args))


def _merge(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in changes.items():
        out.setdefault(section, {}).update(values)
    return out


def _config(home: Path, name: str, **sections) -> str:
    """`<home>/<name>.yaml`: BASE with `sections` merged in, output runs/ppo/<name>."""
    config = _merge(BASE, {"output": {"name": name}, **sections})
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]


def _env(home: Path) -> dict:
    return {**os.environ, "ALIGN_HOME": str(home / ".align"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _error_line(err: str) -> str:
    """The one `error: ...` line of stderr, with nothing else but transformers' weight-loading progress bar."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _ppo_rows() -> list:
    from align.registry import Registry

    return Registry().list("ppo")


# --------------------------------------------------------------------------------------------------
# The setup: SFT (full fine-tune) -> reward model (LoRA on the SFT folder) -> prompts.

@pytest.fixture(scope="module")
def dev(tmp_path_factory, tiny_llama):
    from align.registry import Registry

    home = tmp_path_factory.mktemp("ppo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("ALIGN_HOME", str(home / ".align"))
        rng = random.Random(0)
        sft_rows = [{"prompt": f"reverse: {' '.join(rng.choices('abcdef', k=3))}",
                     "completion": " ".join(rng.choices("abcdefz", k=4))} for _ in range(400)]
        sft_data = tiny_models.write_jsonl(home / "sft.jsonl", sft_rows)
        fast = dict(learning_rate=3e-3, max_length=64, logging_steps=20, save_strategy="no", disable_tqdm=True)
        (home / "sft.yaml").write_text(yaml.safe_dump({
            "model": {"path": tiny_llama}, "data": {"path": sft_data}, "lora": {"enabled": False},
            "training": {**fast, "max_steps": 80, "per_device_train_batch_size": 16}, "output": {"name": "toy-sft"}}))
        assert _main("sft", "--config", str(home / "sft.yaml")) == 0
        label = Registry().add(stage="label", name="marker", kind="dataset",
                               path=tiny_models.write_jsonl(home / "pairs.jsonl", marker_pairs(80)))
        (home / "reward.yaml").write_text(yaml.safe_dump({
            "model": {"path": "sft:1"}, "data": {"path": "label:1", "val_set_size": 0.25},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "training": {**fast, "max_steps": 60, "per_device_train_batch_size": 6}, "output": {"name": "marker"}}))
        assert _main("reward", "--config", str(home / "reward.yaml")) == 0
        reward = Registry().resolve("reward:1")
        assert reward.metrics["eval_accuracy"] >= 0.9, reward.metrics
        prompts = [{"prompt": f"reverse: {' '.join(rng.choices('abcdef', k=3))}"} for _ in range(64)]
        tiny_models.write_jsonl(home / "prompts.jsonl", prompts)
        # ptx data the SFT model has not seen (plain text, loss on every token): room for the ptx term to act.
        # (On the SFT data itself the loss sits near its floor, ~1.38, and PPO without ptx raised it only to
        # 1.56-2.65 in 8 iterations over seeds: too small a gap to test robustly.)
        ptx_data = tiny_models.write_jsonl(home / "ptx.jsonl", tiny_models.toy_text_records(200))
        yield SimpleNamespace(home=home, sft=Registry().resolve("sft:1"), reward=reward, label=label,
                              sft_data=sft_data, ptx_data=ptx_data, sft_folder=Path(Registry().resolve("sft:1").path),
                              prompts=[p["prompt"] for p in prompts], tiny_llama=tiny_llama)


def _run(dev, name: str, *overrides: str, **sections) -> SimpleNamespace:
    assert _main("ppo", "--config", _config(dev.home, name, **sections), *overrides) == 0
    row = _ppo_rows()[0]
    assert row.name == name
    return SimpleNamespace(row=row, m=row.metrics, out=Path(row.path), log=_log(Path(row.path)))


@pytest.fixture(scope="module")
def learn(dev):
    """The main run (seed 42, 60 iterations), LoRA + shared-base reward. Keeps the trainer for in-memory checks."""
    from align.stages.ppo.trainer import PPOTrainer

    trainers = []
    init = PPOTrainer.__init__

    def capture(self, *args, **kwargs):
        init(self, *args, **kwargs)
        trainers.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PPOTrainer, "__init__", capture)
        run = _run(dev, "learn")
    run.trainer = trainers[0]
    return run


@pytest.fixture(scope="module")
def tight(dev):
    """As `learn`, with a KL coefficient 100x larger."""
    return _run(dev, "tight", ppo={"kl_coef": 5.0})


def _ptx_run(dev, name: str, coef: float, **ppo_changes) -> SimpleNamespace:
    """8 iterations with ptx data; records which ptx batches the trainer asked for."""
    from align.stages.ppo.data import PtxData

    asked = []
    batch = PtxData.batch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PtxData, "batch", lambda self, index: asked.append(index) or batch(self, index))
        run = _run(dev, name, ppo={"steps": 8, **ppo_changes}, ptx={"path": dev.ptx_data, "coef": coef})
    run.ptx_indices = asked
    return run


@pytest.fixture(scope="module")
def ptx_on(dev):
    """ptx coef 1, checkpoint at iteration 4: also the uninterrupted reference of the resume test."""
    return _ptx_run(dev, "ptx-on", 1.0, save_steps=4)


@pytest.fixture(scope="module")
def ptx_off(dev):
    return _ptx_run(dev, "ptx-off", 0.0)


# --------------------------------------------------------------------------------------------------
# 1-3. Learning, the KL penalty, ptx.

def test_ppo_raises_the_reward_while_kl_stays_bounded(learn):
    m = learn.m
    # Measured (60 iterations, lr 5e-3, Intel Xeon, value function trained on its top layer of 2): reward_first ->
    # reward_last (kl_last, kl_max):
    #   seed 42: -3.20 -> -0.60 (6.8, 8.7)   seed 1: -3.22 -> -0.79 (10.4, 16.3)   seed 2: -4.61 -> -0.77 (8.1, 16.3)
    #   seed 3:  -2.96 -> +0.42 (8.9, 21.3)
    # and with ppo.value_layers 0 (every layer trained): gains 2.48, 2.01, 4.24, 3.90, reward_last -0.80..+0.74.
    # Gain >= 2.0 everywhere; threshold 1.5. (On an AMD EPYC, 30 iterations gained 3.8-5.8.)
    # The early KL peak is the first updates' overshoot, before the penalty has acted.
    assert m["iterations"] == 60 and m["skipped_steps"] == 0 and m["window"] == 5
    assert m["reward_last"] - m["reward_first"] > 1.5, m
    assert m["reward_last"] > -2.0, m
    assert m["kl_last"] < 25 and m["kl_max"] < 50, m
    log = learn.log
    assert [e["step"] for e in log] == list(range(1, 61))
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-4), "iteration 1 samples from the SFT model itself"
    assert all(math.isfinite(e[k]) for e in log for k in ("reward", "kl", "pg_loss", "vf_loss", "entropy"))
    # The summary is the log's first / last 5 iterations.
    assert m["reward_first"] == pytest.approx(sum(e["reward"] for e in log[:5]) / 5)
    assert m["reward_last"] == pytest.approx(sum(e["reward"] for e in log[-5:]) / 5)
    assert m["kl_max"] == pytest.approx(max(e["kl"] for e in log))
    assert m["episodes"] == 60 * 16


def test_large_kl_coefficient_keeps_the_policy_near_the_reference(learn, tight):
    # Measured kl_last with kl_coef 5 (30 iterations, AMD EPYC): 0.25, 0.11, 0.08, 0.20, 0.23, 0.08 (0.015-0.106
    # with the value adapter trained), against 3.8-14.0 with kl_coef 0.05: ratio <= 0.07; 60 iterations, Intel Xeon,
    # seed 42: 0.145 against 6.8. Its reward barely moves.
    assert tight.m["kl_coef_last"] == 5.0
    assert tight.m["kl_last"] < 1.0, tight.m
    assert tight.m["kl_last"] < 0.2 * learn.m["kl_last"], (tight.m["kl_last"], learn.m["kl_last"])
    assert tight.m["reward_last"] < learn.m["reward_last"]
    # Iteration 1 is identical (the KL is 0 before the first update, so the penalty plays no role yet).
    assert tight.log[0]["reward"] == pytest.approx(learn.log[0]["reward"], abs=1e-5)


def test_ptx_term_lowers_the_ptx_loss(ptx_on, ptx_off):
    # Measured (8 iterations, 200 plain-text examples): ptx_loss first -> last with coef 1 | last with coef 0
    #   seed 42: 3.35 -> 2.27 | 7.99   seed 1: 3.44 -> 2.30 | 5.30   seed 2: 3.44 -> 2.38 | 7.48
    #   seed 3:  3.37 -> 2.27 | 4.09   (with the fixes proposed for stages/ppo/: 2.29-2.32 | 4.19-5.47)
    #   ratio on/off <= 0.56, drop >= 1.0.
    on, off = ptx_on.m, ptx_off.m
    assert "ptx_loss_last" in off and math.isfinite(off["ptx_loss_last"]), "coef 0 still measures the ptx loss"
    assert on["ptx_loss_last"] < 0.75 * off["ptx_loss_last"], (on, off)
    assert on["ptx_loss_last"] < on["ptx_loss_first"] - 0.5 and on["ptx_loss_last"] < 2.6, on
    assert all("ptx_loss" in e for e in ptx_off.log)
    # Same seed: iteration 1 (sampled before any update) is the same in both.
    assert ptx_off.log[0]["reward"] == pytest.approx(ptx_on.log[0]["reward"], abs=1e-5)


def test_ptx_batches_are_read_in_order_without_gaps(ptx_on):
    """Each minibatch takes the next ptx batch: iteration k (4 epochs x 2 minibatches) reads batches 8k .. 8k+7,
    so the ptx data is walked through once per epoch of its seeded order."""
    per_iteration = 4 * 2
    assert ptx_on.ptx_indices == list(range(8 * per_iteration)), ptx_on.ptx_indices[:20]


# --------------------------------------------------------------------------------------------------
# 4. Resume after SIGKILL reproduces the uninterrupted run.

# Runs `align` and pauses (for good) before iteration PAUSE_AT + 1: the test kills it there.
DRIVER = """
import os, sys, time
from align.stages.ppo.trainer import PPOTrainer

_iteration = PPOTrainer.iteration

def iteration(self):
    if self.step >= int(os.environ["PAUSE_AT"]):
        time.sleep(300)
    return _iteration(self)

PPOTrainer.iteration = iteration
from align.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

def _kill_at_checkpoint(command: list[str], env: dict, checkpoint: Path, home: Path) -> subprocess.Popen:
    """Runs `command` (a DRIVER pausing after `checkpoint`) and kills it, with every process it started (torchrun's
    workers run in sessions of their own), once the checkpoint is complete."""
    import psutil

    with open(home / "killed.log", "w") as log:
        process = subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        try:
            while read_json(checkpoint / "trainer_state.json") is None:
                assert process.poll() is None, (home / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, f"no {checkpoint.name} within 120 s"
                time.sleep(0.05)
        finally:
            try:
                root = psutil.Process(process.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:  # it died on its own (the assertion above says why)
                tree = []
            for each in tree:
                try:
                    each.kill()
                except psutil.NoSuchProcess:
                    pass
            process.wait()  # reaped by Popen, which keeps its exit status
            psutil.wait_procs(tree[1:], timeout=30)
    return process


COMPARED = ("reward", "reward_raw", "kl", "entropy", "pg_loss", "vf_loss", "ptx_loss", "response_length",
            "learning_rate", "kl_coef")


def test_resume_after_kill_reproduces_the_uninterrupted_run(dev, ptx_on, capsys):
    from align.artifacts import RunDir

    config = _config(dev.home, "resumed", ppo={"steps": 8, "save_steps": 4},
                     ptx={"path": dev.ptx_data, "coef": 1.0})
    final = dev.home / "runs" / "ppo" / "resumed"
    work = RunDir(final).work
    rows_before = len(_ppo_rows())
    (dev.home / "driver.py").write_text(DRIVER)
    first = _kill_at_checkpoint([sys.executable, str(dev.home / "driver.py"), "ppo", "--config", config],
                                {**_env(dev.home), "PAUSE_AT": "4"}, work / "checkpoints" / "checkpoint-4", dev.home)
    assert first.returncode == -signal.SIGKILL
    assert not final.exists() and work.is_dir() and len(_ppo_rows()) == rows_before
    assert RunDir(final).last_checkpoint().endswith("checkpoint-4")

    capsys.readouterr()
    assert _main("ppo", "--config", config) == 2, "an unfinished run is not silently restarted"
    err = _error_line(capsys.readouterr().err)
    assert "--resume" in err, err
    assert (work / "checkpoints" / "checkpoint-4").is_dir()

    assert _main("ppo", "--config", config, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert final.is_dir() and not work.exists() and len(_ppo_rows()) == rows_before + 1
    resumed, reference = _log(final), ptx_on.log
    assert [e["step"] for e in resumed] == list(range(1, 9))
    for a, b in zip(resumed, reference):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["step"], key, a[key], b[key])
    row = _ppo_rows()[0]
    assert row.metrics["iterations"] == 8 and row.metrics["episodes"] == 8 * 16
    for key in ("reward_first", "reward_last", "kl_last", "ptx_loss_last"):
        assert row.metrics[key] == pytest.approx(ptx_on.m[key], rel=1e-4, abs=1e-4), key


# --------------------------------------------------------------------------------------------------
# 5. One base copy: policy, reference, value and reward are adapters on the same weights.

def test_single_base_copy_holds_policy_reference_value_and_reward(dev, learn):
    from align.scoring import RewardScorer
    from align.stages.ppo.adapters import base_weight_copies
    from align.stages.ppo.rewards import SharedBaseReward

    trainer = learn.trainer
    model = trainer.model
    assert learn.m["base_weight_copies"] == 1
    assert trainer.reference is None
    assert set(model.peft_config) == {"default", "value", "reward"}
    assert isinstance(trainer.reward, SharedBaseReward) and trainer.value.adapters is trainer.adapters
    assert trainer.value.upper is not None, "the value function's training passes run its trained layers only"
    assert base_weight_copies(model) == 1
    # The reward adapter is frozen and outside the optimizer; the value adapter is trained.
    trained = {id(p) for p in trainer.params}
    for name, param in model.named_parameters():
        if ".reward." in name:
            assert not param.requires_grad and id(param) not in trained, name
    assert any(".value." in n and id(p) in trained for n, p in model.named_parameters())
    # After every adapter switch of the run, what is trained is still trainable (peft's switches freeze adapters).
    assert all(p.requires_grad for p in trainer.params)

    # The shared-base path reads exactly what the reward model was trained to read.
    samples = [json.loads(line) for line in (learn.out / "samples.jsonl").read_text().splitlines()]
    prompts = [s["prompt"] for s in samples] + ["reverse: a b c", "reverse: a b c", "reverse: f e d",
                                                "reverse: d d d"]
    responses = [s["response"] for s in samples] + ["z", "a b c d", "", "z a z a z a z a z a z a z a"]
    raw, normalized = trainer.reward(model, prompts, responses)
    scorer = RewardScorer.load("reward:1")
    expected_raw = scorer.score(prompts, responses, batch_size=5, normalized=False)
    expected = scorer.score(prompts, responses, batch_size=5, normalized=True)
    assert torch.allclose(torch.tensor(raw), torch.tensor(expected_raw), atol=1e-4), (raw, expected_raw)
    assert torch.allclose(torch.tensor(normalized), torch.tensor(expected), atol=1e-4)
    assert len(set(round(r, 3) for r in raw)) > 3, "the scores differ between responses"
    # The samples' rewards are these scores (normalized; minus rollout.missing_eos_penalty=1 without EOS).
    assert all(min(abs(s["reward"] - n), abs(s["reward"] - (n - 1.0))) < 1e-4 for s, n in zip(samples, normalized))
    # The policy adapter is active again after scoring.
    assert model.active_adapter == "default"


def test_optimizer_state_of_another_layout_fails_to_resume_with_one_line(learn, tmp_path):
    """A checkpoint whose optimizer groups do not match this run's (e.g. written before the value head had a group
    of its own) is refused with an AlignError naming the file, not a torch traceback."""
    from align.errors import AlignError
    from align.stages.ppo.checkpoints import load_optimizer

    state = learn.trainer.optimizer.state_dict()
    state["param_groups"] = state["param_groups"][:-1]
    file = tmp_path / "optimizer.pt"
    torch.save(state, file)
    with pytest.raises(AlignError, match=r"--resume: .*optimizer.pt does not fit this run's optimizer"):
        load_optimizer(learn.trainer.optimizer, file)


def test_value_adapter_is_trained(dev, learn):
    """The value function starts as the reward model (its LoRA weights, its score head) and is trained by the value
    loss: its adapter weights must move, not only its head. By default only its top quarter of layers trains (here
    layer 1 of 2); the layer below keeps the reward model's weights."""
    from safetensors.torch import load_file

    value = load_file(str(learn.out / "value" / "adapter_model.safetensors"))
    reward = {k: v for k, v in load_file(str(Path(dev.reward.path) / "adapter_model.safetensors")).items()
              if "lora_" in k}
    assert value and set(value) == set(reward), "the value adapter has the reward adapter's shape and names"
    head = torch.load(learn.out / "value" / "value_head.pt", weights_only=True)
    score = next(v for k, v in load_file(str(Path(dev.reward.path) / "adapter_model.safetensors")).items()
                 if "score" in k and "lora_" not in k)
    assert not torch.equal(head["weight"], score.float()), "the value head trained"
    moved = {k for k in value if not torch.equal(value[k], reward[k])}
    assert moved, "the value adapter's LoRA weights never changed: the value loss's gradient does not reach them"
    assert all(".layers.1." in k for k in moved), "only the top layer trains"
    assert sum(".layers.1." in k for k in value) == len(moved), "every weight of the top layer moved"
    assert learn.trainer.value.first_layer == 1
    frozen = learn.trainer.value.frozen(learn.trainer.model)
    assert not any(p is q for p in frozen for q in learn.trainer.params), "layer 0 is not trained"


def test_value_upper_layers_alone_give_the_whole_models_values_and_gradients(learn):
    """The shortcut behind ppo.value_layers: the upper layers run on the hidden states captured where they begin
    give the values the whole model gives, and the value loss's gradient reaches only the trained weights."""
    from align.stages.ppo.adapters import decoder_layers, layer_input

    trainer = learn.trainer
    model, value = trainer.model, trainer.value
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70], [0, 0, 5, 6, 7, 8, 9]])
    mask = (ids != 0).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with layer_input(decoder_layers(model)[value.first_layer]) as captured:
        whole = value(model, ids, mask, positions)
    assert len(captured) == 1
    upper = value(model, ids, mask, positions, inputs=captured[0].detach())
    assert torch.allclose(whole[mask.bool()], upper[mask.bool()], atol=1e-5)
    model.zero_grad(set_to_none=True)
    value.head.zero_grad(set_to_none=True)
    upper[mask.bool()].sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".value." in n and ".layers.1." in n for n in with_grad), with_grad
    assert value.head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    value.head.zero_grad(set_to_none=True)


def test_value_layers_shortcut_is_checked_and_falls_back_to_the_whole_model(tmp_path):
    """ValueFunction.check_upper: a Llama passes; a Granite (which scales what enters its body by an embedding
    multiplier) does not, and its value passes run the whole model. value_layers 0 trains every layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaConfig, LlamaForCausalLM

    from align.stages.ppo.adapters import AdapterSwitch, ValueFunction
    from align.stages.ppo.distributed import Distributed

    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    made = {"llama": LlamaForCausalLM(LlamaConfig(**shape)),
            "granite": GraniteForCausalLM(GraniteConfig(**shape, embedding_multiplier=12.0))}
    cfg = SimpleNamespace(ppo=SimpleNamespace(value_layers=None))
    probe = list(range(3, 40))
    for name, base in made.items():
        # Dropout on the adapters and the model left in training mode: the check runs the model as PPO does (eval).
        model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                                lora_dropout=0.5))
        value = ValueFunction.create(model, cfg, AdapterSwitch(model))
        assert value.first_layer == 3 and value.upper is not None
        assert len(value.frozen(model)) == 3 * 2 * 2, "value A and B of q/v in layers 0-2 stay as they are"
        assert value.check_upper(model, probe, Distributed()) is (name == "llama"), name
        assert (value.upper is not None) is (name == "llama")
        assert value.layers_note(model) == "1 of 4 decoder layers"
        # Whole passes or not, the value loss trains the top layer only (set_adapter re-enables the whole adapter).
        value.adapters.train_only(value.parameters(model), value.frozen(model))
        torch.nn.init.ones_(value.head.weight)
        ids = torch.tensor([probe[:12]])
        mask = torch.ones_like(ids)
        value(model, ids, mask, (mask.cumsum(1) - 1)).sum().backward()
        assert all(p.grad is None for p in value.frozen(model)), name
        assert all(p.grad is not None for p in value.parameters(model)), name
        model.delete_adapter("value")
    every = ValueFunction.create(model, SimpleNamespace(ppo=SimpleNamespace(value_layers=0)),
                                 AdapterSwitch(model))
    assert every.first_layer == 0 and every.upper is None and not every.frozen(model)
    assert every.layers_note(model) == "every layer"


def test_value_warmup_freezes_the_policy_and_trains_the_value(dev):
    """ppo.value_warmup_steps: the first iterations train only the value function. The policy stays the SFT model
    (KL exactly 0 when sampling the iteration after), and trains from the iteration after the warmup."""
    from safetensors.torch import load_file

    run = _run(dev, "warmup", ppo={"steps": 3, "value_warmup_steps": 2, "logging_steps": 1},
               ptx={"path": dev.ptx_data, "coef": 1.0})
    log = run.log
    assert [e["kl"] for e in log] == pytest.approx([0.0, 0.0, 0.0], abs=1e-4), "iterations 1-3 sample the SFT model"
    for entry in log[:2]:
        assert entry["approx_kl"] < 1e-8 and entry["clipfrac"] == 0, entry
        assert "ptx_loss" not in entry, "no ptx term while the policy is frozen"
    assert log[2]["approx_kl"] > 1e-6 and "ptx_loss" in log[2], log[2]
    head = torch.load(run.out / "value" / "value_head.pt", weights_only=True)
    score = next(v for k, v in load_file(str(Path(dev.reward.path) / "adapter_model.safetensors")).items()
                 if "score" in k and "lora_" not in k)
    assert not torch.allclose(head["weight"], score.float()), "the value head trained during the warmup"


def test_qlora_policy_trains_on_one_4bit_base(dev):
    """QLoRA: the base loaded in 4-bit (bitsandbytes, CPU here) still serves policy, reference, value and reward,
    and the policy adapter trains (after generate() and the no-grad rollout passes: the CPU repack trap)."""
    run = _run(dev, "qlora", ppo={"steps": 2, "logging_steps": 1}, quantization={"load_in_4bit": True})
    assert run.m["base_weight_copies"] == 1 and run.m["iterations"] == 2 and run.m["skipped_steps"] == 0, run.m
    assert all(math.isfinite(e["pg_loss"]) and math.isfinite(e["vf_loss"]) for e in run.log)
    assert run.log[0]["approx_kl"] > 1e-6 and run.log[1]["kl"] > 1e-4, run.log
    assert (run.out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# 6. Full fine-tuning with a separately loaded reward model.

def test_full_finetune_with_separate_reward_model_saves_full_weights(dev):
    from transformers import AutoModelForCausalLM

    run = _run(dev, "full", lora={"enabled": False}, reward={"share_base": "false"},
               ppo={"steps": 3, "learning_rate": 1e-4})
    assert run.m["base_weight_copies"] == 3, "policy, frozen reference, reward model"
    assert run.m["iterations"] == 3 and all(math.isfinite(e["reward"]) for e in run.log)
    assert not (run.out / "adapter_config.json").exists()
    assert (run.out / "value" / "value_head.pt").is_file() and not (run.out / "value" / "adapter_config.json").exists()
    policy = AutoModelForCausalLM.from_pretrained(str(run.out))
    sft = AutoModelForCausalLM.from_pretrained(str(dev.sft_folder))
    trained, start = policy.state_dict(), sft.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in start), "training changed the weights"
    head = torch.load(run.out / "value" / "value_head.pt", weights_only=True)
    assert head["weight"].shape == (1, policy.config.hidden_size)


# --------------------------------------------------------------------------------------------------
# 7. Two-process DDP on CPU (gloo): one artifact, one row, episodes of both processes.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script: list[str], *args: str) -> list[str]:
    """torchrun with 2 processes on this machine (gloo on CPU) running `script` (`-m align`, or a file) with args."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), *script, *args]


# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets for the processes it starts.
FSDP_LAUNCH = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
               "FSDP_OFFLOAD_PARAMS": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
               "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}


def _run_two(dev, *args: str, fsdp: bool = False) -> str:
    """`align ppo ...` in 2 processes; FSDP as `accelerate launch` with configs/accelerate/fsdp.yaml sets it up.
    Returns the output."""
    env = {**_env(dev.home), **(FSDP_LAUNCH if fsdp else {})}
    done = subprocess.run(_two_processes(["-m", "align"], "ppo", *args), cwd=dev.home, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_ddp_two_processes_register_one_row_counting_both(dev):
    config = _config(dev.home, "ddp", ppo={"steps": 2, "batch_size": 8, "mini_batch_size": 4},
                     reward={"share_base": "false"})
    rows_before = len(_ppo_rows())
    _run_two(dev, "--config", config)
    rows = _ppo_rows()
    assert len(rows) == rows_before + 1 and rows[0].name == "ddp"
    assert sorted(p.name for p in (dev.home / "runs" / "ppo").glob("ddp*")) == ["ddp"]
    m = rows[0].metrics
    assert m["episodes"] == 2 * 8 * 2, m
    assert m["base_weight_copies"] == 2, "LoRA policy + a separate reward model"
    assert [e["step"] for e in _log(Path(rows[0].path))] == [1, 2]


# --------------------------------------------------------------------------------------------------
# 7b. FSDP2 on CPU (2 processes, gloo): the weights are split across the processes, and nothing else changes. Both
# processes sample the same prompts as under DDP and the shards' gradients are averaged as DDP averages whole ones,
# so the two runs compute the same numbers (measured: equal to print precision; weights within 6e-8).

def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _assert_same_run(log: list[dict], reference: list[dict]) -> None:
    assert [e["step"] for e in log] == [e["step"] for e in reference]
    for a, b in zip(log, reference):
        for key in COMPARED:
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), (a["step"], key, a[key], b[key])


def test_fsdp_lora_run_equals_ddp_and_resumes_after_kill_from_sharded_checkpoints(dev, capsys):
    """LoRA (with the LM head trained whole: modules_to_save), shared-base reward, ptx: the FSDP run's log and
    adapters equal the DDP run's. Killed after its checkpoint at iteration 2 (each process wrote its optimizer
    shard), it resumes under FSDP to the same numbers; resuming it without FSDP fails with one line."""
    from align.artifacts import RunDir

    changes = {"ppo": {"steps": 4, "batch_size": 8, "mini_batch_size": 4, "learning_rate": 1e-3, "save_steps": 2},
               "ptx": {"path": dev.ptx_data, "coef": 0.5}, "lora": {"modules_to_save": ["lm_head"]}}
    ddp = _config(dev.home, "lora-ddp", **changes)
    fsdp = _config(dev.home, "lora-fsdp", **changes)
    _run_two(dev, "--config", ddp)
    out = _run_two(dev, "--config", fsdp, fsdp=True)
    assert "each split across 2 processes (FSDP2)" in out, out
    total, held = map(float, re.search(r"([\d.]+) KiB; ([\d.]+) KiB held by each process", out).groups())
    assert held == pytest.approx(total / 2, rel=0.02), "each process holds half of the weights"
    runs = dev.home / "runs" / "ppo"
    _assert_same_run(_log(runs / "lora-fsdp"), _log(runs / "lora-ddp"))
    for part in (Path("."), Path("value")):
        a, b = _adapter(runs / "lora-fsdp" / part), _adapter(runs / "lora-ddp" / part)
        assert a.keys() == b.keys() and a
        assert any(key.endswith("lm_head.weight") for key in a) is (part == Path(".")), "the policy's whole LM head"
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), part
    assert torch.allclose(torch.load(runs / "lora-fsdp" / "value" / "value_head.pt")["weight"],
                          torch.load(runs / "lora-ddp" / "value" / "value_head.pt")["weight"], atol=1e-5)

    killed = _config(dev.home, "lora-fsdp-killed", **changes)
    work = RunDir(runs / "lora-fsdp-killed").work
    (dev.home / "driver.py").write_text(DRIVER)
    checkpoint = work / "checkpoints" / "checkpoint-2"
    _kill_at_checkpoint(_two_processes([str(dev.home / "driver.py")], "ppo", "--config", killed),
                        {**_env(dev.home), **FSDP_LAUNCH, "PAUSE_AT": "2"}, checkpoint, dev.home)
    assert (checkpoint / "optimizer-rank0.pt").is_file() and (checkpoint / "optimizer-rank1.pt").is_file()

    capsys.readouterr()
    assert _main("ppo", "--config", killed, "--resume") == 2
    err = _error_line(capsys.readouterr().err)
    assert "saved by 2 processes under FSDP, this run runs without FSDP" in err, err
    assert checkpoint.is_dir(), "the checkpoint is kept"

    out = _run_two(dev, "--config", killed, "--resume", fsdp=True)
    assert "resumed from" in out, out
    _assert_same_run(_log(runs / "lora-fsdp-killed"), _log(runs / "lora-fsdp"))


def test_fsdp_full_finetuning_equals_ddp_and_saves_plain_weights(dev):
    """Full fine-tuning shards the policy and its frozen reference copy; the saved weights (gathered from the
    shards) load with plain transformers and equal the DDP run's. This run also generates on the split model
    (rollout.gather_weights: false: each layer gathered for each token's forward pass)."""
    from transformers import AutoModelForCausalLM

    changes = {"ppo": {"steps": 2, "batch_size": 8, "mini_batch_size": 4, "learning_rate": 1e-4},
               "lora": {"enabled": False}, "reward": {"share_base": "false"}}
    _run_two(dev, "--config", _config(dev.home, "full-ddp", **changes))
    _run_two(dev, "--config", _config(dev.home, "full-fsdp", **changes), "rollout.gather_weights=false", fsdp=True)
    runs = dev.home / "runs" / "ppo"
    _assert_same_run(_log(runs / "full-fsdp"), _log(runs / "full-ddp"))
    fsdp = AutoModelForCausalLM.from_pretrained(str(runs / "full-fsdp")).state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(str(runs / "full-ddp")).state_dict()
    sft = AutoModelForCausalLM.from_pretrained(str(dev.sft_folder)).state_dict()
    assert fsdp.keys() == ddp.keys()
    assert all(torch.allclose(fsdp[k], ddp[k], atol=1e-6) for k in fsdp)
    assert any(not torch.allclose(fsdp[k], sft[k], atol=1e-5) for k in fsdp), "the policy was trained"


# --------------------------------------------------------------------------------------------------
# 8. NaN/inf rewards: skipped and reported, then the run stops with a checkpoint; --resume continues.

def test_nan_rewards_skip_iterations_then_stop_with_a_checkpoint(dev, monkeypatch, capsys):
    from align.artifacts import RunDir
    from align.stages.ppo.rewards import SharedBaseReward

    monkeypatch.setattr(SharedBaseReward, "__call__",
                        lambda self, model, prompts, responses: ([float("nan")] * len(prompts),) * 2)
    config = _config(dev.home, "nan", ppo={"steps": 4, "max_bad_steps": 2})
    final = dev.home / "runs" / "ppo" / "nan"
    rows_before = len(_ppo_rows())
    capsys.readouterr()
    assert _main("ppo", "--config", config) == 2
    out, err = capsys.readouterr()
    assert "iteration 1: non-finite rewards or log-probs; skipped" in " ".join(out.split())
    assert "iteration 2: non-finite rewards or log-probs; skipped" in " ".join(out.split())
    err = _error_line(err)
    assert err.startswith("error: ppo: 2 iterations in a row had NaN/inf") and "--resume" in err, err
    assert "checkpoint-2" in err
    work = RunDir(final).work
    assert read_json(work / "checkpoints" / "checkpoint-2" / "trainer_state.json") is not None
    assert not final.exists() and len(_ppo_rows()) == rows_before

    # Fixed (here: the real reward again), the run continues from the checkpoint and counts what it skipped.
    monkeypatch.undo()
    assert _main("ppo", "--config", config, "--resume") == 0
    m = _ppo_rows()[0].metrics
    assert m["skipped_steps"] == 2 and m["iterations"] == 4
    assert [e.get("skipped", 0) for e in _log(final)] == [1, 1, 0, 0]


# --------------------------------------------------------------------------------------------------
# 9. The artifact.

def test_artifact_reloads_and_registers_with_lineage(dev, learn, capsys):
    from peft import AutoPeftModelForCausalLM

    out = learn.out
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md",
                 "align_config.yaml", "training_log.jsonl", "samples.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists() and not out.with_name(out.name + ".incomplete").exists()
    assert (out / "plots" / "ppo_curves.png").read_bytes()[:8] == PNG_MAGIC

    # The policy adapter reloads with plain peft on the SFT weights and is the trained policy.
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == dev.sft_folder.resolve()
    policy = AutoPeftModelForCausalLM.from_pretrained(str(out))
    policy.eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    model = learn.trainer.model
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.allclose(policy(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        with model.disable_adapter():
            sft_logits = model(input_ids=ids).logits
        assert not torch.allclose(policy(input_ids=ids).logits, sft_logits, atol=1e-3)

    # The value function: its adapter and head.
    value = out / "value"
    assert (value / "adapter_config.json").is_file() and (value / "adapter_model.safetensors").is_file()
    head = torch.load(value / "value_head.pt", weights_only=True)
    assert set(head) == {"weight", "bias"} and head["weight"].shape[0] == 1

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all({"prompt", "response", "reward"} <= set(s) for s in samples)
    assert all(s["prompt"] in dev.prompts and math.isfinite(s["reward"]) for s in samples)

    row = learn.row
    assert {dev.sft.id, dev.reward.id} <= set(row.parents)
    assert row.config["ppo"]["kl_coef"] == 0.05 and row.stage == "ppo"
    capsys.readouterr()
    assert _main("registry", "lineage", row.ref) == 0
    text = capsys.readouterr().out
    assert row.ref in text and "sft:1" in text and "reward:1" in text and "label:1" in text, text


# --------------------------------------------------------------------------------------------------
# 10. Bad input: one line, exit code 2, nothing written.

def _lora_adapter(folder: Path, base: str, task: str) -> str:
    """An untrained LoRA adapter folder (CAUSAL_LM or SEQ_CLS with its score head), not registered."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    if task == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"])
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear")
    get_peft_model(model, config).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(folder))
    return str(folder)


BAD = {
    "mini_batch_larger_than_batch": ({"ppo": {"mini_batch_size": 32}},
                                     "ppo.mini_batch_size (32) is larger than ppo.batch_size (16)"),
    "reward_is_the_sft_model": ({"reward": {"path": "sft:1"}}, "is not a reward model (architectures LlamaForCausalLM"),
    "reward_is_an_sft_lora_adapter": ({"reward": {"path": "@causal_adapter"}},
                                      "is a CAUSAL_LM adapter, not a reward model"),
    "share_base_with_full_finetuning": ({"reward": {"share_base": "true"}, "lora": {"enabled": False}},
                                        "reward.share_base: true needs lora.enabled: true"),
    "share_base_with_reward_on_another_base": ({"reward": {"path": "@seq_cls_on_raw_llama", "share_base": "true"}},
                                               "reward.share_base: true, but the reward model"),
    "empty_prompt": ({"data": {"path": "@empty_prompt"}}, "bad_prompts.jsonl:2: field 'prompt' is empty"),
    "unknown_key": ({"ppo": {"kl_coeff": 0.1}}, "ppo.kl_coeff: unknown key"),
    "lora_bias": ({"lora": {"bias": "all"}}, "lora.bias: all: align ppo keeps every base weight frozen"),
    "value_layers_with_full_finetuning": ({"ppo": {"value_layers": 1}, "lora": {"enabled": False},
                                           "reward": {"share_base": "false"}},
                                          "ppo.value_layers: with full fine-tuning"),
    "group_size_with_ppo": ({"ppo": {"group_size": 8}}, "ppo.group_size: GRPO/RLOO only"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_with_one_line_and_writes_nothing(case, dev, capsys):
    from align.registry import Registry

    sections, expected = BAD[case]
    sections = json.loads(json.dumps(sections))
    made = {
        "@causal_adapter": lambda: _lora_adapter(dev.home / "bad" / "causal", str(dev.sft_folder), "CAUSAL_LM"),
        "@seq_cls_on_raw_llama": lambda: _lora_adapter(dev.home / "bad" / "seq_cls", dev.tiny_llama, "SEQ_CLS"),
        "@empty_prompt": lambda: tiny_models.write_jsonl(dev.home / "bad_prompts.jsonl", [
            {"prompt": "reverse: a b c"}, {"prompt": "  "}, {"prompt": "reverse: d e f"}]),
    }
    for values in sections.values():
        for key, value in values.items():
            if isinstance(value, str) and value in made:
                values[key] = made[value]()
    name = f"bad-{case}"
    config = _config(dev.home, name, **sections)
    rows_before = len(Registry().list())
    capsys.readouterr()
    assert _main("ppo", "--config", config) == 2
    err = _error_line(capsys.readouterr().err)
    assert expected in err, err
    if case == "unknown_key":
        line = next(i for i, text in enumerate(Path(config).read_text().splitlines(), 1) if "kl_coeff" in text)
        assert f"{name}.yaml:{line}: " in err and "ppo.kl_coef" in err, err
    assert not list((dev.home / "runs" / "ppo").glob(name + "*"))
    assert len(Registry().list()) == rows_before


LAUNCHER_BAD = {
    "deepspeed": ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "align ppo does not run under DeepSpeed"),
    "fsdp_with_4bit_base": ({"ACCELERATE_USE_FSDP": "true"}, {"quantization": {"load_in_4bit": True}},
                            "quantization: FSDP cannot shard a 4/8-bit base (QLoRA)"),
    "fsdp_offload": ({"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, {},
                     "accelerate config: fsdp_offload_params: true is not supported by align ppo"),
    "fsdp_shard_grad_op": ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, {},
                           "accelerate config: fsdp_reshard_after_forward: false (SHARD_GRAD_OP) is not supported"),
}


@pytest.mark.parametrize("case", sorted(LAUNCHER_BAD))
def test_launcher_settings_align_ppo_cannot_honour_fail_with_one_line(case, dev, monkeypatch, capsys):
    """What `accelerate launch` passes from its config (environment variables) is checked before any model loads."""
    env, sections, expected = LAUNCHER_BAD[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    name = f"bad-launcher-{case}"
    capsys.readouterr()
    assert _main("ppo", "--config", _config(dev.home, name, **sections)) == 2
    err = _error_line(capsys.readouterr().err)
    assert expected in err, err
    assert not list((dev.home / "runs" / "ppo").glob(name + "*"))


# --------------------------------------------------------------------------------------------------
# 12. --algorithm grpo|rloo: TRL's group-relative trainers with the same inputs, logging and artifact.

GROUP = {"ppo": {"steps": 30, "batch_size": 8, "group_size": 4, "mini_batch_size": 16, "ppo_epochs": 2,
                 "logging_steps": 5}}


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def grouped(request, dev):
    algorithm = request.param
    assert _main("ppo", "--config", _config(dev.home, algorithm, **GROUP), "--algorithm", algorithm) == 0
    row = _ppo_rows()[0]
    assert row.name == algorithm
    return SimpleNamespace(algorithm=algorithm, row=row, m=row.metrics, out=Path(row.path), log=_log(Path(row.path)))


def test_grpo_and_rloo_raise_the_reward(grouped):
    # Measured (30 iterations of 8 prompts x 4 responses, seeds 42, 1-3): GRPO -3.22..-2.82 -> -2.20..-1.02 (gain
    # 1.02-1.88, KL 1.0-3.2 nats), RLOO -3.30..-2.67 -> -1.52..+0.17 (gain 1.38-3.03, KL 5.7-13.7). Threshold 0.8.
    m = grouped.m
    assert m["algorithm"] == grouped.algorithm and m["group_size"] == 4
    assert m["iterations"] == 30 and m["episodes"] == 30 * 8 * 4, m
    assert m["reward_last"] - m["reward_first"] > 0.8, m
    assert m["reward_last"] > -2.5 and m["kl_last"] < 25, m
    log = grouped.log
    assert [e["step"] for e in log] == list(range(1, 31))
    assert all(math.isfinite(e[k]) for e in log for k in ("reward", "kl", "entropy", "clipfrac", "response_length",
                                                          "eos_rate"))
    # TRL measures the KL in its loss, during the updates: iteration 1 starts from the SFT model, then moves away.
    assert log[0]["kl"] < 0.5 < log[-1]["kl"], [e["kl"] for e in log]


def test_grpo_and_rloo_artifact_is_the_policy_adapter_with_ppo_lineage(grouped, dev):
    from peft import AutoPeftModelForCausalLM

    out = grouped.out
    assert not (out / "ref").exists(), "TRL's frozen reference adapter is not part of the artifact"
    policy = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert list(policy.peft_config) == ["default"]
    assert (out / "plots" / f"{grouped.algorithm}_curves.png").read_bytes()[:8] == PNG_MAGIC
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and len({s["prompt"] for s in samples}) == 8, "8 prompts x 4 responses"
    assert all(s["prompt"] in dev.prompts and math.isfinite(s["reward"]) for s in samples)
    row = grouped.row
    assert row.stage == "ppo" and {dev.sft.id, dev.reward.id} <= set(row.parents)
    assert row.config["algorithm"] == grouped.algorithm


def test_grpo_ddp_two_processes_register_one_row_counting_both(dev):
    config = _config(dev.home, "grpo-ddp", **_merge(GROUP, {"ppo": {"steps": 2}}))
    rows_before = len(_ppo_rows())
    _run_two(dev, "--config", config, "--algorithm", "rloo")
    rows = _ppo_rows()
    assert len(rows) == rows_before + 1 and rows[0].name == "grpo-ddp"
    assert rows[0].metrics["episodes"] == 2 * 8 * 4 * 2 and rows[0].metrics["algorithm"] == "rloo"
    assert [e["step"] for e in _log(Path(rows[0].path))] == [1, 2]


def test_grpo_resume_continues_from_the_checkpoint_with_the_whole_log(dev):
    """Killed after its first complete checkpoint, a GRPO run resumes there and logs all its iterations."""
    config = _config(dev.home, "grpo-resume", **_merge(GROUP, {"ppo": {"steps": 40, "save_steps": 2}}))
    work = dev.home / "runs" / "ppo" / "grpo-resume.incomplete"
    command = [sys.executable, "-m", "align", "ppo", "--config", config, "--algorithm", "grpo"]
    process = subprocess.Popen(command, cwd=dev.home, env=_env(dev.home), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(read_json(p) is not None for p in work.glob("checkpoints/checkpoint-*/trainer_state.json")) and \
            time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.kill()
    process.wait()
    assert process.returncode != 0, "the run finished before it could be killed"
    done = subprocess.run(command + ["--resume"], cwd=dev.home, env=_env(dev.home), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming from" in done.stdout
    row = _ppo_rows()[0]
    assert row.name == "grpo-resume" and row.metrics["iterations"] == 40
    assert [e["step"] for e in _log(Path(row.path))] == list(range(1, 41))


def test_grpo_without_kl_penalty_finishes_and_says_kl_was_not_measured(dev, capsys):
    config = _config(dev.home, "grpo-beta0", **_merge(GROUP, {"ppo": {"steps": 2, "kl_coef": 0.0}}))
    capsys.readouterr()
    assert _main("ppo", "--config", config, "--algorithm", "grpo") == 0
    assert "not measured (beta 0)" in capsys.readouterr().out
    row = _ppo_rows()[0]
    assert row.name == "grpo-beta0" and "kl_last" not in row.metrics and row.metrics["iterations"] == 2


def test_grpo_prompts_tokenize_as_align_renders_them(dev):
    """TRL tokenizes the prompt text again, adding the tokenizer's BOS: the chat template's own BOS (as in Llama's
    templates, and the test tokenizer's) must not become a second one."""
    from align.modeling import load_tokenizer, training_template
    from align.stages.ppo import grpo
    from align.stages.ppo.common import encode_prompts

    tokenizer = load_tokenizer(str(dev.sft_folder))
    encoded, truncated = encode_prompts(tokenizer, dev.prompts[:8] + ["reverse: " + "a " * 60],
                                        training_template(str(dev.sft_folder)), 32)
    assert truncated == 1
    assert tokenizer(encoded[0][1])["input_ids"][:2] == [tokenizer.bos_token_id] * 2, "the problem being avoided"
    for _, text, ids in encoded[:-1]:
        assert tokenizer(grpo._trl_text(tokenizer, text, ids))["input_ids"] == ids
    # A prompt cut to its last tokens has no BOS of its own; TRL's tokenization gives it the tokenizer's.
    _, text, ids = encoded[-1]
    assert tokenizer(grpo._trl_text(tokenizer, text, ids))["input_ids"] == [tokenizer.bos_token_id] + ids


GROUP_BAD = {
    "ptx": ({"ptx": {"path": "@ptx"}}, "ptx.path: PPO-ptx is part of align's PPO trainer"),
    "value_setting": ({"ppo": {"value_layers": 2}}, "ppo.value_layers: PPO only"),
    "minibatch": ({"ppo": {"mini_batch_size": 5}}, "ppo.mini_batch_size: 5 does not divide the 32 responses"),
    "stop_strings": ({"rollout": {"stop_strings": ["."]}}, "rollout.stop_strings: not supported with algorithm grpo"),
    "gather_weights": ({"rollout": {"gather_weights": False}}, "rollout.gather_weights: PPO only"),
    "too_few_prompts": ({"data": {"max_examples": 4}}, "data.path: 4 prompts, fewer than one iteration's"),
}


@pytest.mark.parametrize("case", sorted(GROUP_BAD))
def test_grpo_bad_input_fails_with_one_line_and_writes_nothing(case, dev, capsys):
    from align.registry import Registry

    sections, expected = GROUP_BAD[case]
    sections = _merge(GROUP, json.loads(json.dumps(sections).replace('"@ptx"', json.dumps(dev.ptx_data))))
    name = f"bad-grpo-{case}"
    rows_before = len(Registry().list())
    capsys.readouterr()
    assert _main("ppo", "--config", _config(dev.home, name, **sections), "--algorithm", "grpo") == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not list((dev.home / "runs" / "ppo").glob(name + "*"))
    assert len(Registry().list()) == rows_before


# --------------------------------------------------------------------------------------------------
# 11. Pure logic on constructed tensors.

def _bare_trainer(**attributes):
    from align.stages.ppo.trainer import PPOTrainer

    trainer = object.__new__(PPOTrainer)
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


def _rollout(response_mask, values):
    from align.stages.ppo.trainer import Rollout

    n, width = response_mask.shape
    empty = torch.zeros((n, width))
    return Rollout(prompts=[""] * n, responses=[""] * n, ids=empty.long(), mask=empty.long(), positions=empty.long(),
                   response_mask=response_mask, logprobs=empty, ref_logprobs=empty, values=values)


def test_shape_rewards_gae_matches_a_hand_computation():
    from align.stages.ppo.config import PPOConfig
    from align.stages.ppo.distributed import Distributed
    from align.stages.ppo.trainer import AdaptiveKL

    trainer = _bare_trainer(kl=AdaptiveKL(0.5, None, 1), ppo=PPOConfig(gamma=1.0, lam=0.95), dist=Distributed())
    # Row 0: 3 response tokens. Row 1: 2 tokens and a padded position (its value and KL must not leak in).
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.1, -0.3, 9.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 0.0]]) * mask
    scores = torch.tensor([1.0, -2.0])
    rollout = _rollout(mask, values)
    trainer.advantages(rollout, trainer.shape_rewards(rollout, scores, kl))

    # Row 0: rewards -beta*kl + score on the last token = [-0.05, -0.1, 0.85].
    #   A2 = 0.85 - 0.6 = 0.25; A1 = (-0.1 + 0.6 - 0.4) + 0.95 * 0.25 = 0.3375;
    #   A0 = (-0.05 + 0.4 - 0.2) + 0.95 * 0.3375 = 0.470625
    # Row 1: rewards [-0.2, 0.1 - 2 = -1.9]; A1 = -1.9 - (-0.3) = -1.6; A0 = (-0.2 - 0.3 - 0.1) + 0.95 * -1.6 = -2.12
    advantages = torch.tensor([[0.470625, 0.3375, 0.25], [-2.12, -1.6, 0.0]])
    expected_returns = advantages + values * mask
    assert torch.allclose(rollout.returns * mask, expected_returns * mask, atol=1e-6), rollout.returns
    real = advantages[mask.bool()]
    mean, std = real.mean(), real.std(unbiased=False)
    assert torch.allclose(rollout.advantages, (advantages - mean) / std * mask, atol=1e-5), rollout.advantages
    assert rollout.advantages[1, 2] == 0


def test_adaptive_kl_moves_beta_towards_the_target_with_clipped_steps():
    from align.stages.ppo.trainer import AdaptiveKL

    def after(kl, episodes=100):
        controller = AdaptiveKL(0.1, 6.0, 10_000)
        controller.update(kl, episodes)
        return controller.coef

    assert after(6.6) == pytest.approx(0.1 * (1 + 0.1 * 100 / 10_000))  # above target: up, proportionally
    assert after(5.4) == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))  # below: down
    assert after(60.0) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10_000))  # clipped at +20% * n / horizon
    assert after(0.0) == pytest.approx(0.1 * (1 - 0.2 * 100 / 10_000))  # clipped at -20% * n / horizon
    assert after(6.0) == pytest.approx(0.1)
    assert after(60.0, episodes=10_000) == pytest.approx(0.12)
    fixed = AdaptiveKL(0.1, None, 10_000)
    fixed.update(60.0, 100)
    assert fixed.coef == 0.1, "no target: a fixed coefficient"


def test_cut_responses_stop_at_the_first_eos_and_mask_the_rest():
    from align.stages.ppo.config import RolloutConfig

    eos, pad = 2, 0
    trainer = _bare_trainer(eos_ids={eos}, rollout_cfg=RolloutConfig(), tokenizer=SimpleNamespace(pad_token_id=pad))
    response = torch.tensor([
        [5, 6, eos, 7, eos],  # EOS in the middle: kept, the rest is padding
        [5, 6, 7, 8, 9],  # no EOS: all kept, not ended
        [eos, 5, 5, 5, 5],  # empty response: just the EOS
        [5, 5, 5, 5, eos],  # EOS as the last possible token
    ])
    tokens, mask, ended = trainer._cut_responses(response)
    assert tokens.tolist() == [[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad], [5, 5, 5, 5, eos]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, True]


def test_epoch_order_visits_every_prompt_once_per_epoch_deterministically():
    from align.stages.ppo import data

    n, seed = 10, 3
    order = data.epoch_order(n, 0, 3 * n, seed)
    for epoch in range(3):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert order[:n] != order[n:2 * n], "each epoch has its own permutation"
    assert data.epoch_order(n, 7, 11, seed) == order[7:18], "any window of the same endless sequence"
    data.PERMUTATIONS.clear()
    assert data.epoch_order(n, 0, 3 * n, seed) == order, "the same with a cold cache (a resumed process)"
    assert data.epoch_order(n, 0, n, seed + 1) != order[:n]


def test_log_probs_recorded_while_sampling_equal_a_forward_pass(tiny_llama):
    """The old log-probs come from generate(): log softmax(logits / T) of each sampled token over the whole
    vocabulary (not the top-k-truncated distribution it sampled from), as a forward pass over the response gives,
    even when the model's own generation defaults carry logits processors (Qwen2.5-Instruct ships a repetition
    penalty): those are not applied."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align.stages.ppo.losses import token_logprobs
    from align.stages.ppo.trainer import SampledLogprobs, generate_without_model_defaults

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    model.get_base_model().generation_config.update(repetition_penalty=1.3, no_repeat_ngram_size=1)
    queries = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    query_mask = (queries != 0).long()
    recorder = SampledLogprobs(temperature=0.7)
    sampling = GenerationConfig(do_sample=True, max_new_tokens=12, temperature=0.7, top_k=5, top_p=1.0,
                                pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        generated = generate_without_model_defaults(model, sampling, input_ids=queries, attention_mask=query_mask,
                                                    logits_processor=[recorder])
        response = generated[:, queries.shape[1]:]
        recorded = recorder.logprobs(response)
        mask = torch.cat([query_mask, torch.ones_like(response)], dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=generated, attention_mask=mask, position_ids=positions).logits
    forward = token_logprobs(logits[:, queries.shape[1] - 1:-1], response, 0.7)
    assert recorded.shape == response.shape and response.shape[1] >= 4, response.shape
    assert torch.allclose(recorded, forward, atol=1e-4), (recorded - forward).abs().max()
    assert (recorded < -1e-3).any(), "the full distribution: a top-5 renormalized one would put more mass on each"
    assert model.get_base_model().generation_config.repetition_penalty == 1.3, "the model's defaults are kept"
