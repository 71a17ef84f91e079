"""`optiforge keys …` and `optiforge projects …`: the server-side CLI, working on the database
(run it where the server's settings are: the same environment, OPTIFORGE_DATABASE_URL included).

The first key of a server is made here (or with OPTIFORGE_BOOTSTRAP_API_KEY); later ones can also
be made through the admin API with an admin key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from app.core.audit import audit
from app.core.db import get_sessionmaker
from app.core.errors import ApiError
from app.core.invalidation import KEYS, announce
from app.core.keys import SCOPES
from app.core.orm import DEFAULT_PROJECT
from app.core.settings import get_settings
from app.services import access


def add_admin_commands(sub: Any) -> None:
    keys = sub.add_parser("keys", help="API keys (server side, on the database)").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key; it is printed once")
    create.add_argument("--project", default=DEFAULT_PROJECT)
    create.add_argument("--name", default="cli")
    create.add_argument(
        "--scopes",
        default="admin",
        help=f"comma-separated, of {', '.join(SCOPES)} (default: admin, for a first key)",
    )
    create.add_argument("--infer-rps", type=float, default=None, help="inference requests per second")
    create.set_defaults(func=cmd_keys_create)
    listing = keys.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--project", default=None)
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id (key_…)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)

    projects = sub.add_parser("projects", help="projects (server side, on the database)").add_subparsers(
        dest="action", required=True
    )
    make = projects.add_parser("create", help="create a project")
    make.add_argument("project")
    make.set_defaults(func=cmd_projects_create)
    projects.add_parser("list", help="list projects with what each holds").set_defaults(
        func=cmd_projects_list
    )
    delete = projects.add_parser("delete", help="delete an empty project and its keys")
    delete.add_argument("project")
    delete.set_defaults(func=cmd_projects_delete)


def _session() -> Any:
    from app.core.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # the key, not the migration's chatter
    upgrade(settings.resolved_database_url)  # a key made before the first `serve` needs the tables
    return get_sessionmaker(settings.resolved_database_url)()


def _run(action: Any, *, announces: str | None = None) -> int:
    """Run `action(session)` and commit; a refused change prints its code and sentence, exit status
    1. `announces`: the change-feed topic to tell running API replicas about once committed (they
    drop their cached keys now instead of after their TTL)."""
    with _session() as session:
        try:
            action(session)
            session.commit()
        except ApiError as exc:
            print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
            return 1
    if announces is not None:
        announce(get_settings(), announces)
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
        record, key = access.create_key(
            session, args.project, name=args.name, scopes=scopes, infer_rps=args.infer_rps
        )
        audit(None, "key.create", record.id, project_id=record.project_id, scopes=record.scopes)
        print(key)
        print(
            f"created {record.id} in project '{record.project_id}' with scopes {','.join(record.scopes)}; "
            "the key above is shown once: keep it now (send it as 'Authorization: Bearer <key>')",
            file=sys.stderr,
        )

    return _run(action, announces=KEYS)


def cmd_keys_list(args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        for record in access.list_keys(session, args.project):
            state = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
            print(
                f"{record.id}  {record.prefix}…  project={record.project_id}  "
                f"scopes={','.join(record.scopes)}  name={json.dumps(record.name)}  {state}"
            )

    return _run(action)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        record = access.revoke_key(session, args.key_id)
        audit(None, "key.revoke", record.id, project_id=record.project_id)
        print(f"revoked {record.id}")

    return _run(action, announces=KEYS)


def cmd_projects_create(args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        project = access.create_project(session, args.project)
        audit(None, "project.create", project.id, project_id=project.id)
        print(f"created project '{project.id}'")

    return _run(action)


def cmd_projects_list(_args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        for usage in access.list_projects(session):
            print(
                f"{usage.project.id}  models={usage.models}  datasets={usage.datasets}  "
                f"engines={usage.engines}  active_keys={usage.active_keys}"
            )

    return _run(action)


def cmd_projects_delete(args: argparse.Namespace) -> int:
    def action(session: Any) -> None:
        access.delete_project(session, args.project)
        audit(None, "project.delete", args.project, project_id=args.project)
        print(f"deleted project '{args.project}'")

    return _run(action, announces=KEYS)
