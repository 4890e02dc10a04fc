"""Faults: a finished output and its registry row appear together or not at all, whatever fails or dies.

The registry's publish protocol (align/registry.py) is tested directly, including processes that die at each of its
steps; then through the CLI: a damaged or unwritable registry, a full disk while saving, and a short run of
scripts/chaos.py (random SIGKILLs, then --resume or a re-run, with the final metrics compared).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from align.errors import AlignError
from align.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "ALIGN_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _align(tmp_path: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *args], cwd=tmp_path, env=kwargs.pop("env", _env(tmp_path)),
                          capture_output=True, text=True, **kwargs)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line, last on stderr, exit code 2, no traceback (progress bars of the work done may precede)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def _staged_output(tmp_path: Path, name: str = "out") -> tuple[Path, Path]:
    staged = tmp_path / "runs" / f"{name}.incomplete"
    staged.mkdir(parents=True)
    (staged / "weights.bin").write_text("finished")
    return staged, tmp_path / "runs" / name


# --------------------------------------------------------------------------------------------------
# The publish protocol

def test_publish_moves_the_output_and_records_it(tmp_path):
    registry = Registry(tmp_path / "home")
    staged, final = _staged_output(tmp_path)
    artifact = registry.add(stage="sft", name="out", path=final, staged=staged)
    assert not staged.exists() and (final / "weights.bin").read_text() == "finished"
    assert artifact.path == str(final.resolve()) and registry.resolve("sft:1").id == artifact.id


def test_a_refused_row_moves_nothing(tmp_path):
    registry = Registry(tmp_path / "home")
    staged, final = _staged_output(tmp_path)
    with pytest.raises(ValueError, match="parent ids"):
        registry.add(stage="sft", name="out", path=final, staged=staged, parents=[42])
    assert staged.exists() and not final.exists() and registry.list() == []


def test_a_row_that_cannot_be_written_puts_the_output_back(tmp_path, monkeypatch):
    """The previous artifact at the same path comes back too."""
    import align.registry as registry_module

    registry = Registry(tmp_path / "home")
    staged, final = _staged_output(tmp_path)
    final.mkdir()
    (final / "weights.bin").write_text("previous")

    def fail(*args):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(registry_module, "_finish_publishing", fail)
    with pytest.raises(AlignError, match="disk holding .* is full"):
        registry.add(stage="sft", name="out", path=final, staged=staged)
    assert (staged / "weights.bin").read_text() == "finished"
    assert (final / "weights.bin").read_text() == "previous"
    assert not final.with_name("out.replaced").exists()
    monkeypatch.undo()
    assert Registry(tmp_path / "home").list() == []


@pytest.mark.parametrize("dies_in, registered", [("_move_into_place", False), ("_finish_publishing", True)])
def test_a_process_killed_while_publishing_is_settled_by_the_next_one(tmp_path, dies_in, registered):
    """Killed after the note, before the move: the note is dropped, the output stays staged. Killed after the move,
    before the row: the row is added. Either way no output without a row, no row without its output."""
    staged, final = _staged_output(tmp_path)
    script = textwrap.dedent(f"""
        import os, align.registry as r
        setattr(r, {dies_in!r}, lambda *args: os._exit(9))
        r.Registry({str(tmp_path / 'home')!r}).add(stage="sft", name="out", path={str(final)!r},
                                                   staged={str(staged)!r})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert final.exists() == registered and staged.exists() != registered
    rows = Registry(tmp_path / "home").list()
    assert [r.path for r in rows] == ([str(final.resolve())] if registered else [])
    with sqlite3.connect(tmp_path / "home" / "registry.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM publishing").fetchone()[0] == 0


def test_a_publish_in_progress_is_left_alone(tmp_path):
    """Another process's note is settled only once that process is gone."""
    registry = Registry(tmp_path / "home")
    registry.add(stage="data", name="d", kind="dataset", path=tmp_path)  # creates the database
    staged, final = _staged_output(tmp_path)
    with sqlite3.connect(registry.db_path) as conn:
        conn.execute("INSERT INTO publishing (path, staged, pid, row) VALUES (?, ?, ?, '{}')",
                     (str(final), str(staged), os.getppid()))
    assert [a.stage for a in Registry(tmp_path / "home").list()] == ["data"]
    with sqlite3.connect(registry.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM publishing").fetchone()[0] == 1


# --------------------------------------------------------------------------------------------------
# Damaged and unwritable registries, through the CLI

def test_a_damaged_registry_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "registry.db").write_bytes(b"this is not sqlite" * 100)
    for command in (["registry", "list"], ["registry", "show", "sft:1"], ["generate", "--model", "sft:1",
                                                                          "--prompt", "hi"]):
        line = _one_error_line(_align(tmp_path, *command))
        assert "registry.db is damaged or not an SQLite database" in line and "move it aside" in line, line


def _sft_config(tmp_path: Path, model: str, **training) -> Path:
    rows = [{"prompt": f"say {w}", "completion": w} for w in "abcdefgh"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"path": model}, "data": {"path": "data.jsonl"}, "lora": {"enabled": False},
                                  "training": {"max_steps": 1, "per_device_train_batch_size": 2, "save_strategy": "no",
                                               **training}}))
    return config


def test_an_unwritable_registry_fails_before_any_work(tmp_path, tiny_llama):
    (tmp_path / "home").write_text("a file where the registry folder should be")
    config = _sft_config(tmp_path, tiny_llama)
    line = _one_error_line(_align(tmp_path, "sft", "--config", str(config)))
    assert "registry: cannot create the registry in" in line and "ALIGN_HOME" in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*")), "nothing was started"


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_saving_leaves_no_output_and_no_row(tmp_path, tiny_llama):
    """No file may grow past 200 kB (the tiny model's weights are ~550 kB): the save fails as a full disk would."""
    config = _sft_config(tmp_path, tiny_llama)
    result = _align(tmp_path, "sft", "--config", str(config), preexec_fn=_limit_file_size(200_000))
    line = _one_error_line(result)
    assert "out of disk space while writing" in line and "free some space" in line, line
    assert not (tmp_path / "runs" / "sft" / "run").exists()
    assert not (tmp_path / "runs" / "sft" / "run.incomplete").exists(), "the partial output is cleared"
    assert Registry(tmp_path / "home").list() == []
    assert _align(tmp_path, "sft", "--config", str(config)).returncode == 0, "with space, the same command works"


# --------------------------------------------------------------------------------------------------
# Random kills (the long run: scripts/chaos.py --kills 20, reported in the README)

def test_random_kills_lose_nothing_and_resume_to_the_same_metrics(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--kills", "2", "--stages", "sft",
                             "--seed", "3", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 kills: 2 OK, 0 failed" in result.stdout
