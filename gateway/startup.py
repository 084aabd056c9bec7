"""What `memory-gateway serve` says when it starts: one block naming the
configuration in effect, and warnings about settings that expose it.

A new user's first questions are "which file did it read, where does it
listen, where do my requests and my memories go, and who may use it"; the
block answers them without a secret (no key, no credentials in a URL).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from pathlib import Path

from gateway.config import Config, UpstreamConfig
from memory.redaction import public_url

logger = logging.getLogger("gateway.startup")

# memory/extraction.py's DEFAULT_MODEL, without importing the extractor here.
AUTO_MODEL = "auto: gpt-4o-mini unless the endpoint serves exactly one other model"


def log_startup(config: Config, source: Path | None) -> None:
    """Log the summary (INFO) and what is risky about this configuration."""
    logger.info("%s", describe(config, source))
    for level, text in notices(config):
        logger.log(level, "%s", text)


def describe(config: Config, source: Path | None) -> str:
    """The start-up summary: one line per concern, never a secret."""
    lines = [
        "memory-gateway starting",
        f"config: {source.absolute() if source is not None else 'built-in defaults'}",
        f"listening on: http://{address(config.server.host, config.server.port)}",
        *(f"upstream {_upstream(config, u)}" for u in config.upstreams),
        f"data dir: {config.data_path.absolute()}",
        *_storage(config),
        *_queue(config),
        *_memory(config),
        f"auth: {_auth(config)}",
        f"processes: {_processes(config)}",
    ]
    return "\n  ".join(lines)


def notices(config: Config) -> list[tuple[int, str]]:
    """(level, text) for each way this configuration exposes the gateway."""
    host = config.server.host
    if is_loopback(host):
        return []
    found = []
    keyed = [u.name for u in config.upstreams if u.api_key]
    if keyed and not config.auth.require_key:
        found.append(
            (
                logging.WARNING,
                f"open relay: listening on {host} (reachable from other machines) with the"
                f" api_key of upstream {', '.join(map(repr, keyed))} configured and"
                " auth.require_key false, so"
                f" anyone who can reach port {config.server.port} spends that key. Set"
                " auth.require_key: true with per-user keys (auth.keys), bind 127.0.0.1,"
                " or put an authenticating proxy in front.",
            )
        )
    if not config.auth.admin_key:
        found.append(
            (
                logging.INFO,
                "no admin key: the management API (/v1/memories) answers local clients"
                " only (loopback, addressed as localhost, through no proxy); to use it from"
                " outside this machine (e.g. from the Docker host) or behind a reverse proxy,"
                " set GATEWAY_ADMIN_KEY (auth.admin_key).",
            )
        )
    return found


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """One line saying why the port could not be bound, and what to do."""
    hint = {
        errno.EADDRINUSE: "address already in use (another gateway?"
        " choose another with --port or GATEWAY_PORT)",
        errno.EACCES: "permission denied (ports below 1024 need privileges;"
        " choose another with --port or GATEWAY_PORT)",
        errno.EADDRNOTAVAIL: "address not available (server.host must be an address"
        " of this machine, 0.0.0.0 or ::)",
    }.get(exc.errno or 0)
    reason = hint or (exc.strerror or str(exc)).lower()
    return f"cannot listen on {address(host, port)}: {reason}"


def _upstream(config: Config, u: UpstreamConfig) -> str:
    default = u is config.default_upstream
    anthropic = [x for x in config.upstreams if x.api == "anthropic"]
    # Where /v1/messages goes when no anthropic upstream claims the model
    # (gateway/routing.py): the default upstream if it is one, else the first.
    messages_default = None
    if anthropic:
        first = config.default_upstream
        messages_default = first if first.api == "anthropic" else anthropic[0]
    models = ", ".join(u.models)
    if default:
        models = f"{models} + every model no other upstream claims" if models else "every model"
    elif u is messages_default:
        every = "every /v1/messages model no other anthropic upstream claims"
        models = f"{models} + {every}" if models else every
    elif not models:
        models = "none (it gets no requests)"
    key = (
        "configured (replaces the client's key)"
        if u.api_key
        else "none (the client's own key is passed through)"
    )
    role = " (default)" if default else ""
    if u.api == "anthropic":
        role += " (api: anthropic)"
    return f"{u.name}{role}: {public_url(u.base_url)}; models: {models}; api_key: {key}"


def _memory(config: Config) -> list[str]:
    memory = config.memory
    if not memory.enabled:
        return ["memory: off (a plain proxy: nothing is searched, injected or extracted)"]
    embedder = f"{memory.embedder.provider} {memory.embedder.model}"
    if memory.embedder.provider == "openai":
        base_url = memory.embedder.base_url or config.default_upstream.base_url
        key = "configured" if memory.embedder.api_key else "none"
        embedder += f" at {public_url(base_url)}; api_key: {key}"
    endpoint = config.extraction
    at = public_url(endpoint.base_url)
    if endpoint.upstream is not None:
        at += f" (upstream {endpoint.upstream!r})"
    return [
        f"memory: on (mode {memory.mode})",
        f"embedder: {embedder}",
        f"extraction model: {memory.llm.model or AUTO_MODEL}",
        f"extraction endpoint: {at}; key: {endpoint.key_source}",
    ]


def _storage(config: Config) -> list[str]:
    """Where the memory tables are, when not in the data dir: the URI without
    credentials or query; the options (keys) are never shown, only named."""
    storage = config.storage
    if not config.memory.enabled or storage.uri is None:
        return []
    options = ", ".join(sorted(storage.options)) or "none"
    return [
        f"memory tables: {public_url(storage.uri)} (shared; checked for other replicas'"
        f" writes every {storage.refresh_seconds:g} s); options set: {options}"
    ]


def _queue(config: Config) -> list[str]:
    """Where exchanges wait for extraction (and issued keys live), when not
    in the data dir: the URL without user info or query."""
    url = config.queue.url
    if url == "sqlite":
        return []
    return [f"extraction queue and issued keys: {public_url(url)} (shared by replicas)"]


def _auth(config: Config) -> str:
    auth = config.auth
    require = "on" if auth.require_key else "off (requests without a gateway key are served)"
    admin = "set" if auth.admin_key else "not set (the management API answers local clients only)"
    return f"require_key {require}; {len(auth.keys)} per-user key(s); admin key {admin}"


def _processes(config: Config) -> str:
    workers = config.server.workers
    text = f"{workers} worker{'s' if workers > 1 else ''}"
    if config.memory.enabled:
        text += f"; extraction {config.server.extraction}"
    return text
