"""The embedded Argilla server's own virtual environment: built once, checked, shared (standard library only).

scripts/setup.sh builds it with this module while align's own dependencies are still being installed, so it
imports nothing beyond the standard library and align's stdlib-only modules (a test keeps it so);
labeling/server.py, which starts and supervises the server, builds it on first use through the same function.

The venv is ``$ALIGN_ARGILLA_VENV`` or ``<align home>/argilla-server-venv``. Its pins (pydantic 2.9, fastapi
0.115, typer < 0.10) clash with ours, so the server runs as a separate service, as in production. A stamp file
written last marks the venv complete; a venv without the right stamp is rebuilt. Several homes (test sessions,
CI) may share one venv, so building takes a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from align.errors import AlignError

SERVER_VERSION = "2.8.0"
# click 8.2+ breaks every `python -m argilla_server ...` command of this release.
SERVER_REQUIREMENTS = (f"argilla-server=={SERVER_VERSION}", "click<8.2")
VENV_ENV = "ALIGN_ARGILLA_VENV"

_STAMP = "align-server-stamp.json"
_BUILDING = "align-server-building"


def align_home() -> Path:
    """The align home (``$ALIGN_HOME`` or ``./.align``), absolute."""
    # Imported here: align.registry imports rich, which setup.sh is still installing when it builds the venv.
    from align.registry import registry_home

    return registry_home().absolute()


def venv_dir() -> Path:
    """The server's virtual environment: ``$ALIGN_ARGILLA_VENV`` or ``<align home>/argilla-server-venv``."""
    override = os.environ.get(VENV_ENV)
    if override:
        return Path(override).expanduser().absolute()
    return align_home() / "argilla-server-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def venv_ready(venv: Path | None = None) -> bool:
    """Whether the server venv is complete (its stamp, written last, matches this align)."""
    venv = venv or venv_dir()
    try:
        stamp = json.loads((venv / _STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _stamp_value() and venv_python(venv).exists()


def ensure_server_venv(say: Callable[[str], None]) -> Path:
    """The server venv's python, building the venv first if needed (~1-2 min, once); ``say`` tells the user."""
    venv = venv_dir()
    if venv_ready(venv):
        return venv_python(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(venv.parent / f".{venv.name}.lock"):
        if venv_ready(venv):  # another process built it while we waited
            return venv_python(venv)
        _check_replaceable(venv)
        say(f"setting up the Argilla server (once, ~1 min) in {venv} ...")
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir(parents=True)
        (venv / _BUILDING).write_text("an unfinished align build of the Argilla server venv\n")
        log = venv.parent / f"{venv.name}.build.log"
        with log.open("w") as out:
            _build_step([sys.executable, "-m", "venv", str(venv)], out, log,
                        "creating the virtual environment failed (on Debian: apt-get install python3-venv)")
            _build_step([str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check",
                         "--no-input", *SERVER_REQUIREMENTS], out, log,
                        f"installing {' '.join(SERVER_REQUIREMENTS)} failed")
            _build_step([str(venv_python(venv)), "-c",
                         "import importlib.metadata as m; v = m.version('argilla-server'); "
                         f"assert v == {SERVER_VERSION!r}, v"], out, log,
                        "the installed argilla-server is not the pinned version")
        (venv / _STAMP).write_text(json.dumps(_stamp_value()))
        (venv / _BUILDING).unlink()
        say(f"Argilla server installed ({time.monotonic() - started:.0f} s)")
    return venv_python(venv)


def clean_env() -> dict[str, str]:
    """Our environment minus what would leak into the server's Python or settings."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("ARGILLA_")}


def last_line(path: Path) -> str:
    """The last non-empty line of a log, for a one-line error."""
    lines = tail_lines(path, 50)
    return lines[-1] if lines else "(no output)"


def tail_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` non-empty lines of a log (read from its last 16 KiB)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()][-count:]


def _stamp_value() -> dict[str, Any]:
    return {
        "requirements": list(SERVER_REQUIREMENTS),
        "python": ".".join(map(str, sys.version_info[:2])),
    }


def _check_replaceable(venv: Path) -> None:
    """Refuse to delete a folder that is not (an old or unfinished) server venv of ours."""
    if not venv.exists() or (venv.is_dir() and not any(venv.iterdir())):
        return
    if (venv / _STAMP).exists() or (venv / _BUILDING).exists():
        return
    raise AlignError(f"{venv} exists but is not an Argilla server environment made by align; remove it or point "
                     f"{VENV_ENV} at another folder")


def _build_step(command: list[str], out, log: Path, message: str) -> None:
    out.write(f"$ {' '.join(command)}\n")
    out.flush()
    result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=clean_env(), check=False)
    if result.returncode != 0:
        raise AlignError(f"Argilla server setup: {message} (exit {result.returncode}); "
                         f"last output: {last_line(log)!r}; full log: {log}")


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    # Raw fcntl, not filelock (labeling/server.py's locks): setup.sh runs this before filelock is installed.
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
