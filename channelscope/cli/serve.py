"""Commands around the store: serve the web app, export a run, and the schema's migrations."""

from __future__ import annotations

import sys

from channelscope.cli.common import CliError, database, log, stored_run


def server_options(host: str, port: int, workers: int) -> dict:
    """uvicorn's settings for `channelscope serve` (tests run a server from these too)."""
    return dict(
        app="channelscope.web.main:served_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        # Forwarded headers are the app's to believe, from CHANNELSCOPE_TRUSTED_PROXIES only
        # (web/main.py): uvicorn's default believes them from 127.0.0.1, where a local proxy
        # and anyone on the machine look alike.
        proxy_headers=False,
    )


def cmd_serve(args) -> None:
    import uvicorn
    from sqlalchemy.exc import SQLAlchemyError

    from channelscope.core import db
    from channelscope.core.config import config

    # Like the worker, serve only checks the schema (decompose and `db upgrade` migrate it): a
    # web process of older code must never migrate a shared database under the others.
    try:
        current, head = db.current_revision(db.engine()), db.head_revision()
        if current != head:
            log(f"warning: the database is at migration {current}, not {head}: channelscope db upgrade")
    except SQLAlchemyError as error:
        log(f"warning: the database is unreachable for now ({str(error).splitlines()[0]})")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    url = config().public_url.rstrip("/") + "/" if config().public_url else f"http://{shown}:{args.port}/"
    print(f"Channelscope is serving at {url}", flush=True)
    uvicorn.run(**server_options(args.host, args.port, args.workers))


def cmd_export(args) -> None:
    from channelscope.web import export

    engine, run = stored_run(args.run_hash)
    output = args.output or ("-" if args.format == "jsonl" else f"{run.hash}.parquet")
    if output == "-" and args.format == "parquet":
        raise CliError("parquet cannot go to stdout: give -o FILE")
    try:
        count = export.write(engine, run, args.format, output)
    except BrokenPipeError:  # `export RUN | head`: the reader has all it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    log(f"wrote {count} neuron sides of run {run.hash} to {output}")


def cmd_db(args) -> None:
    from channelscope.core import db

    _, engine = database(migrate=args.action == "upgrade")
    print(f"schema revision {db.current_revision(engine)} (head {db.head_revision()})")


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="the web app: browse neurons, search channels by token")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--workers", type=int, default=1, help="web processes (default 1)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("export", help="write a whole run in the JSON API's layout, streaming")
    p.add_argument("run_hash", metavar="RUN", help="the run's hash (or a unique prefix)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("-o", "--output", help="file to write (jsonl default: stdout; parquet: RUN.parquet)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("db", help="the database schema (Alembic migrations)")
    p.add_argument("action", choices=["upgrade", "current"])
    p.set_defaults(run=cmd_db)
