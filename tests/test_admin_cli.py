"""`memory-gateway memories ...` and `keys ...` (gateway/admin_cli.py) against
a running gateway over real HTTP: tables for people, JSON for scripts, exit
statuses scripts can trust."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.upstream import ScriptedUpstream


@pytest.fixture
def gateway(
    start_gateway: Callable[..., GatewayServer], upstream: ScriptedUpstream, tmp_path: Path
) -> GatewayServer:
    config = gateway_config_for(
        upstream.url, tmp_path / "data", memory={}, auth={"admin_key": "adm-secret"}
    )
    return start_gateway(config)


@pytest.fixture
def cli(
    gateway: GatewayServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """`cli("memories", "list", "alice")`: exit status, stdout, stderr."""
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "adm-secret")

    def run(command: str, *args: str) -> tuple[int, str, str]:
        code = main([command, "--url", gateway.url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def as_json(out: str) -> Any:
    return json.loads(out)


def test_add_list_search_and_history_in_tables_and_json(cli) -> None:
    code, out, _ = cli("memories", "add", "alice", "Allergic to peanuts")
    assert code == 0 and "Allergic to peanuts" in out and out.startswith("ID")
    cli("memories", "add", "alice", "Lives in Berlin")
    code, out, _ = cli("memories", "list", "alice", "--json")
    listed = as_json(out)
    assert code == 0 and {m["text"] for m in listed} == {"Allergic to peanuts", "Lives in Berlin"}
    code, out, _ = cli("memories", "search", "alice", "peanut allergy", "--json")
    assert as_json(out)[0]["memory"]["text"] == "Allergic to peanuts"
    code, out, _ = cli("memories", "search", "alice", "peanut allergy")
    assert out.splitlines()[0].split()[:2] == ["SCORE", "ID"]
    peanuts = next(m for m in listed if m["text"] == "Allergic to peanuts")
    code, out, _ = cli("memories", "history", peanuts["id"], "--json")
    assert code == 0 and [e["event"] for e in as_json(out)] == ["ADD"]
    code, out, _ = cli("memories", "rm", peanuts["id"])
    assert code == 0
    code, out, _ = cli("memories", "list", "alice", "--json")
    assert [m["text"] for m in as_json(out)] == ["Lives in Berlin"]


def test_export_all_then_import_into_a_fresh_gateway_round_trips(
    cli, start_gateway, upstream: ScriptedUpstream, tmp_path: Path, capsys
) -> None:
    cli("memories", "add", "alice", "Plays the cello")
    cli("memories", "add", "bob", "Speaks Korean")
    code, out, err = cli("memories", "export", "--all")
    assert code == 0 and "exported 2 memories of 2 user(s)" in err
    dump = tmp_path / "memories.jsonl"
    dump.write_text(out)

    fresh = start_gateway(
        gateway_config_for(
            upstream.url, tmp_path / "fresh", memory={}, auth={"admin_key": "adm-secret"}
        )
    )
    code = main(["memories", "--url", fresh.url, "import", str(dump), "--json"])
    report = as_json(capsys.readouterr().out)
    assert code == 0
    assert {(r["user_id"], r["imported"]) for r in report} == {("alice", 1), ("bob", 1)}
    code = main(["memories", "--url", fresh.url, "list", "bob", "--json"])
    assert [m["text"] for m in as_json(capsys.readouterr().out)] == ["Speaks Korean"]


def test_erase_needs_yes_without_a_terminal(cli) -> None:
    cli("memories", "add", "carol", "Likes tea")
    code, _, err = cli("memories", "erase", "carol")
    assert code == 1 and "without --yes" in err
    code, out, _ = cli("memories", "erase", "carol", "--yes", "--json")
    assert code == 0 and as_json(out) == {"deleted": 1}


def test_stats_and_jobs(cli) -> None:
    cli("memories", "add", "dave", "Runs marathons")
    code, out, _ = cli("memories", "stats", "--json")
    assert code == 0 and as_json(out)["memories"] == 1
    code, out, _ = cli("memories", "stats")
    assert "memories" in out and "users" in out
    code, out, err = cli("memories", "jobs", "--failed", "--retry", "--json")
    assert code == 0 and as_json(out) == [] and "retried 0 failed job(s)" in err


def test_keys_create_list_revoke(cli) -> None:
    code, out, _ = cli("keys", "create", "alice", "--name", "laptop", "--json")
    created = as_json(out)
    assert code == 0 and created["key"].startswith("mgk-")
    code, out, _ = cli("keys", "list", "--user", "alice")
    assert created["id"] in out and created["key"] not in out and "laptop" in out
    code, out, _ = cli("keys", "revoke", created["id"])
    assert code == 0
    code, _, err = cli("keys", "revoke", created["id"])
    assert code == 1 and "404" in err


def test_exit_statuses_scripts_can_trust(
    cli, gateway: GatewayServer, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = cli("memories", "rm", "no-such-id")
    assert code == 1 and "404" in err
    monkeypatch.setenv("GATEWAY_ADMIN_KEY", "wrong")
    code, _, err = cli("memories", "list", "alice")
    assert code == 1 and "401" in err
    code = main(["memories", "--url", "http://127.0.0.1:9", "list", "alice"])
    assert code == 3 and "cannot reach the gateway" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["memories", "--url", gateway.url, "list"])
    assert usage.value.code == 2
    code, _, err = cli("memories", "export")
    assert code == 2 and "USER or --all" in err


def test_connection_flags_work_before_or_after_the_action(
    cli, gateway: GatewayServer, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`memories search --url U ...` as well as `memories --url U search ...`;
    one given after the action wins, one not given leaves the earlier alone."""
    cli("memories", "add", "alice", "Allergic to peanuts")
    monkeypatch.delenv("GATEWAY_ADMIN_KEY")
    code = main(
        ["memories", "list", "alice", "--url", gateway.url, "--admin-key", "adm-secret", "--json"]
    )
    assert code == 0
    assert [m["text"] for m in json.loads(capsys.readouterr().out)] == ["Allergic to peanuts"]
    dead = "http://127.0.0.1:9"
    code = main(["keys", "--url", dead, "list", "--url", gateway.url, "--admin-key", "adm-secret"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    code = main(["memories", "--url", gateway.url, "--admin-key", "adm-secret", "stats"])
    assert code == 0 and "memories" in capsys.readouterr().out
