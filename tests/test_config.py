"""gateway.yaml is the documented default configuration (and, packaged, the
built-in one); a value that cannot work is refused with one line naming its
key, and the environment variable it came from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml

from gateway.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_YAML = ROOT / "gateway.yaml"


def test_gateway_yaml_is_exactly_the_built_in_defaults():
    assert msgspec.to_builtins(load_config(GATEWAY_YAML, env={})) == msgspec.to_builtins(Config())


def _struct_keys(struct: type[msgspec.Struct], prefix: str = "") -> set[str]:
    keys = set()
    for field in msgspec.structs.fields(struct):
        path = prefix + field.name
        keys.add(path)
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            keys |= _struct_keys(field.type, path + ".")
    return keys


def _yaml_keys(node: object, prefix: str = "") -> set[str]:
    keys = set()
    if isinstance(node, dict):
        for name, value in node.items():
            keys.add(prefix + name)
            keys |= _yaml_keys(value, prefix + name + ".")
    return keys


def test_gateway_yaml_documents_every_setting():
    documented = _yaml_keys(yaml.safe_load(GATEWAY_YAML.read_text()))
    missing = _struct_keys(Config) - documented
    assert not missing, f"gateway.yaml lacks {sorted(missing)}"


def test_environment_variables_are_interpolated():
    config = load_config(
        GATEWAY_YAML,
        env={"GATEWAY_PORT": "9001", "OPENAI_API_KEY": "sk-env", "GATEWAY_HOST": "0.0.0.0"},
    )
    assert config.server.port == 9001
    assert config.server.host == "0.0.0.0"
    assert config.upstreams[0].api_key == "sk-env"


def test_command_line_overrides_win(tmp_path):
    config = load_config(
        GATEWAY_YAML,
        env={},
        overrides={
            "server.port": 7000,
            "upstream": "http://127.0.0.1:11434/v1",
            "data_dir": str(tmp_path),
        },
    )
    assert config.server.port == 7000
    assert config.default_upstream.base_url == "http://127.0.0.1:11434/v1"
    assert config.data_path == tmp_path


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("server:\n  port: eighty\n", "server.port"),
        ("server:\n  prot: 80\n", "server"),
        ("server:\n  log_level: loud\n", "server.log_level"),
        ("server:\n  extraction_max_lag_seconds: -1\n", "server.extraction_max_lag_seconds"),
        ("http:\n  read_timeout: soon\n", "http.read_timeout"),
        ("upstreams:\n  - name: a\n    base_url: ftp://x\n", "upstreams"),
        ("auth:\n  keys:\n    - key: k\n", "auth.keys[0]"),
        ("upstreams:\n  - name: a\n    base_url: ${MISSING_URL}\n", "MISSING_URL"),
    ],
)
def test_errors_name_the_key(tmp_path, text, named):
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    assert named in str(raised.value)
    assert "\n" not in str(raised.value)


def test_without_a_file_the_built_in_defaults_are_gateway_yaml():
    """The packaged defaults.yaml is gateway.yaml, `${VAR}`s included."""
    assert msgspec.to_builtins(load_config(None, env={})) == msgspec.to_builtins(Config())


def test_the_built_in_defaults_read_the_environment_like_gateway_yaml():
    env = {
        "GATEWAY_PORT": "8095",
        "GATEWAY_DATA_DIR": "/srv/memories",
        "GATEWAY_ADMIN_KEY": "admin-key",
        "OPENAI_API_KEY": "sk-env",
        "MEMORY_LLM_MODEL": "qwen2.5:7b",
    }
    config = load_config(None, env=env)
    assert config.server.port == 8095
    assert config.data_dir == "/srv/memories"
    assert config.auth.admin_key == "admin-key"
    assert config.upstreams[0].api_key == "sk-env"
    assert config.memory.llm.model == "qwen2.5:7b"
    assert msgspec.to_builtins(config) == msgspec.to_builtins(load_config(GATEWAY_YAML, env=env))


def _numeric_settings(
    info: msgspec.inspect.Type, path: str = ""
) -> Iterator[tuple[str, msgspec.inspect.Type]]:
    """Every int or float setting under `info`, by key (`int | None` included)."""
    if isinstance(info, msgspec.inspect.StructType):
        for field in info.fields:
            yield from _numeric_settings(field.type, f"{path}.{field.name}".lstrip("."))
    elif isinstance(info, msgspec.inspect.UnionType):
        for member in info.types:
            yield from _numeric_settings(member, path)
    elif isinstance(info, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        yield path, info


def test_every_numeric_setting_has_a_range():
    unbounded = [
        key
        for key, info in _numeric_settings(msgspec.inspect.type_info(Config))
        if info.ge is None and info.gt is None
    ]
    assert not unbounded, f"no lower bound: {unbounded}"


def test_the_built_in_defaults_are_within_range():
    config = msgspec.to_builtins(Config())
    assert msgspec.to_builtins(msgspec.convert(config, Config)) == config


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("server.port", 0, "server.port: Expected `int` >= 1"),
        ("server.port", 65536, "server.port: Expected `int` <= 65535"),
        ("server.max_body_bytes", 0, "server.max_body_bytes: Expected `int` >= 1"),
        ("server.workers", 65, "server.workers: Expected `int` <= 64"),
        ("http.read_timeout", 0, "http.read_timeout: Expected `float` > 0.0"),
        ("http.max_connections", 0, "http.max_connections: Expected `int` >= 1"),
        ("http.max_keepalive_connections", -1, "http.max_keepalive_connections: Expected"),
        ("memory.search.min_score", 1.5, "memory.search.min_score: Expected `float` <= 1.0"),
        ("memory.search.min_score", -2, "memory.search.min_score: Expected `float` >= -1.0"),
        ("memory.search.limit", 0, "memory.search.limit: Expected `int` >= 1"),
        ("memory.search.text_weight", -0.1, "memory.search.text_weight: Expected `float` >="),
        ("memory.search.cache_bytes", -1, "memory.search.cache_bytes: Expected `int` >= 0"),
        ("memory.injection.deadline_ms", 0, "memory.injection.deadline_ms: Expected `int` >= 1"),
        ("memory.injection.max_chars", 0, "memory.injection.max_chars: Expected `int` >= 1"),
        ("memory.llm.context_tokens", 255, "memory.llm.context_tokens: Expected `int` >= 256"),
        ("memory.llm.max_tokens", 15, "memory.llm.max_tokens: Expected `int` >= 16"),
        ("memory.llm.timeout", 0, "memory.llm.timeout: Expected `float` > 0.0"),
        ("memory.llm.max_concurrent_calls", 0, "memory.llm.max_concurrent_calls: Expected"),
        ("memory.llm.yield_max_seconds", -1, "memory.llm.yield_max_seconds: Expected"),
        ("memory.llm.failing_window_seconds", 0, "memory.llm.failing_window_seconds: Expected"),
        ("memory.embedder.batch_size", 0, "memory.embedder.batch_size: Expected `int` >= 1"),
        ("memory.embedder.dimensions", 0, "memory.embedder.dimensions: Expected `int` >= 1"),
        ("memory.spool.concurrency", 0, "memory.spool.concurrency: Expected `int` >= 1"),
        ("memory.spool.max_attempts", 0, "memory.spool.max_attempts: Expected `int` >= 1"),
        ("memory.spool.backoff_initial", -1, "memory.spool.backoff_initial: Expected"),
        ("memory.spool.lease_seconds", 0, "memory.spool.lease_seconds: Expected `float` > 0.0"),
        ("memory.spool.poll_interval", 0, "memory.spool.poll_interval: Expected `float` > 0.0"),
        ("memory.maintenance.interval_seconds", 0, "memory.maintenance.interval_seconds:"),
        (
            "memory.maintenance.vector_index_min_rows",
            10,
            "memory.maintenance.vector_index_min_rows: Expected `int` >= 256",
        ),
        ("memory.maintenance.index_cache_bytes", -1, "memory.maintenance.index_cache_bytes:"),
        ("queue.url", "redis://localhost:6379/0", "queue.url: must be `sqlite` or a postgresql"),
        ("queue.url", "postgresql://gw:pw@db:notaport/q", "queue.url: Port could not be cast"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_its_key(key, value, expected):
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={}, overrides={key: value})
    assert str(raised.value).startswith(expected)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("X-OpenWebUI-User-Id", ["X-OpenWebUI-User-Id"]),
        ("X-OpenWebUI-User-Id, X-User-Id", ["X-OpenWebUI-User-Id", "X-User-Id"]),
        (["X-OpenWebUI-User-Id", "X-User-Id"], ["X-OpenWebUI-User-Id", "X-User-Id"]),
    ],
)
def test_the_user_header_is_one_name_a_list_or_names_separated_by_commas(value, expected):
    config = load_config(None, env={}, overrides={"identity.user_header": value})
    assert config.identity.user_headers == expected


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("identity.user_header", [], "identity.user_header: name at least one header"),
        ("identity.user_header", " , ", "identity.user_header: name at least one header"),
        ("identity.user_header", "X User", "identity.user_header: 'X User' is not an HTTP header"),
        ("identity.agent_header", "X:Agent", "identity.agent_header: 'X:Agent' is not an HTTP"),
    ],
)
def test_a_header_name_that_cannot_be_one_is_refused(key, value, expected):
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={}, overrides={key: value})
    assert str(raised.value).startswith(expected)


def test_max_tokens_must_leave_room_for_the_prompt():
    with pytest.raises(ConfigError) as raised:
        load_config(
            None,
            env={},
            overrides={"memory.llm.context_tokens": 2048, "memory.llm.max_tokens": 2048},
        )
    assert str(raised.value).startswith(
        "memory.llm.max_tokens: must be smaller than context_tokens (2048)"
    )


def test_a_bad_value_from_the_environment_names_the_variable():
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"GATEWAY_PORT": "abc"})
    assert str(raised.value) == (
        "server.port: Expected `int`, got `str` (from environment variable GATEWAY_PORT)"
    )


def test_an_out_of_range_value_from_the_environment_names_the_variable():
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"GATEWAY_WORKERS": "0"})
    assert str(raised.value) == (
        "server.workers: Expected `int` >= 1 (from environment variable GATEWAY_WORKERS)"
    )


def test_a_bad_upstream_url_from_the_environment_names_the_variable():
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"OPENAI_BASE_URL": "localhost:11434/v1"})
    assert "upstreams[0].base_url" in str(raised.value)
    assert str(raised.value).endswith("(from environment variable OPENAI_BASE_URL)")


def test_a_value_the_command_line_replaced_is_not_blamed_on_the_environment():
    assert load_config(None, env={"GATEWAY_PORT": "abc"}, overrides={"server.port": 9000})
    with pytest.raises(ConfigError) as raised:
        load_config(None, env={"GATEWAY_PORT": "8095"}, overrides={"server.port": 70000})
    assert "server.port" in str(raised.value)
    assert "GATEWAY_PORT" not in str(raised.value)


def test_a_value_from_a_default_in_the_file_is_not_blamed_on_the_environment(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text("server:\n  port: ${UNSET_PORT:-none}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    assert str(raised.value) == "server.port: Expected `int`, got `str`"


def test_an_upstream_url_with_credentials_is_refused_pointing_at_api_key(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "upstreams: [{name: u, base_url: 'https://bob:pw@llm.example/v1', default: true}]\n"
    )
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    message = str(raised.value)
    assert "must not hold credentials" in message and "api_key" in message
    assert "pw@" not in message
