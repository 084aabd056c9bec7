"""Which upstream serves a model: exact name first, then globs in file order, else the default."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config import Config, UpstreamConfig


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    # base_url without its trailing slash: the client's path after /v1 is appended.
    base_url: str
    api_key: str | None


def _upstream(u: UpstreamConfig) -> Upstream:
    return Upstream(name=u.name, base_url=u.base_url.rstrip("/"), api_key=u.api_key)


class Router:
    _CACHE_LIMIT = 4096

    def __init__(self, config: Config) -> None:
        self.default = _upstream(config.default_upstream)
        self._exact: dict[str, Upstream] = {}
        self._globs: list[tuple[str, Upstream]] = []
        for conf in config.upstreams:
            upstream = self.default if conf.name == self.default.name else _upstream(conf)
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
