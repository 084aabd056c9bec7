"""Several gateway processes behind one listening socket (`server.workers`).

One Python process runs on one core. The supervisor binds the socket once,
starts `workers` processes that all accept on it, restarts one that dies, and
on SIGTERM/SIGINT asks each to shut down gracefully (uvicorn drains its
requests, the memory engine hands running spool jobs back). Everything shared
between the processes is on disk and built for it: the spool's leases keep one
user's exchanges in order and exactly-once, LanceDB commits are optimistic, and
the search cache drops what another process changed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from types import FrameType

from gateway.config import Config

logger = logging.getLogger("gateway.supervisor")

# A worker that dies sooner than this after its start counts as a failed start;
# this many in a row means it will never come up (bad config, port, data dir).
STARTUP_SECONDS = 30.0
MAX_FAILED_STARTS = 3
# Graceful shutdown of every worker, then SIGKILL.
STOP_SECONDS = 30.0


def bind(host: str, port: int) -> socket.socket:
    """The one listening socket, bound before any worker exists, so every worker
    accepts from the same queue and none can lose a queued connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(
        self,
        config: Config,
        target: Callable[[Config, socket.socket, int, int], None],
    ) -> None:
        self.config = config
        self.target = target
        self._ctx = multiprocessing.get_context("spawn")
        self._stop = threading.Event()
        self._procs: dict[int, SpawnProcess] = {}
        self._started: dict[int, float] = {}
        self._failed_starts: dict[int, int] = {}

    def _spawn(self, index: int, sock: socket.socket) -> None:
        # spawn, not fork: LanceDB and BLAS start threads, which fork would copy
        # half-alive. The config travels pickled through a pipe, never on disk.
        proc = self._ctx.Process(
            target=self.target,
            args=(self.config, sock, index, os.getpid()),
            name=f"memory-gateway-worker-{index}",
        )
        proc.start()
        self._procs[index] = proc
        self._started[index] = time.monotonic()
        logger.info("worker %d started (pid %s)", index, proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status of the whole gateway."""
        server = self.config.server
        try:
            sock = bind(server.host, server.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%s: %s", server.host, server.port, exc.strerror)
            return 1
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        status = 0
        try:
            for index in range(self.config.server.workers):
                self._spawn(index, sock)
            while not self._stop.wait(0.5):
                failed = self._restart_dead(sock)
                if failed:
                    logger.error(
                        "worker %d failed %d times in a row at start-up; stopping the gateway",
                        failed[0],
                        MAX_FAILED_STARTS,
                    )
                    status = 1
                    break
        finally:
            self._stop_all()
            sock.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _restart_dead(self, sock: socket.socket) -> list[int]:
        """Restart dead workers; the indices that keep failing at start-up."""
        hopeless = []
        for index, proc in list(self._procs.items()):
            if proc.is_alive() or self._stop.is_set():
                continue
            lived = time.monotonic() - self._started[index]
            logger.warning(
                "worker %d (pid %s) exited with status %s after %.1f s; restarting it",
                index,
                proc.pid,
                proc.exitcode,
                lived,
            )
            proc.close()
            if lived < STARTUP_SECONDS:
                self._failed_starts[index] = self._failed_starts.get(index, 0) + 1
                if self._failed_starts[index] >= MAX_FAILED_STARTS:
                    del self._procs[index]
                    hopeless.append(index)
                    continue
                time.sleep(min(2 ** self._failed_starts[index], 10))
            else:
                self._failed_starts[index] = 0
            self._spawn(index, sock)
        return hopeless

    def _stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn's graceful shutdown
        deadline = time.monotonic() + STOP_SECONDS
        for index, proc in self._procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("worker %d did not stop in %.0f s; killing it", index, STOP_SECONDS)
                proc.kill()
                proc.join()
        self._procs.clear()
