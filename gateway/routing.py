"""Which upstream serves a model: exact name first, then globs in file order, else the default."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from gateway.config import Config, UpstreamConfig
from gateway.errors import GatewayError

Api = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    # base_url without its trailing slash: the client's path after /v1 is appended.
    base_url: str
    api_key: str | None
    api: Api = "openai"


def _upstream(u: UpstreamConfig) -> Upstream:
    return Upstream(name=u.name, base_url=u.base_url.rstrip("/"), api_key=u.api_key, api=u.api)


class _Table:
    """Model names to upstreams, among the upstreams one API may go to."""

    _CACHE_LIMIT = 4096

    def __init__(self, upstreams: list[Upstream], confs: list[UpstreamConfig], default: Upstream):
        self.default = default
        self._exact: dict[str, Upstream] = {}
        self._globs: list[tuple[str, Upstream]] = []
        for upstream, conf in zip(upstreams, confs, strict=True):
            for pattern in conf.models:
                if any(ch in pattern for ch in "*?["):
                    self._globs.append((pattern, upstream))
                else:
                    self._exact.setdefault(pattern, upstream)
        self._cache: dict[str, Upstream] = {}

    def pick(self, model: object) -> Upstream:
        if not isinstance(model, str):
            return self.default
        hit = self._cache.get(model)
        if hit is not None:
            return hit
        upstream = self._exact.get(model)
        if upstream is None:
            upstream = next(
                (u for pattern, u in self._globs if fnmatchcase(model, pattern)), self.default
            )
        if len(self._cache) < self._CACHE_LIMIT:
            self._cache[model] = upstream
        return upstream


class Router:
    """OpenAI paths may go to any upstream (the default takes unclaimed
    models); /v1/messages only to `api: anthropic` ones (the default one if it
    is one, else the first)."""

    def __init__(self, config: Config) -> None:
        confs = list(config.upstreams)
        default_conf = config.default_upstream
        upstreams = [_upstream(c) for c in confs]
        self.default = upstreams[confs.index(default_conf)]
        self._tables: dict[str, _Table] = {"openai": _Table(upstreams, confs, self.default)}
        anthropic = [(u, c) for u, c in zip(upstreams, confs, strict=True) if u.api == "anthropic"]
        if anthropic:
            first = self.default if self.default.api == "anthropic" else anthropic[0][0]
            self._tables["anthropic"] = _Table(
                [u for u, _ in anthropic], [c for _, c in anthropic], first
            )

    def pick(self, model: object, api: Api = "openai") -> Upstream:
        table = self._tables.get(api)
        if table is None:
            raise GatewayError(
                404,
                f"no upstream speaks the {api} API: add one with `api: {api}` to"
                " `upstreams` in gateway.yaml",
                code="no_upstream",
                retryable=False,
            )
        return table.pick(model)
