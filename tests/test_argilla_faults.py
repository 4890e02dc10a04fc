"""Kills and server faults lose nothing: the REAL embedded Argilla server SIGKILLed during `align label push`,
`pull` and `simulate`, and `label status` while it is down.

The server is killed and restarted here, so this module runs its own (a free port, its own ALIGN_HOME), not the
session's shared one. Pushes run as real CLI processes (`python -m align label push`); a thread of the test kills
the server process (SIGKILL) as soon as the push has logged a new record, so the kill lands between or inside
the push's requests, wherever it happens to be. CI kills twice; `ALIGN_FAULT_KILLS=5 pytest
tests/test_argilla_faults.py -k push` runs the 5-kill version by hand.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from align.cli.main import main

K = 3
KILLS = int(os.environ.get("ALIGN_FAULT_KILLS", "2"))
DATASET = "faults"
STOPPED = re.compile(r"error: the Argilla server at (\S+) stopped responding during push after (\d+) of (\d+) "
                     r"prompts were logged; nothing lost; start it again with `align label serve` and re-run the "
                     r"same command to continue")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def home(argilla_env):
    """This module's own server (it gets killed): a temporary ALIGN_HOME, a free port, no external Argilla."""
    from align.labeling import server

    with argilla_env("faults_home").applied() as environment:
        info = server.serve(port=_free_port())
        try:
            yield SimpleNamespace(port=info.port, url=info.url, home=environment.home)
        finally:
            server.stop()


def _kill_server() -> None:
    """SIGKILL the API process (uvicorn), as a crash or the OOM killer would; its worker and redis stay."""
    from align.labeling import server

    pid = server.status().info.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.is_our_process(pid, "argilla_launcher.py"):  # reaps it
        assert time.monotonic() < deadline, "the killed server did not exit"
        time.sleep(0.05)


def _restart(home) -> None:
    from align.labeling import server

    assert server.serve(port=home.port).port == home.port


def _records(name: str, responses: bool = False) -> list[dict]:
    from align.labeling import argilla_api

    api = argilla_api.Api.connect()
    found = argilla_api.find_dataset(api, name, "align")
    return [] if found is None else argilla_api.records(api, found["id"], responses=responses)


def _count(client, name: str) -> int:
    """Records in dataset ``name`` (0 while it does not exist yet), read with the test's own client."""
    datasets = client.get("/api/v1/me/datasets").json()["items"]
    found = next((d for d in datasets if d["name"] == name), None)
    if found is None or found.get("status") != "ready":
        return 0
    return client.get(f"/api/v1/datasets/{found['id']}/records", params={"limit": 1}).json()["total"]


def _push_command(model: str, prompts: Path, dataset: str) -> list[str]:
    return [sys.executable, "-m", "align", "label", "push", "--model", model, "--prompts", str(prompts), "--k",
            str(K), "--dataset", dataset, "--max-new-tokens", "12", "--log-every", "1"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _check_complete(name: str, prompts: list[str]) -> None:
    """0 lost, 0 duplicates: one record per prompt under its deterministic id, each with exactly K completions."""
    from align.labeling.rankings import record_id, shuffled_order

    records = _records(name)
    ids = [r["external_id"] for r in records]
    assert len(ids) == len(set(ids)) == len(prompts)  # no duplicate record
    assert sorted(r["fields"]["prompt"] for r in records) == sorted(prompts)  # none lost, none twice
    for record in records:
        assert record["external_id"] == record_id(name, record["fields"]["prompt"])
        completions = {key: text for key, text in record["fields"].items() if key.startswith("completion_")}
        assert sorted(completions) == [f"completion_{p}" for p in range(1, K + 1)]
        assert all(isinstance(text, str) and text.strip() for text in completions.values())
        assert [int(x) for x in record["metadata"]["order"].split(",")] == shuffled_order(record["external_id"], K)


# --- push ------------------------------------------------------------------------------------------------------

def test_push_killed_again_and_again_loses_and_duplicates_nothing(home, tiny_llama, tmp_path, capsys):
    import httpx

    from align.labeling import server

    # Kill i lands after i more prompts are logged: enough prompts that some are left after the last kill.
    prompts = [f"Tell me one thing about the number {i}" for i in range(KILLS * (KILLS + 3) // 2 + 4)]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    command = _push_command(tiny_llama, path, DATASET)
    logged = 0
    for kill in range(KILLS):
        connection = server.connect()
        client = httpx.Client(base_url=connection.api_url, headers={"X-Argilla-Api-Key": connection.api_key},
                              trust_env=False)
        push = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while push.poll() is None and _count(client, DATASET) < logged + kill + 1:
                time.sleep(0.05)
            assert push.poll() is None, f"kill {kill + 1}: the push ended before the kill: {push.communicate()}"
            _kill_server()
            out, err = push.communicate(timeout=180)
        finally:
            client.close()
            if push.poll() is None:
                push.kill()
        assert push.returncode == 2, (out, err)
        said = STOPPED.fullmatch(_one_error_line(err))
        assert said, err
        assert said.group(1) == home.url and int(said.group(3)) == len(prompts)
        _restart(home)
        now = len(_records(DATASET))
        # What the push said was logged is there; one more chunk (1 prompt) may have landed as the server died.
        assert int(said.group(2)) <= now <= int(said.group(2)) + 1 and logged < now < len(prompts)
        logged = now
        with capsys.disabled():
            print(f"\nkill {kill + 1}: the push said {said.group(2)}, the dataset holds {now} of {len(prompts)}")

    assert main(command[3:-1] + ["4"]) == 0  # the same push (in this process: no second import), --log-every 4
    assert f"{len(prompts) - logged} records written, {logged} already there" in capsys.readouterr().out
    _check_complete(DATASET, prompts)


# --- pull, simulate, status ----------------------------------------------------------------------------------

PULL_PROMPTS = ["Name a colour", "Name a fruit", "Name a river", "Name a tree"]


@pytest.fixture(scope="module")
def small(home, tiny_llama, tmp_path_factory):
    """A small pushed dataset (4 prompts x K) that nobody has ranked yet."""
    path = tmp_path_factory.mktemp("pull") / "prompts.txt"
    path.write_text("\n".join(PULL_PROMPTS) + "\n")
    assert main(["label", "push", "--model", tiny_llama, "--prompts", str(path), "--k", str(K), "--dataset", "small",
                 "--max-new-tokens", "8"]) == 0
    return "small"


def test_simulate_killed_midway_continues_where_it_stopped(home, small, monkeypatch, capsys):
    import threading

    from align.labeling import argilla_api, server

    real = argilla_api.Api.call
    submitted = []

    def call_then_kill(api, method, path, doing, *args, **kwargs):
        answer = real(api, method, path, doing, *args, **kwargs)
        if doing.endswith("submitting a ranking"):
            submitted.append(path)
            if len(submitted) == 2:
                _kill_server()
        return answer

    monkeypatch.setattr(argilla_api.Api, "call", call_then_kill)
    assert main(["label", "simulate", "--dataset", small, "--annotators", "1", "--gold", "longer"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: the Argilla server at {home.url} stopped responding while sim-annotator-1 "
                           "submitting a ranking (") and "start it again with `align label serve`" in line
    monkeypatch.setattr(argilla_api.Api, "call", real)

    # Down: `label status` says so in one line.
    assert main(["label", "status", "--dataset", small]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: the Argilla server in {home.home / 'argilla'} is not running: start it with `align label serve` "
        "(or set ARGILLA_API_URL/ARGILLA_API_KEY)")

    # A call to the embedded server whose process is gone fails at once: nobody restarts it but the user.
    connection = server.Connection(home.url, json.loads(server.credentials_file().read_text())["api_key"])
    api = argilla_api.Api(*connection)
    started = time.monotonic()
    with pytest.raises(server.ServerDown, match="stopped responding while listing datasets .*start it again"):
        api.call("GET", "/api/v1/me/datasets", "listing datasets")
    assert time.monotonic() - started < 2
    # A deployment named by ARGILLA_API_URL may be restarting behind its proxy: a call waits for it to come back.
    with monkeypatch.context() as external:
        external.setenv("ARGILLA_API_URL", connection.api_url)
        external.setenv("ARGILLA_API_KEY", connection.api_key)
        external.setattr(argilla_api, "RETRY_WINDOW_S", 120.0)  # a restart on a busy CI machine
        restart = threading.Thread(target=_restart, args=(home,))
        restart.start()
        try:
            assert "items" in api.call("GET", "/api/v1/me/datasets", "listing datasets")
        finally:
            restart.join()
        assert time.monotonic() - started > 1  # it did wait

    assert main(["label", "simulate", "--dataset", small, "--annotators", "1", "--gold", "longer"]) == 0
    capsys.readouterr()
    records = _records(small, responses=True)
    answers = [r for record in records for r in record.get("responses") or []]
    assert len(records) == len(PULL_PROMPTS) and len(answers) == len(PULL_PROMPTS)  # each ranked once
    assert all(r["status"] == "submitted" for r in answers)


def test_pull_killed_writes_and_registers_nothing_then_pulls_everything(home, small, tmp_path, monkeypatch, capsys):
    from align.registry import Registry
    from align.labeling import argilla_api, rankings

    expected = rankings.pull(small, str(tmp_path / "reference.jsonl"), register=False).rows
    assert expected and all(row["simulated"] for row in expected)
    rows_before = len(Registry().list())
    real = argilla_api.records

    def then_kill(*args, **kwargs):  # the records are read; the server dies before the user names are
        answer = real(*args, **kwargs)
        _kill_server()
        return answer

    monkeypatch.setattr(argilla_api, "records", then_kill)
    out = tmp_path / "pairs" / "pairs.jsonl"
    assert main(["label", "pull", "--dataset", small, "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: the Argilla server at {home.url} stopped responding during pull while listing "
                           "users (ConnectError") and line.endswith(
        "; nothing was written or registered; start it again with `align label serve` and re-run the same command")
    assert not out.exists() and not list(tmp_path.rglob(".pairs.jsonl*"))  # no partial or staging file
    assert len(Registry().list()) == rows_before
    monkeypatch.setattr(argilla_api, "records", real)

    _restart(home)
    assert main(["label", "pull", "--dataset", small, "--out", str(out)]) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == expected and len(Registry().list()) == rows_before + 1


# --- the REST client's retries (labeling/argilla_api.py) ------------------------------------------------------

def test_a_proxy_503_is_retried_for_reads_and_never_for_a_post(monkeypatch):
    import http.server
    import threading

    from align.labeling import argilla_api, server

    seen = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            seen.append(self.command)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            code = 503 if len(seen) <= 2 else 200  # down twice, then back
            body = b'{"ok": true}'
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("ARGILLA_API_URL", url)
    monkeypatch.setenv("ARGILLA_API_KEY", "k")
    try:
        api = argilla_api.Api(url, "k")
        assert api.call("GET", "/x", "reading") == {"ok": True} and seen == ["GET"] * 3
        seen.clear()
        with pytest.raises(server.ServerDown) as down:  # a POST the server may have acted on is not repeated
            api.call("POST", "/x", "creating a thing", json_body={})
        assert seen == ["POST"] and str(down.value) == (
            f"the Argilla server at {url} stopped responding while creating a thing (HTTP 503: {{\"ok\": true}}); "
            f"wait until {url} answers again and re-run the same command")
    finally:
        proxy.shutdown()
