"""The gateway's processes: serving workers behind one listening socket
(`server.workers`) and, with memory on, the extraction process
(`server.extraction: process`).

One Python process runs on one core. The supervisor binds the socket once,
starts `workers` processes that all accept on it and the extraction process
that runs the spool's jobs, restarts one that dies, and on SIGTERM/SIGINT
asks each to shut down gracefully (uvicorn drains its requests, the memory
engine hands running spool jobs back). Everything shared between the
processes is on disk and built for it: the spool's leases keep one user's
exchanges in order and exactly-once, LanceDB commits are optimistic, and the
search cache follows what another process changed. Keys and wake-ups go from
the serving processes to the extraction process over a socketpair
(memory/handoff.py), never through a file. The chat requests in flight,
which extraction yields to, are counted in a shared-memory array that the
supervisor creates and hands to each process (gateway/chat_activity.py).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from pathlib import Path
from types import FrameType
from typing import Any

from gateway.chat_activity import clear_slot, shared_counters
from gateway.config import Config
from gateway.metrics import cleanup_multiprocess, multiprocess_dir, prepare_multiprocess
from gateway.startup import cannot_listen
from memory.handoff import channel

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


Target = Callable[..., None]


class Supervisor:
    def __init__(self, config: Config, serve: Target, extraction: Target | None = None) -> None:
        """`serve(config, sock, index, supervisor_pid, handoff_sender | None,
        chat_counters)` runs one serving worker; `extraction(config,
        handoff_receiver, supervisor_pid, chat_counters)` the extraction process.
        `chat_counters`: the chat requests in flight per worker and upstream,
        in shared memory (gateway/chat_activity.py); worker `index` counts
        its own in slot `index`."""
        self.config = config
        self.serve = serve
        self.extraction = extraction
        self._ctx = multiprocessing.get_context("spawn")
        self.chat_counters = shared_counters(config, self._ctx)
        # The chat counters' slot of each serving worker, by process name.
        self._counter_slots: dict[str, int] = {}
        self._stop = threading.Event()
        self._slots: dict[str, tuple[Target, tuple[Any, ...]]] = {}
        self._procs: dict[str, SpawnProcess] = {}
        self._started: dict[str, float] = {}
        self._failed_starts: dict[str, int] = {}

    def _spawn(self, name: str) -> None:
        # spawn, not fork: LanceDB and BLAS start threads, which fork would copy
        # half-alive. The config travels pickled through a pipe, never on disk.
        target, args = self._slots[name]
        proc = self._ctx.Process(
            target=target, args=args, name=f"memory-gateway-{name.replace(' ', '-')}"
        )
        proc.start()
        self._procs[name] = proc
        self._started[name] = time.monotonic()
        logger.info("%s started (pid %s)", name, proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop.set()

    def run(self, sock: socket.socket | None = None) -> int:
        """Serve on `sock` (bound here when None; closed at the end) until
        SIGTERM/SIGINT; the exit status of the whole gateway."""
        if sock is None:
            server = self.config.server
            try:
                sock = bind(server.host, server.port)
            except OSError as exc:
                logger.error("%s", cannot_listen(server.host, server.port, exc))
                return 1
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        sender = receiver = None
        if self.extraction is not None:
            sender, receiver = channel()
            self._slots["extraction process"] = (
                self.extraction,
                (self.config, receiver, os.getpid(), self.chat_counters),
            )
        for index in range(self.config.server.workers):
            name = f"worker {index}"
            self._slots[name] = (
                self.serve,
                (self.config, sock, index, os.getpid(), sender, self.chat_counters),
            )
            self._counter_slots[name] = index
        status = 0
        shared_metrics = None
        if self.config.metrics.enabled:
            given = multiprocess_dir() is not None
            shared_metrics = prepare_multiprocess()
        try:
            for name in self._slots:
                self._spawn(name)
            while not self._stop.wait(0.5):
                failed = self._restart_dead()
                if failed:
                    logger.error(
                        "%s failed %d times in a row at start-up; stopping the gateway",
                        failed[0],
                        MAX_FAILED_STARTS,
                    )
                    status = 1
                    break
        finally:
            self._stop_all()
            sock.close()
            for end in (sender, receiver):
                if end is not None:
                    end.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if shared_metrics is not None:
                cleanup_multiprocess(shared_metrics, created=not given)
        return status

    def _restart_dead(self) -> list[str]:
        """Restart dead processes; the names of those that keep failing at start-up."""
        hopeless = []
        for name, proc in list(self._procs.items()):
            if proc.is_alive() or self._stop.is_set():
                continue
            lived = time.monotonic() - self._started[name]
            logger.warning(
                "%s (pid %s) exited with status %s after %.1f s; restarting it",
                name,
                proc.pid,
                proc.exitcode,
                lived,
            )
            proc.close()
            self._forget_requests(name)
            if lived < STARTUP_SECONDS:
                self._failed_starts[name] = self._failed_starts.get(name, 0) + 1
                if self._failed_starts[name] >= MAX_FAILED_STARTS:
                    del self._procs[name]
                    hopeless.append(name)
                    continue
                time.sleep(min(2 ** self._failed_starts[name], 10))
            else:
                self._failed_starts[name] = 0
            self._spawn(name)
        return hopeless

    def _forget_requests(self, name: str) -> None:
        """A dead worker's chat requests died with it: zero its counters, which
        it can no longer release, before anything is restarted in its slot."""
        slot = self._counter_slots.get(name)
        if slot is not None:
            clear_slot(self.chat_counters, slot, len(self.config.upstreams))

    def _stop_all(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()  # SIGTERM: graceful shutdown
        deadline = time.monotonic() + STOP_SECONDS
        for name, proc in self._procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("%s did not stop in %.0f s; killing it", name, STOP_SECONDS)
                proc.kill()
                proc.join()
        self._procs.clear()


def watch_parent(supervisor: int, stop: Callable[[], None]) -> None:
    """Call `stop` (once) when the supervisor is gone (SIGKILL, OOM): a child
    process shuts down rather than run on orphaned, never restarted or stopped."""

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(1.0)
        logger.warning("the supervisor (pid %s) is gone; this process shuts down", supervisor)
        stop()

    threading.Thread(target=watch, name="watch-supervisor", daemon=True).start()


def name_process(name: str) -> None:
    """Show `name` in ps and top (Linux, 15 characters), so an operator can
    tell the serving workers from the extraction process."""
    with contextlib.suppress(OSError):
        Path("/proc/self/comm").write_text(name[:15])
