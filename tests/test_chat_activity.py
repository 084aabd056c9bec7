"""Yield to chat (gateway/chat_activity.py): the chat requests in flight per
upstream, counted by the proxy across processes, and the gate that makes the
gateway's extraction calls wait for them on a local one-slot model server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from gateway import supervisor as supervisor_module
from gateway.chat_activity import (
    ChatActivity,
    YieldGate,
    clear_slot,
    is_local_host,
    log_yield_decision,
    shared_counters,
    slot_size,
    wait_quiet,
    yield_decision,
    yield_gate,
)
from gateway.config import Config
from tests.extraction import is_extraction, llm_answer, wait_for
from tests.gateway_server import GatewayServer, gateway_config_for
from tests.reliability import memory_settings
from tests.upstream import DONE, JSONReply, SSEReply, chunk, text_stream

MESSAGES = [{"role": "user", "content": "hello"}]


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for state another thread or process changes."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the condition")
        time.sleep(0.005)


def config_for(base_url: str, llm: dict[str, Any] | None = None, **server: Any) -> Config:
    return msgspec.convert(
        {
            "upstreams": [
                {"name": "chat", "base_url": base_url, "default": True},
                {"name": "other", "base_url": "https://api.example.com/v1"},
            ],
            "server": server,
            "memory": {"llm": llm or {}},
        },
        Config,
    )


# -- the counters ----------------------------------------------------------


def test_a_lease_counts_one_request_until_released_once():
    activity = ChatActivity(["a", "b"])
    first, second = activity.begin("a"), activity.begin("a")
    other = activity.begin("b")
    assert (activity.in_flight("a"), activity.in_flight("b")) == (2, 1)
    first.release()
    first.release()  # idempotent: every clean-up path may call it
    assert activity.in_flight("a") == 1
    second.release()
    other.release()
    assert (activity.in_flight("a"), activity.in_flight("b")) == (0, 0)


def test_upstreams_on_one_server_share_their_count():
    """An `anthropic` and an `openai` entry for the same local server: a
    chat through either keeps extraction off that server."""
    config = gateway_config_for(
        "http://127.0.0.1:8000/v1",
        Path("/unused"),
        upstreams=[
            {"name": "local", "base_url": "http://127.0.0.1:8000/v1", "default": True},
            {"name": "local-claude", "base_url": "http://127.0.0.1:8000/v1/", "api": "anthropic"},
            {"name": "hosted", "base_url": "https://api.openai.com/v1"},
        ],
    )
    activity = ChatActivity.for_config(config)
    lease = activity.begin("local-claude")
    assert (activity.in_flight("local"), activity.in_flight("hosted")) == (1, 0)
    lease.release()
    assert activity.in_flight("local") == 0


def test_each_process_writes_its_own_slot_and_readers_add_them_up():
    counters = multiprocessing.get_context("spawn").RawArray("q", 3 * slot_size(2))
    workers = [ChatActivity(["a", "b"], counters, slot=i) for i in range(3)]
    leases = [workers[0].begin("b"), workers[2].begin("b"), workers[2].begin("a")]
    reader = ChatActivity(["a", "b"], counters)
    assert (reader.in_flight("a"), reader.in_flight("b")) == (1, 2)
    assert (workers[2].own("b"), workers[1].own("b")) == (1, 0)
    clear_slot(counters, 2, 2)  # worker 2 died with its requests
    assert (reader.in_flight("a"), reader.in_flight("b")) == (0, 1)
    leases[0].release()
    assert reader.in_flight("b") == 0


def test_the_supervisors_array_has_a_slot_per_worker():
    config = config_for("http://127.0.0.1:8000/v1", workers=3)
    counters = shared_counters(config)
    assert len(counters) == 3 * slot_size(2)
    ChatActivity.for_config(config, counters, slot=2).begin("other")
    assert counters[2 * slot_size(2) + 1] == 1
    with pytest.raises(ValueError, match="slot 3"):
        ChatActivity.for_config(config, counters, slot=3)


def _hold(counters: Any, slot: int, counted: Any, finish: Any, release: bool) -> None:
    lease = ChatActivity(["a", "b"], counters, slot=slot).begin("b")
    counted.set()
    finish.wait(30)
    if release:
        lease.release()
    # else: dies with the request in flight


@pytest.mark.parametrize("release", [True, False], ids=["released", "died-holding"])
def test_a_count_made_in_a_spawned_process_is_seen_by_the_parent(release):
    ctx = multiprocessing.get_context("spawn")
    counters = ctx.RawArray("q", 2 * slot_size(2))
    counted, finish = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(counters, 1, counted, finish, release))
    proc.start()
    try:
        assert counted.wait(30)
        parent = ChatActivity(["a", "b"], counters, slot=0)
        assert parent.in_flight("b") == 1
        assert parent.own("b") == 0
        finish.set()
        proc.join(30)
        assert proc.exitcode == 0
        if release:
            assert parent.in_flight("b") == 0
        else:
            assert parent.in_flight("b") == 1  # what the supervisor clears
            clear_slot(counters, 1, 2)
            assert parent.in_flight("b") == 0
    finally:
        if proc.is_alive():
            proc.kill()


# -- waiting ---------------------------------------------------------------


async def test_wait_quiet_returns_at_once_when_no_chat_is_in_flight():
    activity = ChatActivity(["a", "b"])
    activity.begin("b")  # another upstream's chats do not count
    assert await wait_quiet(activity, "a", 60.0) == 0.0


async def test_wait_quiet_waits_for_a_quiet_moment_after_the_last_chat():
    """A client that sends its next request as soon as an answer ends leaves
    a gap of milliseconds: a call must not take it."""
    activity = ChatActivity(["a"])
    activity.begin("a").release()
    assert activity.quiet_for("a") < 0.1
    waited = await wait_quiet(activity, "a", 60.0, poll=0.005, quiet=0.2)
    assert 0.1 <= waited < 5
    assert await wait_quiet(activity, "a", 60.0, quiet=0.2) == 0.0
    # A chat that begins during the quiet time starts the wait over.
    activity.begin("a").release()
    waiting = asyncio.ensure_future(wait_quiet(activity, "a", 60.0, poll=0.005, quiet=0.3))
    await asyncio.sleep(0.15)
    lease = activity.begin("a")
    await asyncio.sleep(0.3)
    assert not waiting.done(), "it went ahead during a chat"
    lease.release()
    assert 0.3 <= await asyncio.wait_for(waiting, 5) < 5


async def test_wait_quiet_waits_until_the_chat_ends():
    activity = ChatActivity(["a"])
    lease = activity.begin("a")
    waiting = asyncio.ensure_future(wait_quiet(activity, "a", 60.0, poll=0.005))
    done, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not done, "it did not wait for the chat in flight"
    lease.release()
    waited = await asyncio.wait_for(waiting, 5)
    assert 0.2 <= waited < 5


async def test_wait_quiet_gives_up_after_the_maximum():
    activity = ChatActivity(["a"])
    activity.begin("a")  # never released
    started = time.monotonic()
    waited = await wait_quiet(activity, "a", 0.15, poll=0.01)
    assert 0.15 <= waited < 2
    assert time.monotonic() - started < 2


async def test_the_gate_logs_a_wait_at_debug(caplog):
    activity = ChatActivity(["a"])
    gate = YieldGate(activity, "a", max_seconds=0.05, poll=0.01)
    with caplog.at_level(logging.DEBUG, logger="gateway.chat_activity"):
        async with gate():
            pass
        assert not caplog.records  # no wait, nothing to say
        activity.begin("a")
        async with gate():
            pass
    [record] = caplog.records
    assert record.levelno == logging.DEBUG
    assert "waited" in record.getMessage()
    assert "'a'" in record.getMessage()
    assert "still in flight" in record.getMessage()


# -- on or off -------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "10.1.2.3",
        "192.168.1.20",
        "172.16.0.5",
        "169.254.10.1",
        "[::1]",
        "[fd00::5]",
        "100.101.102.103",
        "ollama",
        "gpu-box.local",
        "host.docker.internal",
    ],
)
def test_auto_yields_for_a_server_on_this_machine_or_a_private_network(host):
    url = f"http://{host}:8080/v1"
    assert is_local_host(httpx.URL(url).host)
    config = config_for(url)
    assert config.memory.llm.yield_to_chat == "auto"
    upstream, _ = yield_decision(config)
    assert upstream == "chat"
    gate = yield_gate(config, ChatActivity.for_config(config))
    assert gate is not None
    assert gate.upstream == "chat"
    assert gate.max_seconds == config.memory.llm.yield_max_seconds


@pytest.mark.parametrize("host", ["api.openai.com", "8.8.8.8", "openrouter.ai"])
def test_auto_does_not_yield_for_a_hosted_api(host):
    config = config_for(f"https://{host}/v1")
    upstream, why = yield_decision(config)
    assert upstream is None
    assert "yield_to_chat: true" in why
    assert yield_gate(config, ChatActivity.for_config(config)) is None


def test_true_and_false_force_it():
    hosted = config_for("https://api.openai.com/v1", {"yield_to_chat": True})
    assert yield_decision(hosted)[0] == "chat"
    local = config_for("http://127.0.0.1:8080/v1", {"yield_to_chat": False})
    assert yield_decision(local) == (None, "memory.llm.yield_to_chat is false")


def test_an_extraction_endpoint_that_is_no_chat_upstream_has_nothing_to_yield_to():
    config = config_for(
        "http://127.0.0.1:8080/v1", {"base_url": "http://127.0.0.1:9999/v1", "yield_to_chat": True}
    )
    upstream, why = yield_decision(config)
    assert upstream is None
    assert "not one of the chat upstreams" in why


def test_the_extraction_endpoint_picks_which_upstream_is_watched():
    config = config_for("https://api.openai.com/v1", {"base_url": "https://api.example.com/v1/"})
    assert yield_decision(config)[0] is None  # hosted
    forced = config_for(
        "http://127.0.0.1:1/v1", {"base_url": "https://api.example.com/v1", "yield_to_chat": True}
    )
    assert yield_decision(forced)[0] == "other"


def test_the_decision_is_logged_once_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="gateway.chat_activity"):
        log_yield_decision(config_for("http://127.0.0.1:8080/v1"))
        log_yield_decision(config_for("https://api.openai.com/v1"))
        log_yield_decision(
            msgspec.convert({"memory": {"enabled": False}}, Config)
        )  # no memory, no extraction: nothing to say
    on, off = (r.getMessage() for r in caplog.records)
    assert "wait while chat requests to upstream 'chat' are in flight" in on
    assert "does not yield" in off
    assert "api.openai.com" in off


# -- counted by the proxy, over real HTTP ----------------------------------


@pytest.fixture
def activity_gateway(start_gateway, gateway_config):
    gateway = start_gateway(gateway_config)
    activity: ChatActivity = gateway.app.state.chat_activity
    return gateway, activity


def test_a_stream_is_counted_while_in_flight_and_not_after(activity_gateway, upstream):
    gateway, activity = activity_gateway
    gate = threading.Event()
    upstream.push(SSEReply(text_stream(["once", " upon", " a time"]), gates={2: gate}))
    with gateway.client() as sdk:
        stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = iter(stream)
        next(chunks)
        assert activity.in_flight("scripted") == 1
        gate.set()
        rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "stop"
    until(lambda: activity.in_flight("scripted") == 0)


def test_a_non_streamed_chat_is_counted_until_its_answer_is_read(activity_gateway, upstream):
    gateway, activity = activity_gateway
    gate = threading.Event()
    answer = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    }
    data = json.dumps(answer).encode()
    upstream.push(
        SSEReply(
            [data[:20], data[20:]],
            gates={1: gate},
            headers={"content-type": "application/json"},
        )
    )
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=gateway.url, timeout=30) as http:
        future = pool.submit(
            http.post, "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
        )
        until(lambda: bool(upstream.requests) and upstream.last().sent == [0])
        assert activity.in_flight("scripted") == 1
        gate.set()
        response = future.result(30)
    assert response.status_code == 200
    assert response.json() == answer
    until(lambda: activity.in_flight("scripted") == 0)


def test_a_stream_the_client_abandons_is_no_longer_counted(activity_gateway, upstream):
    gateway, activity = activity_gateway
    never = threading.Event()
    upstream.push(SSEReply(text_stream(["once", " upon", " a time"]), gates={2: never}))
    with gateway.client() as sdk:
        stream = sdk.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        next(iter(stream))
        assert activity.in_flight("scripted") == 1
        stream.close()
    assert upstream.last().disconnected.wait(15)
    until(lambda: activity.in_flight("scripted") == 0)


def test_a_client_gone_before_the_stream_started_is_no_longer_counted(activity_gateway, upstream):
    """The client hangs up while the gateway still waits for the upstream's
    headers: whether or not the relay ever runs, the count is released."""
    gateway, activity = activity_gateway
    headers_go = threading.Event()

    def late_headers(request: Any) -> SSEReply | None:
        if request.path != "/v1/chat/completions":
            return None
        headers_go.wait(15)  # holds the upstream's loop: nothing else runs there
        return SSEReply([chunk("never", role="assistant"), DONE], gates={0: threading.Event()})

    upstream.script(late_headers)
    port = int(gateway.url.rsplit(":", 1)[1])
    body = json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            until(lambda: activity.in_flight("scripted") == 1)
    finally:
        headers_go.set()
    until(lambda: activity.in_flight("scripted") == 0)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_an_upstream_error_answer_is_no_longer_counted(activity_gateway, upstream, stream):
    gateway, activity = activity_gateway
    upstream.push(
        JSONReply(
            {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}},
            status=500,
        )
    )
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": stream}
        )
    assert response.status_code == 500
    until(lambda: activity.in_flight("scripted") == 0)


def test_a_stream_the_upstream_breaks_off_is_no_longer_counted(activity_gateway, upstream):
    gateway, activity = activity_gateway
    upstream.push(SSEReply(text_stream(["once", " upon", " a time"]), cut_after=2))
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        response = http.post(
            "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, "stream": True}
        )
    assert b'"error"' in response.content
    until(lambda: activity.in_flight("scripted") == 0)


def test_an_unreachable_upstream_is_no_longer_counted(start_gateway, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = start_gateway(gateway_config_for(f"http://127.0.0.1:{port}/v1", tmp_path / "data"))
    activity: ChatActivity = gateway.app.state.chat_activity
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for stream in (False, True):
            response = http.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": MESSAGES, "stream": stream},
            )
            assert response.status_code == 502
    assert activity.in_flight("scripted") == 0


def test_other_paths_are_not_chats(activity_gateway, upstream):
    gateway, activity = activity_gateway
    with httpx.Client(
        base_url=gateway.url, timeout=30, headers={"authorization": "Bearer sk-client"}
    ) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
    assert activity.in_flight("scripted") == 0


async def test_the_gate_lets_one_call_through_at_a_time():
    """Released together, two calls would both queue at a one-slot server,
    and a chat arriving between them would be cut short: the second call
    enters only when the first has left, and then only if no chat is in
    flight."""
    activity = ChatActivity(["a"])
    gate = YieldGate(activity, "a", max_seconds=30, poll=0.005)
    inside = asyncio.Event()
    leave = asyncio.Event()
    order: list[str] = []

    async def call(name: str) -> None:
        async with gate():
            order.append(f"{name} in")
            inside.set()
            await leave.wait()
            order.append(f"{name} out")

    first = asyncio.ensure_future(call("first"))
    await inside.wait()
    second = asyncio.ensure_future(call("second"))
    await asyncio.sleep(0.05)
    assert order == ["first in"]
    chat = activity.begin("a")  # a chat arrives while the first call runs
    leave.set()
    await first
    await asyncio.sleep(0.05)
    assert order == ["first in", "first out"], "the second call went ahead during the chat"
    chat.release()
    await asyncio.wait_for(second, 5)
    assert order == ["first in", "first out", "second in", "second out"]


async def test_extraction_waits_for_a_chat_in_flight_through_the_gateway(
    activity_gateway, upstream
):
    """The gate an extractor awaits, against a real chat through the gateway."""
    gateway, activity = activity_gateway
    gate = threading.Event()
    upstream.push(SSEReply(text_stream(["once", " upon"]), gates={1: gate}))
    yielding = YieldGate(activity, "scripted", max_seconds=30, poll=0.005)
    async with (
        httpx.AsyncClient(base_url=gateway.url, timeout=30) as http,
        http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "m", "messages": MESSAGES, "stream": True},
        ) as response,
    ):
        chunks = response.aiter_raw()
        await chunks.__anext__()

        async def call() -> None:
            async with yielding():
                pass

        waiting = asyncio.ensure_future(call())
        done, _ = await asyncio.wait({waiting}, timeout=0.2)
        assert not done, "the extraction call went ahead during the chat"
        gate.set()
        async for _ in chunks:
            pass
    await asyncio.wait_for(waiting, 5)
    assert activity.in_flight("scripted") == 0


# -- the supervisor --------------------------------------------------------


def _worker(
    config: Config,
    sock: socket.socket,
    index: int,
    supervisor: int,
    handoff: Any,
    counters: Any,
) -> None:
    """A serving worker with one chat in flight; worker 0's first run dies with it."""
    sock.close()
    activity = ChatActivity.for_config(config, counters, slot=index)
    runs = config.data_path / f"runs-{index}"
    earlier = runs.read_text() if runs.exists() else ""
    found = activity.own("chat")
    activity.begin("chat")
    runs.write_text(f"{earlier}{found}\n")
    if index == 0 and not earlier:
        os._exit(1)
    signal.pause()  # until the supervisor's SIGTERM


def test_a_dead_workers_chats_are_forgotten_when_it_is_restarted(tmp_path, monkeypatch):
    # A start that dies at once is a failed start; no back-off wait for this one.
    monkeypatch.setattr(supervisor_module, "STARTUP_SECONDS", 0.0)
    data = tmp_path / "data"
    data.mkdir()
    config = msgspec.convert(
        {
            "upstreams": [{"name": "chat", "base_url": "http://127.0.0.1:1/v1", "default": True}],
            "server": {"workers": 2},
            "memory": {"enabled": False},
            "data_dir": str(data),
        },
        Config,
    )
    sup = supervisor_module.Supervisor(config, _worker)
    reader = ChatActivity.for_config(config, sup.chat_counters)
    seen: list[int] = []

    def runs(index: int) -> list[str]:
        path = data / f"runs-{index}"
        return path.read_text().split() if path.exists() else []

    def stop_when_restarted() -> None:
        try:
            until(lambda: len(runs(0)) == 2 and len(runs(1)) == 1, timeout=60)
            # Both live workers hold one chat each; the dead run's is gone.
            seen.append(reader.in_flight("chat"))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the supervisor's handler: stop

    watcher = threading.Thread(target=stop_when_restarted)
    watcher.start()
    status = sup.run(supervisor_module.bind("127.0.0.1", 0))
    watcher.join()
    assert status == 0
    assert seen == [2]
    # The second run of worker 0 found its slot zeroed, not the 1 left by the first.
    assert runs(0) == ["0", "0"]


# -- end to end: extraction in the gateway's process yields to a user's stream


@pytest.mark.parametrize("yield_to_chat", ["auto", False])
def test_extraction_waits_while_a_stream_to_its_local_endpoint_is_in_flight(
    upstream, tmp_path, yield_to_chat
):
    """The scripted upstream is on loopback: `auto` holds the gateway's
    extraction call until the user's stream has ended; `false` shows the
    call would have gone out during it."""
    upstream.script(lambda r: llm_answer([]) if is_extraction(r) else None)
    config = gateway_config_for(
        upstream.url,
        tmp_path / "data",
        memory=memory_settings(upstream.url, llm={"yield_to_chat": yield_to_chat}),
    )
    gateway = GatewayServer(config, None)
    hooks = gateway.app.state.hooks
    reached = threading.Event()
    gate = hooks.call_gate
    if yield_to_chat == "auto":
        assert isinstance(gate, YieldGate)
        assert gate.upstream == "scripted"

        @contextlib.asynccontextmanager
        async def call_gate() -> AsyncIterator[None]:
            reached.set()
            async with gate():
                yield

        hooks.call_gate = call_gate
    else:
        assert gate is None
    gateway.start()
    try:
        activity: ChatActivity = gateway.app.state.chat_activity
        held = threading.Event()
        upstream.push(SSEReply(text_stream(["still", " talking"]), gates={1: held}))
        with (
            httpx.Client(base_url=gateway.url, timeout=30) as http,
            http.stream(
                "POST",
                "/v1/chat/completions",
                headers={"X-User-Id": "ann"},
                json={"model": "m", "messages": MESSAGES, "stream": True},
            ) as stream,
        ):
            chunks = stream.iter_raw()
            next(chunks)
            assert activity.in_flight("scripted") == 1
            # Another user's finished exchange: its extraction job starts now.
            done = http.post(
                "/v1/chat/completions",
                headers={"X-User-Id": "ben"},
                json={"model": "m", "messages": [{"role": "user", "content": "I like tea"}]},
            )
            assert done.status_code == 200
            if yield_to_chat == "auto":
                assert reached.wait(30), "the extraction job never reached its model call"
                until_not_extracted = time.monotonic() + 0.3
                while time.monotonic() < until_not_extracted:
                    assert not any(is_extraction(r) for r in list(upstream.requests))
                    time.sleep(0.01)
            else:
                wait_for(lambda: any(is_extraction(r) for r in list(upstream.requests)))
            held.set()
            rest = b"".join(chunks)
        assert rest.rstrip().endswith(b"data: [DONE]")
        until(lambda: activity.in_flight("scripted") == 0)
        wait_for(lambda: any(is_extraction(r) for r in list(upstream.requests)))
    finally:
        gateway.stop()
