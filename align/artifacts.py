"""Output folders that appear atomically, and what goes in them besides weights (config, card, log).

A run works in `<dir>.incomplete/` (checkpoints included, so `--resume` finds them after a kill) and
is renamed to `<dir>` only when everything is written, in the same step as its registry row is added
(`RunDir.publish`, see align/registry.py). A folder named `<dir>` is therefore always a finished,
registered artifact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from align.errors import AlignError
from align.registry import Artifact, Registry, folder_write_problem, redact_secrets

CHECKPOINTS = "checkpoints"
_UNFINISHED: list[RunDir] = []  # created in this process and not yet published (see discard_unfinished_outputs)


class RunDir:
    """The working folder of one run and its final, atomic destination."""

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final = Path(final).absolute()
        self.work = self.final.with_name(self.final.name + ".incomplete")
        self.overwrite = overwrite

    def open(self, resume: bool, is_main: bool = True) -> str | None:
        """Check the destination and return the checkpoint to resume from (or None). Call before loading models.

        Only the main process checks for an unfinished run: in distributed runs the others may look after
        it has already created the working folder. The registry and the output's folder must be writable
        now, not after training.
        """
        if is_main:
            Registry().check_writable()
            if problem := folder_write_problem(self.final.parent):
                raise AlignError(f"output: cannot write {self.final} ({problem}); choose a writable output folder "
                                 f"(output.dir, --out) or fix its permissions")
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
        _UNFINISHED.append(self)

    def discard_partial_output(self) -> None:
        """Delete what a failed run wrote besides its complete checkpoints (all of it when there is none)."""
        last = self.last_checkpoint()
        if last is None:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        for item in self.work.iterdir():
            if item.name == CHECKPOINTS:
                continue
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
        for checkpoint in (self.work / CHECKPOINTS).iterdir():
            if str(checkpoint) != last:
                shutil.rmtree(checkpoint, ignore_errors=True)

    def last_checkpoint(self) -> str | None:
        folder = self.work / CHECKPOINTS
        checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] \
            if folder.is_dir() else []
        # A checkpoint is complete once the trainer wrote its state file (written last), in full: a kill
        # during that write leaves a truncated file that would make the resumed run fail. The checkpoint of the
        # last step is passed over: transformers' Trainer resumed there takes one step more than the run asked for.
        states = {p: read_json(p / "trainer_state.json") for p in checkpoints}
        usable = [p for p, state in states.items()
                  if state is not None and not 0 < state.get("max_steps", 0) <= state.get("global_step", 0)]
        return str(max(usable, key=lambda p: int(p.name.split("-")[-1]))) if usable else None

    def publish(self, registry: Registry, keep_checkpoints: bool = False, **row) -> Artifact:
        """Rename the working folder to its final name and add its registry row (`Registry.add`'s fields), as one
        step; the previous artifact at that name is replaced only now."""
        if not keep_checkpoints:
            shutil.rmtree(self.work / CHECKPOINTS, ignore_errors=True)
        artifact = registry.add(path=self.final, staged=self.work, **row)
        if self in _UNFINISHED:
            _UNFINISHED.remove(self)
        return artifact


def discard_unfinished_outputs() -> list[Path]:
    """After a failure that leaves files useless (a full disk): clear the unfinished runs of this process down to
    their last complete checkpoint, freeing the space; the working folders that remain (to --resume from)."""
    kept = []
    while _UNFINISHED:
        run_dir = _UNFINISHED.pop()
        run_dir.discard_partial_output()
        if run_dir.work.exists():
            kept.append(run_dir.work)
    return kept


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


def read_json(path: Path) -> dict | None:
    """The JSON in `path`, or None when it is missing or not (yet) complete JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mean_train_loss(log_history: list[dict]) -> float | None:
    """The training loss averaged over every logged step of the run. Unlike `TrainOutput.training_loss`, which
    averages only the steps since the last resume, it is the same whether the run was interrupted or not."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


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
    from huggingface_hub import ModelCardData  # the hub's own front matter: quoting a path with ': ' or '#' right

    front_matter = ModelCardData(base_model=base_model, library_name="peft" if adapter else "transformers",
                                 tags=["align", stage]).to_yaml()
    text = f"""---
{front_matter}
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
