"""Crash durability: SIGKILL the gateway while exchanges are in flight, again and again.

Every exchange whose answer reached the client in full must end up processed
exactly once: one fact, one ADD in its history. Exchanges cut off before the
client had the whole answer may or may not be remembered, but never twice.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from tests.extraction import wait_for
from tests.reliability import (
    TOKEN,
    GatewayProcess,
    memory_settings,
    new_token,
    post_token_exchange,
    spool_drained,
    token_extractor,
)
from tests.upstream import ScriptedUpstream

CYCLES = 20
USERS = ["ann", "ben", "cem"]
SENDERS = 3

pytestmark = pytest.mark.slow_crash  # ~30-60 s: 20 process restarts; runs in CI


def _complete(response: httpx.Response, stream: bool) -> bool:
    """Whether the client received the whole answer, as the SDK would judge it."""
    if response.status_code != 200:
        return False
    if not stream:
        body = msgspec.json.decode(response.content)
        return body["choices"][0]["finish_reason"] == "stop"
    return response.text.rstrip().endswith("data: [DONE]")


class Senders:
    """Threads sending exchanges back to back until the gateway dies under them."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.rng = rng
        self.completed: list[str] = []
        self.attempted: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SENDERS)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a sender hung after the gateway died"

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as http:
            while True:
                token = new_token()
                stream = self.rng.random() < 0.5
                user = self.rng.choice(USERS)
                with self._lock:
                    self.attempted.append(token)
                try:
                    response = post_token_exchange(http, user, token, stream)
                except httpx.HTTPError:
                    return
                if _complete(response, stream):
                    with self._lock:
                        self.completed.append(token)
                # A steady trickle, not a flood: the backlog each restart drains stays small.
                time.sleep(self.rng.uniform(0.02, 0.1))


def _memories(http: httpx.Client, user: str) -> list[dict[str, Any]]:
    response = http.get("/v1/memories", params={"user_id": user, "limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["data"]


@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_loses_and_doubles_no_completed_exchange(
    upstream: ScriptedUpstream, tmp_path: Path
) -> None:
    upstream.script(token_extractor)
    config = {
        "upstreams": [{"name": "scripted", "base_url": upstream.url, "default": True}],
        "data_dir": str(tmp_path / "data"),
        "server": {"log_level": "warning"},
        "memory": memory_settings(upstream.url),
    }
    gateway = following = GatewayProcess(config, tmp_path)
    rng = random.Random(20260806)
    completed: list[str] = []
    attempted: list[str] = []
    try:
        following = GatewayProcess(config, tmp_path).spawn()
        for _ in range(CYCLES):
            gateway, following = following.start(), GatewayProcess(config, tmp_path).spawn()
            senders = Senders(gateway.url, rng)
            senders.start()
            time.sleep(rng.uniform(0.05, 0.8))
            gateway.kill()
            senders.join()
            completed += senders.completed
            attempted += senders.attempted

        gateway = following.start()
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            wait_for(lambda: spool_drained(http), timeout=90, interval=0.2)
            memories = [m for user in USERS for m in _memories(http, user)]
            histories = {
                m["id"]: http.get(
                    f"/v1/memories/{m['id']}/history", params={"user_id": m["user_id"]}
                ).json()["data"]
                for m in memories
            }
            failed = http.get("/v1/memories/jobs", params={"state": "failed"}).json()["data"]
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert gateway.terminate() in (0, -signal.SIGTERM), gateway.log()
    finally:
        gateway.kill()
        following.kill()

    assert len(completed) >= CYCLES, "too few exchanges completed to prove anything"
    assert failed == []
    facts = Counter(t for m in memories for t in TOKEN.findall(m["text"]))
    lost = [t for t in completed if facts[t] == 0]
    doubled = [t for t, n in facts.items() if n > 1]
    assert lost == [], f"{len(lost)} of {len(completed)} completed exchanges were lost"
    assert doubled == []
    assert set(facts) <= set(attempted)
    for memory in memories:
        events = [e["event"] for e in histories[memory["id"]]]
        assert events == ["ADD"], (memory["text"], events)
