"""The real gateway on loopback for tests, and the config it starts from.

`GatewayServer` runs the app under uvicorn in a background thread (its own
event loop), so tests talk to it over real HTTP and can still inspect the
hooks' calls directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import openai

from gateway.app import create_app
from gateway.config import Config
from gateway.hooks import ChatHooks
from tests.upstream import ServerThread


class GatewayServer:
    def __init__(self, config: Config, hooks: ChatHooks | None) -> None:
        self.config = config
        self.app = create_app(config, hooks=hooks)
        self._server = ServerThread(self.app, uvloop=True)

    def start(self) -> GatewayServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def base_url(self) -> str:
        return self._server.url + "/v1"

    def client(self, api_key: str = "sk-client", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **kwargs
        )


def gateway_config_for(
    upstream_url: str, data_dir: Path, *, memory: dict[str, Any] | None = None, **overrides: Any
) -> Config:
    """A Config whose default upstream is `upstream_url`; `overrides` are top-level sections.

    Without a `memory` section the memory engine is off: a plain proxy. Pass
    `memory={...}` (enabled unless it says otherwise) to test with memory.
    Retrieval's deadline is 10 s unless `memory` sets one: on a loaded CI
    machine a first search can take longer than the default 250 ms, and a
    test about what memory does must not turn on how busy the machine is.
    """
    if memory is not None:
        injection = {"deadline_ms": 10_000, **memory.get("injection", {})}
        memory = {**memory, "injection": injection}
    raw: dict[str, Any] = {
        "upstreams": [{"name": "scripted", "base_url": upstream_url, "default": True}],
        "data_dir": str(data_dir),
        "memory": {"enabled": False} if memory is None else memory,
    }
    raw.update(overrides)
    return msgspec.convert(raw, Config)
