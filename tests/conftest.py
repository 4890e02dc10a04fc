"""Shared pytest fixtures. Keep each group under its own banner."""

import os

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


# --- Argilla server: ONE real embedded server (labeling/server.py) per test session, started on first use.
#     Its ALIGN_HOME is a temporary folder; the server venv is shared between runs through ALIGN_ARGILLA_VENV
#     (default ~/.cache/align/argilla-server-venv; the first run builds it, ~1-2 min). The fixture does not
#     leave ALIGN_HOME set: tests apply `argilla_server.env` themselves (e.g. a module-scoped MonkeyPatch),
#     so modules that run later see their own environment. ---
@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    import shutil
    import socket
    from pathlib import Path
    from types import SimpleNamespace

    if not shutil.which("redis-server"):
        pytest.skip("the Argilla server needs redis-server (apt-get install redis-server)")
    env = {
        "ALIGN_HOME": str(tmp_path_factory.mktemp("argilla_align_home")),
        "ALIGN_ARGILLA_VENV": os.environ.get("ALIGN_ARGILLA_VENV")
        or str(Path.home() / ".cache" / "align" / "argilla-server-venv"),
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    def in_env(action):
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            mp.delenv("ARGILLA_API_URL", raising=False)
            mp.delenv("ARGILLA_API_KEY", raising=False)
            return action()

    from align.labeling import server

    info = in_env(lambda: server.serve(port=port))
    try:
        yield SimpleNamespace(env=env, port=info.port, url=info.url, home=Path(env["ALIGN_HOME"]))
    finally:
        in_env(server.stop)
