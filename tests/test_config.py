"""gateway.yaml is the documented default configuration, and bad values name their key."""

from __future__ import annotations

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
