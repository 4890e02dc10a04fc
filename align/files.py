"""Files that appear complete or not at all: written to a hidden file beside the target, flushed to disk, renamed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

from align.errors import AlignError


def stage_file(target: Path, write: Callable[[TextIO], None], private: bool = False) -> Path:
    """`write(handle)` into a hidden file beside `target`, flushed to disk, and return it for the caller to move into
    place (`os.replace`, or `Registry.add(staged=...)` to record it in the same step). A failed write leaves nothing
    behind. `private`: readable by its owner only (0600) from the moment it exists."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666),
                       "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return staging


def write_atomically(target: Path, text: str, private: bool = False) -> None:
    """`text` in `target`, which appears complete or not at all (see `stage_file`)."""
    os.replace(stage_file(target, lambda handle: handle.write(text), private), target)


def stage_jsonl(target: Path, rows: Iterable[dict], key: str = "--out") -> Path:
    """`rows` as JSON lines in a staged file beside `target` (`stage_file`); an OSError (disk full, no permission)
    is one line naming `key`."""
    def write(handle: TextIO) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    try:
        return stage_file(target, write)
    except OSError as e:
        raise AlignError(f"{key}: cannot write {target}: {e.strerror or e}") from None


def write_jsonl(target: Path, rows: Iterable[dict], key: str = "--out") -> None:
    """`rows` as JSON lines in `target`, which appears complete or not at all."""
    os.replace(stage_jsonl(target, rows, key), target)
