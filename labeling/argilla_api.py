"""Argilla's REST API (v1, as the web UI calls it) with httpx: the client shared by every labeling task.

`align label` (labeling/rankings.py, K-way rankings) and `align eval human` (labeling/pairwise.py, blind A/B
comparisons) both create datasets, log records, read submitted responses and run simulated annotators through
these calls. The connection (URL + API key) comes from :func:`align.labeling.server.connect`, the httpx client from
:func:`align.labeling.server.http_client` (the one every request to Argilla goes through); every failure is one
:class:`align.errors.AlignError` naming the server, raised at one place (:meth:`Api.call`):
:class:`align.labeling.server.ServerDown` when the server does not answer (retried first while it may come back), so
that commands can say how far they got, and :class:`HttpError` for an unexpected status.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from align.errors import AlignError
from align.labeling import server

SIM_PREFIX = "sim-annotator-"  # simulated annotators' user names; everything they submit is marked simulated


# How long one call keeps retrying a server that stopped answering (a remote deployment restarting behind its
# proxy, a moment of overload) before the command gives up with one line; doubling pauses from _FIRST_PAUSE_S.
RETRY_WINDOW_S = 15.0
_FIRST_PAUSE_S = 0.25
_PROXY_DOWN = (502, 503, 504)  # a proxy or load balancer whose Argilla behind it is down or (re)starting
_REPEATABLE = ("GET", "HEAD", "PUT", "DELETE")  # HTTP's idempotent methods: a repeat changes nothing


class HttpError(AlignError):
    """The server answered a call with a status it was not expected to give."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Api:
    """Argilla's REST API with one user's API key; every failure is one AlignError naming the server: ServerDown
    when it does not answer, HttpError for an unexpected status."""

    def __init__(self, url: str, api_key: str):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._client = server.http_client(self.url, api_key, timeout=httpx.Timeout(120.0, connect=10.0))

    @classmethod
    def connect(cls) -> Api:
        connection = server.connect()  # checks the server answers and takes the key
        return cls(connection.api_url, connection.api_key)

    def call(self, method: str, path: str, doing: str, json_body: Any = None, params: dict | None = None,
             expect: tuple[int, ...] = (200,)) -> Any:
        response = self._answer(method, path, doing, json_body, params, expect)
        if response.status_code == 401:
            raise HttpError(f"the Argilla server at {self.url} rejected the API key while {doing}", 401)
        if response.status_code not in expect:
            raise HttpError(f"{doing} on {self.url} failed: HTTP {response.status_code}{server.detail(response)}",
                            response.status_code)
        return response.json() if response.content else None

    def _answer(self, method: str, path: str, doing: str, json_body: Any, params: dict | None,
                expect: tuple[int, ...]):
        """The server's response, retried while the server may come back; ServerDown when it does not.

        A request that may have reached the server (the connection dropped after sending, a proxy's 502-504) is
        repeated only for idempotent methods: a repeated POST could create something twice.
        """
        started, pause = time.monotonic(), _FIRST_PAUSE_S
        while True:
            try:
                response = self._client.request(method, path, json=json_body, params=params)
            except httpx.TransportError as e:
                failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                unsent = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            else:
                if response.status_code not in _PROXY_DOWN or response.status_code in expect:
                    return response
                failure, unsent = f"HTTP {response.status_code}{server.detail(response)}", False
            if ((not unsent and method.upper() not in _REPEATABLE)
                    or time.monotonic() - started + pause > RETRY_WINDOW_S or not server.may_answer_again(self.url)):
                cause = f"while {doing} ({failure})"
                raise server.ServerDown(self.url, f"the Argilla server at {self.url} stopped responding {cause}; "
                                                  f"{server.restart_hint(self.url)} and re-run the same command",
                                        cause) from None
            time.sleep(pause)
            pause *= 2

    def close(self) -> None:
        self._client.close()


def find_dataset(api: Api, name: str, workspace: str) -> dict | None:
    workspaces = api.call("GET", "/api/v1/me/workspaces", "listing workspaces")["items"]
    workspace_id = next((w["id"] for w in workspaces if w["name"] == workspace), None)
    if workspace_id is None:
        return None
    datasets = api.call("GET", "/api/v1/me/datasets", "listing datasets")["items"]
    return next((d for d in datasets if d["name"] == name and d["workspace_id"] == workspace_id), None)


def require_dataset(api: Api, name: str, workspace: str, metadata_key: str, fmt: str, command: str) -> dict:
    """The dataset ``name``, which ``command`` (e.g. ``align label push``) must have made: its own metadata holds a
    ``metadata_key`` block with ``"format": fmt``."""
    dataset = find_dataset(api, name, workspace)
    if dataset is None:
        raise AlignError(f"no dataset '{name}' in workspace '{workspace}' on {api.url}; create it with "
                         f"`{command} --dataset {name} ...`")
    info = (dataset.get("metadata") or {}).get(metadata_key)
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise AlignError(f"dataset '{name}' on {api.url} was not made by `{command}` (its metadata has no "
                         f"'{metadata_key}' block)")
    return dataset


def records(api: Api, dataset_id: str, responses: bool) -> list[dict]:
    """Every record of the dataset (an owner's view: all metadata), with their responses when asked."""
    items, offset = [], 0
    params: dict[str, Any] = {"limit": 1000}
    if responses:
        params["include"] = "responses"
    while True:
        page = api.call("GET", f"/api/v1/datasets/{dataset_id}/records", "listing records",
                        params={**params, "offset": offset})
        items += page["items"]
        offset += len(page["items"])
        if not page["items"] or offset >= page.get("total", offset):
            return items


def upsert_records(api: Api, dataset_id: str, items: list[dict]) -> None:
    """Create or update records by external id (at most 500 per call)."""
    for start in range(0, len(items), 500):
        api.call("PUT", f"/api/v1/datasets/{dataset_id}/records/bulk", "logging records",
                 json_body={"items": items[start:start + 500]})


def annotation_url(api_url: str, dataset_id: str) -> str:
    return f"{api_url.rstrip('/')}/dataset/{dataset_id}/annotation-mode"


def workspace_id(api: Api, workspace: str) -> str:
    """The workspace's id; the workspace is created if missing."""
    return server.workspace_id(server.Connection(api.url, api.api_key), workspace)


def usernames(api: Api) -> dict[str, str]:
    """``{user id: user name}``; empty when this key may not list users."""
    try:
        users = api.call("GET", "/api/v1/users", "listing users")["items"]
    except HttpError:  # not ServerDown: a server gone mid-pull must not leave simulated rankings unmarked
        return {}  # an admin key may not list users: annotators are then not marked simulated
    return {str(u["id"]): u["username"] for u in users}


# --- Simulated annotators --------------------------------------------------------------------------------

def owner_users(api: Api) -> dict[str, dict]:
    """``{user name: user}`` with their API keys (an owner's key sees them)."""
    try:
        users = api.call("GET", "/api/v1/users", "listing users")["items"]
    except HttpError as e:
        raise AlignError(f"simulate creates annotator users and needs an owner's API key: {e}") from None
    return {u["username"]: u for u in users}


def remember_password(url: str, name: str, password: str) -> None:
    """Simulated users' passwords (to look at their work in the UI), 0600 under the align home."""
    _remember(simulated_users_file(), [url, name], password)


def remember_simulated_gold(url: str, dataset_id: str, name: str, gold: str) -> None:
    """Which gold preference a simulated annotator ranked a dataset by (`pull` writes it into the pairs and the
    registry), kept beside their passwords."""
    _remember(simulated_golds_file(), [url, str(dataset_id), name], gold)


def simulated_golds(url: str, dataset_id: str) -> dict[str, str]:
    """``{simulated annotator name: gold spec}`` for one dataset (empty when none was remembered)."""
    try:
        return json.loads(simulated_golds_file().read_text()).get(url, {}).get(str(dataset_id), {})
    except (OSError, ValueError):
        return {}


def _remember(path: Path, keys: list[str], value: str) -> None:
    """Set one value at `keys` in a private (0600) JSON file of nested objects, keeping everything else in it."""
    server.make_private_dir(path.parent)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    node = known
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    server.write_private(path, json.dumps(known, indent=2))


def simulated_users_file() -> Path:
    return server.argilla_home() / "simulated_users.json"


def simulated_golds_file() -> Path:
    return server.argilla_home() / "simulated_golds.json"
