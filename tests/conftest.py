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
