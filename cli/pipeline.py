"""`align pipeline`: the InstructGPT chain on one config, each step a normal registered run.

    sft -> label (completions pushed to Argilla, ranked by people or by simulated annotators, pulled as pairs)
        -> reward -> ppo and dpo -> eval (ppo and dpo against sft)

With `rounds: N`, label -> reward -> ppo / dpo runs N times (InstructGPT collected its rankings in rounds): round
r > 1 ranks completions of round r-1's policy in a new Argilla dataset, the reward model is trained on the rankings
of every round so far (one file registered with each round's rankings as parents), and the policies start from SFT
or continue round r-1's (`policy_from`). The eval runs once, after the last round, with every round's policies (and
every round's reward model: its held-out accuracy and, under a gold, its agreement with it).

With simulated annotators, the gold preference they rank by (`label.gold`, align/gold.py) is also handed to PPO
(scored every iteration, never trained on) and to the evaluation (win rates under the gold lead the report).

Each step runs its stage with the step's own YAML, plus what the pipeline wires in: the registry references of the
steps before (`model.path`, `data.path`, `reward.path`), `output.name` = `<pipeline>-<step>` and an output folder
named by a digest of the resolved config. Every step's config is read and checked once, before the first step
runs, with stand-ins for the references of the steps before; the real ones replace them when the step runs. A
re-run finds a finished step in the registry by its folder (same config, same inputs -> skipped), resumes a step
that was interrupted after a checkpoint, and re-runs a step whose config or inputs changed (into a new folder:
earlier artifacts stay as registered).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from pathlib import Path

from align.artifacts import RunDir
from align.files import write_atomically, write_jsonl
from align.cli.pipeline_config import PipelineRunConfig, PipelineStepConfig
from align.config import LoadedConfig, load_config, read_config, to_dict
from align.errors import AlignError
from align.gold import load_gold
from align.registry import Artifact, Registry, looks_like_ref, redact_secrets
from align.reporting import console, print_table
from align.stages.dpo_config import DPORunConfig
from align.stages.eval_config import EvalRunConfig
from align.stages.ppo.config import PPORunConfig
from align.stages.reward_config import RewardRunConfig
from align.stages.sft_config import SFTRunConfig

STEPS = ("sft", "label", "reward", "ppo", "dpo", "eval")
POLL_S = 30  # how often a pipeline waiting for people asks Argilla how far they got
STAGE_CONFIGS = {"sft": SFTRunConfig, "reward": RewardRunConfig, "ppo": PPORunConfig, "dpo": DPORunConfig,
                 "eval": EvalRunConfig}


def load(config_path: str, overrides: list[str]) -> PipelineRunConfig:
    cfg = load_config(config_path, overrides, PipelineRunConfig)
    needs = {"reward": ["sft", "label"], "ppo": ["sft", "reward"], "dpo": ["sft", "label"], "eval": ["sft"]}
    enabled = _enabled(cfg)
    for step, inputs in needs.items():
        missing = [i for i in inputs if i not in enabled]
        if step in enabled and missing:
            raise AlignError(f"{config_path}: {step} needs the output of {', '.join(missing)}, which is disabled "
                             f"({missing[0]}.enabled: false); enable it or disable {step}")
    if "eval" in enabled and not {"ppo", "dpo"} & set(enabled):
        raise AlignError(f"{config_path}: eval compares the ppo and dpo models with sft, and both are disabled; "
                         f"enable one of them or disable eval (eval.enabled: false)")
    gold = simulated_gold(cfg)
    if gold and looks_like_ref(gold):  # `reward:latest` pinned now: later steps register newer reward models
        cfg.label.gold = Registry().resolve(gold).ref
    elif gold:  # a reward-model gold is checked when the label step loads it
        load_gold(gold, option="label.gold")
    return cfg


def _enabled(cfg: PipelineRunConfig) -> list[str]:
    """The steps that run: label with sft (it ranks the SFT model's completions)."""
    return [step for step in STEPS if getattr(cfg, "sft" if step == "label" else step).enabled]


def simulated_gold(cfg: PipelineRunConfig) -> str | None:
    """The gold preference the simulated annotators rank by: PPO tracks it and the evaluation measures under it
    (never trained on). None with people ranking, or with `random` annotators (no preference to measure)."""
    label = cfg.label
    return label.gold if label.annotators == "simulated" and label.gold != "random" else None


def run(cfg: PipelineRunConfig, config_path: str) -> dict[str, Artifact]:
    """`align pipeline`: `cfg` as `load` validated it from `config_path`."""
    gold = simulated_gold(cfg)
    modules, configs = _check_steps(cfg, gold)
    home = Path("runs") / "pipeline" / cfg.name
    done: dict[str, Artifact] = {}
    started = time.monotonic()
    timings: dict[str, tuple[str, float]] = {}

    def step(name: str, action, *args) -> Artifact:
        console.rule(f"[bold]pipeline {cfg.name}: {name}")
        began = time.monotonic()
        try:
            artifact, how = action(*args)
        except AlignError as e:
            raise AlignError(f"pipeline step '{name}' failed: {e} (fix it and run the same command again: finished "
                             f"steps are skipped, an interrupted one resumes)") from None
        done[name] = artifact
        timings[name] = (how, time.monotonic() - began)
        return artifact

    def run_stage(stage: str, refs: dict, run_name: str) -> tuple[Artifact, str]:
        # A copy per round: the checked config is the same, the references and the run name are the round's.
        config = _with_references(copy.deepcopy(configs[stage]), stage, refs, getattr(cfg, stage))
        config.output.name = run_name
        return _stage(modules[stage], stage, getattr(cfg, stage), config, home,
                      _step_overrides(cfg, stage, refs, gold, run_name))

    sft = step("sft", run_stage, "sft", {}, f"{cfg.name}-sft")
    labels: list[Artifact] = []  # each round's rankings
    policies: dict[str, Artifact] = {}  # the last round's ppo / dpo
    evaluated: list[str] = []  # every round's policies
    rewards: list[str] = []  # every round's reward model (label.select asks them; the eval measures them)
    for number in range(1, cfg.rounds + 1):
        tag = "" if number == 1 else f" (round {number})"
        prefix = cfg.name if number == 1 else f"{cfg.name}-round{number}"  # the round's run names: `<prefix>-<step>`
        sampler = sft if number == 1 else policies[round_policy(cfg)]
        labels.append(step("label" + tag, _label, cfg, home, sampler, number, list(rewards), sft))
        # What the reward model (and a dpo from sft) trains on: the rankings of every round so far.
        refs = {"sft": sft.ref, "label": (labels[0] if number == 1 else _rankings_so_far(cfg, home, labels)).ref}
        if cfg.reward.enabled:
            further = {"reward_start": rewards[-1]} if cfg.reward_from == "previous" and rewards else {}
            rewards.append(step("reward" + tag, run_stage, "reward", {**refs, **further}, f"{prefix}-reward").ref)
            refs["reward"] = rewards[-1]
        for stage in ("ppo", "dpo"):
            if getattr(cfg, stage).enabled:
                start = {"start": policies[stage].ref, "round_label": labels[-1].ref} \
                    if cfg.policy_from == "previous" and stage in policies else {}
                policies[stage] = step(stage + tag, run_stage, stage, {**refs, **start}, f"{prefix}-{stage}")
                evaluated.append(policies[stage].ref)
    if cfg.eval.enabled:
        rounds = {"reward_models": rewards} if len(rewards) > 1 else {}
        step("eval", run_stage, "eval", {**refs, "policies": evaluated, **rounds}, f"{cfg.name}-eval")
    rows = [(name, f"{artifact.ref} ({how}, {seconds / 60:.1f} min)") for name, artifact in done.items()
            for how, seconds in [timings[name]]]
    rows.append(("total", f"{(time.monotonic() - started) / 60:.1f} min"))
    if "eval" in done:
        rows.append(("report", str(Path(done["eval"].path) / "report.html")))
    print_table(f"pipeline {cfg.name}: finished", rows)
    _write_summary(home / "last-run.json", {
        "config": config_path, "seed": cfg.seed, "gold": gold, "rounds": cfg.rounds,
        "steps": {name: {"ref": artifact.ref, "how": timings[name][0], "seconds": round(timings[name][1], 1)}
                  for name, artifact in done.items()}})
    return done


def round_policy(cfg: PipelineRunConfig) -> str:
    """The policy of round r-1 whose completions round r ranks: `round_policy`, else ppo when enabled, else dpo."""
    return cfg.round_policy or ("ppo" if cfg.ppo.enabled else "dpo")


def _write_summary(path: Path, summary: dict) -> None:
    """What this run of the pipeline did (benchmarks/demo_quality.py reads it), written whole or not at all."""
    write_atomically(path, json.dumps(summary, indent=2) + "\n")


def _check_steps(cfg: PipelineRunConfig, gold: str | None) -> tuple[dict, dict]:
    """Every step's config read and checked before the first step runs (a typo in the eval config must not wait for
    the training before it): align's checks first, in a second, then each stage's own on the same object (TRL's
    config objects built) once the stages are imported. Returns each step's stage module and its config, which holds
    stand-ins (`sft:latest`, ...) for the references of the steps before (`_with_references` puts in the real ones)."""
    enabled = _enabled(cfg)
    steps = [name for name in STAGE_CONFIGS if name in enabled]
    refs = {name: f"{name}:latest" for name in enabled}  # stand-ins for the references of the steps before
    refs["policies"] = [refs[name] for name in ("ppo", "dpo") if name in refs]
    if cfg.rounds > 1 and "reward" in refs:
        refs["reward_models"] = [refs["reward"]]

    def checked(name: str, check, *args):
        try:
            return check(*args)
        except AlignError as e:
            raise AlignError(f"pipeline step '{name}': {e} (nothing has run yet)") from None

    loaded = {name: checked(name, read_config, getattr(cfg, name).config,
                            _step_overrides(cfg, name, refs, gold, f"{cfg.name}-{name}"), STAGE_CONFIGS[name])
              for name in steps}
    from align.stages import dpo, eval as evaluation, reward, sft
    from align.stages.ppo import grpo, stage as ppo

    algorithm = loaded["ppo"].config.algorithm if "ppo" in loaded else "ppo"  # grpo / rloo: TRL's, stages/ppo/grpo.py
    modules = {"sft": sft, "reward": reward, "ppo": ppo if algorithm == "ppo" else grpo, "dpo": dpo,
               "eval": evaluation}
    # eval has no checks beyond align's.
    finish = {"sft": sft.check, "reward": reward.check, "ppo": modules["ppo"].check, "dpo": dpo.check,
              "eval": LoadedConfig.finish}
    return modules, {name: checked(name, finish[name], loaded[name]) for name in steps}


def _references(stage: str, refs: dict) -> dict[str, str | list[str]]:
    """The keys of a step's config that name the output of the steps before. `refs`: their registry references
    (`sft`, `label`: the pairs to train on, `reward`, `policies`: the models to evaluate, `reward_models`: every
    round's, for the report) and, for a policy that continues the previous round's (`policy_from:
    previous`), `start` and its round's own pairs, `round_label`; for a reward model that continues the previous
    round's (`reward_from: previous`), `reward_start`."""
    if stage == "eval":
        wired: dict = {"models": refs["policies"], "baseline": refs.get("sft")}
        if "reward" in refs:  # without a reward model: no judge win rates, the tax and KL still
            wired["judge.path"] = refs["reward"]
        if "reward_models" in refs:  # every round's: their held-out accuracy, and against the gold
            wired["reward_models"] = refs["reward_models"]
        return wired
    start = refs.get("start")
    continued_dpo = {"model.path": start, "data.path": refs.get("round_label"), "reference": refs.get("sft")}
    return {"reward": {"model.path": refs.get("reward_start") or refs.get("sft"), "data.path": refs.get("label")},
            "ppo": {"model.path": start or refs.get("sft"), "reward.path": refs.get("reward")},
            "dpo": continued_dpo if start else {"model.path": refs.get("sft"), "data.path": refs.get("label")}
            }.get(stage, {})


def _continued(stage: str, refs: dict) -> dict[str, str]:
    """The model a step trains further (the previous round's, `policy_from` / `reward_from: previous`): it wins over
    the step's own `model.path`, which names where round 1 starts (a reward backbone other than the SFT model)."""
    start = refs.get("reward_start" if stage == "reward" else "start") if stage != "eval" else None
    return {"model.path": start} if start else {}


def _step_overrides(cfg: PipelineRunConfig, stage: str, refs: dict, gold: str | None, run_name: str) -> list[str]:
    """The overrides a step runs with: what the pipeline wires in (the references of the steps before; the gold; the
    seed), then the step's own overrides, which win (a reward model on another backbone than the SFT model:
    `model.path=...` among the reward step's overrides) except over a model trained further, then its run name."""
    wired = {key: "[" + ", ".join(value) + "]" if isinstance(value, list) else value
             for key, value in _references(stage, refs).items()}
    if gold and stage == "ppo":
        wired["gold"] = gold
    # The eval's gold scores are compared exactly: the annotators' tie margin models what people can tell apart.
    if gold and stage == "eval":
        wired["gold.preference"] = gold
    if stage != "eval" and cfg.seed is not None:
        wired = {"seed": cfg.seed, **wired}
    return [f"{key}={value}" for key, value in wired.items()] + list(getattr(cfg, stage).overrides) + \
        [f"{key}={value}" for key, value in _continued(stage, refs).items()] + [f"output.name={run_name}"]


def _with_references(config, stage: str, refs: dict, step: PipelineStepConfig):
    """`config`, checked with stand-ins for the references of the steps before, with the real ones (`refs`) in their
    place; a key the step's own overrides set (or a section around it) keeps their value, as it did at the check,
    unless it names the model a step trains further."""
    own = [item.partition("=")[0].strip() for item in step.overrides]
    continued = _continued(stage, refs)
    for key, value in _references(stage, refs).items():
        if key not in continued and any(key == mine or key.startswith(mine + ".") or mine.startswith(key + ".")
                                        for mine in own):
            continue
        *sections, last = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section)
        setattr(target, last, value)
    return config


def _stage(module, stage: str, step: PipelineStepConfig, config, home: Path,
           overrides: list[str]) -> tuple[Artifact, str]:
    """Run one stage with its checked `config` unless the registry already has it for this exact config; resume it
    when interrupted. `overrides`: how the step would be run by hand, for the log."""
    if not step.enabled:
        raise AlignError(f"{stage}: disabled")
    digest = hashlib.sha256(json.dumps(redact_secrets(to_dict(config)), sort_keys=True, default=str)
                            .encode()).hexdigest()[:10]
    folder = (home / f"{stage}-{digest}").absolute()
    config.output.dir = str(folder)
    overrides.append(f"output.dir={folder}")
    for artifact in Registry().list(stage=stage):
        if Path(artifact.path) == folder and folder.is_dir():
            console.print(f"{stage}: finished before as {artifact.ref} ({folder}); skipped")
            return artifact, "skipped: finished before"
    resume = RunDir(folder).last_checkpoint() is not None
    if resume:
        console.print(f"{stage}: resuming the interrupted run in {RunDir(folder).work}")
    console.print(f"{stage}: align {stage} --config {step.config} " + " ".join(overrides))
    if stage == "eval":
        artifact = module.run(config)
    else:
        artifact = module.run(config, step.config, resume=resume)
    if artifact is None:
        raise AlignError(f"{stage}: the stage registered nothing")
    return artifact, "resumed" if resume else "ran"


def _label(cfg: PipelineRunConfig, home: Path, model: Artifact, number: int, rewards: list[str],
           sft: Artifact) -> tuple[Artifact, str]:
    """Round `number`'s rankings: completions of `model` (the SFT model in round 1, the previous round's policy
    after; `round_mix` of them by the `sft` model) ranked in Argilla (the embedded server unless ARGILLA_API_URL
    names one), pulled as preference pairs and registered. A dataset per model: re-running continues it, and a
    finished pull is reused when every pushed prompt has been ranked. With `label.select`, only `label.budget`
    prompts of the pool are pushed, chosen with the `rewards` models of the rounds before (`uncertainty`: the last
    one's; `disagreement`: all of them, a committee of two or more)."""
    from align.data import read_prompts
    from align.generation import SamplingConfig
    from align.labeling import rankings, server
    from align.labeling.selection import deduplicated

    label = cfg.label
    step = "label" if number == 1 else f"label (round {number})"
    # A dataset per model and per labeling setup: rankings under another gold, tie margin or K are new records,
    # never mixed into (or reused from) an earlier dataset.
    # Unset options (no selection) leave the name of a dataset ranked before they existed as it was.
    setup = {k: v for k, v in to_dict(label).items()
             if k not in ("prompts", "max_prompts", "wait_timeout_s", "batch_size") and v is not None}
    setup["seed"] = cfg.seed
    mix = cfg.round_mix if number > 1 else 0  # round 1 samples the SFT model itself
    if mix:
        setup["round_mix"] = mix
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:6]
    rounded = "" if number == 1 else f"-round{number}"
    dataset = f"{cfg.name}{rounded}-rankings-{model.stage}{model.version}-{digest}"
    # Distinct prompts: push makes one record per prompt, and "finished" compares ranked records with this count.
    prompts = list(dict.fromkeys(read_prompts(label.prompts, option="label.prompts")))
    prompts = prompts[:label.max_prompts]
    # What push makes records of: every prompt, or `budget` of the pool (repeats ignoring case and spacing dropped).
    wanted = len(prompts) if label.budget is None else min(label.budget, len(deduplicated(prompts)[0]))
    registry = Registry()
    for artifact in reversed(registry.list(stage="label")):
        if artifact.name == dataset and artifact.metrics.get("ranked_records") == wanted \
                and Path(artifact.path).is_file():
            console.print(f"{step}: {dataset} was ranked and pulled before as {artifact.ref}; skipped")
            _require_pairs(artifact, dataset)
            return artifact, "skipped: finished before"
    home.mkdir(parents=True, exist_ok=True)
    prompt_file = home / "label_prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    server.serve_command()
    sampling = SamplingConfig(max_new_tokens=label.max_new_tokens, temperature=label.temperature,
                              batch_size=label.batch_size, seed=cfg.seed or 0)
    select, asked = label.select, rewards[-1:] if label.select == "uncertainty" else []
    if select == "disagreement":
        asked = rewards
        if len(rewards) == 1:
            console.print(f"{step}: one reward model so far ({rewards[0]}): 'disagreement' asks a committee of two or "
                          f"more (every round's), so this round selects by its 'uncertainty'")
            select = "uncertainty"
    rankings.push_command(model=model.ref, prompts_path=str(prompt_file), k=label.k, dataset=dataset,
                          sampling=sampling, select=select, budget=label.budget, reward_models=asked,
                          mix_model=sft.ref if mix else None, mix_k=mix)
    if label.annotators == "simulated":
        rankings.simulate_command(dataset, label.simulate_annotators, label.gold, noise=label.simulate_noise,
                                  seed=cfg.seed or 0, tie_margin=label.gold_tie_margin)
    else:
        _wait_for_rankings(step, dataset, wanted, label.wait_timeout_s)
    result = rankings.pull_command(dataset, str(home / f"{dataset}.jsonl"))
    if result.artifact is None:
        raise AlignError(f"{step}: pulling {dataset} registered nothing")
    _require_pairs(result.artifact, dataset)
    return result.artifact, "ran"


def _require_pairs(rankings: Artifact, dataset: str) -> None:
    """A round whose rankings make no pair (every completion tied) has nothing to train on: said in one line."""
    metrics = rankings.metrics
    if metrics.get("pairs"):
        return
    why = f"every ranking ties its completions ({metrics['ties']} tied pairs, left out)" if metrics.get("ties") \
        else "no ranking orders two non-empty completions"
    raise AlignError(f"{dataset} ({rankings.ref}): {why}: no preference pairs to train on. Rank again with fewer "
                     f"ties (simulated annotators: a smaller label.gold_tie_margin, which ranks a new dataset)")


def _rankings_so_far(cfg: PipelineRunConfig, home: Path, labels: list[Artifact]) -> Artifact:
    """The pairs of every round so far in one file, registered as a label dataset whose parents are the rounds'
    rankings (`align reward` reads one data file); registered once, and found again on a re-run."""
    from align.data import fingerprint, read_records

    name = f"{cfg.name}-rankings-rounds-1-{len(labels)}"
    parents = [label.id for label in labels]
    registry = Registry()
    for artifact in registry.list(stage="label"):
        if artifact.name == name and artifact.parents == parents and Path(artifact.path).is_file():
            return artifact
    rows = [row for label in labels for row in read_records(label.path, key=label.ref).rows]
    path = home / f"{name}-{'-'.join(str(p) for p in parents)}.jsonl"
    write_jsonl(path, rows)
    return registry.add(stage="label", name=name, kind="dataset", path=path, parents=parents,
                        data_fingerprint=fingerprint(rows), metrics={"pairs": len(rows), "rounds": len(labels)},
                        config={"rankings": [label.ref for label in labels]})


def _wait_for_rankings(step: str, dataset: str, wanted: int, timeout_s: int) -> None:
    from align.labeling import rankings

    console.print(f"{step}: waiting for annotators to rank {wanted} records of '{dataset}' in Argilla (add logins "
                  f"with `align label users add NAME`; progress: `align label status --dataset {dataset}`)")
    deadline, said = time.monotonic() + timeout_s, 0
    while True:
        ranked = rankings.status(dataset).get("completed", 0)
        if ranked >= wanted:
            return
        if ranked != said:  # a line when people make progress, not every poll
            console.print(f"{step}: {ranked} of {wanted} records ranked ({time.strftime('%H:%M')})")
            said = ranked
        if time.monotonic() > deadline:
            raise AlignError(f"{step}: {ranked} of {wanted} records ranked after {timeout_s} s; run the pipeline again "
                             f"to keep waiting (finished steps are skipped)")
        time.sleep(POLL_S)
