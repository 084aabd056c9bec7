"""Replicas: three `memory-gateway serve` processes, each with its own data
directory, sharing their memories on S3 (moto's server) and their extraction
queue in PostgreSQL, both real servers on loopback.

Every exchange carries a token; the scripted extractor turns each token it
sees into one ADD, so counting a token's facts tells whether its exchange
was lost (0) or applied twice (2), whichever replica took the chat and
whichever ran the job.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.extraction import is_extraction, latest_exchange, wait_for
from tests.postgres import PostgresServer
from tests.reliability import (
    TOKEN,
    GatewayProcess,
    memory_settings,
    new_token,
    post_token_exchange,
    spool_drained,
    token_extractor,
)
from tests.s3 import S3Prefix
from tests.upstream import JSONReply, Recorded, ScriptedUpstream

pytestmark = pytest.mark.replicas

REFRESH_SECONDS = 0.5


class Replicas:
    """Gateways started from one configuration, in directories of their own."""

    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.config = config
        self.root = root
        self.gateways: list[GatewayProcess] = []

    def start(self, count: int) -> list[GatewayProcess]:
        spawned = []
        for i in range(len(self.gateways), len(self.gateways) + count):
            workdir = self.root / f"replica-{i}"
            workdir.mkdir()
            config = {**self.config, "data_dir": str(workdir / "data")}
            spawned.append(GatewayProcess(config, workdir).spawn())
        # Imports overlap; the data directories open one after the other.
        self.gateways += [g.start() for g in spawned]
        return spawned

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.kill()


@pytest.fixture
def replicas(
    upstream: ScriptedUpstream,
    postgres_server: PostgresServer,
    s3_prefix: S3Prefix,
    tmp_path: Path,
) -> Iterator[Replicas]:
    config = {
        "upstreams": [{"name": "scripted", "base_url": upstream.url, "default": True}],
        "server": {"log_level": "warning"},
        "storage": {
            "uri": s3_prefix.uri,
            "options": s3_prefix.options,
            "refresh_seconds": REFRESH_SECONDS,
        },
        "queue": {"url": postgres_server.create_database()},
        "memory": memory_settings(
            upstream.url,
            # The scripted upstream is no one-slot local model: extraction
            # need not wait for the senders' chats to it.
            llm={"api_key": "sk-extractor-test", "yield_to_chat": False},
            search={"min_score": -1},
            injection={"deadline_ms": 10_000},
        ),
    }
    group = Replicas(config, tmp_path)
    yield group
    group.stop()


def memories(http: httpx.Client, user: str) -> list[dict[str, Any]]:
    response = http.get("/v1/memories", params={"user_id": user, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def facts(http: httpx.Client, users: list[str]) -> Counter[str]:
    return Counter(
        t for user in users for m in memories(http, user) for t in TOKEN.findall(m["text"])
    )


def search(http: httpx.Client, user: str, query: str) -> list[str]:
    response = http.post("/v1/memories/search", json={"user_id": user, "query": query})
    assert response.status_code == 200, response.text
    return [hit["memory"]["text"] for hit in response.json()["results"]]


def extraction_order(upstream: ScriptedUpstream, tokens: set[str]) -> list[str]:
    """The tokens of `tokens` in the order their exchanges reached the extractor
    (a job retried shows once, at its first call)."""
    seen: list[str] = []
    for request in list(upstream.requests):
        if is_extraction(request):
            for token in TOKEN.findall(latest_exchange(request)):
                if token in tokens and token not in seen:
                    seen.append(token)
    return seen


def test_chats_spread_over_three_replicas_are_each_applied_once_and_in_order(
    replicas: Replicas, upstream: ScriptedUpstream
) -> None:
    upstream.script(token_extractor)
    gateways = replicas.start(3)
    users = ["ann", "ben"]
    sent: dict[str, list[str]] = {user: [] for user in users}
    clients = [httpx.Client(base_url=g.url, timeout=30) for g in gateways]
    try:
        for i in range(9):
            for j, user in enumerate(users):
                token = new_token()
                # Each user's turns go round the replicas, one after the other.
                response = post_token_exchange(clients[(i + j) % 3], user, token, i % 2 == 0)
                assert response.status_code == 200, response.text
                sent[user].append(token)
        wait_for(lambda: spool_drained(clients[0]), timeout=60, interval=0.1)
        for http in clients:
            # Every replica sees every fact once, within its refresh.
            wait_for(lambda h=http: sum(facts(h, users).values()) == 18, timeout=10)
            counted = facts(http, users)
            assert set(counted) == {t for user in users for t in sent[user]}
            assert set(counted.values()) == {1}
        failed = clients[1].get("/v1/memories/jobs", params={"state": "failed"}).json()["data"]
        assert failed == []
    finally:
        for http in clients:
            http.close()
    for user in users:
        assert extraction_order(upstream, set(sent[user])) == sent[user]


def test_a_memory_added_on_one_replica_is_found_on_another_within_the_refresh(
    replicas: Replicas,
) -> None:
    a, b = replicas.start(2)
    with (
        httpx.Client(base_url=a.url, timeout=30) as on_a,
        httpx.Client(base_url=b.url, timeout=30) as on_b,
    ):
        # B has cached the user's (empty) memories before A writes.
        assert search(on_b, "cleo", "tea") == []
        added = on_a.post(
            "/v1/memories",
            json={"user_id": "cleo", "text": "Cleo drinks oolong tea", "infer": False},
        )
        assert added.status_code in (200, 201), added.text
        written = time.monotonic()

        def found() -> bool:
            return "Cleo drinks oolong tea" in search(on_b, "cleo", "tea")

        wait_for(found, timeout=15, interval=0.05)
        # The refresh bound, plus the check itself and a loaded machine's slack.
        assert time.monotonic() - written < REFRESH_SECONDS + 3.0


def test_a_replica_killed_mid_run_loses_no_answered_exchange_and_doubles_none(
    replicas: Replicas, upstream: ScriptedUpstream
) -> None:
    upstream.script(token_extractor)
    gateways = replicas.start(3)
    users = ["dan", "eva", "fay"]
    answered: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def send(gateway: GatewayProcess, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=gateway.url, timeout=20) as http:
            while not stop.is_set():
                token = new_token()
                try:
                    response = post_token_exchange(
                        http, rng.choice(users), token, rng.random() < 0.5
                    )
                except httpx.HTTPError:
                    return  # this replica died under us
                if response.status_code == 200 and response.text.rstrip().endswith(
                    ("data: [DONE]", "}")
                ):
                    with lock:
                        answered.append(token)
                # A trickle, not a flood: each job writes to S3 (moto, ~0.4 s).
                time.sleep(rng.uniform(0.05, 0.2))

    senders = [
        threading.Thread(target=send, args=(g, i), daemon=True) for i, g in enumerate(gateways)
    ]
    for thread in senders:
        thread.start()
    # Kill the first replica once jobs are flowing through the shared queue.
    wait_for(lambda: sum(is_extraction(r) for r in list(upstream.requests)) >= 6, timeout=30)
    gateways[0].kill()
    wait_for(lambda: sum(is_extraction(r) for r in list(upstream.requests)) >= 20, timeout=60)
    stop.set()
    for thread in senders:
        thread.join(timeout=30)

    with httpx.Client(base_url=gateways[1].url, timeout=30) as http:
        # The dead replica's leased jobs are claimed again once their lease runs out.
        wait_for(lambda: spool_drained(http), timeout=90, interval=0.2)
        wait_for(lambda: set(answered) <= set(facts(http, users)), timeout=10)
        counted = facts(http, users)
    assert len(answered) >= 10, "too few exchanges answered to prove anything"
    assert [t for t, n in counted.items() if n > 1] == []


def test_an_erase_on_one_replica_wins_over_a_job_another_is_extracting(
    replicas: Replicas, upstream: ScriptedUpstream
) -> None:
    held = threading.Event()
    release = threading.Event()
    first = new_token()

    def slow_for_first(request: Recorded) -> JSONReply | None:
        answer = token_extractor(request)
        if answer is not None and first in latest_exchange(request):
            held.set()
            return dataclasses.replace(answer, gate=release)  # answered once the test says so
        return answer

    upstream.script(slow_for_first)
    a, b = replicas.start(2)
    with (
        httpx.Client(base_url=a.url, timeout=30) as on_a,
        httpx.Client(base_url=b.url, timeout=30) as on_b,
    ):
        assert post_token_exchange(on_b, "gus", first, False).status_code == 200
        wait_for(held.is_set, timeout=30)
        erased = on_a.delete("/v1/memories", params={"user_id": "gus"})
        assert erased.status_code == 200, erased.text
        release.set()
        # A later exchange of the same user runs after the erased one is settled.
        later = new_token()
        assert post_token_exchange(on_a, "gus", later, False).status_code == 200
        for http in (on_a, on_b):
            wait_for(lambda h=http: later in facts(h, ["gus"]), timeout=30)
            assert first not in facts(http, ["gus"])


def test_a_queue_restart_mid_run_loses_no_acknowledged_exchange(
    replicas: Replicas, upstream: ScriptedUpstream, postgres_server: PostgresServer
) -> None:
    upstream.script(token_extractor)
    a, b = replicas.start(2)
    before = [new_token() for _ in range(6)]
    after = [new_token() for _ in range(6)]
    with (
        httpx.Client(base_url=a.url, timeout=30) as on_a,
        httpx.Client(base_url=b.url, timeout=30) as on_b,
    ):
        for i, token in enumerate(before):
            post_token_exchange((on_a, on_b)[i % 2], "hal", token, False)
        # Acknowledged and waiting (or running): the server crashes under them.
        postgres_server.restart("immediate")
        # The server is back (pg_ctl waited); the replicas' connections died with it.
        for i, token in enumerate(after):
            post_token_exchange((on_a, on_b)[i % 2], "hal", token, True)
        wait_for(lambda: spool_drained(on_a), timeout=60, interval=0.2)
        wait_for(lambda: set(before + after) <= set(facts(on_b, ["hal"])), timeout=30)
        counted = facts(on_b, ["hal"])
    assert [t for t, n in counted.items() if n > 1] == []


def test_with_the_queue_down_chats_are_answered_and_their_exchanges_lost_loudly(
    replicas: Replicas, upstream: ScriptedUpstream, postgres_server: PostgresServer
) -> None:
    upstream.script(token_extractor)
    (gateway,) = replicas.start(1)
    lost, kept = new_token(), new_token()
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        postgres_server.stop()
        try:
            started = time.monotonic()
            response = post_token_exchange(http, "ivy", lost, False)
            held = time.monotonic() - started
            assert response.status_code == 200
            assert lost in response.json()["choices"][0]["message"]["content"]
        finally:
            postgres_server.start()
        # The answer waited for the queue a bounded time (3-5 s), then went out.
        assert held < 8, held
        assert "NOT recorded for memory" in gateway.log()
        # The queue is back: the next exchange is recorded and extracted.
        assert post_token_exchange(http, "ivy", kept, False).status_code == 200
        wait_for(lambda: kept in facts(http, ["ivy"]), timeout=30)
        assert lost not in facts(http, ["ivy"])
