"""One typed configuration, loaded once at start-up and passed down.

`gateway.yaml` (or, without one, the same file packaged as
`gateway/defaults.yaml`) is read, `${VAR}` / `${VAR:-default}` are filled in
from the environment, and the result is validated into `Config`. Anything
wrong is a `ConfigError` whose message names the key, and the environment
variable when the value came from one, e.g.
"server.port: Expected `int`, got `str` (from environment variable GATEWAY_PORT)".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
import yaml

from memory.config import (
    AtLeastOne,
    MemoryConfig,
    NonNegative,
    NonNegativeInt,
    Positive,
    QueueConfig,
    StorageConfig,
)
from memory.errors import InvalidConfig


class ConfigError(InvalidConfig):
    """The configuration cannot be used; the message names the offending key."""


class _Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


class ServerConfig(_Settings):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    # Requests with base64 images are large; above this the gateway answers 413.
    max_body_bytes: AtLeastOne = 32 * 1024 * 1024
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    # One log line per request (uvicorn's access log); off by default, it costs latency.
    access_log: bool = False
    # Gateway processes sharing the listening socket. Python runs one core per
    # process; more than one uses more cores (and memory: each loads the embedder).
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    # Where extraction jobs run (memory on): `inline`, inside each serving
    # process (one process in all); `process`, one extraction process beside
    # the serving ones, at idle CPU priority, so extraction and maintenance
    # never compete with requests for their event loop or a core
    # (docs/benchmarks.md, session 11: ~3.5 ms less p50 at c=1, ~15% more
    # requests/s at c=16, twice the memory).
    extraction: Literal["inline", "process"] = "inline"
    # The extraction process uses only the CPU that serving leaves idle (Linux
    # SCHED_IDLE; gateway/priority.py). Once its oldest waiting job is older
    # than this (sustained full load), it runs at normal priority until it has
    # caught up. 0: always normal priority.
    extraction_max_lag_seconds: NonNegative = 10.0

    @property
    def python_log_level(self) -> str:
        """`log_level` for Python's logging (uvicorn's "trace" is its DEBUG)."""
        return "DEBUG" if self.log_level == "trace" else self.log_level.upper()


class HTTPConfig(_Settings):
    """The shared upstream client. `read_timeout` is the gap allowed between
    two chunks of a stream (and until the first token), not a whole-request limit."""

    connect_timeout: Positive = 10.0
    read_timeout: Positive = 600.0
    write_timeout: Positive = 60.0
    pool_timeout: Positive = 10.0
    max_connections: AtLeastOne = 512
    max_keepalive_connections: NonNegativeInt = 128
    # The connection layer under the httpx client (gateway/transport.py).
    transport: Literal["aiohttp", "httpx"] = "aiohttp"


class UpstreamConfig(_Settings):
    name: str
    base_url: str
    # When set, replaces whatever key the client sent (the client's key never
    # reaches this upstream). When empty, the client's Authorization passes through.
    api_key: str | None = None
    # Model names (exact or glob: `gpt-*`) routed here. The default upstream
    # takes every model no other upstream claims.
    models: list[str] = msgspec.field(default_factory=list)
    default: bool = False
    # The API it speaks: `openai` (chat completions, responses and the rest of
    # /v1/) or `anthropic` (/v1/messages; base_url ends in /v1 as well, e.g.
    # https://api.anthropic.com/v1). /v1/messages goes only to `anthropic` ones.
    api: Literal["openai", "anthropic"] = "openai"


class UserKey(_Settings):
    """A bearer key issued by the gateway: it names a user, optionally with the
    upstream key to use on their behalf."""

    key: str
    user_id: str
    upstream_api_key: str | None = None


class AuthConfig(_Settings):
    # With `require_key`, a request whose bearer key is not a gateway key gets 401.
    require_key: bool = False
    # Protects the management API; when empty only loopback clients may use it.
    admin_key: str | None = None
    keys: list[UserKey] = msgspec.field(default_factory=list)
    # Encrypts the upstream keys of keys issued through `POST /v1/keys`
    # (gateway/key_store.py); from the environment, never stored with them.
    keys_secret: str | None = None


class MetricsConfig(_Settings):
    """Prometheus metrics at `/metrics` (docs/operations.md)."""

    enabled: bool = True
    # A bearer key that may read /metrics and nothing else (Prometheus'
    # `authorization: credentials`), besides the admin key and local clients.
    key: str | None = None


# An HTTP header name (RFC 9110 token characters).
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class IdentityConfig(_Settings):
    # The header(s) naming the user when no gateway key does, tried in order:
    # one name, a list, or names separated by commas (for an environment
    # variable), e.g. [X-OpenWebUI-User-Id, X-User-Id].
    user_header: str | list[str] = "X-User-Id"
    agent_header: str = "X-Agent-Id"
    session_header: str = "X-Session-Id"
    # Read the user from the chat body's `user` field when no key or header names one.
    body_user_field: bool = True

    def __post_init__(self) -> None:
        if not self.user_headers:
            raise ValueError("user_header: name at least one header")
        fields = {
            "user_header": self.user_headers,
            "agent_header": [self.agent_header],
            "session_header": [self.session_header],
        }
        for field_name, names in fields.items():
            for name in names:
                if not _HEADER_NAME.fullmatch(name):
                    raise ValueError(f"{field_name}: {name!r} is not an HTTP header name")

    @property
    def user_headers(self) -> list[str]:
        """`user_header` as the list of names it gives, in order."""
        given = [self.user_header] if isinstance(self.user_header, str) else self.user_header
        return [name.strip() for item in given for name in item.split(",") if name.strip()]


@dataclass(frozen=True, slots=True)
class ExtractionEndpoint:
    """Where the extraction model is called, and which key may go there."""

    # Without a trailing slash.
    base_url: str
    # The configured upstream at that base_url, when chat requests go there too.
    upstream: str | None
    # The key configured for this endpoint (never a user's key; never in a repr).
    api_key: str | None = field(repr=False)
    # Where the key comes from, for the start-up summary and stats (no secret).
    key_source: str


class Config(_Settings):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    http: HTTPConfig = msgspec.field(default_factory=HTTPConfig)
    upstreams: list[UpstreamConfig] = msgspec.field(
        default_factory=lambda: [
            UpstreamConfig(name="openai", base_url="https://api.openai.com/v1", default=True)
        ]
    )
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    identity: IdentityConfig = msgspec.field(default_factory=IdentityConfig)
    data_dir: str = "./memory-gateway-data"
    # Shared by replicas (docs/scaling.md): the memory tables and the extraction queue.
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    memory: MemoryConfig = msgspec.field(default_factory=MemoryConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("at least one upstream is required - at `$.upstreams`")
        defaults = [u for u in self.upstreams if u.default]
        if len(defaults) > 1:
            raise ValueError("only one upstream may be the default - at `$.upstreams`")
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstream names must be unique - at `$.upstreams`")
        for i, u in enumerate(self.upstreams):
            if not u.base_url.startswith(("http://", "https://")):
                raise ValueError(
                    f"base_url of upstream {u.name!r} must start with http:// or https://"
                    f" - at `$.upstreams[{i}].base_url`"
                )
            if "@" in u.base_url.split("//", 1)[1].split("/", 1)[0]:
                # The upstream client cannot send both, and a URL is logged and shown.
                raise ValueError(
                    f"base_url of upstream {u.name!r} must not hold credentials (user:password@):"
                    f" put the key in its api_key - at `$.upstreams[{i}].base_url`"
                )
        if self.queue.url != "sqlite" and not self.queue.url.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("must be `sqlite` or a postgresql:// URL - at `$.queue.url`")
        if self.queue.url != "sqlite":
            try:
                _ = urlsplit(self.queue.url).port
            except ValueError as exc:
                # A URL that cannot work must stop the start, not be retried as an outage.
                raise ValueError(f"{exc} - at `$.queue.url`") from None
        if len({k.key for k in self.auth.keys}) != len(self.auth.keys):
            raise ValueError("gateway keys must be unique - at `$.auth.keys`")

    @property
    def extraction_process(self) -> bool:
        """Whether `serve` runs an extraction process beside the serving ones."""
        return self.memory.enabled and self.server.extraction == "process"

    @property
    def processes(self) -> int:
        """Processes `serve` runs under its supervisor (1: none, one process)."""
        return self.server.workers + (1 if self.extraction_process else 0)

    @property
    def log_format(self) -> str:
        if self.processes > 1:
            return "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        return "%(asctime)s %(levelname)s %(name)s: %(message)s"

    @property
    def default_upstream(self) -> UpstreamConfig:
        for u in self.upstreams:
            if u.default:
                return u
        return self.upstreams[0]

    @property
    def extraction(self) -> ExtractionEndpoint:
        """The extraction endpoint: `memory.llm.base_url`, else the default
        upstream. A key is only ever sent to the endpoint it was configured
        or sent for: `memory.llm.api_key`, else the key configured on the
        upstream at that address; without either, a user's own key, and
        only from a request of theirs to that same upstream."""
        llm = self.memory.llm
        base_url = (llm.base_url or self.default_upstream.base_url).rstrip("/")
        upstream = next((u for u in self.upstreams if u.base_url.rstrip("/") == base_url), None)
        name = upstream.name if upstream is not None else None
        if llm.api_key:
            return ExtractionEndpoint(base_url, name, llm.api_key, "memory.llm.api_key")
        if upstream is not None and upstream.api_key:
            return ExtractionEndpoint(
                base_url, name, upstream.api_key, f"the api_key of upstream {name!r}"
            )
        if upstream is not None:
            return ExtractionEndpoint(
                base_url, name, None, f"each user's own key on their requests to upstream {name!r}"
            )
        return ExtractionEndpoint(
            base_url,
            None,
            None,
            "none (memory.llm.api_key is not set): only a keyless endpoint works",
        )

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# The environment variables that filled each value, by key ("server.port").
Sources = dict[str, list[str]]


def interpolate(
    value: Any, env: Mapping[str, str], path: str = "$", *, sources: Sources | None = None
) -> Any:
    """Fill `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree.

    `sources` learns which variables filled which key, so that a value the
    configuration rejects can be traced to the variable that set it."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}", sources=sources) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]", sources=sources) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    key = path[2:] or path
    used: list[str] = []

    def replace(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and (env[name] != "" or default is None):
            used.append(name)
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{key}: environment variable {name} is not set")

    whole = _VAR.fullmatch(value)
    result = _VAR.sub(replace, value)
    if used and sources is not None:
        sources[key] = used
    # A value that was only `${VAR:-}` and came out empty means "unset".
    if whole and result == "":
        return None
    return result


def _describe(message: str, sources: Sources) -> str:
    """Turn msgspec's "... - at `$.server.port`" into "server.port: ...", and
    name the environment variable the value came from, if any.

    A struct's own cross-field check names its field as "field: ..." (msgspec
    only knows the struct's path), which joins that path."""
    m = re.search(r"^(.*) - at `\$\.?(.*)`$", message)
    text, where = m.groups() if m else (message, "")
    own = re.fullmatch(r"([a-z_]+): (.*)", text)
    if m and own:
        where = f"{where}.{own[1]}" if where else own[1]
        text = own[2]
    names = sources.get(where)
    if names:
        plural = "s" if len(names) > 1 else ""
        text += f" (from environment variable{plural} {', '.join(names)})"
    return f"{where}: {text}" if where else text


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, interpolate and validate the configuration.

    Without `path`, the built-in defaults: `gateway.yaml` as packaged
    (`gateway/defaults.yaml`), so its `${VAR}`s read the environment as the
    repository's file does. `overrides` are dotted keys from the command line
    (`server.port`, `data_dir`, `upstream`), applied after the file.
    """
    env = os.environ if env is None else env
    loaded = _read(path) if path is not None else _read_defaults()
    sources: Sources = {}
    raw = interpolate(loaded, env, sources=sources)
    raw, replaced = _apply_overrides(raw, overrides or {})
    for key in replaced:
        sources.pop(key, None)
    try:
        return msgspec.convert(raw, Config, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(_describe(str(exc), sources)) from None


def _read(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return _parse(text, str(path))


def _read_defaults() -> dict[str, Any]:
    text = resources.files("gateway").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return _parse(text, "the built-in defaults")


def _parse(text: str, name: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name} is not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{name} must contain a mapping at the top level")
    return loaded


def _apply_overrides(
    raw: dict[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """`raw` with the command line's values in, and the keys they replaced."""
    raw = dict(raw)
    replaced: list[str] = []
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "upstream":
            replaced.append(_override_default_upstream(raw, value))
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[leaf] = value
        replaced.append(key)
    return raw, replaced


def _override_default_upstream(raw: dict[str, Any], base_url: str) -> str:
    """`--upstream`: the default upstream's base_url (one is made if none is
    configured); the key it replaced."""
    upstreams = [dict(u) for u in raw.get("upstreams") or []]
    raw["upstreams"] = upstreams
    index = next((i for i, u in enumerate(upstreams) if u.get("default")), 0)
    if not upstreams:
        upstreams.append({"name": "default", "base_url": base_url, "default": True})
    else:
        upstreams[index]["base_url"] = base_url
    return f"upstreams[{index}].base_url"
