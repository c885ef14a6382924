"""What every command shares: one-line errors, argument types, progress bars, the model, the
database. Each command imports what it needs when it runs, so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys

from channelscope.core.config import config


class CliError(Exception):
    """A problem with the user's input, reported as one line."""


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def int_range(text: str, option: str) -> list[int]:
    """`20-29`, `3`, `0-3,7` -> a sorted list of ints."""
    values: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            values.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise CliError(f"{option}: {text!r} is not a range like 20-29 or 0-3,7") from None
    if not values:
        raise CliError(f"{option}: {text!r} is an empty range")
    return sorted(values)


def progress_bar(total: int, label: str):
    """A tqdm bar on stderr; returns the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="ch", file=sys.stderr, leave=False, dynamic_ncols=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return advance


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def references_dir():
    """Where random-vector references are cached."""
    return config().data_dir / "references"


def solver_settings(args):
    from channelscope.method import rotate

    base = rotate.PAPER if args.solver == "paper" else rotate.Settings()
    return rotate.with_overrides(
        base,
        channels=args.channels,
        precision=args.precision,
        downweight_generic=args.downweight_generic or None,
    )


def load(spec: str):
    from channelscope.method.weights import ModelError, load_model

    try:
        return load_model(spec)
    except ModelError as error:
        raise CliError(str(error)) from None


def check_stored_model(engine, model) -> None:
    """A different file stored under this model's name ends the command here, before its long
    work (the random-vector reference, the corpus), not in the middle of it."""
    from channelscope.core import db
    from channelscope.worker import store

    with db.session(engine) as session:
        try:
            store.check_model(session, model)
        except store.ModelConflict as error:
            raise CliError(str(error)) from None


def model_spec(spec: str) -> str:
    """What a worker on another machine is told to load: the name, or an absolute path."""
    from pathlib import Path

    return spec if spec == "smollm2" or not Path(spec).exists() else str(Path(spec).resolve())


def database(*, migrate: bool = False):
    """The configured database, reachable and at the code's schema revision. Only `decompose`
    and `db upgrade` migrate; worker, status and export only check, so a worker of older code
    never migrates a shared database under the others."""
    from alembic.util import CommandError
    from sqlalchemy import make_url, text
    from sqlalchemy.exc import SQLAlchemyError

    from channelscope.core import db

    url = config().database
    try:
        shown = make_url(db.normalise_url(url)).render_as_string(hide_password=True)
    except SQLAlchemyError:
        raise CliError(
            "DATABASE_URL is not a database URL (postgresql://user@host/db or sqlite:///file)"
        ) from None
    try:
        engine = db.make_engine(url)
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise CliError(f"cannot connect to the database at {shown}: {reason}") from None
    if migrate:
        try:
            db.upgrade_locked(url, engine)
        except CommandError as error:
            raise CliError(
                f"cannot migrate the database: {error} (is this code older than the database?)"
            ) from None
    elif db.current_revision(engine) != db.head_revision():
        raise CliError(
            f"the database at {shown} has schema revision {db.current_revision(engine) or 'none'}, "
            f"this code needs {db.head_revision()}: run `channelscope db upgrade`"
        )
    return url, engine


def stored_run(run_hash: str):
    """The configured database's engine and the run that a hash (or a unique prefix) names."""
    from channelscope.core import db
    from channelscope.worker import plan

    _, engine = database()
    with db.session(engine) as session:
        try:
            return engine, plan.find_run(session, run_hash)
        except plan.JobError as error:
            raise CliError(str(error)) from None
