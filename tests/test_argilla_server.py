"""The embedded Argilla server (labeling/server.py) against the REAL argilla-server 2.8.0 and web UI.

One server per module, on a free port, with ALIGN_HOME in a temporary folder. The server's virtual
environment is shared between runs through ALIGN_ARGILLA_VENV (default ~/.cache/align/argilla-server-venv):
the first run builds it (~1-2 min), later runs reuse it. Needs Debian's redis-server (scripts/setup.sh
installs it; as root this module installs it if missing); the UI test needs Debian's chromium.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from align.errors import AlignError

PROMPTS = [f"Explain photosynthesis to a child, take {i}" for i in range(5)]
PENDING_VIEW = {  # what the UI's default "Pending" view sends
    "filters": {"and": [
        {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
        {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
    ]}
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_available() -> bool:
    if shutil.which("redis-server"):
        return True
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        for command in (["apt-get", "install", "-y", "-qq", "redis-server"], ["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "redis-server"]):
            subprocess.run(command, capture_output=True, timeout=900, check=False,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if shutil.which("redis-server"):
                return True
    return shutil.which("redis-server") is not None


@pytest.fixture(scope="module")
def server_env(argilla_env):
    """ALIGN_HOME in a temporary folder, the shared server venv, no external Argilla configured."""
    if not _redis_available():
        pytest.skip("redis-server is not installed and cannot be installed here (apt-get install redis-server)")
    with argilla_env("align_home").applied():
        yield


@pytest.fixture(scope="module")
def running(server_env):
    from align.labeling import server

    started = time.monotonic()
    info = server.serve(port=_free_port())
    print(f"argilla server up in {time.monotonic() - started:.1f} s at {info.url}")
    try:
        yield info
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ranking_dataset(running):
    """A dataset of 5 prompts x 2 completions with a ranking question, and two annotators."""
    import argilla as rg

    from align.labeling import server

    api_url, api_key = server.connect()
    client = rg.Argilla(api_url=api_url, api_key=api_key)
    settings = rg.Settings(
        guidelines="Rank the completions from best to worst.",
        fields=[rg.TextField(name="prompt"), rg.TextField(name="completion_1"), rg.TextField(name="completion_2")],
        questions=[rg.RankingQuestion(name="ranking", values={"completion_1": "Completion 1",
                                                              "completion_2": "Completion 2"})],
        metadata=[rg.TermsMetadataProperty(name="source"), rg.IntegerMetadataProperty(name="length")],
        distribution=rg.TaskDistribution(min_submitted=2),
    )
    dataset = rg.Dataset(name="rankings", workspace=server.WORKSPACE, settings=settings, client=client).create()
    dataset.records.log([
        {"id": f"prompt-{i}", "prompt": prompt, "completion_1": f"Plants eat sunlight ({i})",
         "completion_2": f"Leaves make sugar from light, water and air ({i})",
         "source": "sft" if i < 3 else "ppo", "length": 10 + i}
        for i, prompt in enumerate(PROMPTS)
    ])
    users = {name: server.add_user(name) for name in ("ann", "bea")}
    return {"client": client, "dataset": dataset, "id": str(dataset.id), "users": users, "url": api_url}


def _token(url: str, username: str, password: str) -> dict:
    import httpx

    answer = httpx.post(f"{url}/api/v1/token", data={"username": username, "password": password})
    answer.raise_for_status()
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def _search(url: str, headers: dict, dataset_id: str, body: dict) -> dict:
    import httpx

    answer = httpx.post(f"{url}/api/v1/me/datasets/{dataset_id}/records/search", headers=headers, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _rank(url: str, headers: dict, record_id: str, best: str = "completion_2") -> None:
    import httpx

    worst = "completion_1" if best == "completion_2" else "completion_2"
    body = {"values": {"ranking": {"value": [{"value": best, "rank": 1}, {"value": worst, "rank": 2}]}},
            "status": "submitted"}
    answer = httpx.post(f"{url}/api/v1/records/{record_id}/responses", headers=headers, json=body)
    assert answer.status_code == 201, answer.text


# --- The server itself ---

def test_serves_the_ui_on_loopback_only(running):
    import httpx

    from align.labeling import server

    assert running.url == f"http://127.0.0.1:{running.port}"
    page = httpx.get(running.url + "/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"] and "<html" in page.text.lower()
    # Every listening socket on the port is bound to 127.0.0.1 (0100007F in /proc/net/tcp).
    listeners = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == running.port:
                    listeners.append(local.rsplit(":", 1)[0])
    if os.path.exists("/proc/net/tcp"):
        assert listeners == ["0100007F"], listeners
    current = server.status()
    assert current.running and current.healthy and current.info.pid == running.pid


def test_serve_is_idempotent_and_guards_the_port(running):
    from align.labeling import server

    again = server.serve()
    assert again.already_running and again.pid == running.pid and again.url == running.url
    assert again.new_owner_password is None
    with pytest.raises(AlignError, match="already running"):
        server.serve(port=_free_port())


def test_port_taken_by_another_program(server_env, tmp_path, monkeypatch):
    from align.labeling import server

    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "other_home"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(AlignError, match=f"port {port} .* taken by another program"):
            server.serve(port=port)
    assert server.status().running is False


def test_credentials_are_private_and_never_logged(running):
    from align.labeling import server

    creds_path = server.credentials_file()
    creds = json.loads(creds_path.read_text())
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((running.home / "auth_secret").stat().st_mode) == 0o600
    assert stat.S_IMODE(running.home.stat().st_mode) == 0o700
    assert creds["username"] == "owner" and len(creds["password"]) >= 16 and len(creds["api_key"]) >= 32
    # The first serve() hands the password over once (for the CLI to print).
    assert running.new_owner_password == creds["password"]
    for log in running.home.glob("*.log"):
        text = log.read_text(errors="replace")
        assert creds["password"] not in text and creds["api_key"] not in text, log


def test_connect_errors_are_one_clear_line(running, tmp_path, monkeypatch):
    from align.labeling import server

    assert server.connect() == (running.url, json.loads(server.credentials_file().read_text())["api_key"])

    monkeypatch.setenv("ARGILLA_API_URL", running.url)
    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-key")
    with pytest.raises(AlignError, match=f"Argilla server at {running.url} rejected the API key"):
        server.connect()

    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("ARGILLA_API_URL", dead)
    with pytest.raises(AlignError, match=f"cannot reach the Argilla server at {dead}"):
        server.connect()

    monkeypatch.delenv("ARGILLA_API_KEY")
    with pytest.raises(AlignError, match="ARGILLA_API_KEY is not set"):
        server.connect()

    monkeypatch.delenv("ARGILLA_API_URL")
    monkeypatch.setenv("ALIGN_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(AlignError, match="no Argilla server: run `align label serve`"):
        server.connect()


# --- Annotating through the REST calls the UI makes ---

def test_annotator_ranks_a_pending_record(ranking_dataset):
    url, dataset_id = ranking_dataset["url"], ranking_dataset["id"]
    ann = _token(url, "ann", ranking_dataset["users"]["ann"])
    bea = _token(url, "bea", ranking_dataset["users"]["bea"])

    queue = _search(url, ann, dataset_id, PENDING_VIEW)
    assert queue["total"] == 5
    assert sorted(item["record"]["fields"]["prompt"] for item in queue["items"]) == sorted(PROMPTS)
    first = queue["items"][0]["record"]
    _rank(url, ann, first["id"])

    # Gone from ann's queue, still in bea's (2 rankings wanted per prompt).
    mine = _search(url, ann, dataset_id, PENDING_VIEW)
    assert mine["total"] == 4 and first["id"] not in {i["record"]["id"] for i in mine["items"]}
    assert _search(url, bea, dataset_id, PENDING_VIEW)["total"] == 5
    submitted = {"filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"},
                                      "values": ["submitted"]}]}}
    assert [i["record"]["id"] for i in _search(url, ann, dataset_id, submitted)["items"]] == [first["id"]]

    progress = ranking_dataset["dataset"].progress(with_users_distribution=True)
    assert progress["total"] == 5 and progress["completed"] == 0
    assert progress["users"]["ann"]["pending"]["submitted"] == 1

    # The second ranking completes the record: out of everyone's queue.
    _rank(url, bea, first["id"], best="completion_1")
    assert _search(url, bea, dataset_id, PENDING_VIEW)["total"] == 4
    progress = ranking_dataset["dataset"].progress(with_users_distribution=True)
    assert progress["completed"] == 1 and progress["pending"] == 4
    assert progress["users"]["bea"]["completed"]["submitted"] == 1

    import httpx

    metrics = httpx.get(f"{url}/api/v1/me/datasets/{dataset_id}/metrics", headers=ann).json()
    assert metrics["responses"] == {"total": 5, "submitted": 1, "discarded": 0, "draft": 0, "pending": 4}


def test_search_filters_sort_and_text(ranking_dataset):
    url, dataset_id = ranking_dataset["url"], ranking_dataset["id"]
    ann = _token(url, "ann", ranking_dataset["users"]["ann"])

    def external_ids(body):
        return [item["record"]["external_id"] for item in _search(url, ann, dataset_id, body)["items"]]

    by_length_desc = [{"scope": {"entity": "metadata", "metadata_property": "length"}, "order": "desc"}]
    assert external_ids({"sort": by_length_desc}) == [f"prompt-{i}" for i in (4, 3, 2, 1, 0)]
    ppo = {"type": "terms", "scope": {"entity": "metadata", "metadata_property": "source"}, "values": ["ppo"]}
    assert external_ids({"filters": {"and": [ppo]}, "sort": by_length_desc}) == ["prompt-4", "prompt-3"]
    middle = {"type": "range", "scope": {"entity": "metadata", "metadata_property": "length"}, "ge": 11, "le": 13}
    assert sorted(external_ids({"filters": {"and": [middle]}})) == ["prompt-1", "prompt-2", "prompt-3"]
    assert external_ids({"query": {"text": {"q": "take 3"}}}) == ["prompt-3"]
    assert external_ids({"query": {"text": {"q": "PHOTOSYNTHESIS", "field": "prompt"}}, "sort": by_length_desc,
                         }) == [f"prompt-{i}" for i in (4, 3, 2, 1, 0)]
    assert external_ids({"query": {"text": {"q": "sugar", "field": "prompt"}}}) == []

    import httpx

    paged = httpx.post(f"{url}/api/v1/me/datasets/{dataset_id}/records/search?offset=1&limit=2", headers=ann,
                       json={"sort": by_length_desc}).json()
    assert paged["total"] == 5 and [i["record"]["external_id"] for i in paged["items"]] == ["prompt-3", "prompt-2"]

    owner = {"X-Argilla-Api-Key": ranking_dataset["client"].api_key}
    source = next(p for p in ranking_dataset["dataset"].settings.metadata if p.name == "source")
    terms = httpx.get(f"{url}/api/v1/metadata-properties/{source.id}/metrics", headers=owner).json()
    assert terms["total"] == 5 and {v["term"]: v["count"] for v in terms["values"]} == {"sft": 3, "ppo": 2}


def test_search_engine_answers_suggestion_response_vector_filters(running):
    """The other filters and sorts the UI offers, and find-similar, answered from SQL."""
    import argilla as rg
    import httpx

    from align.labeling import server

    api_url, api_key = server.connect()
    client = rg.Argilla(api_url=api_url, api_key=api_key)
    settings = rg.Settings(
        fields=[rg.TextField(name="text")],
        questions=[rg.RatingQuestion(name="quality", values=[1, 2, 3, 4, 5]),
                   rg.LabelQuestion(name="topic", labels=["bio", "chem"]),
                   rg.MultiLabelQuestion(name="tags", labels=["a", "b", "c"])],
        vectors=[rg.VectorField(name="emb", dimensions=3)],
        metadata=[rg.FloatMetadataProperty(name="score")],
    )
    dataset = rg.Dataset(name="engine-paths", workspace=server.WORKSPACE, settings=settings, client=client).create()
    vectors = [[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [-1, 0, 0]]
    me = client.me.id
    dataset.records.log([
        rg.Record(id=f"r{i}", fields={"text": "Grüße aus München" if i == 2 else f"record {i}"},
                  metadata={"score": i / 10}, vectors={"emb": vectors[i]},
                  suggestions=[rg.Suggestion("topic", "bio" if i % 2 else "chem", score=i / 5, agent="m1"),
                               rg.Suggestion("tags", ["a", "c"] if i < 2 else ["b"], agent="m2")],
                  responses=[rg.Response("quality", i + 1, user_id=me)] if i < 3 else [])
        for i in range(5)
    ])
    owner = {"X-Argilla-Api-Key": api_key}

    def ids(body, me_view=False, params=""):
        where = "me/datasets" if me_view else "datasets"
        answer = httpx.post(f"{api_url}/api/v1/{where}/{dataset.id}/records/search{params}", headers=owner, json=body)
        assert answer.status_code == 200, answer.text
        return [item["record"]["external_id"] for item in answer.json()["items"]]

    def terms(scope, values):
        return {"filters": {"and": [{"type": "terms", "scope": scope, "values": values}]}}

    def between(scope, ge=None, le=None):
        return {"filters": {"and": [{"type": "range", "scope": scope, "ge": ge, "le": le}]}}

    topic = {"entity": "suggestion", "question": "topic", "property": "value"}
    assert ids(terms(topic, ["bio"])) == ["r1", "r3"]
    assert ids(terms({"entity": "suggestion", "question": "tags", "property": "value"}, ["c"])) == ["r0", "r1"]
    score_at_least = between({"entity": "suggestion", "question": "topic", "property": "score"}, ge=0.4)
    assert ids(score_at_least) == ["r2", "r3", "r4"]
    # (the "me" view without a sort is shuffled per user, as with ES)
    assert sorted(ids(between({"entity": "response", "question": "quality"}, ge=2, le=3), me_view=True)) == ["r1", "r2"]
    # SDK-logged responses are drafts; "pending" unscoped = nobody responded.
    assert ids(terms({"entity": "response", "property": "status"}, ["draft"])) == ["r0", "r1", "r2"]
    assert ids(terms({"entity": "response", "property": "status"}, ["pending"])) == ["r3", "r4"]
    assert ids({"sort": [{"scope": {"entity": "response", "question": "quality"}, "order": "desc"}]},
               me_view=True) == ["r2", "r1", "r0", "r3", "r4"]  # no answer: last
    assert ids({"sort": [{"scope": topic | {"property": "score"}, "order": "desc"}]}) == ["r4", "r3", "r2", "r1", "r0"]
    assert ids(between({"entity": "metadata", "metadata_property": "score"}, ge=0.15, le=0.35)) == ["r2", "r3"]
    # Case-insensitive beyond ASCII, as ES analyzers are; all words required.
    assert ids({"query": {"text": {"q": "GRÜSSE MÜNCHEN"}}}) == ["r2"]
    assert ids({"query": {"text": {"q": "grüße berlin"}}}) == []

    by_external_id = terms({"entity": "record", "property": "external_id"}, ["r0"])
    assert ids(by_external_id) == ["r0"]
    r0_id = httpx.post(f"{api_url}/api/v1/datasets/{dataset.id}/records/search", headers=owner,
                       json=by_external_id).json()["items"][0]["record"]["id"]
    similar = ids({"query": {"vector": {"name": "emb", "record_id": r0_id}}}, params="?limit=2")
    assert len(similar) == 2 and similar[0] == "r1"  # r0 itself left out
    assert ids({"query": {"vector": {"name": "emb", "value": [0, 0, 1]}}}, params="?limit=1") == ["r3"]
    assert ids({"query": {"vector": {"name": "emb", "record_id": r0_id, "order": "least_similar"}}},
               params="?limit=1") == ["r4"]

    score = next(p for p in dataset.settings.metadata if p.name == "score")
    metrics = httpx.get(f"{api_url}/api/v1/metadata-properties/{score.id}/metrics", headers=owner).json()
    assert metrics == {"type": "float", "min": 0.0, "max": 0.4}


def test_distribution_change_runs_in_the_worker(ranking_dataset):
    """Changing min_submitted enqueues a job that recomputes record statuses: the worker must run it."""
    import argilla as rg

    url, dataset_id = ranking_dataset["url"], ranking_dataset["id"]
    ann = _token(url, "ann", ranking_dataset["users"]["ann"])
    record = _search(url, ann, dataset_id, PENDING_VIEW)["items"][0]["record"]
    _rank(url, ann, record["id"])
    dataset = ranking_dataset["client"].datasets("rankings", workspace="align")
    assert dataset.progress()["completed"] == 1
    dataset.settings.distribution = rg.TaskDistribution(min_submitted=1)
    dataset.update()
    deadline = time.monotonic() + 30
    while dataset.progress()["completed"] != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert dataset.progress()["completed"] == 2


# --- The web UI in a real browser ---

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_ui_shows_the_records_to_a_logged_in_annotator(ranking_dataset, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from align.labeling import server

    # A new annotator: their whole queue is pending, whatever the other tests submitted.
    password = server.add_user("cal")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]

    def run(*args: str) -> str:
        done = subprocess.run([*flags, *args], capture_output=True, text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    # Sign in through the UI's own ?auth= link; the session lands in the profile for the next visit.
    login = server.login_url("cal", password)
    assert base64.b64decode(login.split("auth=", 1)[1]).decode() == f"cal:{password}"
    run("--virtual-time-budget=15000", "--dump-dom", login)

    page = f"{ranking_dataset['url']}/dataset/{ranking_dataset['id']}/annotation-mode"
    screenshot = tmp_path / "annotation.png"
    run("--virtual-time-budget=20000", f"--screenshot={screenshot}", page)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    keep = os.environ.get("ALIGN_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "argilla-annotation.png")

    dom = run("--virtual-time-budget=20000", "--dump-dom", page)
    assert any(prompt in dom for prompt in PROMPTS), dom[-3000:]
    assert "Completion 1" in dom and "Completion 2" in dom and "ranking" in dom


# --- Restart ---

def test_restart_keeps_users_and_data(running, ranking_dataset):
    import argilla as rg

    from align.labeling import server

    key = server.connect().api_key
    assert server.stop() is True
    assert server.status().running is False
    with pytest.raises(AlignError, match="not running"):
        server.connect()

    info = server.serve(port=running.port)
    assert not info.already_running and info.new_owner_password is None
    assert server.connect() == (info.url, key)
    client = rg.Argilla(api_url=info.url, api_key=key)
    dataset = client.datasets("rankings", workspace="align")
    assert dataset.progress()["total"] == 5
    ann = _token(info.url, "ann", ranking_dataset["users"]["ann"])
    assert _search(info.url, ann, str(dataset.id), PENDING_VIEW)["total"] == 3


def test_serve_recovers_from_a_crashed_process(running, ranking_dataset):
    import signal

    from align.labeling import server

    before = server.status().info
    os.kill(before.worker_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while server.status().healthy and time.monotonic() < deadline:
        time.sleep(0.1)
    current = server.status()
    assert not current.healthy and "worker stopped" in current.detail

    info = server.serve()  # no port given: back on the one it had
    assert not info.already_running and info.port == before.port and info.worker_pid != before.worker_pid
    assert server.status().healthy
    assert server.connect().api_url == before.url
    for pid in (before.pid, before.redis_pid):  # the survivors of the crash were stopped
        assert not server.is_our_process(pid, "argilla_launcher.py") and not server.is_our_process(pid, "redis-server")


def test_server_env_module_imports_with_the_standard_library_only():
    """scripts/setup.sh builds the server's environment with align.labeling.server_env while align's dependencies are
    still being installed: it may import nothing beyond the standard library (and align's own stdlib-only modules)."""
    import subprocess
    import sys

    blocked = ("yaml", "rich", "torch", "transformers", "httpx", "numpy", "psutil", "filelock")
    script = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
              + "import align.labeling.server_env\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
