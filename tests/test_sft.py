"""`align sft` end to end on tiny random-init models: losses that fall, artifacts that reload, masks and packing
that are right, resume after a kill, 2-process DDP on CPU, tokenizer safety and over-long examples.

Runs go through `align.cli.main.main` in-process, or through a fresh `python -m align` / torchrun process where a
process has to die or several have to cooperate. Each run is a few dozen optimizer steps on a 64-wide model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from align.artifacts import read_json
from tests.tiny_models import toy_task_records, toy_text_records, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Few steps, short sequences, no checkpoints, no progress bars: each run takes seconds on one core.
FAST = dict(
    max_steps=30,
    learning_rate=1e-2,
    per_device_train_batch_size=8,
    max_length=64,
    logging_steps=5,
    save_strategy="no",
    disable_tqdm=True,
)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run inside tmp_path with a private registry."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    return tmp_path


def _config(folder: Path, name: str, model_path: str, data_path: str, **sections) -> str:
    """Write `<name>.yaml`: model + data paths, then any sections (data, lora, template, training...) as given."""
    config = {"model": {"path": model_path}, "data": {"path": data_path}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _sft(config: str, *args: str) -> int:
    from align.cli.main import main

    return main(["sft", "--config", config, *args])


def _rows():
    from align.registry import Registry

    return Registry().list()


def _latest():
    from align.registry import Registry

    return Registry().resolve("sft:latest")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "ALIGN_HOME": str(tmp_path / ".align"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _completion_loss(model, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Mean next-token loss of a causal LM on the completion tokens of (prompt, completion) pairs."""
    total, count = 0.0, 0
    for prompt, completion in pairs:
        prompt_len = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + completion, return_tensors="pt")["input_ids"]
        labels = ids.clone()
        labels[:, :prompt_len] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    return total / count


# --------------------------------------------------------------------------------------------------
# 1-2. LoRA on tiny Llama: the loss falls, the artifact is complete, and it reloads with plain peft.

def _lora_run(workdir: Path, model: str, steps: int = 30, learning_rate: float = 1e-2) -> Path:
    data = write_jsonl(workdir / "train.jsonl", toy_task_records(200))
    config = _config(workdir, "lora", model, data,
                     data={"val_set_size": 40},
                     # lm_head trained in full too: a random-init 64-wide head caps what LoRA alone can reach
                     lora={"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
                     training={**FAST, "max_steps": steps, "learning_rate": learning_rate})
    assert _sft(config) == 0
    return workdir / "runs" / "sft" / "lora"


def test_lora_lowers_eval_loss_and_writes_complete_artifact(workdir, tiny_llama):
    out = _lora_run(workdir, tiny_llama)

    rows = _rows()
    assert len(rows) == 1
    row = _latest()
    assert Path(row.path) == out.resolve()
    before, after = row.metrics["eval_loss_before"], row.metrics["eval_loss"]
    assert before > 5.5, "random init starts near uniform over the 512-token vocab"
    assert after < before - 2.0, f"eval loss {before:.3f} -> {after:.3f}"
    assert row.metrics["steps"] == 30 and row.metrics["train_examples"] == 160 and row.metrics["eval_examples"] == 40

    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "align_config.yaml", "training_log.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        Path(tiny_llama).resolve())
    assert not (out / "model.safetensors").exists(), "a LoRA run saves the adapter, not full weights"
    assert not list(out.parent.glob("*.incomplete")), "the working folder was renamed into place"
    assert not (out / "checkpoints").exists()

    assert len(row.data_fingerprint) == 16 and row.data_fingerprint in (out / "README.md").read_text()
    saved = yaml.safe_load((out / "align_config.yaml").read_text())
    assert saved["lora"]["r"] == 16 and saved["training"]["max_steps"] == 30
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [5, 10, 15, 20, 25, 30]
    assert log[-1]["eval_loss"] == pytest.approx(after)
    for plot in ("loss.png", "learning_rate.png"):
        data = (out / "plots" / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot


def test_lora_adapter_reloads_with_plain_peft_and_generates_like_align_generate(workdir, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.generation import SamplingConfig, generate
    from align.modeling import load_for_inference

    # Longer and gentler than test 1, so greedy answers differ between prompts (and in length).
    out = _lora_run(workdir, tiny_llama, steps=100, learning_rate=5e-3)
    prompts = ["reverse: a b c\n", "reverse: f e d c\n", "reverse: b b a d\n"]

    # Plain transformers + peft, one prompt at a time (no padding), greedy.
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), out).eval()

    def greedy(model, prompt):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    expected = [greedy(plain, p) for p in prompts]

    # `align generate --model sft:latest --temperature 0`'s code path: registry ref, batched, left-padded.
    loaded = load_for_inference("sft:latest")
    model = loaded.model
    assert loaded.source.adapter_of is not None and Path(loaded.source.path) == out.resolve()
    assert loaded.template.name == "chat"  # generation wraps prompts the way training did
    got = generate(model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=8, temperature=0, batch_size=3),
                   template=loaded.template)
    assert got == expected
    probe = tokenizer(["reverse: c a f\n"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, plain(**probe).logits)

    # The adapter matters: the trained model answers in the task's alphabet, unlike the random base.
    assert [greedy(base, p) for p in prompts] != expected
    assert all(answer and set(answer) <= set("abcdef ") for answer in expected), expected


# --------------------------------------------------------------------------------------------------
# 3. Full fine-tuning on tiny GPT-NeoX.

def test_full_finetune_gpt_neox_lowers_loss_and_reloads_with_plain_transformers(workdir, tiny_gpt_neox):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(workdir / "train.jsonl", toy_task_records(200))
    config = _config(workdir, "full", tiny_gpt_neox, data, data={"val_set_size": 40}, lora={"enabled": False},
                     template={"name": "question_answer"}, training={**FAST, "learning_rate": 3e-3})
    assert _sft(config) == 0
    row = _latest()
    assert row.metrics["eval_loss"] < row.metrics["eval_loss_before"] - 2.0, row.metrics
    assert row.metrics["trainable_parameters"] == row.metrics["total_parameters"]

    out = Path(row.path)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt_neox)
    held_out = [(f"### Question:\n{r['prompt']}\n### Answer:\n", r["completion"] + tokenizer.eos_token)
                for r in toy_task_records(16, seed=123)]
    tuned_loss, base_loss = _completion_loss(reloaded, tokenizer, held_out), _completion_loss(base, tokenizer, held_out)
    assert tuned_loss < base_loss - 2.0
    assert tuned_loss == pytest.approx(row.metrics["eval_loss"], abs=0.5), "the reloaded weights are the trained ones"


# --------------------------------------------------------------------------------------------------
# 4. QLoRA (4-bit) on CPU, and the bitsandbytes eval-repack trap (stack.md).

def test_qlora_4bit_trains_on_cpu(workdir, tiny_llama):
    data = write_jsonl(workdir / "train.jsonl", toy_task_records(200))
    # Pure LoRA (no lm_head): the loss can only fall through adapters on 4-bit layers. The run evaluates
    # (no-grad) before training, the situation of the CPU trap.
    config = _config(workdir, "qlora", tiny_llama, data, data={"val_set_size": 40},
                     quantization={"load_in_4bit": True}, lora={"r": 16, "alpha": 32, "dropout": 0.0},
                     training=FAST)
    assert _sft(config) == 0
    row = _latest()
    assert row.metrics["eval_loss"] < row.metrics["eval_loss_before"] - 0.25, row.metrics
    # LoRA B starts at zero: every adapted 4-bit layer trained. (The trap itself is tested below: in a full run
    # it only cuts the gradient through the base weights, which this run cannot see.)
    from safetensors.torch import load_file

    adapter = load_file(Path(row.path) / "adapter_model.safetensors")
    lora_b = {name: tensor for name, tensor in adapter.items() if "lora_B" in name}
    assert len(lora_b) == 2 * 7, sorted(adapter)  # 2 layers x (q, k, v, o, gate, up, down)
    assert not [name for name, tensor in lora_b.items() if not tensor.any()]


def test_qlora_lora_grads_survive_a_no_grad_eval_pass(tiny_llama):
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    from align.config import LoraConfig, ModelConfig, QuantizationConfig
    from align.modeling import apply_tuning, load_model

    model_cfg = ModelConfig(path=tiny_llama)
    model = load_model(tiny_llama, model_cfg, QuantizationConfig(load_in_4bit=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = apply_tuning(model, LoraConfig(r=8, alpha=16, dropout=0.0), model_cfg, quantized=True,
                         gradient_checkpointing=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    batch = tokenizer(["reverse: a b c\nc b a", "reverse: d e f\nf e d"], return_tensors="pt")
    lora_b = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    assert lora_b

    def backward() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {name: 0.0 if p.grad is None else p.grad.abs().sum().item() for name, p in lora_b.items()}

    assert all(backward().values()), "every LoRA B gets a gradient before any eval"
    model.eval()
    with torch.no_grad():
        model(**batch)
    dead = [name for name, grad in backward().items() if grad == 0]
    assert not dead, f"no gradient after an eval pass (bitsandbytes CPU repack trap): {dead}"


# --------------------------------------------------------------------------------------------------
# 5. Encoder-decoder (T5) with LoRA through the same command.

def test_t5_lora_lowers_loss_and_reloads_with_plain_peft(workdir, tiny_t5):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    data = write_jsonl(workdir / "train.jsonl", toy_task_records(200))
    config = _config(workdir, "t5", tiny_t5, data, data={"val_set_size": 40}, template={"name": "plain"},
                     lora={"r": 16, "alpha": 32, "dropout": 0.0}, training=FAST)
    assert _sft(config) == 0
    row = _latest()
    assert row.metrics["eval_loss"] < row.metrics["eval_loss_before"] - 1.0, row.metrics

    out = Path(row.path)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    tokenizer = AutoTokenizer.from_pretrained(out)
    reloaded = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), out).eval()
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    records = toy_task_records(16, seed=123)
    inputs = tokenizer([r["prompt"] for r in records], return_tensors="pt", padding=True)
    labels = tokenizer(text_target=[r["completion"] for r in records], return_tensors="pt", padding=True)
    labels = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
    with torch.no_grad():
        tuned_loss = reloaded(**inputs, labels=labels).loss.item()
        base_loss = base(**inputs, labels=labels).loss.item()
    assert tuned_loss < base_loss - 1.0
    assert tuned_loss == pytest.approx(row.metrics["eval_loss"], abs=0.5), "reloaded model is the trained one"


# --------------------------------------------------------------------------------------------------
# 6-7. What the trainer actually trains on: completion-only masks and packing.

def _trainer(config_path: str):
    """The SFT trainer `align sft` would build for this config (same functions, in the same order), untrained."""
    from align.artifacts import RunDir
    from align.data import read_records, to_examples
    from align.modeling import (apply_tuning, load_model, load_tokenizer, match_model_to_tokenizer,
                                prepare_tokenizer)
    from align.stages import sft

    cfg = sft.load(config_path, [])
    tokenizer = load_tokenizer(cfg.model.path, cfg.model)
    prepare_tokenizer(tokenizer)
    examples = to_examples(read_records(cfg.data.path), cfg.data, cfg.template).examples
    model = load_model(cfg.model.path, cfg.model, cfg.quantization)
    match_model_to_tokenizer(model, tokenizer)
    model = apply_tuning(model, cfg.lora, cfg.model, quantized=False, gradient_checkpointing=False)
    args = sft.training_arguments(cfg, RunDir(Path(config_path).with_suffix("")), has_eval=False)
    trainer = sft._make_trainer(model, tokenizer, args, examples, [], seq2seq=False, cfg=cfg)
    return trainer, tokenizer, examples


@pytest.mark.parametrize("template", ["question_answer", "chat"])
def test_completion_only_masking(workdir, tiny_llama, template):
    records = toy_task_records(12)
    data = write_jsonl(workdir / "train.jsonl", records)
    trainer, tokenizer, examples = _trainer(_config(workdir, "mask", tiny_llama, data,
                                                    template={"name": template}, training=FAST))
    assert len(trainer.train_dataset) == len(examples) == len(records)
    # The trainer's own collator over the first rows, in dataset order (row i <-> record i); padded batch.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos

    for i in range(8):
        record, example = records[i], examples[i]
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        if template == "chat":
            prompt_text = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
            assert record["prompt"] in prompt_text and "<|assistant|>" in prompt_text
        else:
            prompt_text = tokenizer.bos_token + f"### Question:\n{record['prompt']}\n### Answer:\n"
        prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any(), "right padding"

        assert (labels[:prompt_len] == -100).all(), "every prompt token is masked"
        assert tokenizer.decode(ids[:prompt_len]) == prompt_text
        completion = labels[prompt_len:length]
        assert (completion == ids[prompt_len:length]).all(), "completion tokens are their own labels"
        assert (labels[length:] == -100).all(), "padding is masked"
        assert completion[-1] == eos or (template == "chat" and eos in completion.tolist()), \
            "EOS closing the completion is a label: the model learns to stop"
        trained_text = tokenizer.decode(completion)
        if template == "chat":  # the template ends each turn with "</s>\n"
            assert trained_text.rstrip("\n") == record["completion"] + tokenizer.eos_token
        else:
            assert trained_text == record["completion"] + tokenizer.eos_token


@pytest.mark.parametrize("model_name, records", [
    ("tiny_gpt_neox", "text"),  # no BOS: each packed example starts with a real word
    ("tiny_llama", "prompt_completion"),
])
def test_packing_keeps_examples_apart(workdir, request, model_name, records):
    model_path = request.getfixturevalue(model_name)
    rows = toy_text_records(48) if records == "text" else toy_task_records(48)
    data = write_jsonl(workdir / "train.jsonl", rows)

    def trained_tokens(trainer) -> int:  # labels the loss uses: position 0 of a row has nothing before it
        return sum(int((b["labels"][:, 1:] != -100).sum()) for b in trainer.get_train_dataloader())

    template = {"name": "plain"}
    plain, _, _ = _trainer(_config(workdir, "unpacked", model_path, data, template=template, training=FAST))
    packed, tokenizer, _ = _trainer(_config(workdir, "packed", model_path, data, template=template,
                                            training={**FAST, "packing": True}))
    assert trained_tokens(packed) == trained_tokens(plain)

    batch = next(iter(packed.get_train_dataloader()))
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape[0] == 1 and "attention_mask" not in batch
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3, "several examples share one row"
    bounds = starts + [ids.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        assert positions[0, start:end].tolist() == list(range(end - start)), "positions restart at each example"
        assert labels[0, start] == -100, "no label predicts an example from the end of the previous one"
        assert ids[0, end - 1] == tokenizer.eos_token_id and labels[0, end - 1] == tokenizer.eos_token_id
    if records == "prompt_completion":
        for start, end in zip(bounds[:-1], bounds[1:]):
            decoded = tokenizer.decode(ids[0, start:end])
            prompt_len = len(tokenizer(decoded.split("\n", 1)[0] + "\n", add_special_tokens=False)["input_ids"])
            assert (labels[0, start:start + prompt_len] == -100).all(), "prompts stay masked when packed"

    # Attention does not cross boundaries either: each packed example gets the logits it gets alone.
    model = packed.model.eval()
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=positions).logits[0]
        for start, end in list(zip(bounds[:-1], bounds[1:]))[:4]:
            alone = model(input_ids=ids[:, start:end]).logits[0]
            torch.testing.assert_close(together[start:end], alone, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# 8. Resume after SIGKILL.

# Runs `align` with an observer: every executed training step is appended to $STEP_LOG, and a pause per
# step (STEP_DELAY seconds) leaves time to kill the run between checkpoints.
DRIVER = """
import os, sys, time
from transformers import Trainer

_step = Trainer.training_step

def training_step(self, *args, **kwargs):
    with open(os.environ["STEP_LOG"], "a") as handle:
        handle.write(f"{self.state.global_step}\\n")
    time.sleep(float(os.environ.get("STEP_DELAY", "0")))
    return _step(self, *args, **kwargs)

Trainer.training_step = training_step
from align.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_continues_from_checkpoint(workdir, tiny_llama, capsys):
    from align.artifacts import RunDir

    data = write_jsonl(workdir / "train.jsonl", toy_task_records(120))
    config = _config(workdir, "resumable", tiny_llama, data, lora={"r": 8, "dropout": 0.0},
                     training={**FAST, "save_strategy": "steps", "save_steps": 5, "save_total_limit": 2,
                               "logging_steps": 1})
    final = workdir / "runs" / "sft" / "resumable"
    work = RunDir(final).work
    env = _env(workdir)
    command = [sys.executable, "-c", DRIVER, "sft", "--config", config]

    with open(workdir / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=workdir, env={**env, "STEP_LOG": str(workdir / "steps1"),
                                                            "STEP_DELAY": "0.15"},
                                 stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        try:
            while read_json(work / "checkpoints" / "checkpoint-10" / "trainer_state.json") is None:
                assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint-10 within 120 s"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL

    assert not final.exists() and work.is_dir()
    assert _rows() == []
    checkpoint = RunDir(final).last_checkpoint()
    resumed_from = int(checkpoint.rsplit("-", 1)[1])
    assert 10 <= resumed_from < 30
    kept = sorted(p.name for p in (work / "checkpoints").glob("checkpoint-*"))
    assert len(kept) <= 2, f"save_total_limit: 2, found {kept}"

    # Without --resume the unfinished run is not silently overwritten.
    assert _sft(config) == 2
    assert "--resume" in capsys.readouterr().err
    assert work.is_dir() and (work / "checkpoints").is_dir()

    resumed = subprocess.run([*command, "--resume"], cwd=workdir, env={**env, "STEP_LOG": str(workdir / "steps2")},
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    executed = [int(s) for s in (workdir / "steps2").read_text().split()]
    assert executed == list(range(resumed_from, 30)), "the resumed run does only the steps after the checkpoint"

    assert final.is_dir() and not work.exists()
    rows = _rows()
    assert len(rows) == 1 and rows[0].metrics["steps"] == 30
    log = [json.loads(line) for line in (final / "training_log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log if "loss" in e]
    assert steps == list(range(1, 31)), "the log keeps the steps before the checkpoint and continues after it"


# --------------------------------------------------------------------------------------------------
# 9. Two-process DDP on CPU.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_on_cpu_write_one_artifact(workdir, tiny_llama):
    data = write_jsonl(workdir / "train.jsonl", toy_task_records(160))
    config = _config(workdir, "ddp", tiny_llama, data, lora={"r": 8, "dropout": 0.0},
                     training={**FAST, "max_steps": 10})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "align", "sft", "--config", config]
    done = subprocess.run(command, cwd=workdir, env=_env(workdir), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = _rows()
    assert len(rows) == 1, [r.path for r in rows]
    assert [p.name for p in (workdir / "runs" / "sft").iterdir()] == ["ddp"]
    assert rows[0].metrics["steps"] == 10
    # Both ranks trained on their own shard: 10 steps x 2 ranks x 8 examples = one pass over 160 examples.
    log = [json.loads(line) for line in (workdir / "runs" / "sft" / "ddp" / "training_log.jsonl").open()]
    assert log[-1]["epoch"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# 10-11. Tokenizer safety and over-long examples.

def test_tokenizer_without_pad_token_trains_and_saves_a_distinct_pad(workdir, tiny_llama_no_pad):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny_llama_no_pad).pad_token is None
    data = write_jsonl(workdir / "train.jsonl", toy_task_records(120))
    config = _config(workdir, "nopad", tiny_llama_no_pad, data, data={"val_set_size": 24},
                     lora={"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
                     training={**FAST, "max_steps": 20})
    assert _sft(config) == 0
    row = _latest()
    assert row.metrics["eval_loss"] < row.metrics["eval_loss_before"] - 1.0, row.metrics
    saved = AutoTokenizer.from_pretrained(row.path)
    assert saved.pad_token is not None and saved.pad_token_id != saved.eos_token_id


def test_overlong_examples_are_counted_and_dropped_or_kept(workdir, tiny_llama):
    # 24 short examples (~23 tokens with the chat template) and 8 whose 30-letter answers make them ~90 tokens.
    long = [{"prompt": "reverse: a b c\n", "completion": " ".join("abcdef"[i % 6] for i in range(30 + k))}
            for k in range(8)]
    data = write_jsonl(workdir / "train.jsonl", toy_task_records(24) + long)
    metrics = {}
    for overlong in ("drop", "truncate"):
        config = _config(workdir, overlong, tiny_llama, data, data={"overlong": overlong},
                         lora={"r": 8, "dropout": 0.0},
                         training={**FAST, "max_steps": -1, "num_train_epochs": 1, "max_length": 32})
        assert _sft(config) == 0
        metrics[overlong] = _latest().metrics
        assert metrics[overlong]["over_max_length"] == 8, "counted either way"

    dropped, kept = metrics["drop"], metrics["truncate"]
    assert dropped["train_examples"] == 24 and dropped["steps"] == 3
    assert kept["train_examples"] == 32 and kept["steps"] == 4
    assert dropped["trained_tokens"] < 24 * 32
    # One epoch each: the truncated run saw the same short examples plus each long one cut to max_length.
    assert kept["trained_tokens"] == dropped["trained_tokens"] + 8 * 32


def test_model_card_front_matter_keeps_a_base_model_path_with_yaml_characters(tmp_path):
    import yaml

    from align.artifacts import write_model_card

    base = "/models/run: 2 #final"
    write_model_card(tmp_path, final_path=tmp_path, title="t", stage="sft", base_model=base, model_source=base,
                     adapter=True, data_source="d.jsonl", data_fingerprint="f", metrics={"loss": 1.0}, config={},
                     plots=[])
    front = (tmp_path / "README.md").read_text().split("---\n")[1]
    assert yaml.safe_load(front) == {"base_model": base, "library_name": "peft", "tags": ["align", "sft"]}
