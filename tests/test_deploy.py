"""deploy/compose.yaml and the Dockerfile stay in step with the gateway: no
Docker engine runs here, so what can drift is checked as text."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
GATEWAYS = {name: s for name, s in COMPOSE["services"].items() if name.startswith("gateway-")}


def test_three_replicas_share_one_store_and_one_queue():
    assert len(GATEWAYS) == 3
    envs = [s["environment"] for s in GATEWAYS.values()]
    assert all(env == envs[0] for env in envs)
    assert envs[0]["GATEWAY_STORAGE_URI"].startswith("s3://")
    assert envs[0]["GATEWAY_QUEUE_URL"].startswith("postgresql://")


def test_every_variable_the_replicas_set_is_one_gateway_yaml_or_lancedb_reads():
    read = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "gateway.yaml").read_text()))
    env = next(iter(GATEWAYS.values()))["environment"]
    unknown = {name for name in env if name not in read and not name.startswith("AWS_")}
    assert unknown == set()


def test_the_image_is_built_with_an_extra_that_exists():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for service in GATEWAYS.values():
        wanted = service["build"]["args"]["EXTRAS"].split(",")
        assert set(wanted) <= set(extras)
    assert 'ARG EXTRAS=""' in (ROOT / "Dockerfile").read_text()


def test_the_balancer_sends_to_every_replica():
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = set(re.findall(r"server (gateway-\d+):8080;", nginx))
    assert servers == set(GATEWAYS)
    bucket = COMPOSE["services"]["bucket"]["entrypoint"][-1]
    uri = next(iter(GATEWAYS.values()))["environment"]["GATEWAY_STORAGE_URI"]
    assert f"local/{uri.removeprefix('s3://').split('/')[0]}" in bucket
