"""Model registry: every finished stage run as a versioned artifact with its lineage.

Rows live in SQLite at ``<ALIGN_HOME or ./.align>/registry.db``. Several training processes may
finish at once, so the database runs in WAL mode with a busy timeout, and writes are short
``BEGIN IMMEDIATE`` transactions: the per-stage version number is read and inserted under the
write lock, so two writers never get the same version.

An output moves into place and gets its row as one step (``add(..., staged=...)``): the move is first
written down in a ``publishing`` table, then done, then the row is inserted and the note removed in one
transaction. A process killed anywhere in between leaves a note that the next registry access settles:
the folder is in place, so the row is added; or it is not, so the note is dropped. A finished output
without its row, or a row without its output, is never left behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from align import __version__
from align.errors import AlignError

SCHEMA_VERSION = 2  # 2: the publishing table
KINDS = ("model", "dataset", "evaluation")
REDACTED = "<redacted>"

_BUSY_TIMEOUT_S = 30.0
_STAGE = r"[A-Za-z][A-Za-z0-9_.-]*"
_STAGE_REF = re.compile(rf"({_STAGE}):(latest|\d+)")
_ID_REF = re.compile(r"#?(\d+)")
_COLUMNS = (
    "stage", "version", "name", "kind", "path", "base_model", "parents", "config",
    "data_fingerprint", "metrics", "align_version", "git_commit", "created_at",
)
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS artifacts (
        id INTEGER PRIMARY KEY,
        stage TEXT NOT NULL,
        version INTEGER NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        base_model TEXT,
        parents TEXT NOT NULL DEFAULT '[]',
        config TEXT NOT NULL DEFAULT '{}',
        data_fingerprint TEXT,
        metrics TEXT NOT NULL DEFAULT '{}',
        align_version TEXT NOT NULL,
        git_commit TEXT,
        created_at TEXT NOT NULL,
        UNIQUE (stage, version)
    )""",
    "CREATE INDEX IF NOT EXISTS artifacts_name ON artifacts (name)",
    # Moves into place that started but whose row is not written yet (see the module docstring).
    """CREATE TABLE IF NOT EXISTS publishing (
        path TEXT PRIMARY KEY,
        staged TEXT NOT NULL,
        pid INTEGER NOT NULL,
        row TEXT NOT NULL
    )""",
)

# Substrings that make any key a secret (``openai_api_key``, ``db_password``, ``client_secret``).
_SECRET_SUBSTRINGS = (
    "api_key", "apikey", "secret", "password", "passwd", "credential", "private_key",
)
# ``<role>_token`` keys that name tokenizer special tokens, not credentials.
_TOKENIZER_ROLES = frozenset({
    "pad", "eos", "bos", "unk", "sep", "cls", "mask", "start", "end", "eot", "stop", "special",
    "image", "audio", "video", "system", "user", "assistant", "prompt", "response",
})
# Credentials recognisable by their value alone, wherever they appear in a string.
_SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|sk-[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r")"
)
# Metrics shown first in the list view; the rest follow in the order the stage recorded them.
_KEY_METRICS = (
    "eval_loss", "eval_accuracy", "accuracy", "win_rate", "reward_mean", "eval_reward", "reward_last", "kl",
    "kl_last", "loss",
)


def registry_home() -> Path:
    """The registry directory: ``$ALIGN_HOME`` if set, else ``./.align``."""
    home = os.environ.get("ALIGN_HOME")
    return Path(home).expanduser() if home else Path.cwd() / ".align"


@dataclass(frozen=True)
class Artifact:
    """One registry row: a stage run's output and where it came from."""

    id: int
    stage: str
    version: int
    name: str
    kind: str
    path: str
    base_model: str | None
    parents: list[int]
    config: dict[str, Any]
    data_fingerprint: str | None
    metrics: dict[str, Any]
    align_version: str
    git_commit: str | None
    created_at: str

    @property
    def ref(self) -> str:
        """The short reference users type, e.g. ``sft:3``."""
        return f"{self.stage}:{self.version}"

    @property
    def algorithm(self) -> str | None:
        """The method that made the row, where its stage has several (`align ppo --algorithm grpo`: ``grpo``), as
        the stage recorded it in its metrics; None where the stage's name says it."""
        value = self.metrics.get("algorithm")
        return value if isinstance(value, str) and value != self.stage else None

    @classmethod
    def _from_row(cls, row: sqlite3.Row) -> Artifact:
        fields = dict(row)
        for key in ("parents", "config", "metrics"):
            fields[key] = json.loads(fields[key])
        return cls(**fields)


class Registry:
    """The SQLite-backed artifact registry; opening a connection per call keeps it process-safe."""

    def __init__(self, home: str | Path | None = None):
        self.home = (Path(home).expanduser() if home is not None else registry_home()).absolute()
        self.db_path = self.home / "registry.db"
        self._schema_ready = False

    def add(
        self,
        *,
        stage: str,
        name: str,
        path: str | Path,
        kind: str = "model",
        base_model: str | None = None,
        parents: Iterable[int] = (),
        config: dict[str, Any] | None = None,
        data_fingerprint: str | None = None,
        metrics: dict[str, Any] | None = None,
        staged: str | Path | None = None,
    ) -> Artifact:
        """Record a finished run as the next version of ``stage`` (``config`` secrets redacted).

        With ``staged``, the output is still there (a folder or file) and is moved to ``path`` as part of
        recording it: both happen, or neither (an output already at ``path`` is replaced only then).
        """
        if not re.fullmatch(_STAGE, stage):
            raise ValueError(f"stage {stage!r} must be a word (letters, digits, '_', '.', '-')")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
        parent_ids = [int(p) for p in parents]
        values = {
            "stage": stage,
            "name": str(name),
            "kind": kind,
            "path": str(Path(path).expanduser().resolve()),
            "base_model": None if base_model is None else str(base_model),
            "parents": json.dumps(parent_ids),
            "config": _dumps(redact_secrets(config or {})),
            "data_fingerprint": data_fingerprint,
            "metrics": _dumps(metrics or {}),
            "align_version": __version__,
            # Outside the transaction: a slow git must not hold the write lock.
            "git_commit": _git_commit(),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if staged is None:
            with self._transaction() as conn:
                artifact_id = _insert(conn, values, parent_ids, self.db_path)
            return self.get(artifact_id)
        final, staged = Path(values["path"]), Path(staged).absolute()
        with self._transaction() as conn:
            _check_parents(conn, parent_ids, self.db_path)  # before anything moves
            conn.execute("INSERT OR REPLACE INTO publishing (path, staged, pid, row) VALUES (?, ?, ?, ?)",
                         (str(final), str(staged), os.getpid(), json.dumps({**values, "parents": parent_ids})))
        try:
            replaced = _move_into_place(staged, final)
        except BaseException:
            with self._transaction() as conn:
                conn.execute("DELETE FROM publishing WHERE path = ?", (str(final),))
            raise
        try:
            with self._transaction() as conn:
                artifact_id = _finish_publishing(conn, str(final), self.db_path)
        except BaseException:
            # The row could not be written: put the output back where it was, so neither exists.
            os.replace(final, staged)
            if replaced is not None:
                os.replace(replaced, final)
            raise
        if replaced is not None:
            _remove(replaced)
        return self.get(artifact_id)

    def check_writable(self) -> None:
        """Fail now, with one line, if a finished run could not be recorded (call before any work). Creates nothing:
        a run that fails its later checks leaves no trace."""
        if self.db_path.exists():
            with self._transaction() as conn:  # a real write: SQLite checks permissions and space only then
                conn.execute("INSERT INTO publishing (path, staged, pid, row) VALUES ('', '', 0, '{}')")
                conn.execute("DELETE FROM publishing WHERE path = ''")
            return
        if problem := folder_write_problem(self.home):
            raise AlignError(f"registry: cannot create the registry in {self.home} ({problem}); set ALIGN_HOME to a "
                             f"writable folder")

    def get(self, artifact_id: int) -> Artifact:
        """The artifact with this id; AlignError if there is none."""
        rows = self._query("SELECT * FROM artifacts WHERE id = ?", (int(artifact_id),))
        if not rows:
            raise AlignError(self._not_found(f"#{artifact_id}", self._id_detail))
        return Artifact._from_row(rows[0])

    def resolve(self, ref: str | int) -> Artifact:
        """Look up ``STAGE:latest``, ``STAGE:N``, ``N``/``#N`` (id) or a name (newest with it)."""
        text = str(ref).strip()
        if match := _ID_REF.fullmatch(text):
            return self.get(int(match.group(1)))
        if match := _STAGE_REF.fullmatch(text):
            stage, version = match.groups()
            if version == "latest":
                rows = self._query(
                    "SELECT * FROM artifacts WHERE stage = ? ORDER BY version DESC LIMIT 1",
                    (stage,),
                )
            else:
                rows = self._query(
                    "SELECT * FROM artifacts WHERE stage = ? AND version = ?", (stage, int(version))
                )
            if not rows:
                raise AlignError(self._not_found(text, lambda: self._stage_detail(stage)))
            return Artifact._from_row(rows[0])
        artifact = self.by_name(text)
        if artifact is None:
            raise AlignError(
                self._not_found(text, lambda: f"no artifact has that name; {self._existing()}")
            )
        return artifact

    def list(self, stage: str | None = None) -> list[Artifact]:
        """All artifacts (or one stage's), newest first."""
        if stage is None:
            rows = self._query("SELECT * FROM artifacts ORDER BY id DESC")
        else:
            rows = self._query("SELECT * FROM artifacts WHERE stage = ? ORDER BY id DESC", (stage,))
        return [Artifact._from_row(r) for r in rows]

    def children(self, artifact_id: int) -> list[Artifact]:
        """Artifacts that list this one among their parents, oldest first."""
        rows = self._query(
            "SELECT * FROM artifacts AS a WHERE EXISTS "
            "(SELECT 1 FROM json_each(a.parents) WHERE value = ?) ORDER BY a.id",
            (int(artifact_id),),
        )
        return [Artifact._from_row(r) for r in rows]

    def lineage(self, ref: str | int) -> list[tuple[int, Artifact]]:
        """``(depth, artifact)`` pairs walking parents depth-first; the artifact itself is depth 0.

        An ancestor shared by two parents appears under each, as in a family tree. Parents must
        exist before their children (checked in ``add``), so the walk cannot cycle.
        """
        walked: list[tuple[int, Artifact]] = []

        def walk(artifact: Artifact, depth: int) -> None:
            walked.append((depth, artifact))
            for parent_id in artifact.parents:
                walk(self.get(parent_id), depth + 1)

        walk(self.resolve(ref), 0)
        return walked

    def update_metrics(self, artifact_id: int, metrics: dict[str, Any]) -> Artifact:
        """Merge ``metrics`` into the artifact's metrics (later stages attach eval results)."""
        with self._transaction() as conn:
            artifact_id = int(artifact_id)
            row = conn.execute(
                "SELECT metrics FROM artifacts WHERE id = ?", (artifact_id,)
            ).fetchone()
            if row is None:
                raise AlignError(self._not_found(f"#{artifact_id}", self._id_detail))
            merged = _dumps({**json.loads(row[0]), **metrics})
            conn.execute("UPDATE artifacts SET metrics = ? WHERE id = ?", (merged, artifact_id))
        return self.get(artifact_id)

    def by_name(self, name: str) -> Artifact | None:
        """The newest artifact named `name`, or None."""
        rows = self._query(
            "SELECT * FROM artifacts WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
        )
        return Artifact._from_row(rows[0]) if rows else None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AlignError(f"registry: cannot create the registry folder {self.home} ({e.strerror or e}); set "
                             f"ALIGN_HOME to a writable folder") from None
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; timeout is SQLite's busy_timeout.
        conn = sqlite3.connect(self.db_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            if not self._schema_ready:
                self._ensure_schema(conn)
                self._settle_publishing(conn)
            yield conn
        except sqlite3.IntegrityError:
            raise
        except sqlite3.DatabaseError as e:
            raise AlignError(_database_problem(self.db_path, e)) from None
        finally:
            conn.close()

    def _settle_publishing(self, conn: sqlite3.Connection) -> None:
        """Finish or forget the moves into place that a killed process left half done."""
        for path, staged, pid in conn.execute("SELECT path, staged, pid FROM publishing").fetchall():
            if _alive(pid):
                continue  # still publishing it
            conn.execute("BEGIN IMMEDIATE")
            try:
                if Path(path).exists() and not Path(staged).exists():
                    _finish_publishing(conn, path, self.db_path)
                else:
                    conn.execute("DELETE FROM publishing WHERE path = ?", (path,))
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found < SCHEMA_VERSION:
            # Persistent per file: readers keep reading while another process writes.
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        elif found > SCHEMA_VERSION:
            raise AlignError(
                f"registry: {self.db_path} has schema version {found}, newer than this align "
                f"({__version__}, schema {SCHEMA_VERSION}) understands; upgrade align"
            )
        self._schema_ready = True

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            # IMMEDIATE takes the write lock up front, so read-then-insert (versions) cannot race.
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        # Reading must not create .align/ in whatever directory the user happens to be in.
        if not self.db_path.exists():
            return []
        with self._connect() as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    def _not_found(self, ref: str, detail: Callable[[], str]) -> str:
        # detail is only asked for when there are rows to describe.
        if not self._query("SELECT 1 FROM artifacts LIMIT 1"):
            return (
                f"registry: no artifact '{ref}'; the registry at {self.db_path} is empty "
                "(run a stage first)"
            )
        return f"registry: no artifact '{ref}' ({detail()}; see 'align registry list')"

    def _id_detail(self) -> str:
        low, high = self._query("SELECT MIN(id), MAX(id) FROM artifacts")[0]
        return f"ids run {_span(low, high)}"

    def _stage_detail(self, stage: str) -> str:
        low, high = self._query(
            "SELECT MIN(version), MAX(version) FROM artifacts WHERE stage = ?", (stage,)
        )[0]
        if low is None:
            return f"no {stage} runs yet; {self._existing()}"
        return f"{stage} has version{'' if low == high else 's'} {_span(low, high)}"

    def _existing(self) -> str:
        rows = self._query(
            "SELECT stage, MIN(version), MAX(version) FROM artifacts "
            "GROUP BY stage ORDER BY MIN(id)"
        )
        return "existing: " + ", ".join(f"{stage}:{_span(low, high)}" for stage, low, high in rows)


def _check_parents(conn: sqlite3.Connection, parent_ids: list[int], db_path: Path) -> None:
    marks = ",".join("?" * len(parent_ids))
    rows = conn.execute(f"SELECT id FROM artifacts WHERE id IN ({marks})", parent_ids)
    if missing := sorted(set(parent_ids) - {r[0] for r in rows}):
        raise ValueError(f"parent ids {missing} are not in the registry at {db_path}")


def _insert(conn: sqlite3.Connection, values: dict[str, Any], parent_ids: list[int], db_path: Path) -> int:
    """Insert one artifact row as the next version of its stage (inside a write transaction); its id."""
    _check_parents(conn, parent_ids, db_path)
    values = {**values, "parents": json.dumps(parent_ids)}
    values["version"] = conn.execute(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM artifacts WHERE stage = ?", (values["stage"],)
    ).fetchone()[0]
    columns, marks = ", ".join(_COLUMNS), ", ".join("?" * len(_COLUMNS))
    return conn.execute(f"INSERT INTO artifacts ({columns}) VALUES ({marks})", [values[c] for c in _COLUMNS]).lastrowid


def _finish_publishing(conn: sqlite3.Connection, path: str, db_path: Path) -> int:
    """The row of a moved output, from its publishing note (inside a write transaction); its id.

    Another process may have settled the same note first: then its row is the one.
    """
    note = conn.execute("SELECT row FROM publishing WHERE path = ?", (path,)).fetchone()
    if note is None:
        return conn.execute("SELECT MAX(id) FROM artifacts WHERE path = ?", (path,)).fetchone()[0]
    conn.execute("DELETE FROM publishing WHERE path = ?", (path,))
    values = json.loads(note[0])
    return _insert(conn, values, values["parents"], db_path)


def folder_write_problem(folder: Path) -> str | None:
    """Why no file could be created in `folder` (or, when it does not exist yet, in its nearest existing parent);
    None when one can. Tried with a probe file, the only test that also holds for root and read-only mounts."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    probe = folder / f".align-write-check-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return f"{folder}: {e.strerror or e}"
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _move_into_place(staged: Path, final: Path) -> Path | None:
    """Rename ``staged`` to ``final``; an existing ``final`` is set aside and returned (the caller removes it)."""
    if not final.exists():
        os.replace(staged, final)
        return None
    replaced = final.with_name(final.name + ".replaced")
    _remove(replaced)
    os.replace(final, replaced)
    try:
        os.replace(staged, final)
    except BaseException:
        os.replace(replaced, final)
        raise
    return replaced


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _database_problem(db_path: Path, error: sqlite3.DatabaseError) -> str:
    """One line for what SQLite said about the registry file, with what to do."""
    text = str(error)
    if "not a database" in text or "malformed" in text:
        return (f"registry: {db_path} is damaged or not an SQLite database ({text}); move it aside (mv {db_path} "
                f"{db_path}.damaged) to start an empty registry, or restore it from a backup")
    if "readonly" in text or "unable to open" in text or "access permission" in text:
        return f"registry: cannot write {db_path} ({text}); make it writable or set ALIGN_HOME to a writable folder"
    if "disk is full" in text:
        return f"registry: the disk holding {db_path} is full; free some space and run the command again"
    if "locked" in text:
        return (f"registry: {db_path} stayed locked by another process for {_BUSY_TIMEOUT_S:.0f} s; wait for it "
                f"to finish and run the command again")
    return f"registry: {db_path}: {text}"


def looks_like_ref(text: str) -> bool:
    """True for ``word:latest``, ``word:123`` and ``#123``: strings meant for the registry."""
    text = text.strip()
    return bool(_STAGE_REF.fullmatch(text) or re.fullmatch(r"#\d+", text))


def resolve_path(ref_or_path: str, registry: Registry | None = None) -> tuple[str, Artifact | None]:
    """Turn a CLI model/data argument into a path.

    An existing path wins and comes back unchanged; a registry ref or artifact name gives that
    artifact's path; anything else (say a hub id) comes back unchanged for the caller to handle.
    """
    text = str(ref_or_path)
    if Path(text).expanduser().exists():
        return text, None
    registry = registry if registry is not None else Registry()
    artifact = registry.resolve(text) if looks_like_ref(text) else registry.by_name(text)
    if artifact is None:
        return text, None
    if not Path(artifact.path).exists():
        raise AlignError(
            f"registry: '{text}' is {artifact.ref} ({artifact.name}), but its path {artifact.path} "
            "no longer exists; re-run that stage or pass a path"
        )
    return artifact.path, artifact


def redact_secrets(obj: Any) -> Any:
    """A deep copy of ``obj`` with credentials replaced by ``"<redacted>"``.

    A value is redacted when its key names a secret (``hf_token``, ``token``, ``openai_api_key``,
    ``db_password``, ``client_secret``, ``auth``, camelCase too) but not tokenizer settings such
    as ``pad_token`` or ``max_new_tokens``. None and booleans stay (``use_auth_token: true`` holds
    nothing secret). Credential-shaped substrings (``hf_...``, ``sk-...``, ``ghp_...``) are
    redacted in any string, whatever its key.
    """
    if isinstance(obj, dict):
        return {
            key: REDACTED if _is_secret_key(key) and not (value is None or isinstance(value, bool))
            else redact_secrets(value)
            for key, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        items = [redact_secrets(item) for item in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        return _SECRET_VALUE.sub(REDACTED, obj)
    return obj


def _is_secret_key(key: Any) -> bool:
    # camelCase -> snake_case so ``hfToken`` and ``apiKey`` match like ``hf_token`` and ``api_key``.
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key)).lower()
    if any(word in name for word in _SECRET_SUBSTRINGS):
        return True
    words = [w for w in re.split(r"[^a-z0-9]+", name) if w]
    if "auth" in words or "authorization" in words:
        return True
    # Only a trailing singular "token" is a credential: "max_tokens", "tokenizer" are not.
    if not words or words[-1] != "token":
        return False
    return len(words) == 1 or words[-2] not in _TOKENIZER_ROLES


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _json_default(obj: Any) -> Any:
    # numpy/torch scalars carry .item(); anything else (Path, enum) is stored as its text.
    item = getattr(obj, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def _git_commit() -> str | None:
    """The commit of the align source that produced the artifact (when run from a checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:  # not a git checkout, or one without commits yet
        return None
    return result.stdout.strip() or None


def _span(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def _short(text: str | None, width: int = 32) -> str:
    if not text:
        return "-"
    parts = Path(text).parts
    if os.path.isabs(text) and len(parts) > 3:
        text = "…/" + "/".join(parts[-2:])
    elif len(text) > width and "/" in text:
        text = text.rsplit("/", 1)[-1]  # a hub id's model name says more than its org
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _key_metrics(metrics: dict[str, Any], limit: int = 3) -> str:
    numeric = [
        k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    ordered = [k for k in _KEY_METRICS if k in numeric]
    ordered += [k for k in numeric if k not in _KEY_METRICS]
    return " ".join(f"{k}={_format_value(metrics[k])}" for k in ordered[:limit])


def _local_time(created_at: str) -> str:
    return datetime.fromisoformat(created_at).astimezone().strftime("%Y-%m-%d %H:%M")


def _parent_refs(artifact: Artifact, registry: Registry, known: dict[int, str]) -> str:
    return ", ".join(known.get(p) or registry.get(p).ref for p in artifact.parents) or "-"


def print_list(
    console: Console, artifacts: list[Artifact], registry: Registry | None = None
) -> None:
    """Render artifacts as a table (``align registry list``).

    ``registry`` (default: the one at ``registry_home()``) names the database in the empty-list
    message and turns parent ids outside ``artifacts`` into refs.
    """
    registry = registry if registry is not None else Registry()
    if not artifacts:
        console.print(Text(f"No artifacts yet in {registry.db_path}."))
        return
    known = {a.id: a.ref for a in artifacts}
    table = Table(box=None, header_style="bold")
    for column in ("ref", "id", "name", "kind", "base model", "parents", "key metrics", "created"):
        table.add_column(column, no_wrap=column in ("ref", "id", "created"))
    for a in artifacts:
        table.add_row(
            Text.assemble((a.ref, "bold cyan"), f" ({a.algorithm})" if a.algorithm else ""),
            str(a.id),
            Text(a.name),
            a.kind,
            Text(_short(a.base_model)),
            Text(_parent_refs(a, registry, known)),
            Text(_key_metrics(a.metrics)),
            _local_time(a.created_at),
        )
    console.print(table)


def print_show(console: Console, artifact: Artifact, registry: Registry) -> None:
    """Render every field of one artifact, plus the artifacts derived from it."""
    derived = registry.children(artifact.id)
    children = ", ".join(f"{c.ref} ({c.name})" for c in derived if c.kind != "evaluation") or "-"
    evaluations = "\n".join(_evaluation_line(e, artifact) for e in derived if e.kind == "evaluation") or "-"
    parents = ", ".join(f"{p.ref} ({p.name})" for p in map(registry.get, artifact.parents)) or "-"
    missing = "" if Path(artifact.path).exists() else "  (missing)"
    rows = (
        ("ref", artifact.ref),
        ("id", str(artifact.id)),
        ("name", artifact.name),
        ("stage", artifact.stage + (f" ({artifact.algorithm})" if artifact.algorithm else "")),
        ("version", str(artifact.version)),
        ("kind", artifact.kind),
        ("path", artifact.path + missing),
        ("base model", artifact.base_model or "-"),
        ("parents", parents),
        ("children", children),
        ("evaluations", evaluations),
        ("data fingerprint", artifact.data_fingerprint or "-"),
        ("created", f"{_local_time(artifact.created_at)} (UTC {artifact.created_at})"),
        ("align version", artifact.align_version),
        ("git commit", artifact.git_commit or "-"),
        ("metrics", json.dumps(artifact.metrics, indent=2) if artifact.metrics else "-"),
        ("config", json.dumps(artifact.config, indent=2) if artifact.config else "-"),
    )
    table = Table(show_header=False, box=None)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in rows:
        # Text, not markup: names, paths and configs may contain "[...]".
        table.add_row(key, Text(value))
    console.print(table)


def _evaluation_line(evaluation: Artifact, model: Artifact) -> str:
    """`eval:2 (demo-eval): win_rate=0.62 mmlu/tax=0.01`: the numbers an evaluation recorded for this model.

    An `align eval reward` row measures one reward model and records its metrics flat: `eval:3 (reward-reward1):
    accuracy=0.81 [0.74, 0.87] longer_wins_accuracy=0.55 ece=0.06 margin=1.2 pairs=120`; listed under a dataset it
    evaluated on, the line starts with the reward model's reference."""
    if evaluation.config.get("evaluation") == "reward":
        m = evaluation.metrics
        numbers = " ".join(
            f"{k}={_format_value(m[k])}" + (f" [{m[k + '_low']:.3g}, {m[k + '_high']:.3g}]"
                                             if k == "accuracy" and k + "_low" in m and k + "_high" in m else "")
            for k in _REWARD_EVAL_METRICS if isinstance(m.get(k), (int, float)))
        evaluated = evaluation.config.get("model")
        about = f"{evaluated} " if evaluated and evaluated != model.ref else ""
        return f"{evaluation.ref} ({evaluation.name}): {about}{numbers or '-'}"
    prefix = f"{model.ref}/"
    own = {k[len(prefix):]: v for k, v in evaluation.metrics.items() if k.startswith(prefix)}
    numbers = " ".join(f"{k}={_format_value(v)}" for k, v in own.items()) or "(baseline or judge)"
    return f"{evaluation.ref} ({evaluation.name}): {numbers}"


_REWARD_EVAL_METRICS = ("accuracy", "longer_wins_accuracy", "ece", "margin", "pairs")


def print_lineage(console: Console, registry: Registry, ref: str | int) -> None:
    """Render ``ref`` and its ancestors as a tree (artifact -> parents -> their parents)."""
    branches: list[Tree] = []
    for depth, artifact in registry.lineage(ref):
        label = Text.assemble(
            (artifact.ref, "bold cyan"), "  ", artifact.name, "  ", (artifact.path, "dim"),
            ("  (missing)", "red") if not Path(artifact.path).exists() else "",
        )
        # Pre-order walk: the node at depth d hangs off the latest node at depth d - 1.
        del branches[depth:]
        branches.append(branches[-1].add(label) if branches else Tree(label))
    console.print(branches[0])
