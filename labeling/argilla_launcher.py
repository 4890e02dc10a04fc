"""Entry point run by the Argilla server's own Python (``<venv>/bin/python argilla_launcher.py ...``).

Not imported by align itself: ``labeling/server.py`` starts it as a separate process, with every
``ARGILLA_*`` setting already in the environment (argilla_server reads its settings at import time).
It may import only argilla_server, its dependencies and the standard library.

    argilla_launcher.py setup            migrate the database; create or reset the owner user from a
                                         JSON object on stdin (secrets never travel on a command line)
    argilla_launcher.py server --port N  the API and web UI on 127.0.0.1:N (uvicorn)
    argilla_launcher.py worker           the background-job worker (rq), e.g. record status updates
                                         after a dataset's task distribution changes

Each command imports ``argilla_search`` (beside this file) first, so the ``align-sql`` search engine
is registered before the app asks for it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys


def _import_engine() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import argilla_search  # noqa: F401  (registers the "align-sql" engine)


def setup() -> None:
    request = json.load(sys.stdin)
    _import_engine()
    from argilla_server.cli.database.migrate import migrate_db

    migrate_db(revision="head")
    created = asyncio.run(
        _ensure_owner(request["username"], request["password"], request["api_key"], request["workspace"])
    )
    print(json.dumps({"owner_created": created}))


async def _ensure_owner(username: str, password: str, api_key: str, workspace_name: str) -> bool:
    """The owner exists with exactly this password and API key, and belongs to the workspace."""
    from sqlalchemy import select

    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal
    from argilla_server.models import User, UserRole, Workspace, WorkspaceUser

    async with AsyncSessionLocal() as db:
        workspace = (await db.execute(select(Workspace).filter_by(name=workspace_name))).scalar_one_or_none()
        if workspace is None:
            workspace = await Workspace.create(db, name=workspace_name)
        password_hash = accounts.hash_password(password)
        user = await accounts.get_user_by_username(db, username)
        if user is None:
            user = await User.create(
                db, first_name=username, username=username, role=UserRole.owner,
                password_hash=password_hash, api_key=api_key,
            )
            created = True
        else:
            await user.update(db, role=UserRole.owner, password_hash=password_hash, api_key=api_key)
            created = False
        member = (
            await db.execute(select(WorkspaceUser).filter_by(workspace_id=workspace.id, user_id=user.id))
        ).scalar_one_or_none()
        if member is None:
            await WorkspaceUser.create(db, workspace_id=workspace.id, user_id=user.id)
    return created


def server(port: int) -> None:
    _import_engine()
    import uvicorn

    from argilla_server import app

    # No access log: the UI's /sign-in?auth=<base64 user:password> links would land in it.
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="info")


def worker() -> None:
    _import_engine()
    from rq import Worker

    from argilla_server.jobs.queues import DEFAULT_QUEUE, HIGH_QUEUE, REDIS_CONNECTION

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    Worker([HIGH_QUEUE, DEFAULT_QUEUE], connection=REDIS_CONNECTION).work(with_scheduler=False)


def main() -> None:
    parser = argparse.ArgumentParser(prog="argilla_launcher")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup")
    serve = commands.add_parser("server")
    serve.add_argument("--port", type=int, required=True)
    commands.add_parser("worker")
    args = parser.parse_args()
    if args.command == "setup":
        setup()
    elif args.command == "server":
        server(args.port)
    else:
        worker()


if __name__ == "__main__":
    main()
