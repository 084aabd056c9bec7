"""The gateway's Prometheus metrics (gateway/metrics.py): the families an
operator scrapes, their label sets, and one `/metrics` for several
processes (multiprocess mode, as under `server.workers` and the extraction
process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import (
    MULTIPROC_ENV,
    Metrics,
    StateGauges,
    cleanup_multiprocess,
    prepare_multiprocess,
)
from memory.models import Operation


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: bytes, name: str, **labels: str) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


STATE = StateGauges(
    jobs={"pending": 2, "running": 1, "failed": 3, "done": 40},
    lag_seconds=1.5,
    rows=123,
    extraction_failing=True,
)


def test_requests_are_counted_and_timed_by_route_method_and_status() -> None:
    metrics = Metrics()
    metrics.request("/v1/chat/completions", "POST", 200, 0.02)
    metrics.request("/v1/chat/completions", "POST", 200, 0.2)
    metrics.request("/v1/chat/completions", "POST", 400, 0.001)
    text = metrics.render(None)
    name = "memory_gateway_requests_total"
    route = "/v1/chat/completions"
    assert value(text, name, route=route, method="POST", status="200") == 2
    assert value(text, name, route=route, method="POST", status="400") == 1
    duration = "memory_gateway_request_duration_seconds"
    assert value(text, f"{duration}_count", route=route) == 3
    assert value(text, f"{duration}_bucket", route=route, le="0.05") == 2
    assert value(text, f"{duration}_sum", route=route) == pytest.approx(0.221)


def test_a_method_no_client_should_send_is_counted_as_other() -> None:
    metrics = Metrics()
    for method in ("BREW", "PROPFIND", "X" * 50):
        metrics.request("unmatched", method, 405, 0.001)
    text = metrics.render(None)
    assert (
        value(
            text, "memory_gateway_requests_total", route="unmatched", method="other", status="405"
        )
        == 3
    )


def test_memory_upstream_and_extraction_metrics() -> None:
    metrics = Metrics()
    metrics.upstream("local", 0.5)
    metrics.retrieved("ok", 0.004)
    metrics.retrieved("timeout", 0.25)
    metrics.chat_memory("ok", 3)
    metrics.chat_memory("degraded", 0)
    observer = metrics.observer()
    observer.llm_tokens(800, 40)
    observer.llm_tokens(0, 0)  # a server that reports no usage
    observer.operations_applied([Operation(op="ADD", text="a"), Operation(op="ADD", text="b")])
    observer.operations_applied([Operation(op="DELETE", memory_id="m1")])
    observer.operations_applied([])  # the model found nothing to remember
    text = metrics.render(None)
    assert value(text, "memory_gateway_upstream_duration_seconds_count", upstream="local") == 1
    retrieval = "memory_gateway_memory_retrieval_seconds_count"
    assert value(text, retrieval, outcome="ok") == 1
    assert value(text, retrieval, outcome="timeout") == 1
    assert value(text, "memory_gateway_memory_injected_total") == 3
    assert value(text, "memory_gateway_memory_status_total", status="ok") == 1
    assert value(text, "memory_gateway_memory_status_total", status="degraded") == 1
    tokens = "memory_gateway_extraction_llm_tokens_total"
    assert value(text, tokens, kind="prompt") == 800
    assert value(text, tokens, kind="completion") == 40
    ops = "memory_gateway_memory_operations_total"
    assert value(text, ops, op="ADD") == 2
    assert value(text, ops, op="DELETE") == 1
    assert value(text, ops, op="NONE") == 1
    assert value(text, ops, op="UPDATE") is None


def test_state_gauges_are_the_scrapes_snapshot() -> None:
    text = Metrics().render(STATE)
    for state, n in STATE.jobs.items():
        assert value(text, "memory_gateway_extraction_jobs", state=state) == n
    assert value(text, "memory_gateway_extraction_lag_seconds") == 1.5
    assert value(text, "memory_gateway_extraction_failing") == 1
    assert value(text, "memory_gateway_store_rows") == 123


def test_without_memory_there_are_no_state_gauges() -> None:
    text = Metrics().render(None)
    assert b"memory_gateway_extraction_jobs" not in text
    assert b"memory_gateway_store_rows" not in text


def test_two_apps_in_one_process_keep_their_own_values() -> None:
    first, second = Metrics(), Metrics()
    first.request("/health", "GET", 200, 0.001)
    text = second.render(None)
    assert (
        value(text, "memory_gateway_requests_total", route="/health", method="GET", status="200")
        is None
    )


# A process of a gateway with several: records, then exits (its values stay in files).
RECORD = textwrap.dedent(
    """
    import sys
    from gateway.metrics import Metrics
    from memory.models import Operation
    metrics = Metrics()
    for _ in range(int(sys.argv[1])):
        metrics.request("/v1/chat/completions", "POST", 200, 0.01)
    metrics.observer().operations_applied([Operation(op="ADD", text="x")])
    """
)
RENDER = textwrap.dedent(
    """
    import sys
    from gateway.metrics import Metrics
    sys.stdout.buffer.write(Metrics().render(None))
    """
)


def run_python(code: str, *args: str, env: dict[str, str]) -> bytes:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, timeout=60
    ).stdout


def test_processes_sharing_a_directory_are_summed_by_any_of_them(tmp_path: Path) -> None:
    env = {**os.environ, MULTIPROC_ENV: str(tmp_path)}
    run_python(RECORD, "3", env=env)
    run_python(RECORD, "4", env=env)
    text = run_python(RENDER, env=env)
    route = "/v1/chat/completions"
    assert (
        value(text, "memory_gateway_requests_total", route=route, method="POST", status="200") == 7
    )
    assert value(text, "memory_gateway_memory_operations_total", op="ADD") == 2


def test_the_shared_directory_starts_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # An operator's directory: the last run's values are not summed into this one's.
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    stale = tmp_path / "counter_12345.db"
    stale.write_bytes(b"old values")
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    assert prepare_multiprocess() == tmp_path
    assert not stale.exists()
    assert other.exists()
    cleanup_multiprocess(tmp_path, created=False)
    assert tmp_path.exists()


def test_without_a_given_directory_a_new_one_is_made_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    path = prepare_multiprocess()
    assert path.is_dir() and os.environ[MULTIPROC_ENV] == str(path)
    cleanup_multiprocess(path, created=True)
    assert not path.exists()
    assert MULTIPROC_ENV not in os.environ


def test_the_grafana_dashboard_charts_only_metrics_that_exist() -> None:
    """docs/grafana-dashboard.json stays in step with the metrics."""
    dashboard = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
    exprs = [
        target["expr"]
        for panel in json.loads(dashboard.read_text())["panels"]
        for target in panel["targets"]
    ]
    used = {m for e in exprs for m in re.findall(r"memory_gateway_[a-z_]+", e)}
    metrics = Metrics()
    metrics.request("/health", "GET", 200, 0.001)
    metrics.upstream("u", 0.1)
    metrics.retrieved("ok", 0.001)
    metrics.chat_memory("ok", 1)
    metrics.stream_cut("u")
    metrics.observer().llm_tokens(1, 1)
    metrics.observer().operations_applied([])
    exposed = {name for (name, _) in samples(metrics.render(STATE))}
    assert used and used <= exposed, used - exposed
