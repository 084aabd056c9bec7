"""Yield to chat: the gateway's extraction calls wait while users' chat
requests to the same model server are in flight.

A local model server often has one slot. llama-cpp-python (its default
`interrupt_requests`) cuts a running stream short when another request
arrives; Ollama and LM Studio queue the second request behind the first. In
both, an extraction call sent while a user's answer is being generated costs
that user: a truncated answer, or seconds of waiting. So the proxy counts the
chat requests in flight per upstream (`ChatActivity.begin`, from sending the
request upstream until its answer is relayed or abandoned), and an extraction
call to the upstream that is also the extraction endpoint first waits until
that count is 0 (`wait_quiet`), polling, and never longer than
`memory.llm.yield_max_seconds`.

The counts are shared by every process of the gateway: a shared-memory array
of int64 that the supervisor creates (`shared_counters`) and passes to each
serving worker and to the extraction process; in one process, a local array.
Each serving worker writes only its own slot of `len(upstreams)` counters
(slot = worker index): with one writer a slot needs no lock across processes
(no lock can be left held by a killed process), and when a worker dies with
requests in flight the supervisor zeroes its slot before it starts the
replacement (`clear_slot`). Readers add up every slot.

`memory.llm.yield_to_chat`: `auto` turns the gate on when the extraction
endpoint is one of the configured upstreams and its host is this machine or
a private network (`is_local_host`): hosted APIs serve many requests at once
and need no gate. `true`/`false` force it (`true` still needs the endpoint to
be a chat upstream: otherwise there are no chats of its to wait for).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ipaddress
import logging
import multiprocessing
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Protocol
from urllib.parse import urlsplit

from gateway.config import Config

logger = logging.getLogger("gateway.chat_activity")

# How often a waiting extraction call looks at the counts again.
POLL_SECONDS = 0.025
# How long no chat must have been in flight before an extraction call goes:
# a client that sends its next request as soon as an answer ends (an agent,
# a benchmark) leaves a gap of a few milliseconds, which a call sent at once
# would take, making that next chat wait for the call whole.
QUIET_SECONDS = 0.3

# Host names that name this machine or a private network without DNS:
# docker compose service names ("ollama") have no dot; mDNS and the usual
# private zones have these suffixes.
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")
# Carrier-grade NAT space: Tailscale and similar overlay networks (not `is_private`).
_SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")


class Counters(Protocol):
    """An int64 array: `multiprocessing`'s shared RawArray, or a local array."""

    def __getitem__(self, index: int, /) -> int: ...

    def __setitem__(self, index: int, value: int, /) -> None: ...

    def __len__(self) -> int: ...


def slot_size(upstreams: int) -> int:
    """A slot holds, per upstream, the requests in flight and when the last
    one ended (monotonic milliseconds, the same clock in every process)."""
    return 2 * upstreams


def shared_counters(config: Config, ctx: BaseContext | None = None) -> Counters:
    """The supervisor's array: one slot per serving worker, in shared memory
    that spawned processes inherit when it is passed as an argument of their
    target."""
    ctx = ctx if ctx is not None else multiprocessing.get_context("spawn")
    size = config.server.workers * slot_size(len(config.upstreams))
    counters: Counters = ctx.RawArray("q", size)
    return counters


def clear_slot(counters: Counters, slot: int, upstreams: int) -> None:
    """Zero a dead worker's counters (its requests died with it). Only while no
    live process owns `slot`: the supervisor calls it before the restart."""
    start = slot * slot_size(upstreams)
    for i in range(start, start + upstreams):
        counters[i] = 0


class ChatLease:
    """One chat request in flight; `release()` (idempotent) ends it."""

    __slots__ = ("_activity", "_at")

    def __init__(self, activity: ChatActivity, at: int) -> None:
        self._activity = activity
        self._at = at

    def release(self) -> None:
        at, self._at = self._at, -1
        if at >= 0:
            self._activity._add(at, -1)


def _server(base_url: str) -> str:
    """scheme://host:port of a base URL: what a server is, whatever its path."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class ChatActivity:
    """Chat requests in flight per upstream server, across the gateway's processes."""

    def __init__(
        self,
        upstreams: Sequence[str],
        counters: Counters | None = None,
        slot: int = 0,
        servers: Sequence[str] | None = None,
    ) -> None:
        """`counters` shared with the other processes (None: this process only);
        this process counts its requests in slot `slot` (a serving worker's index).
        `servers`: each upstream's server; upstreams on one server (an
        `anthropic` and an `openai` entry for the same local server) share a count."""
        self.upstreams = list(upstreams)
        first: dict[str, int] = {}
        self._index = {
            name: first.setdefault(server, i)
            for i, (name, server) in enumerate(
                zip(self.upstreams, servers or self.upstreams, strict=True)
            )
        }
        width = len(self.upstreams)
        size = slot_size(width)
        if counters is None:
            counters = array.array("q", bytes(8 * size * (slot + 1)))
        if width == 0 or len(counters) % size or len(counters) < (slot + 1) * size:
            raise ValueError(
                f"{len(counters)} counters do not hold slot {slot} of {width} upstreams"
            )
        self._counters = counters
        self._slots = len(counters) // size
        self._base = slot * size
        self._size = size
        self._width = width
        # Requests are counted on the event loop's thread; the lock only keeps
        # another thread of this process (an embedding app) from racing it.
        self._lock = threading.Lock()

    @classmethod
    def for_config(
        cls, config: Config, counters: Counters | None = None, slot: int = 0
    ) -> ChatActivity:
        servers = [_server(u.base_url) for u in config.upstreams]
        return cls([u.name for u in config.upstreams], counters, slot, servers)

    def begin(self, upstream: str) -> ChatLease:
        """A chat request to `upstream` is being sent; release the lease once its
        answer is relayed, failed or abandoned (every path: it must not leak)."""
        at = self._base + self._index[upstream]
        self._add(at, 1)
        return ChatLease(self, at)

    def _add(self, at: int, delta: int) -> None:
        with self._lock:
            self._counters[at] += delta
            if delta < 0:
                self._counters[at + self._width] = time.monotonic_ns() // 1_000_000

    def in_flight(self, upstream: str) -> int:
        """Chat requests to `upstream` in flight in every process. Lock-free: each
        counter has one writer, and an aligned int64 is read whole."""
        i = self._index[upstream]
        return sum(self._counters[slot * self._size + i] for slot in range(self._slots))

    def quiet_for(self, upstream: str) -> float:
        """Seconds since the last chat request to `upstream` ended, in any
        process (0.0 while one is in flight; large when none ever was)."""
        if self.in_flight(upstream):
            return 0.0
        i = self._width + self._index[upstream]
        last = max(self._counters[slot * self._size + i] for slot in range(self._slots))
        if last == 0:
            return float("inf")
        return max(0.0, (time.monotonic_ns() // 1_000_000 - last) / 1000)

    def own(self, upstream: str) -> int:
        """Those of this process (its slot) only."""
        return self._counters[self._base + self._index[upstream]]


async def wait_quiet(
    activity: ChatActivity,
    upstream: str,
    max_seconds: float,
    *,
    poll: float = POLL_SECONDS,
    quiet: float = QUIET_SECONDS,
) -> float:
    """Wait until no chat request to `upstream` has been in flight for
    `quiet` seconds, polling every `poll` seconds, at most `max_seconds`; the
    seconds waited (0.0 at once when it is quiet already)."""
    if activity.quiet_for(upstream) >= quiet:
        return 0.0
    start = time.monotonic()
    deadline = start + max_seconds
    while (calm := activity.quiet_for(upstream)) < quiet:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(max(poll, quiet - calm) if calm else poll, left))
    return time.monotonic() - start


@dataclass(eq=False)
class YieldGate:
    """The extractor's `call_gate`, entered around each call to the model:
    it waits until no chat to the upstream is in flight, and lets one call
    through at a time. Released all at once, several calls would queue at a
    one-slot server, and a chat arriving between two of them would be cut
    short (llama-cpp-python ends a stream when a request waits behind it)."""

    activity: ChatActivity
    upstream: str
    max_seconds: float
    poll: float = POLL_SECONDS
    # One extraction call in flight per process; the extraction process
    # (or the single process) is the one that calls.
    _one: asyncio.Lock = field(default_factory=asyncio.Lock)

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        async with self._one:
            waited = await wait_quiet(
                self.activity, self.upstream, self.max_seconds, poll=self.poll
            )
            if waited:
                busy = self.activity.in_flight(self.upstream)
                logger.debug(
                    "extraction call waited %.3f s for chat requests to upstream %r%s",
                    waited,
                    self.upstream,
                    f" and goes ahead with {busy} still in flight (yield_max_seconds)"
                    if busy
                    else "",
                )
            yield


def is_local_host(host: str | None) -> bool:
    """Whether `host` (an address or a name, as in a URL) is this machine or a
    private network: loopback, private, link-local or carrier-grade NAT
    addresses, `localhost`, names without a dot (docker compose services)
    and private zones (`.local`, `.internal`, `.lan`, `.home.arpa`). Names
    are not resolved."""
    if not host:
        return False
    host = host.strip("[]").rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost" or "." not in host or host.endswith(_LOCAL_SUFFIXES)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_unspecified
        or (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_SPACE)
    )


def yield_decision(config: Config) -> tuple[str | None, str]:
    """(the upstream extraction yields to, or None; why, for the start-up log)."""
    setting = config.memory.llm.yield_to_chat
    endpoint = config.extraction
    if setting is False:
        return None, "memory.llm.yield_to_chat is false"
    if endpoint.upstream is None:
        return None, (
            f"the extraction endpoint {endpoint.base_url} is not one of the chat upstreams,"
            " so no chat request competes with it"
        )
    if setting is True:
        return endpoint.upstream, "memory.llm.yield_to_chat is true"
    host = urlsplit(endpoint.base_url).hostname
    if is_local_host(host):
        return endpoint.upstream, (
            f"yield_to_chat auto: {host} is on this machine or a private network"
        )
    return None, (
        f"yield_to_chat auto: {host} is a hosted endpoint that serves requests in parallel"
        " (set memory.llm.yield_to_chat: true if it answers one request at a time)"
    )


def yield_gate(config: Config, activity: ChatActivity) -> YieldGate | None:
    """The gate for the extractor's `call_gate`, or None when extraction
    does not yield to chat (see `yield_decision`)."""
    upstream, _ = yield_decision(config)
    if upstream is None:
        return None
    return YieldGate(activity, upstream, config.memory.llm.yield_max_seconds)


def log_yield_decision(config: Config) -> None:
    """One INFO line at start: which upstream extraction yields to, or why none."""
    if not config.memory.enabled:
        return
    upstream, why = yield_decision(config)
    if upstream is None:
        logger.info("extraction does not yield to chat requests: %s", why)
    else:
        logger.info(
            "extraction calls wait while chat requests to upstream %r are in flight"
            " (at most %g s each): %s",
            upstream,
            config.memory.llm.yield_max_seconds,
            why,
        )
