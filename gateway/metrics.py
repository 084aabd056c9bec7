"""Prometheus metrics: what the gateway counts, and the text `/metrics` serves.

Counters and histograms are updated where things happen (the request
wrapper in gateway/observe.py, the proxy, the memory hooks, and the engine
through its `Observer`); gauges of state (jobs by state, lag, rows) are read
from the spool and the store when Prometheus scrapes, so every process
reports the same values.

Several processes (`server.workers`, the extraction process) share one
`/metrics`: the supervisor points prometheus_client's multiprocess mode at
a fresh directory before it spawns them (`prepare_multiprocess`), each
process writes its values there, and a scrape on any worker sums them.

No label ever carries a user, a key or a model name a client typed: every
label value comes from a small set the gateway knows (its routes, its
upstreams' names, memory statuses, operation names).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from memory.models import Operation
from memory.observer import Observer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "memory_gateway"

# Whole requests, streams included: from milliseconds to minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Memory retrieval runs under a deadline of a few hundred milliseconds.
RETRIEVAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)

# HTTP methods other than these are counted as "other" (a client may send anything).
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
JOB_STATES = ("pending", "running", "failed", "done")


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def _shared_dir() -> str | None:
    """Where this process's values go, when they go to files: prometheus_client
    chose at its import, from the environment the supervisor spawned it with."""
    if values.ValueClass is values.MutexValue:
        return None
    return multiprocess_dir()


def prepare_multiprocess() -> Path:
    """Before the supervisor spawns its processes: the directory they write
    their values to, emptied (values of a previous run would be summed in).
    An operator's `PROMETHEUS_MULTIPROC_DIR` is used and emptied; otherwise a
    new temporary one, which `cleanup_multiprocess` removes at exit."""
    given = multiprocess_dir()
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.glob("*.db"):
            entry.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="memory-gateway-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
    return path


def cleanup_multiprocess(path: Path, *, created: bool) -> None:
    """Once every process has exited: remove what `prepare_multiprocess` made."""
    if created:
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == str(path):
            del os.environ[MULTIPROC_ENV]


@dataclass(frozen=True, slots=True)
class StateGauges:
    """What a scrape reads from the spool and the store (None: memory off or not open)."""

    jobs: dict[str, int]
    lag_seconds: float
    rows: int
    extraction_failing: bool


class _Snapshot(Collector):
    def __init__(self, state: StateGauges | None) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        if state is None:
            return
        jobs = GaugeMetricFamily(
            f"{PREFIX}_extraction_jobs", "Extraction jobs in the spool, by state", labels=["state"]
        )
        for name in JOB_STATES:
            jobs.add_metric([name], state.jobs.get(name, 0))
        yield jobs
        yield GaugeMetricFamily(
            f"{PREFIX}_extraction_lag_seconds",
            "How long the longest-waiting due extraction job has waited",
            value=state.lag_seconds,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_extraction_failing",
            "1 while every recent extraction job failed (X-Memory-Status: ok; extraction=failing)",
            value=1.0 if state.extraction_failing else 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_store_rows", "Memories stored, all users", value=state.rows
        )


class _Own(Collector):
    """This process's metrics, when no other process shares them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return iter(self._registry.collect())


class Metrics:
    """The gateway's metrics in this process."""

    def __init__(self) -> None:
        self._shared_dir = _shared_dir()
        # In multiprocess mode the values go to files and a scrape reads them
        # all; otherwise they live in this registry (one per app, so that
        # several apps in one process, as in tests, do not collide).
        self._registry = None if self._shared_dir else CollectorRegistry()
        registry = self._registry
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "From a request's arrival to its response's last byte, by route template",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            f"{PREFIX}_upstream_duration_seconds",
            "From sending a request upstream to its response's headers (a stream's first"
            " byte), by upstream name",
            ["upstream"],
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.retrieval = Histogram(
            f"{PREFIX}_memory_retrieval_seconds",
            "Memory search before forwarding a chat, by outcome (ok, timeout, error)",
            ["outcome"],
            buckets=RETRIEVAL_BUCKETS,
            registry=registry,
        )
        self.injected = Counter(
            f"{PREFIX}_memory_injected_total",
            "Memories injected into chat requests",
            registry=registry,
        )
        self.memory_status = Counter(
            f"{PREFIX}_memory_status_total",
            "Chat requests by memory status (X-Memory-Status: ok, degraded, off, no-user...)",
            ["status"],
            registry=registry,
        )
        self.operations = Counter(
            f"{PREFIX}_memory_operations_total",
            "Extraction's decisions applied: ADD, UPDATE, DELETE per memory; NONE per"
            " exchange that changed nothing",
            ["op"],
            registry=registry,
        )
        self.llm_tokens = Counter(
            f"{PREFIX}_extraction_llm_tokens_total",
            "Tokens of extraction calls as the model server reported them, by kind"
            " (prompt, completion)",
            ["kind"],
            registry=registry,
        )
        self.streams_cut = Counter(
            f"{PREFIX}_streams_cut_total",
            "Streamed answers that ended without a finish reason (cut short by the"
            " upstream; not recorded for memory), by upstream name",
            ["upstream"],
            registry=registry,
        )
        # Children looked up once: `.labels()` takes a lock and hashes its values.
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    # -- recording ----------------------------------------------------------

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            if len(self._request_children) > 10_000:
                # Statuses and routes are bounded; this only stops a runaway.
                self._request_children.clear()
            children = (
                self.requests.labels(route, method if method in METHODS else "other", str(status)),
                self.request_duration.labels(route),
            )
            self._request_children[key] = children
        count, duration = children
        count.inc()
        duration.observe(seconds)

    def upstream(self, name: str, seconds: float) -> None:
        self.upstream_duration.labels(name).observe(seconds)

    def stream_cut(self, upstream: str) -> None:
        self.streams_cut.labels(upstream).inc()

    def retrieved(self, outcome: str, seconds: float) -> None:
        self.retrieval.labels(outcome).observe(seconds)

    def chat_memory(self, status: str, injected: int) -> None:
        self.memory_status.labels(status).inc()
        if injected:
            self.injected.inc(injected)

    def observer(self) -> Observer:
        """What the memory engine reports through."""
        return _EngineObserver(self)

    # -- reading ------------------------------------------------------------

    def render(self, state: StateGauges | None) -> bytes:
        """The exposition text: every process's values plus the state gauges.
        Reads files in multiprocess mode: call it off the event loop."""
        registry = CollectorRegistry(auto_describe=False)
        if self._shared_dir:
            MultiProcessCollector(registry, self._shared_dir)
        else:
            assert self._registry is not None
            registry.register(_Own(self._registry))
        registry.register(_Snapshot(state))
        return generate_latest(registry)


class _EngineObserver(Observer):
    def __init__(self, metrics: Metrics) -> None:
        self._ops = metrics.operations
        self._prompt = metrics.llm_tokens.labels("prompt")
        self._completion = metrics.llm_tokens.labels("completion")

    def llm_tokens(self, prompt: int, completion: int) -> None:
        if prompt > 0:
            self._prompt.inc(prompt)
        if completion > 0:
            self._completion.inc(completion)

    def operations_applied(self, ops: Sequence[Operation]) -> None:
        if not ops:
            self._ops.labels("NONE").inc()
        for op in ops:
            self._ops.labels(op.op).inc()
