"""`align ppo` (and `--algorithm grpo|rloo`) with a gold preference (`gold:`): every iteration's responses are
scored under it and logged as `gold`, measured and never trained on (Gao et al. 2022's overoptimization curve).

- The pure decision (`align.stages.ppo.common.overoptimization`) on constructed histories: it fires when the proxy
  rises while the gold falls by more than its noise, not when both rise or the gold only wanders within its noise.
- A tiny PPO run (tests/test_ppo.py's `dev` setup: a toy SFT model, a reward model preferring `z`) with a gold
  callable written into the run folder: `gold` in every log entry and sample, the overoptimization plot, the
  summary; and the very same run without the gold: identical rewards, losses and trained weights.
- A bad gold (cannot import, raises, returns a string, is the proxy itself) ends in one line, exit code 2, before a
  model loads.
- GRPO with a gold: TRL's weight-0 reward function, read back per iteration; identical to the run without it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.test_ppo import (GROUP, PNG_MAGIC, _config, _error_line, _log, _lora_adapter, _main, _merge,  # noqa: F401
                             _ppo_rows, _run_two, dev)

# The proxy (the toy reward model) prefers responses with `z`; this gold prefers fewer of them: the policy PPO
# trains against the proxy should do worse under it. A second function makes the gold's own noise visible.
GOLD_MODULE = '''
import os


def fewer_z(prompt, response):
    return -float(response.count("z"))


def raises(prompt, response):
    raise RuntimeError("gold service down")


def text(prompt, response):
    return "good"


def rank(prompt, response):
    return float(os.environ.get("RANK", "0"))
'''

# 8 iterations (of tests/test_ppo.py's BASE: 16 prompts, 4 PPO epochs of 2 minibatches) keep the pair of runs
# short; the policy already moves towards `z` in them.
SHORT = {"ppo": {"steps": 8, "logging_steps": 1, "sample_steps": 4}}


@pytest.fixture(scope="module")
def gold_module(dev):  # noqa: F811 - the fixture imported from tests/test_ppo.py
    """`ppo_gold_toy.py` in the run folder (the current directory: align.gold makes it importable, as python -m)."""
    (dev.home / "ppo_gold_toy.py").write_text(GOLD_MODULE)
    return "ppo_gold_toy"


def _entry_of(log: list[dict], keep=lambda key: key not in ("time_s", "gold", "gold_std")) -> list[dict]:
    return [{k: v for k, v in e.items() if keep(k)} for e in log]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# --------------------------------------------------------------------------------------------------
# 1. The decision, on constructed histories.

def _history(reward, gold, kl=None) -> list[dict]:
    return [{"step": i + 1, "reward": r, "gold": g, **({"kl": kl[i]} if kl else {})}
            for i, (r, g) in enumerate(zip(reward, gold))]


WIGGLE = [0.03, -0.02, 0.01, -0.04, 0.02, 0.0, -0.01, 0.03, -0.03, 0.02] * 3  # +-0.04 per-iteration noise


def test_overoptimization_fires_when_the_proxy_rises_and_the_gold_falls():
    from align.stages.ppo.common import overoptimization, summarize

    n = 30
    reward = [0.1 * i + w for i, w in enumerate(WIGGLE[:n])]  # 0 -> 2.9
    gold = [0.5 + 0.04 * i - 0.003 * i * i + w for i, w in enumerate(WIGGLE[:n])]  # up, peaks near 7, then down
    history = _history(reward, gold)
    verdict = overoptimization(history, 5)
    assert verdict is not None and verdict.startswith("overoptimization: the gold score fell"), verdict
    assert "\n" not in verdict and "proxy reward rose" in verdict
    peak = int(verdict.split("peaked around iteration ")[1].split()[0])
    assert 4 <= peak <= 10, verdict
    summary = summarize(history, n, n * 16, 10.0, 0, 0.05)
    assert summary["window"] == 5 and summary["overoptimized"] is True
    assert summary["overoptimization"] == verdict
    assert summary["gold_first"] > summary["gold_last"] and summary["reward_last"] > summary["reward_first"]
    assert json.loads(json.dumps(summary))["overoptimized"] is True  # what the registry keeps


@pytest.mark.parametrize("case", ["both_rise", "gold_flat_within_noise", "proxy_flat", "too_short", "no_gold"])
def test_overoptimization_stays_quiet_otherwise(case):
    from align.stages.ppo.common import finished_rows, overoptimization, summarize

    n = 30
    rising = [0.1 * i + w for i, w in enumerate(WIGGLE[:n])]
    noise = [0.3 + 3 * w for w in WIGGLE[:n]]  # +-0.12 around 0.3, and a small drift down inside that noise
    history = {
        "both_rise": _history(rising, [0.2 + 0.02 * i + w for i, w in enumerate(WIGGLE[:n])]),
        "gold_flat_within_noise": _history(rising, [g - 0.001 * i for i, g in enumerate(noise)]),
        "proxy_flat": _history([0.5 + w for w in WIGGLE[:n]], [1 - 0.05 * i for i in range(n)]),
        "too_short": _history([0.0, 1.0], [1.0, 0.0]),
        "no_gold": [{"step": i + 1, "reward": r} for i, r in enumerate(rising)],
    }[case]
    summary = summarize(history, len(history), 16 * len(history), 1.0, 0, 0.05)
    assert overoptimization(history, summary["window"]) is None
    assert "overoptimization" not in summary
    if case == "no_gold":
        assert "overoptimized" not in summary and "gold_last" not in summary
        assert not any(label.startswith("gold") for label, _ in finished_rows({**summary, "kl_last": 1.0,
                                                                                "length_first": 1, "length_last": 1,
                                                                                "eos_rate_first": 1,
                                                                                "eos_rate_last": 1}))
    else:
        assert summary["overoptimized"] is False


def test_overoptimization_skips_skipped_and_non_finite_iterations():
    from align.stages.ppo.common import overoptimization

    n = 30
    history = _history([0.1 * i + w for i, w in enumerate(WIGGLE[:n])],
                       [2 - 0.05 * i + w for i, w in enumerate(WIGGLE[:n])])
    assert overoptimization(history, 5) is not None
    noisy = history[:10] + [{"skipped": 1}, {"step": 99, "reward": float("nan"), "gold": 5.0}] + history[10:]
    assert overoptimization(noisy, 5) == overoptimization(history, 5)


def test_finished_rows_and_plots_show_the_gold(tmp_path, capsys):
    from align.stages.ppo.common import (PLOT_PANELS, finished_rows, plot_overoptimization, print_overoptimization,
                                         summarize)
    from align.reporting import plot_metric_grid

    n = 12
    history = _history([0.1 * i for i in range(n)], [1 - 0.1 * i for i in range(n)], kl=[0.2 * i for i in range(n)])
    for e in history:
        e.update(response_length=5.0, eos_rate=1.0)
    summary = summarize(history, n, n * 16, 1.0, 0, 0.05)
    rows = dict(finished_rows(summary))
    assert rows["gold score"].startswith(f"{summary['gold_first']:.3f} -> {summary['gold_last']:.3f}")
    assert "OVEROPTIMIZED" in rows["gold score"]
    capsys.readouterr()
    print_overoptimization(summary)
    assert " ".join(capsys.readouterr().out.split()) == summary["overoptimization"]
    print_overoptimization({**summary, "overoptimized": False, "overoptimization": None})
    assert capsys.readouterr().out == ""
    assert ("gold score (never trained on)", ["gold"]) in PLOT_PANELS
    assert plot_metric_grid(history, tmp_path, "curves.png", PLOT_PANELS) == ["plots/curves.png"]
    assert plot_overoptimization(history, tmp_path, summary["overoptimization"]) == ["plots/overoptimization.png"]
    assert (tmp_path / "plots" / "overoptimization.png").read_bytes()[:8] == PNG_MAGIC
    # Without KL (beta 0): against the iteration only; without a gold: no plot.
    assert plot_overoptimization([{k: v for k, v in e.items() if k != "kl"} for e in history], tmp_path / "b") == \
        ["plots/overoptimization.png"]
    assert plot_overoptimization([{"step": 1, "reward": 1.0}], tmp_path / "c") == []


# --------------------------------------------------------------------------------------------------
# 2. A tiny PPO run with a gold, and the same run without it.

@pytest.fixture(scope="module")
def with_gold(dev, gold_module):  # noqa: F811
    return _ppo_run(dev, "gold-on", gold=f"{gold_module}:fewer_z")


@pytest.fixture(scope="module")
def without_gold(dev):  # noqa: F811
    return _ppo_run(dev, "gold-off")


def _ppo_run(dev, name: str, *extra: str, gold: str | None = None, algorithm: str = "ppo", **sections):  # noqa: F811
    from types import SimpleNamespace

    overrides = [f"gold={gold}"] if gold else []
    args = ["ppo", "--config", _config(dev.home, name, **(sections or SHORT)), *overrides, *extra]
    if algorithm != "ppo":
        args += ["--algorithm", algorithm]
    assert _main(*args) == 0
    row = _ppo_rows()[0]
    assert row.name == name
    out = Path(row.path)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return SimpleNamespace(row=row, m=row.metrics, out=out, log=_log(out), samples=samples)


def test_ppo_logs_the_gold_every_iteration_with_samples_plots_and_summary(with_gold, gold_module):
    log, m = with_gold.log, with_gold.m
    assert [e["step"] for e in log] == list(range(1, 9))
    assert all(math.isfinite(e["gold"]) and e["gold"] <= 0 for e in log), [e.get("gold") for e in log]
    # Each sample keeps its own gold score, next to its reward: the gold's value of that very response.
    assert len(with_gold.samples) == 16
    assert all(s["gold"] == -float(s["response"].count("z")) for s in with_gold.samples)
    assert log[-1]["gold"] == pytest.approx(sum(s["gold"] for s in with_gold.samples) / 16)
    for name in ("ppo_curves.png", "overoptimization.png"):
        assert (with_gold.out / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name
    assert m["gold_first"] == pytest.approx(sum(e["gold"] for e in log[:m["window"]]) / m["window"])
    assert m["gold_last"] == pytest.approx(sum(e["gold"] for e in log[-m["window"]:]) / m["window"])
    assert isinstance(m["overoptimized"], bool)
    assert with_gold.row.config["gold"] == f"{gold_module}:fewer_z"


def test_ppo_shows_the_gold_in_the_log_line_and_closing_table(dev, gold_module, capsys):  # noqa: F811
    capsys.readouterr()
    _ppo_run(dev, "gold-lines", gold=f"{gold_module}:fewer_z", ppo={"steps": 2, "logging_steps": 1})
    out = " ".join(capsys.readouterr().out.split())
    assert "iteration 1/2 reward" in out and re.search(r"\) gold [+-]\d\.\d{3} kl ", out), out
    assert re.search(r"gold \(measured only\) │ ppo_gold_toy:fewer_z: the Python function", out), out
    assert re.search(r"gold score │ -?\d\.\d{3} -> -?\d\.\d{3} \(first -> last;", out), out


def test_the_gold_never_changes_training(with_gold, without_gold):
    """The same run without the gold: the same rewards, losses, KL, samples and trained weights."""
    assert all("gold" not in e for e in without_gold.log)
    assert _entry_of(with_gold.log) == _entry_of(without_gold.log)
    assert [{k: v for k, v in s.items() if k != "gold"} for s in with_gold.samples] == without_gold.samples
    trained, reference = _adapter(with_gold.out), _adapter(without_gold.out)
    assert trained.keys() == reference.keys() and all(torch.equal(trained[k], reference[k]) for k in trained)
    assert "gold_last" not in without_gold.m and "overoptimized" not in without_gold.m
    assert not (without_gold.out / "plots" / "overoptimization.png").exists()


def test_a_reward_model_gold_scores_each_iteration(dev):  # noqa: F811
    """A gold that is another reward model (here an untrained SEQ_CLS adapter on the raw tiny Llama, a folder):
    its score of each sample is the score RewardScorer gives that (prompt, response)."""
    from align.scoring import RewardScorer

    folder = _lora_adapter(dev.home / "gold-rm", dev.tiny_llama, "SEQ_CLS")
    run = _ppo_run(dev, "gold-rm", gold=folder, ppo={"steps": 2})
    assert [e["step"] for e in run.log] == [1, 2] and all(math.isfinite(e["gold"]) for e in run.log)
    expected = RewardScorer.load(folder).score([s["prompt"] for s in run.samples],
                                               [s["response"] for s in run.samples])
    assert [s["gold"] for s in run.samples] == pytest.approx(expected, abs=1e-4)
    assert run.row.config["gold"] == folder


# --------------------------------------------------------------------------------------------------
# 3. A bad gold: one line, exit code 2, before any model loads.

BAD_GOLD = {
    "cannot_import": ("no_such_gold_module:score", "gold: cannot import 'no_such_gold_module'"),
    "raises": ("@module:raises", "raised RuntimeError: gold service down"),
    "returns_a_string": ("@module:text", "returned 'good' (str)"),
    "not_a_function": ("@module:missing", "has no function 'missing'"),
    "not_a_reward_model": ("sft:1", "gold: reward model: sft:1 is not a reward model"),
    "the_proxy_itself": ("reward:1", "gold: reward:1 is the reward model the policy is optimized against"),
    "unknown_spec": ("better answers", "gold: 'better answers' is not a gold preference"),
}


# Both trainers check the gold with the same function (align.stages.ppo.common.load_run_gold): GRPO runs two of the
# cases.
@pytest.mark.parametrize("case, algorithm", [(case, "ppo") for case in sorted(BAD_GOLD)] +
                         [("raises", "grpo"), ("the_proxy_itself", "grpo")])
def test_bad_gold_fails_with_one_line_before_a_model_loads(case, algorithm, dev, gold_module, monkeypatch,  # noqa: F811
                                                           capsys):
    from align import modeling, scoring
    from align.registry import Registry

    spec, expected = BAD_GOLD[case]
    spec = spec.replace("@module", gold_module)
    loads = []
    monkeypatch.setattr(modeling, "load_model", lambda *a, **k: loads.append(a))  # the policy's weights
    monkeypatch.setattr(scoring, "load_sequence_classifier", lambda *a, **k: loads.append(a))  # a reward model's
    name = f"bad-gold-{case}-{algorithm}"
    sections = {"ppo": {"steps": 2, "group_size": 4, "mini_batch_size": 16, "batch_size": 8}} \
        if algorithm == "grpo" else {}
    rows_before = len(Registry().list())
    capsys.readouterr()
    args = ["ppo", "--config", _config(dev.home, name, **sections), f"gold={spec}"]
    assert _main(*args + (["--algorithm", algorithm] if algorithm != "ppo" else [])) == 2
    err = _error_line(capsys.readouterr().err)
    assert expected in err, err
    assert not loads, "a model loaded before the gold was checked"
    assert not list((dev.home / "runs" / "ppo").glob(name + "*"))
    assert len(Registry().list()) == rows_before


# --------------------------------------------------------------------------------------------------
# 4. GRPO: the gold as TRL's weight-0 reward function, logged per iteration, changing nothing.

GROUP_SHORT = {"ppo": {"steps": 3, "batch_size": 8, "group_size": 4, "mini_batch_size": 16, "ppo_epochs": 2,
                       "logging_steps": 1, "sample_steps": 0}}


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_log_the_gold_per_iteration_and_it_changes_nothing(algorithm, dev, gold_module,  # noqa: F811
                                                                         capsys):
    capsys.readouterr()
    on = _ppo_run(dev, f"{algorithm}-gold-on", gold=f"{gold_module}:fewer_z", algorithm=algorithm, **GROUP_SHORT)
    out = " ".join(capsys.readouterr().out.split())
    assert re.search(r"iteration 3/3 reward [+-]\d\.\d{3} gold [+-]\d\.\d{3} kl ", out), out
    assert "reward function of weight 0" in out and re.search(r"gold score │ -?\d\.\d{3} -> ", out), out
    off = _ppo_run(dev, f"{algorithm}-gold-off", algorithm=algorithm, **GROUP_SHORT)
    assert [e["step"] for e in on.log] == [1, 2, 3]
    assert all(math.isfinite(e["gold"]) and e["gold"] <= 0 for e in on.log), on.log
    assert len(on.samples) == 32 and all(s["gold"] == -float(s["response"].count("z")) for s in on.samples)
    assert on.log[-1]["gold"] == pytest.approx(sum(s["gold"] for s in on.samples) / 32)
    assert (on.out / "plots" / "overoptimization.png").read_bytes()[:8] == PNG_MAGIC
    assert "gold_first" in on.m and "gold_last" in on.m and "overoptimized" in on.m
    # Weight 0: TRL's rewards, advantages, and so its losses and updates, are those of the run without the gold.
    assert _entry_of(on.log) == _entry_of(off.log)
    assert [{k: v for k, v in s.items() if k != "gold"} for s in on.samples] == off.samples
    trained, reference = _adapter(on.out), _adapter(off.out)
    assert all(torch.equal(trained[k], reference[k]) for k in trained)


# --------------------------------------------------------------------------------------------------
# 5. Several processes: the logged gold is the mean over every process's responses.

@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_two_processes_log_the_gold_of_all_responses(algorithm, dev, gold_module):  # noqa: F811
    """A gold that scores each response with its process's rank: 0 on one process, 1 on the other; the mean of the
    iteration's responses is 0.5."""
    name = f"gold-ddp-{algorithm}"
    sections = _merge(GROUP, {"ppo": {"steps": 2}}) if algorithm != "ppo" else \
        {"ppo": {"steps": 2, "batch_size": 8, "mini_batch_size": 4}, "reward": {"share_base": "false"}}
    args = ["--config", _config(dev.home, name, **sections), f"gold={gold_module}:rank"]
    _run_two(dev, *args + (["--algorithm", algorithm] if algorithm != "ppo" else []))
    row = _ppo_rows()[0]
    assert row.name == name
    log = _log(Path(row.path))
    assert [e["step"] for e in log] == [1, 2] and all(e["gold"] == pytest.approx(0.5) for e in log), log
    assert row.metrics["gold_last"] == pytest.approx(0.5)
