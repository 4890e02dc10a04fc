"""Tests for align.registry: versions, refs, lineage, redaction, concurrency, rendering."""

import json
import multiprocessing
import re
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from align import __version__
from align.errors import AlignError
from align.registry import (
    SCHEMA_VERSION,
    Registry,
    looks_like_ref,
    print_lineage,
    print_list,
    print_show,
    redact_secrets,
    registry_home,
    resolve_path,
)

HF_SECRET = "hf_" + "aB3" * 12
OPENAI_SECRET = "sk-proj-" + "Zx9" * 10


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty ALIGN_HOME, with the process in a scratch directory."""
    align_home = tmp_path / "home"
    monkeypatch.setenv("ALIGN_HOME", str(align_home))
    monkeypatch.chdir(tmp_path)
    return align_home


@pytest.fixture
def reg(home):
    return Registry()


def _add(reg, stage, name=None, tmp=None, **kwargs):
    path = (tmp or reg.home.parent) / f"{name or stage}-{len(reg.list())}"
    path.mkdir(parents=True, exist_ok=True)
    return reg.add(stage=stage, name=name or f"{stage}-run", path=path, **kwargs)


def test_home_from_env_or_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ALIGN_HOME", raising=False)
    assert registry_home() == tmp_path / ".align"
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "elsewhere"))
    assert registry_home() == tmp_path / "elsewhere"
    assert Registry().db_path == tmp_path / "elsewhere" / "registry.db"


def test_db_created_on_first_write_with_wal_and_schema_version(reg):
    assert reg.list() == []
    assert not reg.db_path.exists(), "reads must not create the registry"
    _add(reg, "sft")
    assert reg.db_path.exists()
    with sqlite3.connect(reg.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_schema_is_refused(reg):
    _add(reg, "sft")
    with sqlite3.connect(reg.db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(AlignError, match="schema version 99"):
        Registry(reg.home).list()


def test_add_fills_fields_and_versions_per_stage(reg, tmp_path):
    sft1 = _add(reg, "sft", base_model="gpt2", config={"lr": 1e-5}, data_fingerprint="abc",
                metrics={"eval_loss": 1.5})
    sft2 = _add(reg, "sft")
    rm1 = _add(reg, "reward", parents=[sft1.id], kind="model")
    ds1 = _add(reg, "label", kind="dataset")
    sft3 = _add(reg, "sft")
    assert [a.version for a in (sft1, sft2, sft3)] == [1, 2, 3]
    assert (rm1.ref, ds1.ref, sft3.ref) == ("reward:1", "label:1", "sft:3")
    assert (sft1.base_model, sft1.config) == ("gpt2", {"lr": 1e-5})
    assert sft1.metrics == {"eval_loss": 1.5}
    assert sft1.data_fingerprint == "abc" and sft1.align_version == __version__
    assert Path(sft1.path).is_absolute() and rm1.parents == [sft1.id]
    assert sft1.created_at.endswith("+00:00")
    assert [a.ref for a in reg.list()] == ["sft:3", "label:1", "reward:1", "sft:2", "sft:1"]
    assert [a.ref for a in reg.list("sft")] == ["sft:3", "sft:2", "sft:1"]


def test_add_rejects_bad_input(reg):
    with pytest.raises(ValueError, match="kind"):
        _add(reg, "sft", kind="weights")
    with pytest.raises(ValueError, match="stage"):
        reg.add(stage="sft:1", name="x", path=".")
    with pytest.raises(ValueError, match=r"\[42\]"):
        _add(reg, "ppo", parents=[42])
    assert reg.list() == []


def test_git_commit_is_the_align_source_commit(reg):
    """The commit recorded is the align checkout's, whatever directory the run starts in."""
    import subprocess

    source = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("align is not running from a git checkout with commits")
    assert _add(reg, "sft").git_commit == head.stdout.strip()


def test_git_missing_does_not_fail(reg, monkeypatch):
    monkeypatch.setenv("PATH", "")
    assert _add(reg, "sft").git_commit is None


def test_all_ref_forms_resolve(reg):
    sft1 = _add(reg, "sft", name="tiny-sft")
    sft2 = _add(reg, "sft", name="tiny-sft")
    rm1 = _add(reg, "reward", name="rm")
    assert reg.resolve("sft:latest") == sft2
    assert reg.resolve("sft:1") == sft1
    assert reg.resolve("reward:latest") == rm1
    assert reg.resolve(str(rm1.id)) == rm1
    assert reg.resolve(f"#{sft1.id}") == sft1
    assert reg.resolve(sft1.id) == sft1
    assert reg.resolve("tiny-sft") == sft2, "a name resolves to the newest artifact with it"
    assert reg.resolve(" rm ") == rm1


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (
            "sft:7",
            "registry: no artifact 'sft:7' (sft has versions 1-3; see 'align registry list')",
        ),
        ("dpo:latest", "no artifact 'dpo:latest' (no dpo runs yet; existing: sft:1-3, reward:1;"),
        ("reward:2", "no artifact 'reward:2' (reward has version 1;"),
        ("#99", "no artifact '#99' (ids run 1-4;"),
        ("99", "no artifact '#99' (ids run 1-4;"),
        ("nope", "no artifact 'nope' (no artifact has that name; existing: sft:1-3, reward:1;"),
    ],
)
def test_bad_refs_name_the_ref_and_what_exists(reg, ref, expected):
    for stage in ("sft", "sft", "sft", "reward"):
        _add(reg, stage)
    with pytest.raises(AlignError) as info:
        reg.resolve(ref)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_registry_message(reg):
    with pytest.raises(AlignError) as info:
        reg.resolve("sft:latest")
    assert str(info.value) == (
        f"registry: no artifact 'sft:latest'; the registry at {reg.db_path} is empty "
        "(run a stage first)"
    )


def test_lineage_three_generations_two_parents(reg):
    base = _add(reg, "label", kind="dataset")
    sft = _add(reg, "sft", parents=[base.id])
    rm = _add(reg, "reward", parents=[sft.id])
    ppo = _add(reg, "ppo", parents=[sft.id, rm.id])
    got = [(depth, a.ref) for depth, a in reg.lineage("ppo:latest")]
    assert got == [
        (0, "ppo:1"),
        (1, "sft:1"),
        (2, "label:1"),
        (1, "reward:1"),
        (2, "sft:1"),
        (3, "label:1"),
    ]
    assert reg.lineage(base.ref) == [(0, base)]
    assert [c.ref for c in reg.children(sft.id)] == ["reward:1", "ppo:1"]
    assert reg.children(ppo.id) == []


def test_update_metrics_merges(reg):
    sft = _add(reg, "sft", metrics={"train_loss": 2.0, "eval_loss": 1.9})
    updated = reg.update_metrics(sft.id, {"eval_loss": 1.7, "win_rate": 0.6})
    assert updated.metrics == {"train_loss": 2.0, "eval_loss": 1.7, "win_rate": 0.6}
    assert reg.get(sft.id).metrics == updated.metrics
    with pytest.raises(AlignError, match="'#77'"):
        reg.update_metrics(77, {"x": 1})


def test_secrets_redacted_before_they_reach_the_file(reg):
    config = {
        "hf_token": "plain-token-value-1",
        "training": {
            "max_new_tokens": 64, "pad_token": "<pad>", "eos_token": "</s>", "tokenizer": "gpt2",
        },
        "logging": [{"wandb_api_key": "wandb-secret-value-2", "project": "p"}],
        "openaiApiKey": "camel-secret-value-3",
        "db_password": None,
        "use_auth_token": True,
        "notes": f"pushed with {HF_SECRET}",
        "judge": {"key_hint": OPENAI_SECRET},
    }
    artifact = _add(reg, "sft", config=config)
    assert artifact.config["hf_token"] == "<redacted>"
    assert artifact.config["training"] == config["training"]
    assert artifact.config["logging"] == [{"wandb_api_key": "<redacted>", "project": "p"}]
    assert artifact.config["openaiApiKey"] == "<redacted>"
    assert artifact.config["db_password"] is None
    assert artifact.config["use_auth_token"] is True
    assert artifact.config["notes"] == "pushed with <redacted>"
    assert artifact.config["judge"] == {"key_hint": "<redacted>"}
    assert config["hf_token"] == "plain-token-value-1", "the caller's dict is not modified"

    with sqlite3.connect(reg.db_path) as conn:
        raw = conn.execute("SELECT config FROM artifacts WHERE id = ?", (artifact.id,)).fetchone()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # move WAL pages into the main file
    assert json.loads(raw[0])["training"]["max_new_tokens"] == 64
    on_disk = b"".join(p.read_bytes() for p in reg.home.glob("registry.db*"))
    assert b"max_new_tokens" in on_disk
    secrets = ("plain-token-value-1", "wandb-secret-value-2", "camel-secret-value-3")
    for secret in (*secrets, HF_SECRET, OPENAI_SECRET):
        assert secret.encode() not in on_disk


@pytest.mark.parametrize(
    "key",
    ["token", "hf_token", "HF_TOKEN", "hub_token", "access_token", "auth_token", "wandb_token",
     "hfToken", "api_key", "openai_api_key", "apikey", "client_secret", "secrets", "password",
     "db_passwd", "credentials", "auth", "authorization", "private_key"],
)
def test_secret_keys(key):
    assert redact_secrets({key: "v"}) == {key: "<redacted>"}


@pytest.mark.parametrize(
    "key",
    ["max_new_tokens", "max_tokens", "num_tokens", "pad_token", "eos_token", "bos_token",
     "unk_token", "tokenizer", "tokenizer_name", "pad_token_id", "text_key", "author",
     "max_length"],
)
def test_non_secret_keys(key):
    assert redact_secrets({key: "v"}) == {key: "v"}


def test_secret_values_need_the_full_shape():
    assert redact_secrets(["hf_short", "sk-learn", "task-" + "a" * 30, "gpt2"]) == [
        "hf_short", "sk-learn", "task-" + "a" * 30, "gpt2",
    ]
    assert redact_secrets((HF_SECRET, 3)) == ("<redacted>", 3)


def test_looks_like_ref():
    assert all(map(looks_like_ref, ["sft:latest", "reward:12", "#3", " ppo:1 "]))
    not_refs = ["12", "gpt2", "org/model", "./sft:1/x", "sft:", "sft:new", "#x", ":1"]
    assert not any(map(looks_like_ref, not_refs))


def test_resolve_path(reg, tmp_path):
    sft = _add(reg, "sft", name="my-sft")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "sft:latest").mkdir()  # an existing path wins even if it reads like a ref
    assert resolve_path("local/sft:latest") == ("local/sft:latest", None)
    assert resolve_path("sft:latest") == (sft.path, sft)
    assert resolve_path("my-sft", reg) == (sft.path, sft)
    assert resolve_path("org/some-model") == ("org/some-model", None)
    with pytest.raises(AlignError, match="'sft:9'"):
        resolve_path("sft:9")
    Path(sft.path).rmdir()
    with pytest.raises(AlignError, match="no longer exists"):
        resolve_path("sft:1")


def test_resolve_path_without_registry_leaves_hub_ids_alone(home):
    assert resolve_path("gpt2") == ("gpt2", None)
    assert not home.exists()


def _add_many(home: str, count: int) -> None:
    registry = Registry(home)
    for i in range(count):
        registry.add(stage="sft", name=f"worker-{i}", path=home, metrics={"i": i})


def test_concurrent_writers_get_unique_versions(tmp_path):
    home = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_many, args=(home, 10)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    rows = Registry(home).list("sft")
    assert len(rows) == 20
    assert sorted(a.version for a in rows) == list(range(1, 21))


def test_print_list(reg):
    sft = _add(reg, "sft", name="tiny-sft", base_model="/very/long/path/to/models/base-model",
               metrics={"train_runtime": 12.0, "eval_loss": 1.23456, "epoch": 3, "note": "x"})
    _add(reg, "reward", parents=[sft.id], metrics={"accuracy": 0.75},
         base_model="HuggingFaceTB/SmolLM2-135M-Instruct-extended")
    console = Console(record=True, width=200)
    print_list(console, reg.list(), reg)
    text = console.export_text()
    assert "sft:1" in text and "reward:1" in text and "tiny-sft" in text
    assert "eval_loss=1.235" in text and "accuracy=0.75" in text
    assert "…/models/base-model" in text
    assert " SmolLM2-135M-Instruct-extended " in text
    assert "note=" not in text  # only numeric metrics are "key"

    console = Console(record=True, width=200)
    print_list(console, reg.list("reward"), reg)
    assert "sft:1" in console.export_text(), "parents outside the list still show as refs"


def test_print_list_empty(reg):
    console = Console(record=True, width=200)
    print_list(console, [], reg)
    assert console.export_text().strip() == f"No artifacts yet in {reg.db_path}."


def test_print_show(reg):
    sft = _add(reg, "sft", name="tiny-sft", config={"lr": 0.001, "hf_token": "x", "tags": "[bold]"},
               metrics={"eval_loss": 1.5})
    _add(reg, "ppo", name="tiny-ppo", parents=[sft.id])
    console = Console(record=True, width=200)
    print_show(console, reg.get(sft.id), reg)
    text = console.export_text()
    assert "sft:1" in text and sft.path in text and '"eval_loss": 1.5' in text
    assert '"lr": 0.001' in text and "<redacted>" in text and '"[bold]"' in text
    assert "ppo:1 (tiny-ppo)" in text


def test_print_lineage(reg):
    sft = _add(reg, "sft", name="tiny-sft")
    rm = _add(reg, "reward", name="tiny-rm", parents=[sft.id])
    _add(reg, "ppo", name="tiny-ppo", parents=[sft.id, rm.id])
    console = Console(record=True, width=200)
    print_lineage(console, reg, "ppo:latest")
    lines = console.export_text().splitlines()
    assert lines[0].startswith("ppo:1  tiny-ppo")
    refs = [(line.index(ref), ref) for line in lines for ref in re.findall(r"\w+:\d+", line)]
    assert refs == [(0, "ppo:1"), (4, "sft:1"), (4, "reward:1"), (8, "sft:1")]
    assert sft.path in "\n".join(lines)
