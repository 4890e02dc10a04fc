"""The head and the tail that every stage's run shares, written once. A stage calls them by name from its numbered
steps and stays readable top to bottom:

    job = start_run(STAGE, cfg.output, Path(config_path).stem, resume, report_to=cfg.training.get("report_to"))
    ...                                          # the stage's own steps, writing into job.work
    job.folder.create()                          # (before training: checkpoints go to job.work/checkpoints)
    ...
    save_run_record(job, to_dict(cfg), history)  # align_config.yaml, training_log.jsonl
    artifact = publish_model(job, ...)           # model card; renamed into place with its registry row
    print_finished(job, artifact, rows, plots)   # the closing table

An evaluation has no model card: it publishes with `publish_evaluation`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.artifacts import EVAL_BEFORE_FILE, RunDir, save_run_config, save_training_log, write_model_card
from align.config import LoadedConfig, OutputConfig, check_report_to
from align.registry import Artifact, Registry
from align.reporting import print_table


def check_training(loaded: LoadedConfig, stage: str, trl_config: type, training_arguments: Callable) -> Any:
    """A training stage's config, checked in full: every `training:` key against TRL's `trl_config`, and the config
    training uses built once by the stage's `training_arguments(cfg, run_dir, has_eval=...)` (its own checks,
    reported at file:line). The output folder is a stand-in: only the checks matter here."""
    def build(cfg) -> None:
        training_arguments(cfg, RunDir(Path("runs") / stage / "check"),
                           has_eval=bool(cfg.data.eval_path or cfg.data.val_set_size))

    return loaded.finish({"training": trl_config}, build)


@dataclass
class Run:
    """One run of a stage, as `start_run` set it up."""

    stage: str
    name: str  # its name in the registry
    folder: RunDir  # <dir>.incomplete while it runs, renamed to <dir> by publish_*
    registry: Registry
    is_main: bool  # the process that checks the output folder (rank 0 of torchrun)
    checkpoint: str | None  # what --resume continues from

    @property
    def work(self) -> Path:
        return self.folder.work

    @property
    def final(self) -> Path:
        return self.folder.final


def start_run(stage: str, output: OutputConfig, default_name: str, resume: bool = False, report_to=None,
              is_main: bool | None = None, registry: Registry | None = None) -> Run:
    """The head, before anything heavy: the run's name (`output.name`, else `default_name`); its folder (`output.dir`,
    else runs/<stage>/<name>) checked: writable, no finished run there unless `output.overwrite`, the checkpoint to
    resume from with `resume`; the trackers `report_to` names installed; the registry. `is_main` defaults to rank 0
    of torchrun's RANK."""
    if is_main is None:
        is_main = int(os.environ.get("RANK", "0")) == 0
    name = output.name or default_name
    folder = RunDir(output.dir or Path("runs") / stage / name, output.overwrite)
    checkpoint = folder.open(resume, is_main)
    check_report_to(report_to)
    return Run(stage, name, folder, registry or Registry(), is_main, checkpoint)


def save_run_record(job: Run, config: dict, history: list[dict] | None = None) -> None:
    """The tail's record in the working folder: the resolved config (`align_config.yaml`, secrets redacted) and the
    training log (`training_log.jsonl`, when there is a `history`). The log holds the held-out "before" numbers
    now, so the file that kept them for a resume (align.artifacts.evaluate_at_start) goes."""
    (job.work / EVAL_BEFORE_FILE).unlink(missing_ok=True)
    save_run_config(config, job.work)
    if history is not None:
        save_training_log(history, job.work)


def publish_model(job: Run, *, config: dict, metrics: dict, plots: list[str], base_model: str, model_source: str,
                  adapter: bool, data_source: str, data_fingerprint: str, parents: Iterable[Artifact | None],
                  keep_checkpoints: bool, usage: str | None = None) -> Artifact:
    """The model's finish: its card (README.md; `usage` replaces the default "how to load it"), then the working
    folder renamed into place together with its registry row, whose lineage is `parents` (None: not registered)."""
    write_model_card(job.work, final_path=job.final, title=job.name, stage=job.stage, base_model=base_model,
                     model_source=model_source, adapter=adapter, data_source=data_source,
                     data_fingerprint=data_fingerprint, metrics=metrics, config=config, plots=plots, usage=usage)
    return job.folder.publish(job.registry, keep_checkpoints=keep_checkpoints, stage=job.stage, name=job.name,
                              base_model=base_model, parents=_ids(parents), config=config,
                              data_fingerprint=data_fingerprint, metrics=metrics)


def publish_evaluation(job: Run, *, config: dict, metrics: dict, parents: Iterable[Artifact | None]) -> Artifact:
    """An evaluation's finish: the working folder renamed into place with its registry row (kind `evaluation`),
    whose lineage is every registered model and dataset it measured (`parents`; None: not registered)."""
    return job.folder.publish(job.registry, stage=job.stage, name=job.name, kind="evaluation", parents=_ids(parents),
                              config=config, metrics=metrics)


def print_finished(job: Run, artifact: Artifact, rows: list[tuple[str, object]],
                   plots: list[str] | None = None) -> None:
    """The closing table: what the run measured (`rows`), then, for a model (`plots` given), its folder and plots,
    and last its registry reference."""
    where = [("artifact", str(job.final)), ("plots", ", ".join(plots) or "none")] if plots is not None else []
    print_table(f"finished: {artifact.ref} ({job.name})", [*rows, *where,
                                                           ("registry", f"{artifact.ref} (id {artifact.id})")])


def _ids(artifacts: Iterable[Artifact | None]) -> list[int]:
    """The registry ids of `artifacts`, each once, in order; None (an input that is not registered) left out."""
    return list(dict.fromkeys(a.id for a in artifacts if a is not None))
