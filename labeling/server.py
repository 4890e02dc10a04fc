"""The embedded Argilla server (`align label serve`): the real argilla-server 2.8.0 and its web UI.

Where things live (``<home>`` is the align home, ``$ALIGN_HOME`` or ``./.align``):

- ``<home>/argilla-server-venv`` (or ``$ALIGN_ARGILLA_VENV``): the server's own virtual environment, built on
  first use by labeling/server_env.py (standard library only: scripts/setup.sh builds it with that module).
- ``<home>/argilla/`` (mode 0700): the SQLite database, ``credentials.json`` (the owner's login and
  API key, 0600), ``auth_secret`` (the JWT key, 0600: browser sessions survive restarts),
  ``server.json`` (what is running), ``server.log``, ``worker.log``, ``redis.log``, ``tmp/``.

Three processes, each in its own session, bound to 127.0.0.1 only: Debian's ``redis-server`` (on a
free port, password-protected, nothing saved to disk), the API + UI (uvicorn, ``argilla_launcher.py
server``) and the job worker (``argilla_launcher.py worker``). Search is answered from the SQL
database by ``argilla_search.py`` (Elasticsearch cannot be installed here). ``server.json`` names each
process by pid and start time, so a recycled pid is never taken for ours (psutil); starting and stopping
take a lock on the home (filelock).

Everything else in align talks to Argilla through :func:`connect`, which prefers an existing
deployment named by ``ARGILLA_API_URL`` + ``ARGILLA_API_KEY``, and every request goes through an
httpx client from :func:`http_client` (labeling/argilla_api.py's ``Api`` adds retries on top).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import psutil
from filelock import FileLock

from align.errors import AlignError
from align.files import write_atomically
from align.labeling.server_env import SERVER_VERSION, align_home, clean_env, ensure_server_venv, last_line, tail_lines

DEFAULT_PORT = 6900
WORKSPACE = "align"
OWNER = "owner"
ROLES = ("annotator", "admin")
HOST = "127.0.0.1"
ENGINE_NAME = "align-sql"

URL_ENV = "ARGILLA_API_URL"
KEY_ENV = "ARGILLA_API_KEY"

_HERE = Path(__file__).resolve().parent
_LAUNCHER = _HERE / "argilla_launcher.py"
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 15.0
_HTTP_TIMEOUT_S = 10.0
_LOG_ROTATE_BYTES = 5 * 1024 * 1024
_USERNAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class Connection(NamedTuple):
    """Where Argilla is and the key to use; unpacks as ``api_url, api_key = connect()``."""

    api_url: str
    api_key: str


@dataclass(frozen=True)
class ServerInfo:
    """A running embedded server."""

    url: str
    port: int
    pid: int
    worker_pid: int
    redis_pid: int
    redis_port: int
    home: Path
    credentials_file: Path
    log_file: Path
    username: str = OWNER
    already_running: bool = False
    # Set only by the serve() that created the owner, so the CLI can show it once.
    new_owner_password: str | None = None


@dataclass(frozen=True)
class ServerStatus:
    """What `align label serve status` reports."""

    running: bool
    healthy: bool
    home: Path
    info: ServerInfo | None = None
    detail: str = ""


# --- Paths -------------------------------------------------------------------------------------

def argilla_home() -> Path:
    """``<align home>/argilla``: the server's database, secrets, logs and run state."""
    return align_home() / "argilla"


def credentials_file() -> Path:
    return argilla_home() / "credentials.json"


def _state_file() -> Path:
    return argilla_home() / "server.json"


# --- Lifecycle -------------------------------------------------------------------------------------

def serve(port: int | None = None, say=None) -> ServerInfo:
    """Start the embedded server (idempotent: a healthy running one is returned as it is).

    Builds the server venv on first use, starts redis, migrates the database and creates the owner
    user on first start, then the API/UI and the worker, and waits until the API answers.
    """
    say = say or _say
    redis_server = find_redis_server()
    python = ensure_server_venv(say)
    home = argilla_home()
    make_private_dir(home)
    with FileLock(home / ".lock"):  # one start at a time: a second one finds the first one's server
        state = _read_state()
        if state is not None:
            info = _info_from_state(state, already_running=True)
            if _healthy(state) and _running(state, "worker_pid"):
                if port is not None and port != info.port:
                    raise AlignError(f"the Argilla server is already running at {info.url}; stop it first "
                                     "(`align label serve stop`) to use another port")
                return info
            _stop_processes(state)  # leftovers of a crashed or half-started server, or a lone one
            if port is None:
                port = info.port  # come back where it was
        port = DEFAULT_PORT if port is None else port
        if not 0 < port < 65536:
            raise AlignError(f"--port {port}: not a TCP port (1-65535)")
        if _port_in_use(port):
            other = "another align Argilla server (from another align home?)" if _healthy(
                {"port": port}, check_pid=False) else "another program"
            raise AlignError(f"port {port} on {HOST} is taken by {other}; "
                             "choose another with `align label serve --port N`")

        tmp = home / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # argilla_server copies its 14 MB UI here per process
        tmp.mkdir()
        for name in ("server.log", "worker.log", "redis.log", "setup.log"):
            _rotate(home / name)
        creds = _ensure_credentials(home)
        state: dict[str, Any] = {"port": port, "home": str(home), "started_at": time.time()}
        try:
            redis_port, redis_password = _start_redis(redis_server, home, state)
            env = _server_env(home, redis_port, redis_password)
            owner_set = _ensure_database(python, home, env, creds)
            _spawn(state, "pid", [str(python), str(_LAUNCHER), "server", "--port", str(port)], home, env,
                   home / "server.log")
            _spawn(state, "worker_pid", [str(python), str(_LAUNCHER), "worker"], home, env, home / "worker.log")
            write_private(_state_file(), json.dumps(state, indent=2))
            _wait_healthy(state, home)
        except BaseException:
            _stop_processes(state)
            _state_file().unlink(missing_ok=True)
            raise
    info = _info_from_state(state, already_running=False)
    if owner_set:  # the owner was just created or reset to the password in credentials.json
        info = dataclasses.replace(info, new_owner_password=creds["password"])
    return info


def stop() -> bool:
    """Stop the embedded server, its worker and redis; False if nothing was running."""
    home = argilla_home()
    if not _state_file().exists():
        return False
    with FileLock(home / ".lock"):
        state = _read_state()
        if state is None:
            return False
        was_running = any(_running(state, key) for key in _RUNS)
        _stop_processes(state)
        _state_file().unlink(missing_ok=True)
        shutil.rmtree(home / "tmp", ignore_errors=True)
        return was_running


def status() -> ServerStatus:
    """Whether the embedded server runs and answers."""
    home = argilla_home()
    state = _read_state()
    if state is None:
        return ServerStatus(running=False, healthy=False, home=home, detail="not running")
    info = _info_from_state(state, already_running=True)
    if not _running(state, "pid"):
        return ServerStatus(running=False, healthy=False, home=home, info=info,
                            detail=f"stopped unexpectedly (see {info.log_file}); start it again with "
                                   "`align label serve`")
    if not _healthy(state):
        return ServerStatus(running=True, healthy=False, home=home, info=info,
                            detail=f"not answering at {info.url}; see {info.log_file}")
    if not _running(state, "worker_pid"):
        return ServerStatus(running=True, healthy=False, home=home, info=info,
                            detail=f"the job worker stopped; see {home / 'worker.log'}")
    return ServerStatus(running=True, healthy=True, home=home, info=info, detail="running")


def server_url() -> str | None:
    """The embedded server's URL if it is running (per its state file), else None."""
    state = _read_state()
    if state is None or not _running(state, "pid"):
        return None
    return _url(state["port"])


# --- Clients -----------------------------------------------------------------------------------------

def connect(check: bool = True) -> Connection:
    """Where to reach Argilla: ``ARGILLA_API_URL`` + ``ARGILLA_API_KEY``, else the embedded server.

    With ``check``, the server must answer and accept the key; each failure is one clear AlignError
    naming the URL.
    """
    url, key = os.environ.get(URL_ENV, "").strip(), os.environ.get(KEY_ENV, "").strip()
    if url or key:
        if not (url and key):
            missing = KEY_ENV if url else URL_ENV
            raise AlignError(f"{URL_ENV} and {KEY_ENV} go together: {missing} is not set")
        source = f"${KEY_ENV}"
    else:
        creds = _read_credentials()
        if creds is None:
            raise AlignError(f"no Argilla server: run `align label serve` or set {URL_ENV}/{KEY_ENV}")
        url = server_url()
        if url is None:
            raise AlignError(f"the Argilla server in {argilla_home()} is not running: "
                             f"start it with `align label serve` (or set {URL_ENV}/{KEY_ENV})")
        key, source = creds["api_key"], str(credentials_file())
    url = url.rstrip("/")
    connection = Connection(url, key)
    if check:
        me = _check_key(connection, source)
        if not isinstance(me, dict) or "username" not in me:
            raise AlignError(f"{url} does not look like an Argilla server (GET /api/v1/me answered "
                             f"without a user)")
    return connection


class ServerDown(AlignError):
    """Argilla did not answer (connection refused or dropped, a timeout, a proxy's 502-504): nothing in the user's
    input to fix; commands catch it to say how far they got and that re-running the same command continues."""

    def __init__(self, url: str, message: str, cause: str = ""):
        super().__init__(message)
        self.url = url
        self.cause = cause  # what was being done and how it failed, for a command's own wording


def http_client(url: str, api_key: str | None = None, timeout: float | httpx.Timeout = _HTTP_TIMEOUT_S) -> httpx.Client:
    """The httpx client every request to Argilla goes through, with ``api_key`` sent on each request.

    On the loopback the environment's proxy settings are ignored: our own server's key never goes through a proxy.
    """
    local = (httpx.URL(url).host or "") in ("127.0.0.1", "localhost", "::1")
    headers = {"X-Argilla-Api-Key": api_key} if api_key is not None else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, trust_env=not local)


def detail(response: httpx.Response) -> str:
    """The server's error detail for a message (``": ..."``), or ``""``."""
    try:
        body = response.json()
    except ValueError:
        return f": {response.text[:300]}" if response.text else ""
    said = body.get("detail", body) if isinstance(body, dict) else body
    return f": {said if isinstance(said, str) else json.dumps(said)[:400]}"


def restart_hint(url: str) -> str:
    """What brings the server at ``url`` back: the embedded one is started by `align label serve`."""
    return f"wait until {url} answers again" if _external() else "start it again with `align label serve`"


def may_answer_again(url: str) -> bool:
    """False when ``url`` is the embedded server and its process is gone: retrying cannot help until someone
    starts it. A deployment named by ``$ARGILLA_API_URL`` may be restarting behind a proxy: worth retrying."""
    return _external() or server_url() == url.rstrip("/")


def _external() -> bool:
    """Whether align talks to a deployment named by ``$ARGILLA_API_URL`` (as :func:`connect` decides)."""
    return bool(os.environ.get(URL_ENV, "").strip() or os.environ.get(KEY_ENV, "").strip())


def add_user(name: str, role: str = "annotator", workspace: str = WORKSPACE) -> str:
    """Create a user in the workspace (created if missing) and return its random password."""
    if role not in ROLES:
        raise AlignError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not _USERNAME.fullmatch(name or ""):
        raise AlignError(f"user name {name!r}: use lowercase letters, digits, '-' and '_' "
                         "(starting with a letter or digit)")
    connection = connect()
    password = secrets.token_urlsafe(12)
    created = _request(connection, "POST", "/api/v1/users",
                       {"username": name, "first_name": name, "role": role, "password": password})
    if created.status_code == 409:
        raise AlignError(f"user {name!r} already exists on {connection.api_url}")
    _expect(connection, created, 201, f"creating user {name!r}")
    member_of = workspace_id(connection, workspace)
    added = _request(connection, "POST", f"/api/v1/workspaces/{member_of}/users", {"user_id": created.json()["id"]})
    _expect(connection, added, 201, f"adding user {name!r} to workspace {workspace!r}")
    return password


def workspace_id(connection: Connection, name: str) -> str:
    """The workspace's id; the workspace is created if missing."""
    listed = _request(connection, "GET", "/api/v1/me/workspaces")
    _expect(connection, listed, 200, "listing workspaces")
    for workspace in listed.json().get("items", []):
        if workspace.get("name") == name:
            return workspace["id"]
    created = _request(connection, "POST", "/api/v1/workspaces", {"name": name})
    _expect(connection, created, 201, f"creating workspace {name!r}")
    return created.json()["id"]


def login_url(username: str, password: str, url: str | None = None) -> str:
    """A link that signs ``username`` in to the web UI (``/sign-in?auth=<base64 user:password>``)."""
    base = (url or os.environ.get(URL_ENV) or server_url() or _url(DEFAULT_PORT)).rstrip("/")
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return f"{base}/sign-in?auth={token}"


# --- What the CLI prints ------------------------------------------------------------------------------

def serve_command(port: int | None = None) -> ServerInfo:
    """`align label serve`: start (or find) the server and say how to log in."""
    info = serve(port)
    if info.already_running:
        _show(f"[bold green]Argilla is already running[/bold green] at [bold]{info.url}[/bold] (pid {info.pid})")
    else:
        _show(f"[bold green]Argilla is running[/bold green] at [bold]{info.url}[/bold] (pid {info.pid}; it keeps "
              f"running in the background; log {_esc(info.log_file)})")
    if info.new_owner_password and sys.stdout.isatty():  # a terminal, not a log file or CI output
        _show(f"  log in as [bold]{info.username}[/bold] with password [bold]{_esc(info.new_owner_password)}[/bold] "
              f"(shown once; it and the API key are kept in {_esc(info.credentials_file)}, readable only by you)")
    else:
        _show(f"  log in as [bold]{info.username}[/bold]; the password and API key are in "
              f"{_esc(info.credentials_file)}")
    _show("  add annotators: [bold]align label users add NAME[/bold]    stop: [bold]align label serve stop[/bold]")
    return info


def stop_command() -> None:
    """`align label serve stop`."""
    _show("Argilla server stopped." if stop() else "The Argilla server was not running.")


def status_command() -> ServerStatus:
    """`align label serve status`."""
    current = status()
    if current.healthy and current.info is not None:
        _show(f"[bold green]running[/bold green] at [bold]{current.info.url}[/bold] (pid {current.info.pid}; "
              f"home {_esc(current.home)})")
        _show(f"  owner login and API key: {_esc(current.info.credentials_file)}")
    else:
        _show(f"[bold]{_esc(current.detail)}[/bold] (home {_esc(current.home)})")
    return current


def add_user_command(name: str, role: str = "annotator") -> str:
    """`align label users add NAME [--role annotator|admin]`: the password is printed once."""
    password = add_user(name, role)
    url = connect(check=False).api_url
    _show(f"user [bold]{_esc(name)}[/bold] ({role}) added to workspace '{WORKSPACE}' on {_esc(url)}")
    _show(f"  password: [bold]{_esc(password)}[/bold] (shown once)")
    _show(f"  sign-in link: {_esc(login_url(name, password, url))}")
    return password


def _show(markup: str) -> None:
    from align.reporting import console

    console.print(markup, soft_wrap=True)  # soft_wrap: never break a URL or path across lines


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape(str(value))


# --- Internals: credentials and settings ------------------------------------------------------

def _ensure_credentials(home: Path) -> dict[str, str]:
    creds = _read_credentials()
    if creds is not None:
        return creds
    creds = {
        "username": OWNER,
        "password": secrets.token_urlsafe(15),
        "api_key": "align-" + secrets.token_urlsafe(32),
        "workspace": WORKSPACE,
    }
    write_private(credentials_file(), json.dumps(creds, indent=2))
    return creds


def _read_credentials() -> dict[str, str] | None:
    try:
        creds = json.loads(credentials_file().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AlignError(f"cannot read {credentials_file()}: {e}; delete it and run `align label serve` "
                         "to reset the owner's password and key") from None
    if not isinstance(creds, dict) or not all(isinstance(creds.get(k), str) for k in ("username", "password",
                                                                                        "api_key")):
        raise AlignError(f"{credentials_file()} is damaged; delete it and run `align label serve` to reset "
                         "the owner's password and key")
    return creds


def _auth_secret(home: Path) -> str:
    path = home / "auth_secret"
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        secret = ""
    if len(secret) < 32:
        secret = secrets.token_hex(32)
        write_private(path, secret)
    return secret


def _server_env(home: Path, redis_port: int, redis_password: str) -> dict[str, str]:
    env = clean_env()
    env.update({
        "ARGILLA_HOME_PATH": str(home),
        "ARGILLA_DATABASE_URL": f"sqlite+aiosqlite:///{home / 'argilla.db'}?check_same_thread=False",
        "ARGILLA_DATABASE_SQLITE_TIMEOUT": "30",
        "ARGILLA_SEARCH_ENGINE": ENGINE_NAME,
        "ARGILLA_REDIS_URL": f"redis://:{redis_password}@{HOST}:{redis_port}/0",
        "ARGILLA_AUTH_SECRET_KEY": _auth_secret(home),
        # Keep the oauth config lookup inside the home, whatever the working directory.
        "ARGILLA_AUTH_OAUTH_CFG": str(home / "oauth.yaml"),
        # "false", not "0": the server warns that ARGILLA_ENABLE_TELEMETRY=0 is deprecated.
        "ARGILLA_ENABLE_TELEMETRY": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TMPDIR": str(home / "tmp"),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _ensure_database(python: Path, home: Path, env: dict[str, str], creds: dict[str, str]) -> bool:
    """Migrate the database and make the owner match credentials.json; False if nothing had changed."""
    marker = home / "setup.json"
    fingerprint = hashlib.sha256(json.dumps(
        [SERVER_VERSION, creds["username"], creds["password"], creds["api_key"], creds.get("workspace", WORKSPACE),
         str(home / "argilla.db")]).encode()).hexdigest()
    if (home / "argilla.db").exists() and marker.exists():
        try:
            if json.loads(marker.read_text()).get("fingerprint") == fingerprint:
                return False
        except (OSError, ValueError):
            pass
    request = json.dumps({"username": creds["username"], "password": creds["password"],
                          "api_key": creds["api_key"], "workspace": creds.get("workspace", WORKSPACE)})
    log = home / "setup.log"
    with log.open("a") as out:
        result = subprocess.run([str(python), str(_LAUNCHER), "setup"], input=request, text=True, stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=home, timeout=300, check=False)
    if result.returncode != 0:
        raise AlignError(f"preparing the Argilla database failed (exit {result.returncode}): "
                         f"{last_line(log)!r}; see {log}")
    write_private(marker, json.dumps({"fingerprint": fingerprint}))
    return True


# --- Internals: processes ------------------------------------------------------------------------------

# What each process named in server.json runs: its name or command line must show it to count as ours.
_RUNS = {"worker_pid": "argilla_launcher.py", "pid": "argilla_launcher.py", "redis_pid": "redis-server"}
# psutil's start times add the boot time, which the kernel gives in whole seconds and moves with clock changes.
_START_TIME_SLACK_S = 2.0
_CHILDREN: dict[int, subprocess.Popen] = {}


def find_redis_server() -> str:
    """The redis-server binary; AlignError saying how to install it if there is none."""
    found = shutil.which("redis-server")
    for candidate in (found, "/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AlignError("the Argilla server needs redis-server, which is not installed: "
                     "apt-get install redis-server (or brew install redis)")


def _start_redis(redis_server: str, home: Path, state: dict[str, Any]) -> tuple[int, str]:
    password = secrets.token_hex(24)
    data_dir = home / "redis"
    make_private_dir(data_dir)
    last_error = ""
    for _ in range(3):  # a free port can be taken between our probe and redis' bind
        port = _free_port()
        conf = home / "redis.conf"
        write_private(conf, "\n".join([
            f"bind {HOST}", f"port {port}", "protected-mode yes", f"requirepass {password}",
            'save ""', "appendonly no", f"dir {data_dir}", "daemonize no", 'logfile ""', "",
        ]))
        _spawn(state, "redis_pid", [redis_server, str(conf)], home, clean_env(), home / "redis.log")
        state["redis_port"] = port
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if _redis_ping(port, password):
                return port, password
            if not _running(state, "redis_pid"):
                break
            time.sleep(0.1)
        last_error = last_line(home / "redis.log")
        _terminate(state, "redis_pid")
    raise AlignError(f"redis-server did not start: {last_error!r}; see {home / 'redis.log'}")


def _redis_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as conn:
            conn.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            reply = b""
            while b"PONG" not in reply and len(reply) < 200:
                chunk = conn.recv(100)
                if not chunk:
                    break
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


def _spawn(state: dict[str, Any], key: str, command: list[str], home: Path, env: dict[str, str], log: Path) -> None:
    """Start ``command`` in its own session, output to ``log``; ``state`` records it under ``key`` (pid, start time)."""
    with log.open("a") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=home, start_new_session=True)
    _CHILDREN[process.pid] = process
    state[key] = process.pid
    state.setdefault("start_times", {})[key] = psutil.Process(process.pid).create_time()


def _wait_healthy(state: dict[str, Any], home: Path) -> None:
    url = _url(state["port"])
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _running(state, "pid"):
            raise AlignError(f"the Argilla server exited during startup: {_log_tail(home / 'server.log')}")
        if not _running(state, "worker_pid"):
            raise AlignError(f"the Argilla job worker exited during startup: {_log_tail(home / 'worker.log')}")
        if _healthy(state):
            return
        time.sleep(0.25)
    raise AlignError(f"the Argilla server did not answer at {url} within {_START_TIMEOUT_S:.0f} s: "
                     f"{_log_tail(home / 'server.log')}")


def _healthy(state: dict[str, Any], check_pid: bool = True) -> bool:
    """Our server process is alive and its status endpoint names our search engine."""
    if check_pid and not _running(state, "pid"):
        return False
    try:
        with http_client(_url(state["port"]), timeout=3) as client:
            answer = client.get("/api/v1/status").json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(answer, dict) and (answer.get("search_engine") or {}).get("name") == ENGINE_NAME


def _stop_processes(state: dict[str, Any]) -> None:
    for key in _RUNS:
        _terminate(state, key)


def _terminate(state: dict[str, Any], key: str) -> None:
    """Stop the process ``state[key]`` names, with its children, if it is still ours: SIGTERM, then SIGKILL."""
    if not _running(state, key):
        return
    pid = state[key]
    for sig, wait in ((signal.SIGTERM, _STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)  # its own session: the process group holds it and its children
        except ProcessLookupError:
            return
        except PermissionError:
            return  # not ours to stop
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _running(state, key):
                return
            time.sleep(0.1)


def _running(state: dict[str, Any], key: str) -> bool:
    """Whether the process ``state[key]`` names (from server.json or just started) still runs and is ours; a
    server.json written before start times were recorded names none, and the name or command line decides alone."""
    return is_our_process(state.get(key), _RUNS[key], (state.get("start_times") or {}).get(key))


def is_our_process(pid: Any, runs: str, started: float | None = None) -> bool:
    """Whether ``pid`` is a live process of ours that runs ``runs``; an exited child of ours is reaped.

    A child this process started is known by its Popen. Any other pid (from server.json) must show ``runs`` in its
    name or command line and, when its start time ``started`` is known, have started then (psutil): a pid the system
    recycled for another program, or for another align home's server, is never taken for ours.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        del _CHILDREN[pid]
        return False
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if started is not None and abs(process.create_time() - started) > _START_TIME_SLACK_S:
            return False
        # The name too: redis-server blanks its command line for a moment while it sets its title.
        return runs in process.name() or any(runs in part for part in process.cmdline())
    except psutil.Error:  # gone, or not ours to look at
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: SO_REUSEADDR, so sockets in TIME_WAIT from a quick restart do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# --- Internals: state, files, requests --------------------------------------------------------------------

def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("port"), int) else None


def _info_from_state(state: dict[str, Any], already_running: bool) -> ServerInfo:
    home = argilla_home()
    creds = _read_credentials() or {}
    return ServerInfo(
        url=_url(state["port"]), port=state["port"], pid=state.get("pid", 0),
        worker_pid=state.get("worker_pid", 0), redis_pid=state.get("redis_pid", 0),
        redis_port=state.get("redis_port", 0), home=home, credentials_file=credentials_file(),
        log_file=home / "server.log", username=creds.get("username", OWNER), already_running=already_running,
    )


def _url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _say(message: str) -> None:
    from align.reporting import console

    console.print(message, markup=False)


def make_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable only by its owner (0600)."""
    write_atomically(path, text, private=True)


def _rotate(log: Path) -> None:
    try:
        if log.stat().st_size > _LOG_ROTATE_BYTES:
            os.replace(log, log.with_name(log.name + ".1"))
    except FileNotFoundError:
        pass


def _log_tail(path: Path, count: int = 8) -> str:
    lines = tail_lines(path, count)
    return f"last lines of {path}: " + " | ".join(lines) if lines else f"{path} is empty"


def _request(connection: Connection, method: str, path: str, body: Any = None) -> httpx.Response:
    """One request with the connection's API key; ServerDown when the server does not answer."""
    try:
        with http_client(connection.api_url, connection.api_key) as client:
            return client.request(method, path, json=body)
    except httpx.TransportError as e:
        reason = str(e) or type(e).__name__
        raise ServerDown(connection.api_url, f"cannot reach the Argilla server at {connection.api_url} ({reason}); "
                         "is it running? (`align label serve status`)", f"while {method} {path} ({reason})") from None


def _check_key(connection: Connection, source: str) -> Any:
    """The user the key belongs to (GET /api/v1/me; None when the answer is not JSON)."""
    answer = _request(connection, "GET", "/api/v1/me")
    if answer.status_code in (401, 403):
        raise AlignError(f"the Argilla server at {connection.api_url} rejected the API key from {source}")
    if answer.status_code != 200:
        raise AlignError(f"the Argilla server at {connection.api_url} answered HTTP {answer.status_code} to "
                         f"GET /api/v1/me{detail(answer)}")
    try:
        return answer.json()
    except ValueError:
        return None


def _expect(connection: Connection, answer: httpx.Response, wanted: int, doing: str) -> None:
    if answer.status_code != wanted:
        raise AlignError(f"{doing} on {connection.api_url} failed: HTTP {answer.status_code}{detail(answer)}")
