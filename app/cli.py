"""The `optiforge` command: serve, worker, migrate, and the client commands of the SDK.

`optiforge serve` on the embedded defaults (no broker configured) runs the schema upgrade, a
Celery worker process beside the API, and the API itself: one command, one machine, no Redis.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from optiforge_client.cli import add_client_commands, run_client_command

from app.admin_cli import add_admin_commands
from app.api.middleware.request_log import configure_logging
from app.core.settings import get_settings

#: Addresses a server with no API key may listen on: only this machine can reach it.
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "localhost", "::1"})


def _worker_argv(queues: str, concurrency: int | None, loglevel: str) -> list[str]:
    argv = ["worker", "--queues", queues, "--loglevel", loglevel, "--without-mingle", "--without-gossip"]
    # One node name per process (Celery's default, celery@<host>, is the same for every worker on a
    # machine): two workers on one host are two live workers in /v1/capabilities, not one.
    argv += ["--hostname", f"worker{os.getpid()}@%h"]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    return argv


def cmd_migrate(_args: argparse.Namespace) -> int:
    from app.core.migrate import upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    print(f"database at head: {_shown_url(settings.resolved_database_url)}")
    if settings.bootstrap_api_key:
        ensure_bootstrap_key(settings.bootstrap_api_key)
    return 0


def _shown_url(url: str) -> str:
    """The database URL without its password, for a log line."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def ensure_bootstrap_key(key: str) -> None:
    from app.core.db import get_sessionmaker
    from app.core.errors import ApiError
    from app.services.access import ensure_key

    with get_sessionmaker(get_settings().resolved_database_url)() as session:
        try:
            record = ensure_key(session, key)
        except ApiError as exc:
            raise SystemExit(f"OPTIFORGE_BOOTSTRAP_API_KEY refused: {exc.detail}") from exc
    print(f"bootstrap API key: {record.id} ({record.prefix}…, project '{record.project_id}')")


def check_listen_address(host: str) -> None:
    """A server with no API key answers anyone who reaches it: it listens on loopback only."""
    from app.core.db import get_sessionmaker
    from app.services.access import any_active_key

    if host in LOOPBACK_ADDRESSES or host.startswith("127."):
        return
    with get_sessionmaker(get_settings().resolved_database_url)() as session:
        if any_active_key(session):
            return
    raise SystemExit(
        f"refusing to listen on {host}: this server has no API key, so anyone who reaches it could "
        "use it. Create one first:\n"
        "    optiforge keys create --project default --scopes admin\n"
        "(or set OPTIFORGE_BOOTSTRAP_API_KEY to a random string of 32+ characters), then send it "
        "as 'Authorization: Bearer <key>'. Without a key, serve on 127.0.0.1."
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from app.core.job_queue import get_celery  # the worker's tasks load by module name: no import of workers/

    settings = get_settings()
    queues = ",".join(settings.queue(name.strip()) for name in args.queues.split(","))
    get_celery(settings).worker_main(_worker_argv(queues, args.concurrency, args.loglevel))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from app.server.config import run_server
    from app.supervisor import WorkerSupervisor

    settings = get_settings()
    cmd_migrate(args)
    check_listen_address(args.host)
    start_worker = settings.embedded_broker if args.worker is None else args.worker
    supervisor = None
    if start_worker:
        argv = [
            sys.executable,
            "-m",
            "app.cli",
            "worker",
            "--queues",
            args.queues,
            "--loglevel",
            args.loglevel,
        ]
        supervisor = WorkerSupervisor(argv, os.environ.copy())
        supervisor.start()
    # uvicorn re-raises the SIGTERM it caught once it has shut down; turn that into SystemExit so
    # the `finally` below still stops the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        started = run_server(settings, args.host, args.port, args.loglevel.lower())
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0 if started else 3  # uvicorn's exit status for a server that could not start


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optiforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API (and, on embedded defaults, a worker beside it)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a worker beside the API (default: only when no broker URL is configured)",
    )
    serve.add_argument("--queues", default="cpu", help="queues of the worker started beside the API")
    serve.add_argument("--loglevel", default="INFO")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run a Celery worker alone")
    worker.add_argument("--queues", default="cpu", help="comma-separated: cpu, gpu")
    worker.add_argument("--concurrency", type=int, default=None, help="default: OPTIFORGE_WORKER_CONCURRENCY")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    migrate.set_defaults(func=cmd_migrate)

    add_admin_commands(sub)  # keys, projects: on the database, where the server runs
    add_client_commands(sub)  # models, datasets, jobs, engines, optimize, infer: the SDK's CLI
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "client_command", None):
        return run_client_command(args)
    configure_logging(args.loglevel if "loglevel" in args else "INFO", get_settings().log_format)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
