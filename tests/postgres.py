"""A real PostgreSQL 15 server for the test session, on 127.0.0.1.

Started once (initdb in a temporary directory, a free port, `fsync=on` so a
crash test means what it says) and stopped at the end of the session; each
test gets a database of its own (`postgres_url`). As root (CI), the server
runs as the `postgres` OS user, since initdb refuses root.

Without the binaries the tests that need it skip and say what to install.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "memgw"
# The role's password: tests check that it never reaches a log line.
PASSWORD = "pg-secret-5f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One running cluster; `url(db)` to connect, `restart()` to bounce it."""

    def __init__(self, root: Path, port: int, run_as: list[str]) -> None:
        self.root = root
        self.data = root / "data"
        self.port = port
        self._run_as = run_as

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self._run_as, *args],
            check=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=self.root,
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=on"
            f" -c unix_socket_directories={self.root} -c max_connections=100"
        )
        self._run(
            str(BIN / "pg_ctl"),
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            *extra,
        )

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._run(
            str(BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()

    def start(self) -> None:
        self._ctl("start")

    def stop(self) -> None:
        # Its directory is deleted next: no shutdown checkpoint to wait for.
        self._ctl("stop", "-m", "immediate")

    def restart(self, mode: str = "fast") -> None:
        """`immediate` is a crash: no shutdown checkpoint, recovery from the WAL."""
        self._ctl("restart", "-m", mode)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if not (BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 not found in {BIN}: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="pip install 'memory-gateway[postgres]'")
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="memgw-pg-"))
    if os.geteuid() == 0:
        # initdb refuses root; the Debian package creates this user.
        try:
            shutil.chown(root, "postgres", "postgres")
        except LookupError:
            pytest.skip("running as root without a `postgres` OS user: apt-get install postgresql")
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(root, _free_port(), run_as)
    try:
        server.init()
        server.start()
    except subprocess.CalledProcessError as exc:
        log = root / "server.log"
        detail = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {exc.stdout!r}\n{detail}") from exc
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return postgres_server.create_database()
