"""The skeleton of a labeling task in Argilla, shared by `align label` (labeling/rankings.py, K-way rankings) and
`align eval human` (labeling/pairwise.py, blind A/B comparisons).

A task module says what its records look like and what a response means; this module does what every task does
around that, in the order a task runs:

- push: check the arguments, find the dataset (an unfinished one is replaced) or create it from the task's layout
  (fields, questions, metadata properties) with the task's metadata block, check an existing one was made by the
  same command with the same layout, and update its guidelines and annotators per record;
- status: the dataset's progress and a table of annotators;
- pull: the submitted responses of each record (drafts and discards counted), the error when there are none, and
  the rows written atomically together with their registry row;
- simulate: simulated annotators enrolled with their own API keys, each working through the UI's pending queue.

Everything goes through Argilla's REST API (labeling/argilla_api.py).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from align.errors import AlignError
from align.files import stage_jsonl
from align.labeling import argilla_api, server
from align.labeling.argilla_api import SIM_PREFIX, Api, annotation_url

METADATA_KEY = "align"  # the dataset's metadata block that push writes (format, models, settings)
PENDING_VIEW = {  # the web UI's default "Pending" queue: records this user has not answered yet
    "filters": {"and": [
        {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
        {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
    ]}
}
COMMENT_QUESTION = {"name": "comment", "title": "Comment (optional)", "required": False,
                    "settings": {"type": "text", "use_markdown": False}}
COUNT_COLUMNS = {"submitted": "submitted", "pending": "pending", "draft": "drafts", "discarded": "discarded"}

Registered = TypeVar("Registered")


def record_id(prefix: str, dataset: str, prompt: str) -> str:
    """A record's external id: ``prefix`` and a hash of the dataset name and the prompt text (pushing again never
    duplicates a record)."""
    return prefix + hashlib.sha256(f"{dataset}\x00{prompt}".encode()).hexdigest()[:24]


def annotator_id(user_id: str) -> str:
    """What pulled rows name an annotator by: a short sha256 of their Argilla user id."""
    return hashlib.sha256(str(user_id).encode()).hexdigest()[:12]


# --- Dataset ---------------------------------------------------------------------------------------------------

def hidden_terms(titles: dict[str, str]) -> list[dict]:
    """Metadata properties of type ``terms`` (``{name: title}``) that annotators do not see."""
    return [{"name": name, "title": title, "visible_for_annotators": False, "settings": {"type": "terms"}}
            for name, title in titles.items()]


def option_values(settings: dict) -> tuple:
    """A question's option values, as a layout comparison sees them."""
    return tuple(str(o.get("value")) for o in settings.get("options") or [])


def read_layout(api: Api, dataset_id: str) -> dict[str, list[dict]]:
    """An existing dataset's fields, questions and metadata properties, keyed as :func:`create_dataset` takes them."""
    return {
        "fields": api.call("GET", f"/api/v1/datasets/{dataset_id}/fields", "reading the dataset's fields")["items"],
        "questions": api.call("GET", f"/api/v1/datasets/{dataset_id}/questions",
                              "reading the dataset's questions")["items"],
        "metadata": api.call("GET", f"/api/v1/me/datasets/{dataset_id}/metadata-properties",
                             "reading the dataset's metadata properties")["items"],
    }


def check_annotators(annotators: int | None) -> None:
    if annotators is not None and annotators < 1:
        raise AlignError(f"--annotators-per-record {annotators}: at least 1")


def check_dataset_name(dataset: str) -> None:
    if not dataset.strip() or len(dataset) > 200:
        raise AlignError(f"--dataset {dataset!r}: a name of 1-200 characters")


def read_guidelines(path: str | None, default: str) -> str:
    """The annotation guidelines (markdown): the file at ``path``, or the task's ``default``."""
    if path is None:
        return default
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise AlignError(f"--guidelines: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise AlignError(f"--guidelines: {path} is not UTF-8 text") from None
    if not text.strip() or len(text) > 10_000:
        raise AlignError(f"--guidelines: {path} must hold 1-10,000 characters of markdown (it has {len(text):,})")
    return text


def dataset_for_push(api: Api, name: str, workspace: str,
                     check: Callable[[dict], list[str]]) -> tuple[dict | None, dict[str, dict], list[str]]:
    """The published dataset ``name`` that a push adds to (None when there is none yet), its records by external id,
    and notes on what was done: a draft (an earlier push died while creating it, before any record) is deleted, to
    be created again; ``check`` checks an existing dataset against this push and returns what it updated."""
    found = argilla_api.find_dataset(api, name, workspace)
    notes: list[str] = []
    if found is not None and found["status"] != "ready":
        api.call("DELETE", f"/api/v1/datasets/{found['id']}", f"removing the unfinished dataset '{name}'")
        found = None
        notes.append("an unfinished dataset of that name (an interrupted push) was replaced")
    if found is None:
        return None, {}, notes
    notes += check(found)
    return found, {r.get("external_id"): r for r in argilla_api.records(api, found["id"], responses=False)}, notes


def create_dataset(api: Api, name: str, workspace: str, layout: dict[str, list[dict]], annotators: int,
                   guidelines: str, info: dict) -> dict:
    """Create, lay out and publish a dataset; ``info`` is its metadata block (``METADATA_KEY``)."""
    workspace_id = argilla_api.workspace_id(api, workspace)  # created if missing
    dataset = api.call("POST", "/api/v1/datasets", f"creating dataset '{name}'", expect=(201,), json_body={
        "name": name, "guidelines": guidelines, "allow_extra_metadata": False, "workspace_id": workspace_id,
        "distribution": {"strategy": "overlap", "min_submitted": annotators}, "metadata": {METADATA_KEY: info}})
    for kind, path in (("fields", "fields"), ("questions", "questions"), ("metadata", "metadata-properties")):
        for item in layout[kind]:
            api.call("POST", f"/api/v1/datasets/{dataset['id']}/{path}", f"adding '{item['name']}' to dataset '{name}'",
                     json_body=item, expect=(201,))
    # Until published the dataset is a draft: a push that dies before this line starts over next time.
    return api.call("PUT", f"/api/v1/datasets/{dataset['id']}/publish", f"publishing dataset '{name}'")


def check_existing(api: Api, dataset: dict, name: str, fmt: str, command: str,
                   differences: Callable[[dict], list[str]]) -> None:
    """An existing dataset must have been made by ``command`` (its metadata block has ``"format": fmt``) and show no
    ``differences`` (given that block) from what this push wants."""
    info = (dataset.get("metadata") or {}).get(METADATA_KEY)
    where = f"dataset '{name}' on {api.url}"
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise AlignError(f"{where} exists but was not made by `{command}`; push to a new --dataset name")
    diffs = differences(info)
    if diffs:
        raise AlignError(f"{where} already exists with different settings: {'; '.join(diffs)}. Push to a new "
                         "--dataset name (or repeat the original command to continue that dataset)")


def update_settings(api: Api, dataset: dict, name: str, annotators: int | None, guidelines: str,
                    guidelines_given: bool, answers: str) -> list[str]:
    """Update the annotators per record (when given) and the guidelines (when given) where they differ; returns
    what was updated. ``answers`` names what annotators give (``rankings``, ``judgments``)."""
    update: dict[str, Any] = {}
    notes = []
    before = (dataset.get("distribution") or {}).get("min_submitted")
    if annotators is not None and before != annotators:
        update["distribution"] = {"strategy": "overlap", "min_submitted": annotators}
        notes.append(f"{answers} wanted per record changed from {before} to {annotators}")
    if guidelines_given and dataset.get("guidelines") != guidelines:
        update["guidelines"] = guidelines
        notes.append("guidelines updated")
    if update:
        api.call("PATCH", f"/api/v1/datasets/{dataset['id']}", f"updating dataset '{name}'", json_body=update)
        dataset.update(update)
    return notes


# --- Status ----------------------------------------------------------------------------------------------------

def progress(api: Api, dataset: dict) -> dict[str, Any]:
    """The dataset's ``total``, ``completed`` and ``pending`` records, ``min_submitted`` answers wanted per record
    and the ``url`` where annotators work."""
    counts = api.call("GET", f"/api/v1/datasets/{dataset['id']}/progress", "reading progress")
    return {"total": counts["total"], "completed": counts["completed"], "pending": counts["pending"],
            "min_submitted": (dataset.get("distribution") or {}).get("min_submitted"),
            "url": annotation_url(api.url, dataset["id"])}


def print_annotators(users: dict[str, dict[str, int]], counts: tuple[str, ...], empty: str) -> None:
    """A table of annotators (simulated ones marked) with their ``counts`` (keys of ``COUNT_COLUMNS``), or
    ``empty`` when there is none."""
    from rich.table import Table

    from align.reporting import console

    if not users:
        show(empty)
        return
    table = Table(title="annotators", title_justify="left")
    table.add_column("annotator", justify="left")
    for key in counts:
        table.add_column(COUNT_COLUMNS[key], justify="right")
    for name, tally in sorted(users.items()):
        table.add_row(esc(name) + (" (simulated)" if name.startswith(SIM_PREFIX) else ""),
                      *(str(tally[key]) for key in counts))
    console.print(table)


# --- Pull ------------------------------------------------------------------------------------------------------

def check_pull(aggregate: str, aggregates: tuple[str, ...], register: bool) -> None:
    """Before the server is asked: ``--aggregate`` is known, and the registry takes a row when one is wanted."""
    from align.registry import Registry

    if aggregate not in aggregates:
        raise AlignError(f"--aggregate {aggregate}: choose one of {', '.join(aggregates)}")
    if register:
        Registry().check_writable()


def submitted_responses(record: dict, counts: Counter) -> Iterator[tuple[dict, dict]]:
    """The record's submitted responses with their values; any other (draft, discarded) is counted by status."""
    for response in record.get("responses") or []:
        if response.get("status") != "submitted":
            counts[response.get("status") or "unknown"] += 1
            continue
        yield response, response.get("values") or {}


def nothing_submitted(answers: str, dataset: str, records: list[dict], counts: Counter, where: str) -> AlignError:
    """The error of a pull before any usable answer: how many records wait, how many drafts; ``where`` says where
    annotators answer (``annotators rank at URL``)."""
    pending = sum(r.get("status") == "pending" for r in records)
    drafts = f"; drafts, not counted until submitted: {counts['draft']}" if counts["draft"] else ""
    return AlignError(f"no submitted {answers} in dataset {dataset} yet ({pending} records pending{drafts}); {where}")


def write_registered(target: Path, rows: list[dict], register: Callable[[Path], Registered]) -> Registered:
    """Stage ``rows`` beside ``target`` and ``register(staging)``: the registry moves the file into place, so the
    file appears together with its registry row, or neither does."""
    staging = stage_jsonl(target, rows)
    try:
        return register(staging)
    finally:
        staging.unlink(missing_ok=True)


def show_written(result: Any, rows: str) -> None:
    """A pull's closing lines: its notes, then where its ``rows`` (``pairs``, ``judgments``) went."""
    for note in result.notes:
        show(f"note: {esc(note)}")
    where = f" and registered as {result.artifact.ref}" if result.artifact is not None else ""
    show(f"{len(result.rows)} {rows} written to {esc(result.out)}{where}")


# --- Simulate ----------------------------------------------------------------------------------------------------

def check_simulate_args(annotators: int, noise: float) -> None:
    if not 1 <= annotators <= 100:
        raise AlignError(f"--annotators {annotators}: between 1 and 100")
    if not 0 <= noise <= 1:
        raise AlignError(f"--noise {noise}: a probability between 0 and 1")


def enroll_simulated(api: Api, dataset: dict, annotators: int, workspace: str) -> dict[str, dict]:
    """``sim-annotator-1..N`` as annotators of the dataset's workspace (created, their passwords remembered, when
    new): ``{name: user}`` with their API keys, in order."""
    names = [f"{SIM_PREFIX}{i}" for i in range(1, annotators + 1)]
    users = argilla_api.owner_users(api)
    for name in names:
        if name not in users:
            password = server.add_user(name, "annotator", workspace)
            argilla_api.remember_password(api.url, name, password)
        else:
            api.call("POST", f"/api/v1/workspaces/{dataset['workspace_id']}/users",
                     f"adding {name} to workspace '{workspace}'", json_body={"user_id": users[name]["id"]},
                     expect=(201, 409))
    users = argilla_api.owner_users(api)
    return {name: users[name] for name in names}


def annotator_apis(api: Api, users: dict[str, dict]) -> Iterator[tuple[str, Api]]:
    """Each simulated annotator's name and the REST API with their own key, one at a time."""
    for name, user in users.items():
        key = user.get("api_key")
        if not key:
            raise AlignError(f"the API key of {name} is not visible with this key: simulate needs an owner's key")
        yield name, Api(api.url, key)


def pending_queue(api: Api, dataset_id: str, name: str) -> Iterator[list[dict]]:
    """Pages of the records in the annotator's pending queue, as the web UI reads it, each record once; the API
    (the annotator's own) is closed when the queue is empty."""
    seen: set[str] = set()
    while True:
        page = api.call("POST", f"/api/v1/me/datasets/{dataset_id}/records/search", f"{name} reading their queue",
                        json_body=PENDING_VIEW, params={"limit": 100})
        records = [item["record"] for item in page["items"] if item["record"]["id"] not in seen]
        if not records:
            api.close()
            return
        seen.update(record["id"] for record in records)
        yield records


def submit(api: Api, record: dict, doing: str, values: dict) -> None:
    """Submit a response as the UI's Submit button does (an answer already there, 409, is left as it is)."""
    api.call("POST", f"/api/v1/records/{record['id']}/responses", doing,
             json_body={"status": "submitted", "values": values}, expect=(201, 409))


# --- Output ------------------------------------------------------------------------------------------------------

def show(markup: str) -> None:
    from align.reporting import console

    console.print(markup, soft_wrap=True)


def esc(value: Any) -> str:
    from rich.markup import escape

    return escape(str(value))
