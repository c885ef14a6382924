"""The shard queue: procrastinate's schema through migration 0002, and queueing a run twice."""

from sqlalchemy import inspect, text

from channelscope import cli
from channelscope.core import db
from channelscope.core.config import config

PROCRASTINATE_OBJECTS = """
SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE 'procrastinate%')
     + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'procrastinate%')
     + (SELECT count(*) FROM pg_type WHERE typname LIKE '%procrastinate%')
"""


def test_migration_0002_creates_the_queue_on_postgresql_and_removes_all_of_it(empty_postgres_url):
    db.upgrade(empty_postgres_url, "0002")
    engine = db.make_engine(empty_postgres_url)
    assert {"procrastinate_jobs", "procrastinate_workers", "procrastinate_events"} <= set(
        inspect(engine).get_table_names()
    )
    with engine.connect() as connection:
        assert connection.execute(
            text("SELECT to_regprocedure('procrastinate_fetch_job_v2(varchar[], bigint)')")
        )
    db.downgrade(empty_postgres_url, "0001")
    with engine.connect() as connection:
        assert connection.execute(text(PROCRASTINATE_OBJECTS)).scalar() == 0
        assert connection.execute(text("SELECT count(*) FROM models")).scalar() == 0  # 0001 kept
    db.upgrade(empty_postgres_url)  # and back up again from there
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()


def test_sqlite_has_no_queue(tmp_path):
    url = f"sqlite:///{tmp_path / 'q.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    assert not [t for t in inspect(engine).get_table_names() if t.startswith("procrastinate")]
    engine.dispose()


def test_queueing_a_run_twice_adds_no_second_job(postgres_url, tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    monkeypatch.setenv("CHANNELSCOPE_DATA_DIR", str(tmp_path))
    config.cache_clear()
    args = ["decompose", str(tiny_folder), "--layers", "0-1", "--sides", "in", "--neurons", "0-9",
            "--shard-size", "4", "--channels", "2", "--reference-count", "4", "--enqueue-only"]  # fmt: skip
    try:
        assert cli.main(args) == 0
        assert "queued 6 shards" in capsys.readouterr().out
        assert cli.main(args) == 0
        assert "queued 0 shards" in capsys.readouterr().out
        assert cli.main(["status"]) == 0
        status = capsys.readouterr().out
    finally:
        config.cache_clear()
    engine = db.make_engine(postgres_url)
    with engine.connect() as connection:
        jobs = connection.execute(
            text("SELECT (args->>'shard')::int, priority, status::text FROM procrastinate_jobs ORDER BY id")
        ).all()
        shards = connection.execute(text("SELECT id, priority FROM shards ORDER BY id")).all()
    engine.dispose()
    assert [(shard, -priority, status) for shard, priority, status in jobs] == [
        (shard, priority, "todo") for shard, priority in shards
    ]
    assert "0/6" in status and "live workers: 0" in status
