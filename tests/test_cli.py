"""The command line. `memory-gateway serve` as a subprocess: a bad config exits
2 with one line, a port it cannot listen on exits 1 with one line, a good
config serves (from the environment alone, without a file) and says at start
what it runs with, never a secret; `memory-gateway health` asks it /health."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.cli import config_from_args, parse_args
from gateway.config import Config, load_config
from gateway.startup import AUTO_MODEL, describe, log_startup, notices
from memory.extraction import DEFAULT_MODEL
from tests.upstream import ScriptedUpstream

ROOT = Path(__file__).resolve().parent.parent
# What gateway.yaml reads from the environment: a subprocess gets none of it
# from the test run, only what its test gives it.
CONFIG_VARIABLES = ("GATEWAY_", "OPENAI_", "MEMORY_LLM_", "EMBEDDINGS_")


def _environment(**values: str) -> dict[str, str]:
    """This process's environment without the configuration's variables, plus `values`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(CONFIG_VARIABLES)}
    return {**kept, **values}


def _run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env=_environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("server:\n  port: eighty\n", "server.port"),
        ("sever:\n  port: 80\n", "sever"),
        ("upstreams: []\n", "upstreams"),
        ("memory:\n  search:\n    limit: many\n", "memory.search.limit"),
    ],
)
def test_a_wrong_config_is_one_line_naming_the_key_and_exit_2(tmp_path, text, named):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    result = _run(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]


def test_without_config_the_gateway_yaml_in_the_current_directory_is_used(tmp_path):
    (tmp_path / "gateway.yaml").write_text("server:\n  log_level: chatty\n")
    result = _run(["serve"], tmp_path)
    assert result.returncode == 2
    assert "server.log_level" in result.stderr


def test_bad_flags_are_config_errors_too(tmp_path):
    result = _run(["serve", "--port", "70000"], tmp_path)
    assert result.returncode == 2
    assert "server.port" in result.stderr
    result = _run(["serve", "--upstream", "localhost:11434"], tmp_path)
    assert result.returncode == 2
    assert "upstreams" in result.stderr


def test_a_missing_config_file_is_exit_2(tmp_path):
    result = _run(["serve", "--config", str(tmp_path / "nope.yaml")], tmp_path)
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_ready(base: str, process: subprocess.Popen[str], output: Any) -> None:
    """Until `base` answers /ready (the memory engine is open), or fail with `output()`."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(base + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, output()
        assert time.monotonic() < deadline, "the gateway did not become ready"
        time.sleep(0.1)


def test_serve_with_built_in_defaults_and_flags(tmp_path, upstream):
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--port",
            str(port),
            "--upstream",
            upstream.url,
            "--data",
            str(tmp_path / "data"),
        ],
        cwd=tmp_path,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_until_ready(base, process, lambda: process.stdout.read())
        response = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "ping"}]},
            headers={"authorization": "Bearer sk-secret-key-123"},
            timeout=30,
        )
        assert response.json()["choices"][0]["message"]["content"] == "echo: ping"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status.
    assert process.returncode in (0, -15)
    assert "Application shutdown complete" in output
    assert "sk-secret-key-123" not in output


@pytest.mark.parametrize(("workers", "extraction"), [(1, "inline"), (1, "process"), (2, "process")])
def test_log_lines_use_the_gateway_format_and_level(tmp_path, workers, extraction):
    """Litestar configures logging when the app starts; it must keep our format
    (with the process id when there are several) and `server.log_level`."""
    port = _free_port()
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"server: {{port: {port}, log_level: warning, workers: {workers},"
        f" extraction: {extraction}}}\n"
        f"upstreams: [{{name: u, base_url: '{dead}', default: true}}]\n"
        f"data_dir: {str(tmp_path / 'data')!r}\n"
        f"memory: {{embedder: {{provider: openai, base_url: '{dead}'}}}}\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        lines = []
        # The embedder is unreachable: one ERROR at start, then WARNINGs while
        # retrying, in each process.
        expected = ["memory is unavailable, serving", "memory still unavailable"]
        if extraction == "process":
            expected.append("extraction waits and retries")
        while not all(any(e in line for line in lines) for e in expected):
            assert time.monotonic() < deadline, "".join(lines)
            lines.append(process.stdout.readline())
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=60)
    output = "".join(lines) + rest
    error = next(line for line in lines if "memory is unavailable, serving" in line)
    assert " ERROR " in error and "gateway.memory:" in error
    if workers > 1 or extraction == "process":
        assert re.search(r" ERROR \[\d+\] gateway\.memory: ", error), error
    else:
        assert not re.search(r"\[\d+\]", error), error
    if extraction == "process":
        waiting = next(line for line in lines if "extraction waits and retries" in line)
        assert re.search(r" ERROR \[\d+\] gateway\.extraction: ", waiting), waiting
    assert " INFO " not in output  # log_level: warning


# --- serve from the environment alone -----------------------------------------------


@dataclass
class EnvGateway:
    """`serve` started in an empty directory with the environment as its only configuration."""

    port: int
    data_dir: Path
    admin_key: str
    cwd: Path
    env: dict[str, str]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def env_gateway(
    upstream_server: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvGateway]:
    root = tmp_path_factory.mktemp("env-only")
    cwd = root / "empty"
    cwd.mkdir()
    gateway = EnvGateway(
        port=_free_port(),
        data_dir=root / "data",
        admin_key="admin-key-from-the-environment",
        cwd=cwd,
        env={},
        log=root / "gateway.log",
    )
    gateway.env = _environment(
        GATEWAY_PORT=str(gateway.port),
        GATEWAY_DATA_DIR=str(gateway.data_dir),
        GATEWAY_ADMIN_KEY=gateway.admin_key,
        OPENAI_BASE_URL=upstream_server.url,
    )
    with gateway.log.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve"],
            cwd=cwd,
            env=gateway.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_ready(gateway.base, process, gateway.log.read_text)
        yield gateway
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_without_a_config_file_serve_is_configured_by_the_environment(env_gateway):
    assert httpx.get(env_gateway.base + "/health", timeout=5).status_code == 200
    assert (env_gateway.data_dir / "spool.sqlite3").is_file()
    assert list(env_gateway.cwd.iterdir()) == []
    response = httpx.post(
        env_gateway.base + "/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "ping"}]},
        timeout=30,
    )
    assert response.json()["choices"][0]["message"]["content"] == "echo: ping"


def test_the_admin_key_from_the_environment_guards_the_management_api(env_gateway):
    stats = env_gateway.base + "/v1/memories/stats"
    assert httpx.get(stats, timeout=10).status_code == 401
    authorized = {"Authorization": f"Bearer {env_gateway.admin_key}"}
    assert httpx.get(stats, headers=authorized, timeout=10).status_code == 200


def test_serve_logs_one_start_up_summary_without_the_admin_key(env_gateway):
    log = env_gateway.log.read_text()
    assert log.count("memory-gateway starting") == 1
    assert " INFO gateway.startup: memory-gateway starting" in log
    assert "config: built-in defaults" in log
    assert f"listening on: http://127.0.0.1:{env_gateway.port}" in log
    assert f"data dir: {env_gateway.data_dir}" in log
    assert env_gateway.admin_key not in log


def test_health_finds_the_gateway_the_way_serve_does(env_gateway):
    result = _run(["health"], env_gateway.cwd, env_gateway.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"memory-gateway: healthy: http://127.0.0.1:{env_gateway.port}/health"
    )


def test_health_goes_straight_to_the_gateway_whatever_proxy_is_set(env_gateway):
    # A container's proxy would not reach the gateway's loopback port.
    env = {
        **env_gateway.env,
        "HTTP_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    result = _run(["health"], env_gateway.cwd, env)
    assert result.returncode == 0, result.stderr


def test_health_of_a_gateway_that_is_not_there_is_exit_1_with_one_line(tmp_path):
    port = _free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(f"server: {{host: 0.0.0.0, port: {port}}}\n")
    result = _run(["health", "--config", str(config)], tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"memory-gateway: not healthy: http://127.0.0.1:{port}/health: connection refused"
    ]


def test_health_with_a_broken_config_is_exit_1_not_2(tmp_path):
    """A Docker HEALTHCHECK reserves exit status 2."""
    result = _run(["health"], tmp_path, _environment(GATEWAY_PORT="abc"))
    assert result.returncode == 1
    assert "GATEWAY_PORT" in result.stderr


# --- what serve refuses, in one line --------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, workers):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = _run(
            ["serve", "--port", str(port), "--workers", str(workers), "--data", str(tmp_path)],
            tmp_path,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"memory-gateway: cannot listen on 127.0.0.1:{port}: address already in use"
        " (another gateway? choose another with --port or GATEWAY_PORT)"
    ]


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path):
    (tmp_path / "data").write_text("")
    result = _run(["serve", "--data", str(tmp_path / "data")], tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"memory-gateway: configuration error: data_dir: {str(tmp_path / 'data')!r}"
        " is a file, not a directory"
    ]


def test_a_bad_value_in_the_environment_names_the_variable(tmp_path):
    result = _run(["serve"], tmp_path, _environment(GATEWAY_PORT="abc"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "memory-gateway: configuration error: server.port: Expected `int`, got `str`"
        " (from environment variable GATEWAY_PORT)"
    ]


def test_extraction_flags_set_the_model_and_its_endpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEMORY_LLM_MODEL", "from-the-environment")
    monkeypatch.delenv("MEMORY_LLM_BASE_URL", raising=False)
    args = parse_args(
        [
            "serve",
            "--extraction-model",
            "qwen2.5:7b",
            "--extraction-url",
            "http://127.0.0.1:11434/v1",
        ]
    )
    config = config_from_args(args)
    assert config.memory.llm.model == "qwen2.5:7b"
    assert config.memory.llm.base_url == "http://127.0.0.1:11434/v1"
    assert config.extraction.base_url == "http://127.0.0.1:11434/v1"


# --- the start-up summary ----------------------------------------------------------


def _config(env: dict[str, str] | None = None, **overrides: Any) -> Config:
    """The built-in defaults with `env` and dotted-key `overrides` (`server.host`)."""
    return load_config(None, env=env or {}, overrides=overrides)


def _lines(config: Config, source: Path | None = None) -> list[str]:
    return [line.strip() for line in describe(config, source).splitlines()]


def test_the_summary_says_what_the_gateway_runs_with(tmp_path):
    config = _config(
        {"GATEWAY_DATA_DIR": "relative-data", "GATEWAY_ADMIN_KEY": "k"},
        **{"server.port": 9000, "server.workers": 2, "server.extraction": "process"},
    )
    assert _lines(config) == [
        "memory-gateway starting",
        "config: built-in defaults",
        "listening on: http://127.0.0.1:9000",
        "upstream openai (default): https://api.openai.com/v1; models: every model;"
        " api_key: none (the client's own key is passed through)",
        f"data dir: {Path('relative-data').absolute()}",
        "memory: on (mode auto)",
        "embedder: local use-multilingual-v3",
        f"extraction model: {AUTO_MODEL}",
        "extraction endpoint: https://api.openai.com/v1 (upstream 'openai');"
        " key: each user's own key on their requests to upstream 'openai'",
        "auth: require_key off (requests without a gateway key are served);"
        " 0 per-user key(s); admin key set",
        "processes: 2 workers; extraction process",
    ]


def test_the_summary_names_the_config_file_by_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert f"config: {tmp_path / 'gateway.yaml'}" in _lines(_config(), Path("gateway.yaml"))


def test_the_auto_extraction_model_is_the_extractors_default():
    assert f"auto: {DEFAULT_MODEL} unless" in AUTO_MODEL


def test_the_summary_names_a_configured_extraction_model_and_an_openai_embedder():
    config = _config(
        {"MEMORY_LLM_MODEL": "qwen2.5:7b", "MEMORY_LLM_BASE_URL": "http://127.0.0.1:11434/v1"},
        **{"memory.embedder.provider": "openai", "memory.embedder.model": "bge-m3"},
    )
    lines = _lines(config)
    assert "extraction model: qwen2.5:7b" in lines
    assert (
        "extraction endpoint: http://127.0.0.1:11434/v1;"
        " key: none (memory.llm.api_key is not set): only a keyless endpoint works"
    ) in lines
    assert "embedder: openai bge-m3 at https://api.openai.com/v1; api_key: none" in lines


def test_with_memory_off_the_summary_says_it_is_a_plain_proxy():
    lines = _lines(_config(**{"memory.enabled": False}))
    assert "memory: off (a plain proxy: nothing is searched, injected or extracted)" in lines
    assert not [line for line in lines if line.startswith(("embedder", "extraction"))]
    assert "processes: 1 worker" in lines


SECRETS = {
    "OPENAI_API_KEY": "sk-upstream-secret",
    "GATEWAY_ADMIN_KEY": "admin-secret",
    "ALICE_GATEWAY_KEY": "alice-gateway-secret",
    "ALICE_OPENAI_KEY": "sk-alice-upstream-secret",
    "MEMORY_LLM_API_KEY": "sk-extraction-secret",
    "EMBEDDINGS_API_KEY": "sk-embeddings-secret",
    "URL_PASSWORD": "url-password-secret",
    "URL_TOKEN": "url-query-secret",
}


def test_the_summary_and_warnings_never_show_a_secret(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "server: {host: 0.0.0.0}\n"
        "upstreams:\n"
        "  - name: openai\n"
        # (an upstream's URL may not hold credentials: test_config.py)
        "    base_url: https://api.example.com/v1?token=${URL_TOKEN}\n"
        "    api_key: ${OPENAI_API_KEY}\n"
        "auth:\n"
        "  admin_key: ${GATEWAY_ADMIN_KEY}\n"
        "  keys:\n"
        "    - {key: '${ALICE_GATEWAY_KEY}', user_id: alice,"
        " upstream_api_key: '${ALICE_OPENAI_KEY}'}\n"
        "memory:\n"
        "  embedder:\n"
        "    provider: openai\n"
        "    base_url: https://me:${URL_PASSWORD}@embed.example.com/v1?token=${URL_TOKEN}\n"
        "    api_key: ${EMBEDDINGS_API_KEY}\n"
        "  llm: {api_key: '${MEMORY_LLM_API_KEY}'}\n"
    )
    loaded = load_config(config, env=SECRETS)
    text = describe(loaded, config) + "\n".join(text for _, text in notices(loaded))
    assert [name for name, secret in SECRETS.items() if secret in text] == []
    assert "https://api.example.com/v1" in text
    assert "https://embed.example.com/v1" in text
    assert "1 per-user key(s); admin key set" in text


def _open_relay(config: Config) -> list[str]:
    return [text for level, text in notices(config) if level == logging.WARNING]


def test_a_keyed_upstream_on_an_open_port_without_required_keys_is_a_warning():
    config = _config({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "0.0.0.0"})
    [warning] = _open_relay(config)
    assert "anyone who can reach port 8080 spends that key" in warning
    assert "auth.require_key: true with per-user keys" in warning
    assert "bind 127.0.0.1" in warning
    assert "authenticating proxy in front" in warning


@pytest.mark.parametrize(
    ("env", "overrides"),
    [
        ({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "127.0.0.2"}, {}),
        ({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "::1"}, {}),
        ({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "localhost"}, {}),
        ({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "0.0.0.0"}, {"auth.require_key": True}),
        ({"GATEWAY_HOST": "0.0.0.0"}, {}),
    ],
)
def test_no_open_relay_warning_on_loopback_with_required_keys_or_without_a_key(env, overrides):
    assert _open_relay(_config(env, **overrides)) == []


def test_without_an_admin_key_an_open_port_says_how_to_reach_the_management_api():
    [(level, text)] = notices(_config({"GATEWAY_HOST": "0.0.0.0"}))
    assert level == logging.INFO
    assert "answers local clients only" in text
    assert "set GATEWAY_ADMIN_KEY" in text
    assert notices(_config({"GATEWAY_HOST": "0.0.0.0", "GATEWAY_ADMIN_KEY": "k"})) == []
    assert notices(_config()) == []


def test_start_up_logs_one_info_block_then_the_warnings(caplog):
    caplog.set_level(logging.INFO, logger="gateway.startup")
    config = _config({"OPENAI_API_KEY": "sk-x", "GATEWAY_HOST": "0.0.0.0"})
    log_startup(config, None)
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert records[0] == ("gateway.startup", logging.INFO, describe(config, None))
    assert [level for _, level, _ in records[1:]] == [logging.WARNING, logging.INFO]


def test_the_start_up_summary_says_where_anthropic_requests_go():
    from gateway.startup import describe

    config = load_config(
        None,
        env={},
        overrides={
            "upstreams": [
                {"name": "openai", "base_url": "https://api.openai.com/v1", "default": True},
                {"name": "claude", "base_url": "https://api.anthropic.com/v1", "api": "anthropic"},
            ]
        },
    )
    text = describe(config, None)
    assert "upstream claude (api: anthropic): https://api.anthropic.com/v1" in text
    assert "every /v1/messages model no other anthropic upstream claims" in text


def test_the_summary_names_the_memory_tables_uri_without_credentials():
    config = load_config(
        None,
        env={},
        overrides={
            "storage": {
                "uri": "s3://key:pw-in-uri@memories/prod?ddbTableName=t",
                "options": {"aws_secret_access_key": "opt-secret-4b1e", "region": "eu-west-1"},
                "refresh_seconds": 0.5,
            }
        },
    )
    text = describe(config, None)
    assert (
        "memory tables: s3://memories/prod (shared; checked for other replicas' writes"
        " every 0.5 s); options set: aws_secret_access_key, region"
    ) in text
    assert "pw-in-uri" not in text and "opt-secret-4b1e" not in text and "eu-west-1" not in text
    assert "memory tables" not in describe(_config(), None)


def test_the_summary_names_a_shared_queue_without_its_password():
    config = load_config(
        None, env={"GATEWAY_QUEUE_URL": "postgresql://gw:pg-pw-71c2@db.internal:5432/gateway"}
    )
    text = describe(config, None)
    assert (
        "extraction queue and issued keys: postgresql://db.internal:5432/gateway"
        " (shared by replicas)"
    ) in text
    assert "pg-pw-71c2" not in text
    assert "extraction queue" not in describe(_config(), None)
