"""Runs and shards: planning, resuming, the done mark, crash safety, and the CLI around them.

Subprocesses get their database and data folder through DATABASE_URL and CHANNELSCOPE_DATA_DIR,
and one torch thread each: two of them share this machine's two cores with pytest."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import func, select

from channelscope import cli
from channelscope.core import db
from channelscope.core import tables as T
from channelscope.method import rotate
from channelscope.method.decomposer import TOP_K, Decomposer
from channelscope.method.weights import load_model
from channelscope.worker import compute, plan
from tests.fixtures.cli import ROOT, spawn, wait_for

SMALL = ["--channels", "3", "--reference-count", "8"]


def shard_rows(engine):
    with db.session(engine) as session:
        return session.execute(
            select(
                T.Shard.id,
                T.Shard.layer,
                T.Shard.side,
                T.Shard.neuron_start,
                T.Shard.neuron_stop,
                T.Shard.done_at,
                T.Shard.worker,
                T.Shard.attempts,
                T.Shard.priority,
            ).order_by(T.Shard.id)
        ).all()


def assert_rows_match_done_shards(engine, channels: int) -> set:
    """Every stored neuron belongs to a done shard, every done shard has all of its neurons,
    and every neuron all of its channels and token rows. Returns {(run id, layer, side, neuron)}."""
    with db.session(engine) as session:
        neurons = session.execute(
            select(T.Neuron.run_id, T.Neuron.layer, T.Neuron.side, T.Neuron.neuron, T.Neuron.shard_id)
        ).all()
        done = {s.id: s for s in session.scalars(select(T.Shard).where(T.Shard.done_at.is_not(None)))}
        n_channels = session.scalar(select(func.count()).select_from(T.Channel))
        n_tokens = session.scalar(select(func.count()).select_from(T.ChannelToken))
    keys = {tuple(row[:4]) for row in neurons}
    assert len(keys) == len(neurons), "a neuron was stored twice"
    expected = {(s.run_id, s.layer, s.side, n) for s in done.values() for n in T.shard_neurons(s)}
    assert keys == expected
    assert all(row.shard_id in done for row in neurons), "a neuron of an unfinished shard"
    assert n_channels == len(neurons) * channels
    assert n_tokens == len(neurons) * channels * TOP_K
    return keys


# --- planning -------------------------------------------------------------------------------------


def test_blocks_are_aligned_so_extending_cuts_the_same_shards():
    assert plan.blocks(list(range(0, 100)), set(), 64) == [(0, 64), (64, 100)]
    # Extending 0-99 to 0-199 fills the rest of the block first, then whole blocks.
    assert plan.blocks(list(range(0, 200)), set(range(100)), 64) == [(100, 128), (128, 192), (192, 200)]
    # Gaps in the request are never bridged, and scattered neurons planned before are left out.
    assert plan.blocks([0, 1, 2, 3, 7], set(), 64) == [(0, 4), (7, 8)]
    assert plan.blocks([5, 6], set(range(10)), 4) == []
    assert plan.blocks(list(range(8)), {2, 5}, 4) == [(0, 2), (3, 4), (4, 5), (6, 8)]


def test_first_neurons_are_planned_with_the_rest_and_computed_first(database_url, tiny_folder, run_cli):
    args = ["decompose", tiny_folder, "--layers", "1", "--sides", "gate,out", "--neurons", "0-9"]
    assert run_cli(database_url, *args, "--shard-size", "4", "--first-neurons", "2", *SMALL) == 0
    engine = db.make_engine(database_url)
    shards = shard_rows(engine)
    # Every shard planned at once; the heads of both sides first, then the rest in aligned blocks.
    assert [(s.side, s.neuron_start, s.neuron_stop, s.priority) for s in shards] == [
        ("out", 0, 2, -10), ("out", 2, 4, 0), ("out", 4, 8, 0), ("out", 8, 10, 0),
        ("gate", 0, 2, -8), ("gate", 2, 4, 2), ("gate", 4, 8, 2), ("gate", 8, 10, 2),
    ]  # fmt: skip
    done = sorted(shards, key=lambda s: s.done_at)
    assert {(s.side, s.neuron_start) for s in done[:2]} == {("out", 0), ("gate", 0)}
    # The same command again plans nothing new.
    assert run_cli(database_url, *args, "--shard-size", "4", "--first-neurons", "2", *SMALL) == 0
    assert len(shard_rows(engine)) == len(shards)
    engine.dispose()


def test_check_request_names_the_bad_value(tiny_folder):
    model = load_model(tiny_folder)
    with pytest.raises(plan.JobError, match="layer 2 is out of range: tiny-llama has layers 0-1"):
        plan.check_request(model, plan.Request([0, 2], ["out"], [0]))
    with pytest.raises(plan.JobError, match="neuron 128 is out of range"):
        plan.check_request(model, plan.Request([0], ["out"], [127, 128]))
    with pytest.raises(plan.JobError, match="unknown side 'up'"):
        plan.check_request(model, plan.Request([0], ["up"], [0]))


# --- a run through `decompose`, read back ---------------------------------------------------------


def test_decompose_stores_what_the_engine_computes_and_resumes_without_recomputing(
    database_url, tiny_folder, tmp_path, run_cli
):
    args = ["decompose", tiny_folder, "--layers", "1", "--sides", "gate,out", "--neurons", "0-9"]
    assert run_cli(database_url, *args, "--shard-size", "4", *SMALL) == 0
    engine = db.make_engine(database_url)
    shards = shard_rows(engine)
    # `out` first, then the read side; blocks of 4 aligned at multiples of 4.
    assert [(s.side, s.neuron_start, s.neuron_stop) for s in shards] == [
        ("out", 0, 4), ("out", 4, 8), ("out", 8, 10), ("gate", 0, 4), ("gate", 4, 8), ("gate", 8, 10),
    ]  # fmt: skip
    assert all(s.done_at is not None and s.attempts == 1 for s in shards)

    model = load_model(tiny_folder)
    settings = rotate.with_overrides(rotate.Settings(), channels=3)
    decomposer = Decomposer(model, settings, reference_count=8, cache_dir=tmp_path / "ref")
    with db.session(engine) as session:
        (run,) = session.scalars(select(T.Run)).all()
        # Shard by shard, as the run computed them: a GEMM's rounding depends on its batch.
        for shard in shards:
            ids = list(range(shard.neuron_start, shard.neuron_stop))
            for record in decomposer.neurons(1, shard.side, ids):
                side = shard.side
                row = session.scalar(
                    select(T.Neuron).where(T.Neuron.side == side, T.Neuron.neuron == record.neuron)
                )
                assert row.run_id == run.id
                assert np.array_equal(T.neuron_vector(row.vector), record.vector)
                assert row.kurtosis == pytest.approx(record.kurtosis, rel=1e-9)
                assert [t for t, _ in row.top_tokens] == record.top_ids.tolist()
                stored = session.scalars(
                    select(T.Channel).where(T.Channel.neuron_id == row.id).order_by(T.Channel.channel)
                ).all()
                for channel, computed in zip(stored, record.channels, strict=True):
                    assert np.allclose(T.channel_vector(channel.vector), computed.vector, atol=1e-3)
                    assert channel.kurtosis == pytest.approx(computed.kurtosis, rel=1e-9)
                    assert channel.faithfulness_percentile == pytest.approx(computed.faithfulness_percentile)
                    assert np.array_equal(T.masked_tokens(channel.masked), computed.masked)

    # The same command again: the same run, nothing added, nothing recomputed.
    assert run_cli(database_url, *args, "--shard-size", "4", *SMALL) == 0
    assert shard_rows(engine) == shards
    # Wider neurons extend the same run: only the new block is added and computed.
    assert run_cli(database_url, "decompose", tiny_folder, "--layers", "1", "--sides", "out",
                   "--neurons", "0-13", "--shard-size", "4", *SMALL) == 0  # fmt: skip
    extended = shard_rows(engine)
    assert extended[: len(shards)] == shards
    assert [(s.side, s.neuron_start, s.neuron_stop) for s in extended[len(shards) :]] == [
        ("out", 10, 12),
        ("out", 12, 14),
    ]
    # Another seed is another run.
    assert run_cli(database_url, *args, "--seed", "1", *SMALL) == 0
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.Run)) == 2
    assert_rows_match_done_shards(engine, 3)
    engine.dispose()


def test_a_late_commit_of_a_done_shard_is_rejected_by_the_database(database_url, tiny_folder, run_cli):
    assert run_cli(database_url, "decompose", tiny_folder, "--layers", "0", "--sides", "in",
                   "--neurons", "0-3", *SMALL) == 0  # fmt: skip
    engine = db.make_engine(database_url)
    (shard,) = shard_rows(engine)
    model = load_model(tiny_folder)
    decomposer = Decomposer(model, rotate.with_overrides(rotate.Settings(), channels=3), reference_count=8)
    records = decomposer.neurons(0, "in", [0, 1, 2, 3])
    # A second worker that computed the same shard: its done mark touches no row, so it rolls back.
    assert compute.commit_shard(engine, shard.id, records, seconds=1.0, worker="late") is False
    # Even with the done mark cleared, the unique constraint refuses the second copy of the neurons.
    with db.session(engine) as session, session.begin():
        session.execute(T.Shard.__table__.update().values(done_at=None))
    assert compute.commit_shard(engine, shard.id, records, seconds=1.0, worker="late") is False
    assert shard_rows(engine)[0].done_at is None and shard_rows(engine)[0].worker != "late"
    with db.session(engine) as session:
        assert session.scalar(select(func.count()).select_from(T.Neuron)) == 4
    engine.dispose()


# --- crash safety ---------------------------------------------------------------------------------


def test_decompose_killed_mid_run_resumes_to_exactly_the_expected_rows(database_url, tiny_folder, tmp_path):
    args = ["decompose", tiny_folder, "--layers", "0-1", "--sides", "out", "--neurons", "0-23",
            "--shard-size", "4", "--heartbeat-seconds", "0.5", "--stalled-seconds", "2", *SMALL]  # fmt: skip
    data = tmp_path / "data"
    engine = db.make_engine(database_url)
    log = tmp_path / "first.log"
    first = spawn(database_url, data, log, *args)

    def some_done():
        rows = shard_rows(engine)
        return rows and 2 <= sum(s.done_at is not None for s in rows) < len(rows)

    wait_for(some_done, 120, "two shards done", first, log)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = {s.id: s.done_at for s in shard_rows(engine) if s.done_at is not None}
    assert 2 <= len(before) < 12
    assert_rows_match_done_shards(engine, 3)  # nothing partial left behind

    log = tmp_path / "second.log"
    second = spawn(database_url, data, log, *args)
    assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
    after = shard_rows(engine)
    assert len(after) == 12 and all(s.done_at is not None for s in after)
    assert {s.id: s.done_at for s in after if s.id in before} == before  # committed shards kept
    keys = assert_rows_match_done_shards(engine, 3)
    assert {key[1:] for key in keys} == {(layer, "out", n) for layer in (0, 1) for n in range(24)}
    engine.dispose()


def test_two_workers_share_a_run_and_survive_one_being_killed(postgres_url, tiny_folder, tmp_path, run_cli):
    assert run_cli(postgres_url, "decompose", tiny_folder, "--layers", "0-1", "--sides", "out,in",
                   "--neurons", "0-23", "--shard-size", "8", "--channels", "4", "--reference-count", "8",
                   "--enqueue-only") == 0  # fmt: skip
    engine = db.make_engine(postgres_url)
    total = len(shard_rows(engine))
    assert total == 12
    # Each worker has a data folder of its own: it takes the run's reference from the database.
    options = ["--heartbeat-seconds", "0.5", "--stalled-seconds", "2"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = spawn(postgres_url, tmp_path / "a", logs[0], "worker", *options)
    b = spawn(postgres_url, tmp_path / "b", logs[1], "worker", *options)
    host = socket.gethostname()
    try:

        def a_in_flight():
            return [s for s in shard_rows(engine) if s.worker == f"{host}:{a.pid}" and s.done_at is None]

        (victim,) = wait_for(a_in_flight, 120, "worker A to start a shard", a, logs[0])
        a.send_signal(signal.SIGKILL)
        a.wait()
        wait_for(
            lambda: all(s.done_at is not None for s in shard_rows(engine)),
            120,
            "worker B to finish the run",
            b,
            logs[1],
        )
    finally:
        for process in (a, b):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    rows = {s.id: s for s in shard_rows(engine)}
    assert rows[victim.id].worker == f"{host}:{b.pid}" and rows[victim.id].attempts == 2
    assert {s.worker for s in rows.values()} <= {f"{host}:{a.pid}", f"{host}:{b.pid}"}
    keys = assert_rows_match_done_shards(engine, 4)
    assert len(keys) == 2 * 2 * 24
    with engine.connect() as connection:
        queued = connection.exec_driver_sql(
            "SELECT (args->>'shard')::int, status::text, attempts FROM procrastinate_jobs"
        ).all()
    assert sorted(shard for shard, _, _ in queued) == sorted(rows)  # one job per shard
    assert {status for _, status, _ in queued} == {"succeeded"}
    assert {shard for shard, _, attempts in queued if attempts > 1} == {victim.id}  # retried once
    assert "queued again" in logs[1].read_text()
    engine.dispose()


def test_a_paused_worker_that_resumes_after_its_shard_went_elsewhere_says_so_in_one_line(
    postgres_url, tiny_folder, tmp_path, run_cli
):
    assert run_cli(postgres_url, "decompose", tiny_folder, "--layers", "0", "--sides", "out",
                   "--neurons", "0-23", "--shard-size", "8", "--channels", "4", "--reference-count", "8",
                   "--enqueue-only") == 0  # fmt: skip
    engine = db.make_engine(postgres_url)
    options = ["--heartbeat-seconds", "0.5", "--stalled-seconds", "2"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a = spawn(postgres_url, tmp_path / "a", logs[0], "worker", *options)
    host = socket.gethostname()
    try:

        def a_in_flight():
            return [s for s in shard_rows(engine) if s.worker == f"{host}:{a.pid}" and s.done_at is None]

        (victim,) = wait_for(a_in_flight, 120, "worker A to start a shard", a, logs[0])
        a.send_signal(signal.SIGSTOP)  # paused past the stall timeout: B takes its shard over
        b = spawn(postgres_url, tmp_path / "b", logs[1], "worker", *options)
        wait_for(
            lambda: all(s.done_at is not None for s in shard_rows(engine)), 120, "B to finish", b, logs[1]
        )
        a.send_signal(signal.SIGCONT)
        wait_for(
            lambda: f"shard {victim.id} " in logs[0].read_text(), 60, "A to report its shard", a, logs[0]
        )
        time.sleep(2)  # what A logs after the rejected commit, if anything
    finally:
        a.send_signal(signal.SIGCONT)
        for process in (a, b):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    log = logs[0].read_text()
    assert "Traceback" not in log, log
    (line,) = [line for line in log.splitlines() if f"shard {victim.id} " in line]
    assert "already done elsewhere" in line, log
    assert_rows_match_done_shards(engine, 4)
    engine.dispose()


# --- two commands on one SQLite file --------------------------------------------------------------


def test_migrations_on_sqlite_take_a_lock(tmp_path):
    """Three processes migrate one fresh file at the same instant: one creates the schema, the
    others find it made (without the lock: `table alembic_version already exists`)."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    code = (
        "import sys, time; from channelscope.core import db; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "db.upgrade_locked(sys.argv[1], db.make_engine(sys.argv[1]))"
    )
    start = time.time() + 3  # after every interpreter has started
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(start)], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], errors
    engine = db.make_engine(url)
    assert db.current_revision(engine) == db.head_revision()
    engine.dispose()


def test_two_decompose_commands_on_one_sqlite_file_share_the_shards(tiny_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"  # fresh: both migrate it too
    args = ["decompose", tiny_folder, "--layers", "0-1", "--sides", "out", "--neurons", "0-23",
            "--shard-size", "4", *SMALL]  # fmt: skip
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [spawn(url, tmp_path / "data", log, *args) for log in logs]
    for process, log in zip(processes, logs, strict=True):
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    engine = db.make_engine(url)
    rows = shard_rows(engine)
    assert len(rows) == 12 and all(s.done_at is not None for s in rows)
    assert [s.attempts for s in rows] == [1] * 12  # each computed once: claimed before computing
    host = socket.gethostname()
    assert {s.worker for s in rows} == {f"{host}:{p.pid}" for p in processes}  # by both
    assert len(assert_rows_match_done_shards(engine, 3)) == 2 * 24
    for log in logs:
        assert "Traceback" not in log.read_text()
    engine.dispose()


def test_a_shard_claimed_by_a_decompose_that_died_is_computed_by_the_other(sqlite_url, tiny_folder, tmp_path):
    args = ["decompose", tiny_folder, "--layers", "0", "--sides", "out", "--neurons", "0-47",
            "--shard-size", "8", *SMALL]  # fmt: skip
    engine = db.make_engine(sqlite_url)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    a, b = (spawn(sqlite_url, tmp_path / "data", log, *args) for log in logs)
    host = socket.gethostname()

    def in_flight(process):
        return [s for s in shard_rows(engine) if s.worker == f"{host}:{process.pid}" and s.done_at is None]

    wait_for(lambda: in_flight(a) and in_flight(b), 120, "both to compute a shard", a, logs[0])
    (victim,) = in_flight(a)
    a.send_signal(signal.SIGKILL)  # in the middle of its shard; its claim goes with it
    a.wait()
    assert b.wait(timeout=300) == 0, logs[1].read_text()[-3000:]
    rows = {s.id: s for s in shard_rows(engine)}
    assert all(s.done_at is not None for s in rows.values())
    assert rows[victim.id].worker == f"{host}:{b.pid}" and rows[victim.id].attempts == 2
    assert len(assert_rows_match_done_shards(engine, 3)) == 48
    engine.dispose()


# --- status and errors ----------------------------------------------------------------------------


def test_status_reports_progress_as_json(sqlite_url, tiny_folder, run_cli, capsys):
    assert run_cli(sqlite_url, "decompose", tiny_folder, "--layers", "0", "--sides", "out",
                   "--neurons", "0-5", "--shard-size", "4", *SMALL) == 0  # fmt: skip
    capsys.readouterr()
    assert run_cli(sqlite_url, "status", "--json") == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["complete"] and run["shards_done"] == run["shards_total"] == 2
    assert run["neurons_stored"] == run["neurons_total"] == 6
    assert run["failed"] == 0 and run["layers"] == [0] and run["sides"] == ["out"]
    assert run["compute_rate"] > 0 and run["channels"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["decompose", "no-such-model", "--layers", "0"], "no model at"),
        (["decompose", "{tiny}", "--layers", "5-3"], "--layers: '5-3' is an empty range"),
        (["decompose", "{tiny}", "--layers", "0-9"], "layer 2 is out of range: tiny-llama has layers 0-1"),
        (["decompose", "{tiny}", "--layers", "0", "--neurons", "120-130"], "neuron 128 is out of range"),
        (["decompose", "{tiny}", "--layers", "0", "--sides", "out,up"], "unknown side 'up'"),
        (["worker"], "workers share a queue in PostgreSQL"),
        (["export", "abcdef"], "no run 'abcdef' in this database"),
    ],
)
def test_bad_input_gets_one_clear_line(args, message, sqlite_url, tiny_folder, run_cli, capsys):
    args = [a.replace("{tiny}", str(tiny_folder)) for a in args]
    assert run_cli(sqlite_url, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_concurrency_below_one_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["decompose", "smollm2", "--layers", "0", "--concurrency", "0"])
    assert stop.value.code == 2 and "--concurrency: must be at least 1, not 0" in capsys.readouterr().err


def test_a_database_that_cannot_be_reached_gets_one_clear_line(run_cli, capsys):
    assert run_cli("postgresql://someone:secret@127.0.0.1:9/nowhere", "status") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: cannot connect to the database at postgresql+psycopg://someone:***@127.0.0.1:9"
    )
    assert "secret" not in err and len(err.splitlines()) == 1


def test_an_old_schema_is_refused_with_the_command_that_fixes_it(tmp_path, run_cli, capsys):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db.upgrade(url, "0001")
    assert run_cli(url, "status") == 2
    assert "run `channelscope db upgrade`" in capsys.readouterr().err
    assert run_cli(url, "db", "upgrade") == 0
    assert run_cli(url, "status") == 0


def test_a_different_model_at_the_same_path_is_refused_in_one_line_before_any_reference(
    database_url, tmp_path, run_cli, capsys, monkeypatch
):
    from tests import tiny

    folder = tiny.write_folder(tmp_path / "models" / "tiny-llama")
    args = ["decompose", folder, "--layers", "0", "--sides", "out", "--neurons", "0-3", *SMALL]
    assert run_cli(database_url, *args) == 0
    shutil.rmtree(folder)
    tiny.write_folder(folder, seed=1)  # another model with the same name, at the same path
    capsys.readouterr()

    def no_reference(*_, **__):
        raise AssertionError("the random-vector reference was about to be computed")

    monkeypatch.setattr(Decomposer, "__init__", no_reference)
    assert run_cli(database_url, *args) == 2
    err = capsys.readouterr().err.strip()
    assert "a different model named 'tiny-llama' is already stored" in err and len(err.splitlines()) == 1, err


def test_a_failing_shard_is_recorded_reported_and_retried_by_the_next_command(
    database_url, tiny_folder, run_cli, monkeypatch, capsys
):
    args = ["decompose", tiny_folder, "--layers", "0", "--sides", "out", "--neurons", "0-7",
            "--shard-size", "4", *SMALL]  # fmt: skip
    original = Decomposer.neurons

    def fails_on_the_second_block(self, layer, side, ids, on_channel=None):
        if ids[0] == 4:
            raise RuntimeError("out of memory on this block")
        return original(self, layer, side, ids, on_channel)

    monkeypatch.setattr(Decomposer, "neurons", fails_on_the_second_block)
    if database_url.startswith("sqlite"):
        with pytest.raises(RuntimeError, match="out of memory"):  # in-process: the error itself
            run_cli(database_url, *args)
    else:
        assert run_cli(database_url, *args) == 2
        assert (
            "1 shards not done (1 failed, first: RuntimeError: out of memory on this block)"
            in capsys.readouterr().err
        )
    capsys.readouterr()
    assert run_cli(database_url, "status", "--json") == 0
    (status,) = json.loads(capsys.readouterr().out)["runs"]
    assert status["shards_done"] == 1 and status["failed"] == 1
    assert status["last_error"] == "RuntimeError: out of memory on this block"

    monkeypatch.setattr(Decomposer, "neurons", original)
    assert run_cli(database_url, *args) == 0
    engine = db.make_engine(database_url)
    retried = [s for s in shard_rows(engine) if s.neuron_start == 4]
    assert retried[0].done_at is not None and retried[0].attempts == 2
    assert len(assert_rows_match_done_shards(engine, 3)) == 8
    engine.dispose()
