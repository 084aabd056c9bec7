"""Typed settings of the memory engine.

The engine is a library: it receives one `MemoryConfig`, already validated, and
never reads the environment itself. The gateway embeds this model in its own
configuration (`memory:` in gateway.yaml).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec


class _Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# The ranges outside which a setting cannot work. A value outside one is a
# validation error naming its key ("memory.spool.concurrency: Expected `int` >= 1").
AtLeastOne = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]


class EmbedderConfig(_Settings):
    """Which model turns text into vectors.

    `local` is USE multilingual v3 shipped inside the package (no key, no
    network); `openai` calls any OpenAI-compatible `/v1/embeddings`.
    """

    provider: Literal["local", "openai"] = "local"
    model: str = "use-multilingual-v3"
    base_url: str | None = None
    api_key: str | None = None
    dimensions: AtLeastOne | None = None
    batch_size: AtLeastOne = 32
    timeout: Positive = 30.0


class LLMConfig(_Settings):
    """The model that extracts and updates facts (one call per exchange).

    `base_url` defaults to the gateway's default upstream. With no `api_key`,
    the key configured for that endpoint's upstream is used, else the key a
    user's request sent to that same endpoint (kept in process memory only):
    a key never goes to an endpoint it was not configured or sent for.
    """

    base_url: str | None = None
    # Unset: `gpt-4o-mini`, unless the endpoint's `GET /models` lists exactly
    # one other model (a local server), which is then used; checked at start.
    model: str | None = None
    api_key: str | None = None
    timeout: Positive = 60.0
    temperature: NonNegative = 0.0
    # Real answers are ~50 tokens; a confused model must not run for minutes.
    max_tokens: Annotated[int, msgspec.Meta(ge=16)] = 384
    # The model's context window (tokens). The prompt is clipped to fit it
    # with `max_tokens` to spare, estimating tokens per script (a Chinese
    # character costs ~2 on small models, an English word ~1.3).
    context_tokens: Annotated[int, msgspec.Meta(ge=256)] = 8192
    # Extraction calls in flight at once, at most (per process). A local model
    # server that answers one request at a time (Ollama, llama.cpp) queues the
    # others, and a call's `timeout` runs while it waits there; jobs beyond
    # this wait in the gateway instead, where no timeout runs.
    max_concurrent_calls: AtLeastOne = 16
    # When the extraction endpoint is also a chat upstream, extraction calls
    # wait while chat requests to it are in flight, so a one-slot server never
    # interrupts or delays a user's answer for the gateway's own call. `auto`:
    # on when the endpoint is on this machine or a private network.
    yield_to_chat: bool | Literal["auto"] = "auto"
    # ...but never longer than this (seconds) under continuous chat traffic.
    yield_max_seconds: NonNegative = 60.0
    # Extraction is reported as failing (`X-Memory-Status: ok; extraction=failing`,
    # `/ready`, stats) when every attempt in this window (seconds) failed.
    failing_window_seconds: Positive = 300.0

    def __post_init__(self) -> None:
        # "field: text" names the field; the loader prefixes the struct's path.
        if self.max_tokens >= self.context_tokens:
            raise ValueError(
                f"max_tokens: must be smaller than context_tokens ({self.context_tokens}),"
                " which must also hold the prompt"
            )


class SearchConfig(_Settings):
    limit: AtLeastOne = 8
    # Vector and full-text results fused (see `fusion`); `False` is vector only.
    hybrid: bool = True
    # How full-text joins the vector side: `boost` adds up to `text_weight` to the
    # cosine (scaled BM25); `rrf` is plain reciprocal-rank fusion. See docs/embedders.md.
    fusion: Literal["boost", "rrf"] = "boost"
    text_weight: NonNegative = 0.1
    # Hits whose cosine similarity is below this are dropped (full-text-only
    # hits must still reach it through their vector score).
    min_score: Annotated[float, msgspec.Meta(ge=-1, le=1)] = 0.15
    # Existing memories shown to the extractor with each exchange.
    extraction_context: AtLeastOne = 10
    # Recently searched scopes are kept in memory (vectors + n-gram BM25) up to
    # this many bytes, for millisecond search (memory/search/scope_cache.py); 0 disables.
    cache_bytes: NonNegativeInt = 128 * 1024 * 1024


class SpoolConfig(_Settings):
    # Different users run in parallel up to this many; one user is always serial.
    # Concurrent jobs share spool commits and store writes (docs/benchmarks.md:
    # 48 gave ~1.4x the exchanges/s of 16). The model calls among them are
    # limited by `llm.max_concurrent_calls`.
    concurrency: AtLeastOne = 48
    max_attempts: AtLeastOne = 5
    backoff_initial: NonNegative = 1.0
    backoff_max: NonNegative = 60.0
    # Finished jobs are kept this long (for stats and idempotent replay), then purged.
    keep_done_seconds: NonNegative = 86400.0
    # A claimed job whose worker stops renewing its lease (crash) is resumed after this.
    lease_seconds: Positive = 30.0
    # Fallback poll for jobs of other processes; this process wakes its workers directly.
    poll_interval: Positive = 2.0


class MaintenanceConfig(_Settings):
    # Compaction, index refresh and cleanup of old versions run this often.
    interval_seconds: Positive = 60.0
    # A vector index is built once the table holds this many rows (IVF-PQ
    # needs 256 rows to train on).
    vector_index_min_rows: Annotated[int, msgspec.Meta(ge=256)] = 100_000
    # Old table versions older than this are removed at maintenance.
    keep_versions_seconds: NonNegative = 600.0
    # Maintenance also runs once this many writes happened since the last run.
    optimize_after_writes: AtLeastOne = 500
    # Bounds of LanceDB's index and metadata caches, so RSS stays flat.
    index_cache_bytes: NonNegativeInt = 64 * 1024 * 1024
    metadata_cache_bytes: NonNegativeInt = 32 * 1024 * 1024
    # How stale a table handle may be about other processes' writes (seconds;
    # 0 = always check, costs ~0.1 ms a query). The search cache relies on it.
    read_consistency_seconds: NonNegative = 0.0


class RedactionConfig(_Settings):
    # Secrets (API keys, passwords, card numbers...) are masked before storage.
    enabled: bool = True


class InjectionConfig(_Settings):
    # Where the memory system message goes. `before_last_user` keeps every
    # earlier message byte-identical so provider prompt caching keeps working.
    position: Literal["before_last_user", "after_system", "end"] = "before_last_user"
    max_chars: AtLeastOne = 2000
    # Retrieval slower than this is abandoned; the request goes on without memories.
    deadline_ms: AtLeastOne = 250


class StorageConfig(_Settings):
    """Where the memory tables live.

    Unset, a directory in the data dir. Any LanceDB URI shares them between
    replicas: `s3://bucket/prefix`, `gs://...`, `az://...` (`s3+ddb://` for
    stores without conditional writes). `options` go to LanceDB as
    `storage_options` (endpoint, region, credentials, `allow_http`); they may
    hold secrets and are never logged."""

    uri: str | None = None
    options: dict[str, str] = msgspec.field(default_factory=dict)
    # How stale a replica's search cache may be about other replicas' writes
    # (seconds): the table's version is checked at most this often.
    refresh_seconds: NonNegative = 2.0


class QueueConfig(_Settings):
    """Where exchanges wait for extraction: `sqlite` (a file in the data dir,
    one machine) or a `postgresql://` URL shared by replicas."""

    url: str = "sqlite"


class MemoryConfig(_Settings):
    enabled: bool = True
    # Default `X-Memory-Mode` when a request names none.
    mode: Literal["auto", "read", "write", "off"] = "auto"
    # Default `X-Memory-Record`: what a recorded exchange gives extraction,
    # `exchange` (the user's new turns and the reply) or `user` (the user's
    # turns alone: a coding agent's replies are about its work, not the user).
    record: Literal["exchange", "user"] = "exchange"
    # `record` per API path, e.g. {"/v1/messages": "user"} for coding agents.
    record_by_path: dict[str, Literal["exchange", "user"]] = msgspec.field(default_factory=dict)
    embedder: EmbedderConfig = msgspec.field(default_factory=EmbedderConfig)
    llm: LLMConfig = msgspec.field(default_factory=LLMConfig)
    search: SearchConfig = msgspec.field(default_factory=SearchConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    maintenance: MaintenanceConfig = msgspec.field(default_factory=MaintenanceConfig)
    redaction: RedactionConfig = msgspec.field(default_factory=RedactionConfig)
    injection: InjectionConfig = msgspec.field(default_factory=InjectionConfig)
    # Overrides of the prompts in memory/prompts.py, by name (e.g. `extraction`).
    prompts: dict[str, str] = msgspec.field(default_factory=dict)
