"""The management API against its own OpenAPI schema: generated requests, valid
and invalid, never get a server error.

schemathesis reads `/schema/openapi.json` from a loopback gateway (memory on)
and drives every operation with hypothesis. Derandomized and few examples per
operation, so CI sees the same cases every run and stays within seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings, token_extractor
from tests.upstream import ScriptedUpstream

# Per operation and mode; ~14 operations x 2 modes stay well under 40 s here.
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def gateway(
    upstream_server: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    upstream_server.reset()
    upstream_server.script(token_extractor)
    data: Path = tmp_path_factory.mktemp("schemathesis") / "data"
    server = GatewayServer(
        gateway_config_for(upstream_server.url, data, memory=memory_settings(upstream_server.url)),
        hooks=None,
    ).start()
    yield server
    server.stop()
    upstream_server.reset()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_request_gets_a_server_error(
    gateway: GatewayServer, mode: GenerationMode
) -> None:
    schema = schemathesis.openapi.from_url(gateway.url + "/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10, "the management API's operations are in the schema"
    tried: list[str] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(base_url=gateway.url, checks=[not_a_server_error], timeout=30)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing to make invalid (e.g. GET /users has no parameters).
            assert mode is GenerationMode.NEGATIVE, operation.label
            continue
        tried.append(operation.label)
    assert len(tried) >= len(operations) // 2, tried
