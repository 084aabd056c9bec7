"""The SQLite group-commit writer: one thread, grouped writes, each in its savepoint."""

import asyncio
import sqlite3
import threading

import pytest

from memory.sqlite_writer import GroupCommitWriter


def connect(path):
    def open_db() -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER NOT NULL)")
        return db

    return open_db


@pytest.fixture
async def writer(tmp_path):
    w = GroupCommitWriter(thread_name="test-writer", busy_timeout_ms=30_000)
    await w.open(connect(tmp_path / "w.sqlite3"))
    yield w
    await w.close()


def count(db: sqlite3.Connection) -> int:
    return db.execute("SELECT COUNT(*) FROM t").fetchone()[0]


async def test_every_call_runs_on_the_writers_one_thread(writer):
    names = await asyncio.gather(
        *(writer.run(lambda: threading.current_thread().name) for _ in range(5))
    )
    assert all(name.startswith("test-writer") for name in names)
    assert len(set(names)) == 1


async def test_concurrent_writes_share_commits_and_a_failing_one_is_rolled_back_alone(writer):
    commits = 0
    write_group = writer._write_group

    def counted(fns):
        nonlocal commits
        commits += 1
        return write_group(fns)

    writer._write_group = counted

    def insert(n):
        return lambda db: db.execute("INSERT INTO t (n) VALUES (?)", (n,)).rowcount

    def broken(db):
        db.execute("INSERT INTO t (n) VALUES (NULL)")  # violates NOT NULL

    results = await asyncio.gather(
        *(writer.grouped(insert(n)) for n in range(10)),
        writer.grouped(broken),
        return_exceptions=True,
    )
    assert results[:10] == [1] * 10
    assert isinstance(results[10], sqlite3.IntegrityError)
    assert await writer.run(count, writer.conn()) == 10
    assert commits < 11  # grouped: fewer commits than writes


async def test_a_transaction_is_rolled_back_when_its_function_fails(writer):
    def half(db):
        db.execute("INSERT INTO t (n) VALUES (1)")
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await writer.transaction(half)
    assert await writer.transaction(count) == 0


async def test_a_write_waits_for_another_connections_lock_then_gives_up(tmp_path, writer):
    other = sqlite3.connect(tmp_path / "w.sqlite3", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.2, other.rollback).start()
    await writer.grouped(lambda db: db.execute("INSERT INTO t (n) VALUES (1)"))  # waited
    writer.busy_timeout_ms = 100
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await writer.grouped(lambda db: db.execute("INSERT INTO t (n) VALUES (2)"))
    finally:
        other.close()
    # The connection's busy timeout is the writer's again.
    assert writer.conn().execute("PRAGMA busy_timeout").fetchone()[0] == 100


async def test_a_closed_writer_says_so(tmp_path):
    w = GroupCommitWriter(thread_name="closing", busy_timeout_ms=1000)
    await w.open(connect(tmp_path / "w.sqlite3"))
    await w.close()
    with pytest.raises(RuntimeError, match="the closing is closed"):
        w.conn()
