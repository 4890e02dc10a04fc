"""Output folders that appear atomically, and what goes in them besides weights (config, card, log).

A run works in `<dir>.incomplete/` (checkpoints included, so `--resume` finds them after a kill) and
is renamed to `<dir>` only when everything is written; the registry row is added after the rename.
A folder named `<dir>` is therefore always a finished artifact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from align.errors import AlignError
from align.registry import redact_secrets

CHECKPOINTS = "checkpoints"


class RunDir:
    """The working folder of one run and its final, atomic destination."""

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = Path(final).absolute()
        self.work = self.final.with_name(self.final.name + ".incomplete")
        self.overwrite = overwrite

    def open(self, resume: bool, is_main: bool = True) -> str | None:
        """Check the destination and return the checkpoint to resume from (or None). Call before loading models.

        Only the main process checks for an unfinished run: in distributed runs the others may look after
        it has already created the working folder.
        """
        if self.final.exists() and not self.overwrite:
            raise AlignError(f"output: {self.final} already exists (a finished run). Set output.overwrite=true to "
                             f"replace it, or choose another output.dir / output.name")
        if resume:
            checkpoint = self.last_checkpoint()
            if checkpoint is None:
                raise AlignError(f"--resume: no checkpoint in {self.work / CHECKPOINTS} (nothing to resume; run "
                                 f"without --resume)")
            return checkpoint
        if self.work.exists() and is_main and (self.overwrite or self.last_checkpoint() is None):
            shutil.rmtree(self.work)  # overwrite asked for, or a run that died before its first checkpoint
        elif self.work.exists() and is_main:
            raise AlignError(f"output: an unfinished run with checkpoints is in {self.work}. Add --resume to "
                             f"continue it, or delete that folder to start over")
        return None

    def create(self) -> None:
        (self.work / CHECKPOINTS).mkdir(parents=True, exist_ok=True)

    def last_checkpoint(self) -> str | None:
        folder = self.work / CHECKPOINTS
        checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] \
            if folder.is_dir() else []
        # A checkpoint is complete once the trainer wrote its state file (written last), in full: a kill
        # during that write leaves a truncated file that would make the resumed run fail.
        complete = [p for p in checkpoints if _readable_json(p / "trainer_state.json")]
        return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None

    def finish(self, keep_checkpoints: bool = False) -> Path:
        """Rename the working folder to its final name; the previous artifact is replaced only now."""
        if not keep_checkpoints:
            shutil.rmtree(self.work / CHECKPOINTS, ignore_errors=True)
        if self.final.exists():
            trash = self.final.with_name(self.final.name + ".replaced")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.final, trash)
            os.replace(self.work, self.final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.work, self.final)
        return self.final


EVAL_BEFORE_FILE = "eval_before.json"


def evaluate_at_start(trainer, run_dir: RunDir, checkpoint: str | None, keys: tuple[str, ...]) -> dict:
    """The held-out metrics `keys` of the starting model. Kept in the working folder, so a resumed run reports the
    same "before" numbers without measuring a half-trained model; the stage deletes the file when it finishes."""
    saved = run_dir.work / EVAL_BEFORE_FILE
    if checkpoint is not None and saved.is_file():
        return json.loads(saved.read_text())
    result = trainer.evaluate()
    before = {k: result[k] for k in keys if k in result}
    if trainer.is_world_process_zero():
        saved.write_text(json.dumps(before))
    return before


def evaluate_at_end(trainer) -> dict:
    """The held-out metrics at the last step: reused when the trainer just evaluated there, else measured now."""
    for entry in (trainer.state.log_history or [])[-2:]:
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return entry
    return trainer.evaluate()


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def save_run_config(config: dict, folder: Path) -> None:
    """The resolved config, secrets redacted, as `align_config.yaml` (re-runnable with `align <stage> --config`)."""
    (folder / "align_config.yaml").write_text(yaml.safe_dump(redact_secrets(config), sort_keys=False))


def save_training_log(log_history: list[dict], folder: Path) -> None:
    with (folder / "training_log.jsonl").open("w") as handle:
        for entry in log_history:
            handle.write(json.dumps(entry) + "\n")


def write_model_card(folder: Path, *, final_path: Path, title: str, stage: str, base_model: str, model_source: str,
                     adapter: bool,
                     data_source: str, data_fingerprint: str, metrics: dict, config: dict,
                     plots: list[str], usage: str | None = None) -> None:
    """README.md in the artifact: what it is, how it was made, how well it did, how to load it.

    `usage` replaces the default "how to load it" section (a causal LM, with or without peft).
    """
    if usage is None:
        auto = "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM"
        module = "peft" if adapter else "transformers"
        usage = (f"```python\nfrom {module} import {auto}\nfrom transformers import AutoTokenizer\n\n"
                 f"model = {auto}.from_pretrained({str(final_path)!r})\n"
                 f"tokenizer = AutoTokenizer.from_pretrained({str(final_path)!r})\n```")
    metric_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items())
    plot_lines = "\n".join(f"![{Path(p).stem}]({p})" for p in plots)
    config_yaml = yaml.safe_dump(redact_secrets(config), sort_keys=False)
    text = f"""---
base_model: {base_model}
library_name: {"peft" if adapter else "transformers"}
tags: [align, {stage}]
---

# {title}

Trained with `align {stage}` ({"LoRA adapter" if adapter else "full weights"}) from `{model_source}`
(loaded from `{base_model}`).

- Data: `{data_source}` (fingerprint `{data_fingerprint}`)

## Metrics

| metric | value |
| --- | --- |
{metric_rows}

{plot_lines}

## Use

{usage}

## Config

```yaml
{config_yaml}```
"""
    (folder / "README.md").write_text(text)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
