"""`align pipeline`: the InstructGPT chain on one config, each step a normal registered run.

    sft -> label (completions pushed to Argilla, ranked by people or by simulated annotators, pulled as pairs)
        -> reward -> ppo and dpo -> eval (ppo and dpo against sft)

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

import hashlib
import json
import time
from pathlib import Path

from align.artifacts import RunDir
from align.files import write_atomically
from align.cli.pipeline_config import PipelineRunConfig, PipelineStepConfig
from align.config import LoadedConfig, PPORunConfig, load_config, read_config, to_dict
from align.errors import AlignError
from align.gold import load_gold
from align.registry import Artifact, Registry, looks_like_ref, redact_secrets
from align.reporting import console, print_table
from align.stages.dpo_config import DPORunConfig
from align.stages.eval_config import EvalRunConfig
from align.stages.reward_config import RewardRunConfig
from align.stages.sft_config import SFTRunConfig

STEPS = ("sft", "label", "reward", "ppo", "dpo", "eval")
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

    def step(name: str, action) -> None:
        console.rule(f"[bold]pipeline {cfg.name}: {name}")
        began = time.monotonic()
        try:
            artifact, how = action()
        except AlignError as e:
            raise AlignError(f"pipeline step '{name}' failed: {e} (fix it and run the same command again: finished "
                             f"steps are skipped, an interrupted one resumes)") from None
        done[name] = artifact
        timings[name] = (how, time.monotonic() - began)

    def run_stage(name: str) -> tuple[Artifact, str]:
        refs = {done_step: artifact.ref for done_step, artifact in done.items()}
        config = _with_references(configs[name], name, refs, getattr(cfg, name))
        return _stage(modules[name], name, getattr(cfg, name), config, home, _step_overrides(cfg, name, refs, gold))

    step("sft", lambda: run_stage("sft"))
    step("label", lambda: _label(cfg, home, done["sft"]))
    for name in ("reward", "ppo", "dpo", "eval"):
        if getattr(cfg, name).enabled:
            step(name, lambda name=name: run_stage(name))
    rows = [(name, f"{artifact.ref} ({how}, {seconds / 60:.1f} min)") for name, artifact in done.items()
            for how, seconds in [timings[name]]]
    rows.append(("total", f"{(time.monotonic() - started) / 60:.1f} min"))
    if "eval" in done:
        rows.append(("report", str(Path(done["eval"].path) / "report.html")))
    print_table(f"pipeline {cfg.name}: finished", rows)
    _write_summary(home / "last-run.json", {
        "config": config_path, "seed": cfg.seed, "gold": gold,
        "steps": {name: {"ref": artifact.ref, "how": timings[name][0], "seconds": round(timings[name][1], 1)}
                  for name, artifact in done.items()}})
    return done


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

    def checked(name: str, check, *args):
        try:
            return check(*args)
        except AlignError as e:
            raise AlignError(f"pipeline step '{name}': {e} (nothing has run yet)") from None

    loaded = {name: checked(name, read_config, getattr(cfg, name).config, _step_overrides(cfg, name, refs, gold),
                            STAGE_CONFIGS[name]) for name in steps}
    from align.stages import dpo, eval as evaluation, ppo, reward, sft
    from align.stages.ppo import grpo

    algorithm = loaded["ppo"].config.algorithm if "ppo" in loaded else "ppo"  # grpo / rloo: TRL's, stages/ppo/grpo.py
    modules = {"sft": sft, "reward": reward, "ppo": ppo if algorithm == "ppo" else grpo, "dpo": dpo,
               "eval": evaluation}
    # eval and ppo have no checks beyond align's (ppo's run reads its config itself: it is given the overrides).
    finish = {"sft": sft.check, "reward": reward.check, "ppo": LoadedConfig.finish, "dpo": dpo.check,
              "eval": LoadedConfig.finish}
    return modules, {name: checked(name, finish[name], loaded[name]) for name in steps}


def _references(stage: str, refs: dict[str, str]) -> dict[str, str | list[str]]:
    """The keys of a step's config that name the output of the steps before (`refs`: their registry references)."""
    if stage == "eval":
        wired: dict = {"models": [refs[s] for s in ("ppo", "dpo") if s in refs], "baseline": refs.get("sft")}
        if "reward" in refs:  # without a reward model: no judge win rates, the tax and KL still
            wired["judge.path"] = refs["reward"]
        return wired
    return {"reward": {"model.path": refs.get("sft"), "data.path": refs.get("label")},
            "ppo": {"model.path": refs.get("sft"), "reward.path": refs.get("reward")},
            "dpo": {"model.path": refs.get("sft"), "data.path": refs.get("label")}}.get(stage, {})


def _step_overrides(cfg: PipelineRunConfig, stage: str, refs: dict[str, str], gold: str | None) -> list[str]:
    """The overrides a step runs with: what the pipeline wires in (the references of the steps before; the gold; the
    seed), then the step's own overrides, which win (a reward model on another backbone than the SFT model:
    `model.path=...` among the reward step's overrides), then its run name."""
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
        [f"output.name={cfg.name}-{stage}"]


def _with_references(config, stage: str, refs: dict[str, str], step: PipelineStepConfig):
    """`config`, checked with stand-ins for the references of the steps before, with the real ones (`refs`) in their
    place; a key the step's own overrides set (or a section around it) keeps their value, as it did at the check."""
    own = [item.partition("=")[0].strip() for item in step.overrides]
    for key, value in _references(stage, refs).items():
        if any(key == mine or key.startswith(mine + ".") or mine.startswith(key + ".") for mine in own):
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
    when interrupted. `overrides`: how the step would be run by hand, for the log (and for ppo, which reads its
    config itself)."""
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
    if stage == "ppo":  # stages/ppo/ still reads its config itself, from the file and the overrides
        artifact = module.run(step.config, overrides, resume=resume)
    elif stage == "eval":
        artifact = module.run(config)
    else:
        artifact = module.run(config, step.config, resume=resume)
    if artifact is None:
        raise AlignError(f"{stage}: the stage registered nothing")
    return artifact, "resumed" if resume else "ran"


def _label(cfg: PipelineRunConfig, home: Path, sft: Artifact) -> tuple[Artifact, str]:
    """Completions of the SFT model ranked in Argilla (the embedded server unless ARGILLA_API_URL names one), pulled
    as preference pairs and registered. A dataset per SFT model: re-running continues it, and a finished pull is
    reused when every pushed prompt has been ranked."""
    from align.data import read_prompts
    from align.generation import SamplingConfig
    from align.labeling import rankings, server

    label = cfg.label
    # A dataset per SFT model and per labeling setup: rankings under another gold, tie margin or K are new records,
    # never mixed into (or reused from) an earlier dataset.
    setup = {k: v for k, v in to_dict(label).items()
             if k not in ("prompts", "max_prompts", "wait_timeout_s", "batch_size")}  # prompts: counted below
    setup["seed"] = cfg.seed
    digest = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:6]
    dataset = f"{cfg.name}-rankings-{sft.stage}{sft.version}-{digest}"
    # Distinct prompts: push makes one record per prompt, and "finished" compares ranked records with this count.
    prompts = list(dict.fromkeys(read_prompts(label.prompts, option="label.prompts")))
    prompts = prompts[:label.max_prompts]
    registry = Registry()
    for artifact in reversed(registry.list(stage="label")):
        if artifact.name == dataset and artifact.metrics.get("ranked_records") == len(prompts) \
                and Path(artifact.path).is_file():
            console.print(f"label: {dataset} was ranked and pulled before as {artifact.ref}; skipped")
            return artifact, "skipped: finished before"
    home.mkdir(parents=True, exist_ok=True)
    prompt_file = home / "label_prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    server.serve_command()
    sampling = SamplingConfig(max_new_tokens=label.max_new_tokens, temperature=label.temperature,
                              batch_size=label.batch_size, seed=cfg.seed or 0)
    rankings.push_command(model=sft.ref, prompts_path=str(prompt_file), k=label.k, dataset=dataset,
                          sampling=sampling)
    if label.annotators == "simulated":
        rankings.simulate_command(dataset, label.simulate_annotators, label.gold, noise=label.simulate_noise,
                                  seed=cfg.seed or 0, tie_margin=label.gold_tie_margin)
    else:
        _wait_for_rankings(dataset, len(prompts), label.wait_timeout_s)
    result = rankings.pull_command(dataset, str(home / f"{dataset}.jsonl"))
    if result.artifact is None:
        raise AlignError(f"label: pulling {dataset} registered nothing")
    return result.artifact, "ran"


def _wait_for_rankings(dataset: str, wanted: int, timeout_s: int) -> None:
    from align.labeling import rankings

    console.print(f"label: waiting for annotators to rank {wanted} records of '{dataset}' in Argilla (add logins "
                  f"with `align label users add NAME`; progress: `align label status --dataset {dataset}`)")
    deadline = time.monotonic() + timeout_s
    while True:
        ranked = rankings.status(dataset).get("completed", 0)
        if ranked >= wanted:
            return
        if time.monotonic() > deadline:
            raise AlignError(f"label: {ranked} of {wanted} records ranked after {timeout_s} s; run the pipeline again "
                             f"to keep waiting (finished steps are skipped)")
        time.sleep(30)
