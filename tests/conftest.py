"""Shared fixtures: a scripted upstream, the real gateway over loopback, SDK clients.

Both servers run under uvicorn in background threads (their own event loops),
so tests talk to them over real HTTP - streaming and disconnects included -
and can still inspect the upstream's records and the hooks' calls directly.

The gateway itself (`GatewayServer`, `gateway_config_for`) lives in
tests/gateway_server.py, importable from any test module.

Reuse from other test packages:
    gw = start_gateway(config, hooks=MyHooks())   # custom config and hooks
    upstream.script(lambda req: JSONReply(...))   # answer extraction calls
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.config import Config
from gateway.hooks import ChatHooks
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
from tests.s3 import s3_prefix, s3_server  # noqa: F401 (fixtures)
from tests.upstream import ScriptedUpstream, ServerThread


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[ScriptedUpstream]:
    app = ScriptedUpstream()
    server = ServerThread(app).start()
    app.url = server.url + "/v1"
    yield app
    server.stop()


@pytest.fixture
def upstream(upstream_server: ScriptedUpstream) -> Iterator[ScriptedUpstream]:
    """The session's upstream, with empty records and no scripts."""
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()


@pytest.fixture
def gateway_config(upstream: ScriptedUpstream, tmp_path: Path) -> Config:
    return gateway_config_for(upstream.url, tmp_path / "data")


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., GatewayServer]]:
    """Start a gateway with a given Config and hooks; stopped after the test."""
    started: list[GatewayServer] = []

    def start(config: Config, hooks: ChatHooks | None = None) -> GatewayServer:
        server = GatewayServer(config, hooks).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayServer], gateway_config: Config) -> GatewayServer:
    return start_gateway(gateway_config)


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[openai.OpenAI]:
    with gateway.client() as sdk:
        yield sdk


@pytest.fixture
def direct_client(upstream: ScriptedUpstream) -> Iterator[openai.OpenAI]:
    """The same SDK pointed straight at the upstream: what the gateway must be invisible against."""
    with openai.OpenAI(
        base_url=upstream.url, api_key="sk-client", max_retries=0, timeout=30
    ) as sdk:
        yield sdk


@pytest.fixture
def http(gateway: GatewayServer) -> Iterator[httpx.Client]:
    """A raw HTTP client on the gateway, for byte-level checks."""
    with httpx.Client(base_url=gateway.url, timeout=30) as raw:
        yield raw
