"""Helpers shared by the reliability tests: a token-remembering extractor and a
gateway run as a real `memory-gateway serve` process.

Each exchange carries a unique token (`tok-<hex>`); the scripted extractor turns
every token it sees into exactly one ADD fact, so counting facts per token tells
whether an exchange was lost (0) or processed twice (2).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.extraction import is_extraction, latest_exchange, llm_answer
from tests.upstream import JSONReply, Recorded

TOKEN = re.compile(r"tok-[0-9a-f]{12}")


def new_token() -> str:
    return "tok-" + uuid.uuid4().hex[:12]


def token_extractor(request: Recorded) -> JSONReply | None:
    """ADD one fact per token in the exchange's user turns, whatever is stored already."""
    if not is_extraction(request):
        return None
    # Only the user's words: the echoed reply carries the same token.
    seen: list[str] = []
    for token in TOKEN.findall(latest_exchange(request)):
        if token not in seen:
            seen.append(token)
    return llm_answer([{"op": "ADD", "text": f"Remembers {t}"} for t in seen])


def post_token_exchange(
    http: httpx.Client, user: str, token: str, stream: bool, key: str | None = None
) -> httpx.Response:
    """One chat exchange of `user` carrying `token`, as the token extractor
    expects it; `key` is the user's own upstream key (bring-your-own-key)."""
    headers = {"X-User-Id": user}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return http.post(
        "/v1/chat/completions",
        json={
            "model": "test-model",
            "stream": stream,
            "messages": [{"role": "user", "content": f"note {token} please"}],
        },
        headers=headers,
    )


def spool_drained(http: httpx.Client) -> bool:
    spool = http.get("/v1/memories/stats").json()["spool"]
    return spool["pending"] == 0 and spool["running"] == 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            with contextlib.suppress(FileNotFoundError):
                kids = [int(c) for c in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_settings(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """Memory on, with the scripted upstream as embedder (fast start) and quick retries."""
    settings: dict[str, Any] = {
        "embedder": {"provider": "openai", "base_url": upstream_url, "model": "test-embed"},
        # A configured key: jobs need no client request to bring one after a restart.
        "llm": {"api_key": "sk-extractor-test"},
        "spool": {
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "lease_seconds": 1.0,
            "poll_interval": 0.2,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


# `memory-gateway serve` exactly as the console script runs it, after a go-line on stdin.
PRELOAD = (
    "import sys, gateway.app, gateway.cli; sys.stdin.readline(); "
    "sys.exit(gateway.cli.main(sys.argv[1:]))"
)


class GatewayProcess:
    """`python -m gateway.cli serve` on a loopback port, its output captured to a file."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.config_path = workdir / "gateway.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "gateway.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> GatewayProcess:
        """Start the interpreter and import everything, but serve only at `start()`.

        Imports take seconds on a busy machine; tests that restart the gateway
        many times pay them while the previous process still runs. The data
        directory is opened only once `start()` says go.
        """
        self.port = free_port()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    *(sys.executable, "-c", PRELOAD, "serve", "--config", str(self.config_path)),
                    *("--host", "127.0.0.1", "--port", str(self.port)),
                ],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI")},
            )
        return self

    def start(self, *, ready_timeout: float = 60.0) -> GatewayProcess:
        if self.process is None or self.process.poll() is not None:
            self.spawn()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"gateway did not become ready:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the gateway and every process it started, as a power cut would."""
        if self.process is not None and self.process.poll() is None:
            family = descendants(self.process.pid)
            self.process.send_signal(signal.SIGKILL)
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def kill_supervisor(self) -> None:
        """SIGKILL the supervisor alone: its children must notice and exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")
