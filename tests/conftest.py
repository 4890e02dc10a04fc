"""Shared pytest fixtures. Keep each group under its own banner."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

# --- Environment: offline, single-threaded, no telemetry (set before torch/transformers load) ---
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402


# --- Tiny random-init models (tests/tiny_models.py), built once per session; each is a folder path.
#     Imported lazily so test runs that need no model don't pay for importing torch. ---
@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from tests import tiny_models

    return tiny_models.build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt_neox(tmp_path_factory) -> str:
    from tests import tiny_models

    return tiny_models.build_tiny_gpt_neox(tmp_path_factory.mktemp("tiny_gpt_neox"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from tests import tiny_models

    return tiny_models.build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="session")
def tiny_llama_no_pad(tmp_path_factory) -> str:
    from tests import tiny_models

    return tiny_models.build_tiny_llama_no_pad(tmp_path_factory.mktemp("tiny_llama_no_pad"))


# --- Argilla servers: the environment every test server runs in (`argilla_env`), and ONE real embedded server
#     (labeling/server.py) per test session (`argilla_server`), started on first use. Each server's ALIGN_HOME is a
#     temporary folder; the server venv is shared between runs through ALIGN_ARGILLA_VENV (default
#     ~/.cache/align/argilla-server-venv; the first run builds it, ~1-2 min). The session server does not leave
#     ALIGN_HOME set: tests apply it themselves (`with argilla_server.applied(): ...`, e.g. in a module-scoped
#     fixture), so modules that run later see their own environment. ---
@dataclass(frozen=True)
class ArgillaEnv:
    """A test Argilla server's environment variables; ``applied()`` sets them, with no external Argilla configured
    (ARGILLA_API_URL/ARGILLA_API_KEY unset), until its ``with`` block ends."""

    env: dict[str, str]

    @property
    def home(self) -> Path:
        return Path(self.env["ALIGN_HOME"])

    @contextlib.contextmanager
    def applied(self) -> Iterator[ArgillaEnv]:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in self.env.items():
                mp.setenv(key, value)
            mp.delenv("ARGILLA_API_URL", raising=False)
            mp.delenv("ARGILLA_API_KEY", raising=False)
            yield self


@pytest.fixture(scope="session")
def argilla_env(tmp_path_factory):
    """``argilla_env(name)``: a new ArgillaEnv whose ALIGN_HOME is a new temporary folder ``name``, sharing the
    server venv; skips the test when redis-server (which the server needs) is not installed."""
    def new(name: str) -> ArgillaEnv:
        if not shutil.which("redis-server"):
            pytest.skip("the Argilla server needs redis-server (apt-get install redis-server)")
        return ArgillaEnv({
            "ALIGN_HOME": str(tmp_path_factory.mktemp(name)),
            "ALIGN_ARGILLA_VENV": os.environ.get("ALIGN_ARGILLA_VENV")
            or str(Path.home() / ".cache" / "align" / "argilla-server-venv"),
        })

    return new


@pytest.fixture(scope="session")
def argilla_server(argilla_env):
    """The session's server: ``.env`` (its variables), ``.applied()``, ``.port``, ``.url``, ``.home``."""
    from align.labeling import server

    environment = argilla_env("argilla_align_home")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with environment.applied():
        info = server.serve(port=port)
    try:
        yield SimpleNamespace(env=environment.env, applied=environment.applied, port=info.port, url=info.url,
                              home=environment.home)
    finally:
        with environment.applied():
            server.stop()
