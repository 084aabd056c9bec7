"""Exchanges recorded in one process, extracted in another.

With an extraction process (`server.extraction: process`), the serving
processes only spool exchanges; the extraction process claims and processes
them. The spool on disk carries the exchanges themselves. This channel
carries what must not touch disk or only saves time: the key a
bring-your-own-key user's extraction is paid with; a wake-up, so a job
starts at once instead of at the extraction process's next poll; and the
embedding of the user's turn, which the request's search has just computed
and the extraction would otherwise compute again (~4.5 ms of CPU).

One datagram per message on a Unix socketpair that the supervisor creates and
every process inherits: a datagram is delivered whole, so messages of
several senders never interleave, and sending never blocks. When the
receiver is behind (its queue full) or restarting, a message is dropped: the
poll still finds the job, and the user's next request brings the key again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import msgspec
import numpy as np

log = logging.getLogger(__name__)

# User ids are at most 256 characters; a key longer than ~16 KiB is not handed
# over, nor an embedding of a text longer than ~16 KiB.
MAX_MESSAGE = 36 * 1024
# Room for a few hundred messages while the extraction process is busy.
_BUFFER = 1024 * 1024
_REPORT_AT = frozenset(10**n for n in range(12))

# (user_id, key, text, the text's float32 embedding); all None only wakes.
Message = tuple[str | None, str | None, str | None, bytes | None]
OnMessage = Callable[[str | None, str | None, str | None, np.ndarray | None], None]
_decode = msgspec.msgpack.Decoder(Message).decode


def channel() -> tuple[socket.socket, socket.socket]:
    """(sender end, receiver end), inheritable by spawned processes."""
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for end in (sender, receiver):
        end.set_inheritable(True)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _BUFFER)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
    return sender, receiver


class HandoffSender:
    """The serving side: wake the extraction process, hand it a user's key."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.dropped = 0

    def send(
        self,
        user_id: str | None = None,
        api_key: str | None = None,
        embedded: tuple[str, np.ndarray] | None = None,
    ) -> None:
        text, vector = embedded if embedded is not None else (None, None)
        raw = None if vector is None else np.asarray(vector, dtype=np.float32).tobytes()
        data = msgspec.msgpack.encode((user_id, api_key, text, raw))
        if len(data) > MAX_MESSAGE and embedded is not None:
            data = msgspec.msgpack.encode((user_id, api_key, None, None))
        if len(data) > MAX_MESSAGE:
            log.warning("user id or key too long to hand to the extraction process; not sent")
            return
        try:
            self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            self._drop("it is behind")
        except OSError as exc:
            self._drop(f"cannot reach it: {exc.strerror or exc}")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        # The 1st, 10th, 100th... drop: visible, never a flood (a restarting
        # extraction process would otherwise cost a line per request).
        if self.dropped in _REPORT_AT:
            log.warning(
                "%d message(s) to the extraction process dropped so far (last: %s);"
                " its poll still finds the jobs, and a bring-your-own-key user's key"
                " comes again with their next request",
                self.dropped,
                why,
            )

    def close(self) -> None:
        self._sock.close()


class HandoffReceiver:
    """The extraction side: messages are read on the event loop, never blocking it."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, on_message: OnMessage) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable, on_message)

    def _readable(self, on_message: OnMessage) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE + 1)
            except (BlockingIOError, InterruptedError):
                return
            try:
                user_id, api_key, text, raw = _decode(data)
            except msgspec.DecodeError:
                log.warning("unreadable handoff message ignored (%d bytes)", len(data))
                continue
            vector = None
            if raw is not None and len(raw) % 4 == 0:
                vector = np.frombuffer(raw, dtype=np.float32)
            on_message(user_id, api_key, text, vector)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        self._sock.close()
