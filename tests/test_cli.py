"""`memory-gateway serve` as a subprocess: a bad config exits 2 with one line; a good one serves."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.1)
        # Ready once storage is open (the default config enables memory).
        while httpx.get(base + "/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway never became ready"
            time.sleep(0.1)
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
