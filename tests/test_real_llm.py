"""The gateway in front of a real local model server, as a user runs it.

The upstream is llama-cpp-python's OpenAI-compatible server with
SmolLM2-135M-Instruct (tests/llama_server.py): the only upstream, and the
extraction endpoint too (`memory.llm.base_url` unset). The app is the official
`openai` SDK, the user named by `X-User-Id`. The model is tiny, so nothing here
judges what it extracts: these tests check the protocol and the robustness a
user of a one-slot local server depends on (every extraction job ends, a
user's stream is never cut short by the gateway's own call, failures are
visible).

What this server does that a scripted upstream does not:
- `response_format: {"type": "json_schema"}` is a 500 (a request-validation
  error), `{"type": "json_object", "schema": ...}` works;
- a prompt longer than `--n_ctx` is a 400 `context_length_exceeded`;
- one request at a time: while a *stream* runs, any other request (a
  completion, even `GET /v1/models`) makes it end early with `[DONE]` and no
  `finish_reason` (`--interrupt_requests True`, its default); a non-streamed
  completion is never interrupted, later requests wait for it;
- the model name in a request is ignored (any name answers).

Needs the `real-llm` extra; without it every test here skips and says how
to install it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.gateway_server import GatewayServer, gateway_config_for
from tests.llama_server import (
    LlamaServer,
    LlamaServers,
    free_port,
    llama_server,  # noqa: F401 (a fixture)
    llama_servers,  # noqa: F401 (a fixture)
    start_llama_server,
)

pytestmark = [pytest.mark.real_llm, pytest.mark.timeout(300)]

ALICE = {"X-User-Id": "alice"}
BOB = {"X-User-Id": "bob"}
FINAL = ("done", "failed")
# How long the extraction jobs the gateway queued may take to reach `done` or
# `failed`. One call takes 1-5 s here (an ~800-token prompt, up to 384 tokens
# of answer at ~100 tokens/s on two cores; a 4k-token prompt adds ~3 s), a job
# makes at most two (`max_attempts` below) and one user's jobs run one after
# the other: these bounds are several times what is needed, and a job still
# pending after them is stuck.
EXTRACTION_BOUND = 120.0  # a few jobs
# One job: a long prompt on two cores that another process is also using
# (a build, another test run) took 45 s once; stuck means far longer.
ONE_JOB_BOUND = 90.0
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
# Memory settings of every gateway here: what a user of a small local model
# would set (its context window), and quick retries so a failing job reaches
# `failed` in seconds rather than minutes. Everything else is the default,
# `memory.llm.yield_to_chat: auto` included (on: the endpoint is on loopback).
MEMORY: dict[str, Any] = {
    "llm": {"context_tokens": 4096},
    "spool": {"backoff_initial": 0.2, "backoff_max": 1.0, "max_attempts": 2},
}


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@pytest.fixture
def real_gateway(
    start_gateway: Callable[..., GatewayServer],
    llama_server: LlamaServer,  # noqa: F811
    tmp_path: Path,
) -> Callable[..., GatewayServer]:
    """`real_gateway(server=None, **memory)`: the gateway with `server` (the
    default llama server) as its only upstream, memory on (`MEMORY` plus
    `memory` overrides)."""

    def start(server: LlamaServer | None = None, **memory: Any) -> GatewayServer:
        upstream = server or llama_server
        config = gateway_config_for(
            upstream.base_url, tmp_path / "data", memory=merged(MEMORY, memory)
        )
        return start_gateway(config)

    return start


@pytest.fixture
def admin_of() -> Iterator[Callable[[GatewayServer], httpx.Client]]:
    """The management API of a gateway, as a loopback client (no admin key)."""
    clients: list[httpx.Client] = []

    def make(gateway: GatewayServer) -> httpx.Client:
        clients.append(httpx.Client(base_url=gateway.url, timeout=30))
        return clients[-1]

    yield make
    for c in clients:
        c.close()


def sdk(gateway: GatewayServer) -> openai.OpenAI:
    # A generation of a few hundred tokens, or one queued behind an extraction
    # call, takes seconds on two cores; a 3,300-token prompt took over 60 s on
    # a machine busy with other tests. Retries would hide what happened.
    return openai.OpenAI(base_url=gateway.base_url, api_key="sk-client", max_retries=0, timeout=150)


@dataclass
class Streamed:
    text: str = ""
    finish_reason: str | None = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    chunks: int = 0
    first_token_s: float | None = None
    total_s: float = 0.0


def stream_chat(
    client: openai.OpenAI,
    headers: dict[str, str],
    messages: list[dict[str, Any]],
    *,
    on_first_token: Callable[[], None] | None = None,
    **body: Any,
) -> Streamed:
    """One streamed chat through the SDK; `on_first_token` runs when the first
    content arrives (the server is then generating this answer)."""
    out = Streamed()
    start = time.monotonic()
    with client.chat.completions.with_streaming_response.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        extra_headers=headers,
        extra_body=body,
    ) as response:
        out.headers = response.headers
        for chunk in response.parse():
            out.chunks += 1
            for choice in chunk.choices:
                if choice.delta.content:
                    if out.first_token_s is None:
                        out.first_token_s = time.monotonic() - start
                        if on_first_token is not None:
                            on_first_token()
                    out.text += choice.delta.content
                if choice.finish_reason is not None:
                    out.finish_reason = choice.finish_reason
    out.total_s = time.monotonic() - start
    return out


def plain_chat(
    client: openai.OpenAI, headers: dict[str, str], messages: list[dict[str, Any]], **body: Any
) -> tuple[str, httpx.Headers]:
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        extra_headers=headers,
        extra_body=body,
    )
    return raw.parse().choices[0].message.content or "", raw.headers


def jobs_of(http: httpx.Client, user: str) -> list[dict[str, Any]]:
    response = http.get("/v1/memories/jobs", params={"user_id": user, "limit": 1000})
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def summary(jobs: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{j['id'][:8]} {j['state']} attempts={j['attempts']}"
        f" last_error={(j['last_error'] or '')[:300]!r}"
        for j in jobs
    )


def wait_final(
    http: httpx.Client, user: str, *, expected: int, timeout: float = EXTRACTION_BOUND
) -> list[dict[str, Any]]:
    """Wait until `user` has `expected` jobs, each `done` or `failed`."""
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = jobs_of(http, user)
        if len(jobs) >= expected and all(j["state"] in FINAL for j in jobs):
            return jobs
        time.sleep(0.25)
    raise AssertionError(
        f"{user}'s extraction jobs did not all reach done/failed within {timeout:.0f} s"
        f" ({len(jobs)} of {expected} expected jobs queued): {summary(jobs)}"
    )


def assert_failed_jobs_say_why(jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        if job["state"] == "failed":
            assert job["last_error"], f"a failed job without a reason: {summary([job])}"


# --- a: chat and extraction, end to end ---------------------------------------


def test_every_extraction_job_of_a_few_chats_reaches_a_final_state(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
) -> None:
    """A user states facts over four chats, plain and streamed, resending the
    history as SDK apps do; each exchange queues one extraction job, and every
    one of them ends `done` (or `failed` with its reason) within
    EXTRACTION_BOUND: none waits forever. The memory API answers throughout.
    The chats go back to back, so an extraction call and the next chat meet
    at the one-slot server."""
    gateway = real_gateway()
    client, admin = sdk(gateway), admin_of(gateway)
    turns = [
        ("My name is Alice and I live in Berlin.", False),
        ("I'm allergic to peanuts, please remember that.", True),
        ("My sister Anna works as a doctor in Lyon.", False),
        ("I play the cello every Sunday morning.", True),
    ]
    history: list[dict[str, Any]] = [SYSTEM]
    for text, stream in turns:
        history.append({"role": "user", "content": text})
        if stream:
            answer = stream_chat(client, ALICE, history, max_tokens=48)
            assert answer.finish_reason is not None, (
                f"the stream of {text!r} ended without a finish_reason after"
                f" {answer.chunks} chunks: cut short ({answer.text!r})"
            )
            reply, headers = answer.text, answer.headers
        else:
            reply, headers = plain_chat(client, ALICE, history, max_tokens=48)
        assert headers["X-Memory-Status"].startswith("ok"), headers["X-Memory-Status"]
        history.append({"role": "assistant", "content": reply})

    jobs = wait_final(admin, "alice", expected=len(turns))
    assert len(jobs) == len(turns), summary(jobs)
    assert_failed_jobs_say_why(jobs)

    listed = admin.get("/v1/memories", params={"user_id": "alice"})
    assert listed.status_code == 200, listed.text
    assert isinstance(listed.json()["data"], list)
    found = admin.post("/v1/memories/search", json={"query": "allergy", "user_id": "alice"})
    assert found.status_code == 200, found.text
    stats = admin.get("/v1/memories/stats")
    assert stats.status_code == 200, stats.text
    spool = stats.json()["spool"]
    assert spool["pending"] == spool["running"] == 0, spool
    assert spool["done"] + spool["failed"] == len(turns), spool


# --- b: the gateway's own extraction call never cuts a user's stream -----------


def queue_extraction(http: httpx.Client, user: str) -> str:
    """An extraction job for `user`, through the management API (`infer: true`)."""
    response = http.post(
        "/v1/memories",
        json={
            "user_id": user,
            "messages": [
                {"role": "user", "content": "I moved to Hamburg last year and I work as a nurse."},
                {"role": "assistant", "content": "Nice! How do you like Hamburg?"},
            ],
            "infer": True,
        },
    )
    assert response.status_code in (200, 201), response.text
    return str(response.json()["job_id"])


def wait_running(http: httpx.Client, user: str, job_id: str, timeout: float = 15.0) -> str:
    """Wait until the job is claimed (its extraction call is then being made) or over."""
    deadline = time.monotonic() + timeout
    state = "unknown"
    while time.monotonic() < deadline:
        state = next((j["state"] for j in jobs_of(http, user) if j["id"] == job_id), "missing")
        if state != "pending":
            return state
        time.sleep(0.005)
    return state


LONG_ANSWER = [
    SYSTEM,
    {"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."},
]


@pytest.mark.parametrize("order", ["stream-then-extraction", "extraction-then-stream"])
def test_a_stream_running_beside_an_extraction_call_ends_with_a_finish_reason(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
    order: str,
) -> None:
    """The timing is arranged, not hoped for.

    stream-then-extraction: alice's stream must produce at least 200 tokens
    (llama-cpp-python's `min_tokens`, ~2 s here); when its first token
    arrives, i.e. while the server is generating it, bob's exchange is
    queued through the management API (`infer: true`). His extraction job
    is claimed at once (bob's key is known from a `read`-mode chat before,
    so it does not wait for one), and its call would reach the server while
    the stream still has most of its 200+ tokens to go: unless the gateway
    holds its call back until the stream is over, the server ends the
    stream early, without a finish_reason.

    extraction-then-stream: bob's job is queued first and the stream starts
    once the job is claimed (its call in flight); the server does not
    interrupt a non-streamed call, so the stream waits for it and must still
    end normally.

    Either way bob's job must then end (done/failed): that also shows the
    extraction call really reached the model, and the first check did not
    pass only because the gateway never calls it.
    """
    gateway = real_gateway()
    client, admin = sdk(gateway), admin_of(gateway)
    # bob's key (the client's) is known from now on, so his job need not wait for one.
    plain_chat(client, {**BOB, "X-Memory-Mode": "read"}, [{"role": "user", "content": "hi"}])
    queued: dict[str, Any] = {}

    def trigger() -> None:
        queued["at"] = time.monotonic()
        queued["job"] = queue_extraction(admin, "bob")

    if order == "extraction-then-stream":
        trigger()
        queued["state"] = wait_running(admin, "bob", queued["job"])
    start = time.monotonic()
    answer = stream_chat(
        client,
        {**ALICE, "X-Memory-Mode": "read"},
        LONG_ANSWER,
        max_tokens=300,
        min_tokens=200,
        on_first_token=trigger if order == "stream-then-extraction" else None,
    )
    end = time.monotonic()
    assert "job" in queued, "the stream produced no content at all"
    assert answer.finish_reason is not None, (
        f"the stream was cut short: no finish_reason after {answer.chunks} chunks"
        f" ({len(answer.text)} characters, {answer.total_s:.1f} s; bob's extraction was queued"
        f" {queued['at'] - start:.2f} s after the stream started)"
    )
    if order == "stream-then-extraction":
        assert queued["at"] < end - 0.5, "the extraction was queued too late to overlap"
    jobs = wait_final(admin, "bob", expected=1, timeout=ONE_JOB_BOUND)
    assert_failed_jobs_say_why(jobs)


# --- c: what else a user of a real local server runs into ----------------------


def test_a_job_queued_through_the_api_for_a_user_who_never_chatted_ends(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
) -> None:
    """`POST /v1/memories` with `infer: true` against a keyless local server,
    no `memory.llm.api_key`: the endpoint needs no key, so the job must not
    wait for one that no request of this user will ever bring."""
    gateway = real_gateway()
    admin = admin_of(gateway)
    queue_extraction(admin, "carol")
    jobs = wait_final(admin, "carol", expected=1, timeout=ONE_JOB_BOUND)
    assert_failed_jobs_say_why(jobs)


def extraction_section(stats: dict[str, Any]) -> dict[str, Any]:
    assert "extraction" in stats, f"GET /v1/memories/stats has no `extraction` section: {stats}"
    section = stats["extraction"]
    assert isinstance(section, dict), section
    return section


def field_like(section: dict[str, Any], *words: str) -> Any:
    """The value of the one key of `section` that contains all `words` (the
    design names these fields but not their exact spelling)."""
    keys = [k for k in section if all(w in k for w in words)]
    assert len(keys) == 1, f"expected one field named like {words} in {sorted(section)}"
    return section[keys[0]]


def test_stats_name_the_local_model_and_the_output_mode_it_accepts(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
    llama_server: LlamaServer,  # noqa: F811
) -> None:
    """With `memory.llm.model` unset the gateway asks the endpoint's
    `GET /models`, which lists exactly one model here (the GGUF's path), and
    uses it; the server refuses `json_schema` (a 500) and accepts
    `json_object`, which is the mode it learns. Stats say so, and a chat says
    plain `ok` while extraction works."""
    gateway = real_gateway()
    client, admin = sdk(gateway), admin_of(gateway)
    plain_chat(client, ALICE, [SYSTEM, {"role": "user", "content": "I live in Oslo."}])
    jobs = wait_final(admin, "alice", expected=1, timeout=ONE_JOB_BOUND)
    _, headers = plain_chat(client, ALICE, [SYSTEM, {"role": "user", "content": "Hi!"}])
    section = extraction_section(admin.get("/v1/memories/stats").json())
    assert section.get("endpoint") == llama_server.base_url, section
    assert section.get("model") == llama_server.model_id, section
    if jobs[0]["state"] == "done":
        assert section.get("mode") == "json_object", section
        assert field_like(section, "last", "success"), section
        assert headers["X-Memory-Status"] == "ok"
    assert isinstance(field_like(section, "reason"), dict), section


def test_an_unreachable_extraction_endpoint_is_reported_as_failing_and_recovers(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
    tmp_path: Path,
) -> None:
    """Chat goes to the running llama server; `memory.llm.base_url` names a
    second one (a separate extraction model) that is not running. Chat keeps
    working; once every extraction attempt of `failing_window_seconds` has
    failed, chats say `X-Memory-Status: ok; extraction=failing` and stats name
    the endpoint and the last error. The jobs wait (an outage parks nothing
    as failed); when the server comes up they end and the status is `ok`."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/v1"
    gateway = real_gateway(llm={"base_url": endpoint, "failing_window_seconds": 2.0})
    client, admin = sdk(gateway), admin_of(gateway)
    ask = [SYSTEM, {"role": "user", "content": "I live in Oslo."}]
    _, headers = plain_chat(client, ALICE, ask, max_tokens=16)
    assert headers["X-Memory-Status"] == "ok"

    status, deadline = headers["X-Memory-Status"], time.monotonic() + 20
    while status != "ok; extraction=failing" and time.monotonic() < deadline:
        time.sleep(0.5)
        _, headers = plain_chat(client, {**ALICE, "X-Memory-Mode": "read"}, ask, max_tokens=1)
        status = headers["X-Memory-Status"]
    jobs = jobs_of(admin, "alice")
    assert status == "ok; extraction=failing", f"still {status!r} after 20 s; {summary(jobs)}"
    assert all(j["state"] in ("pending", "running") for j in jobs), summary(jobs)
    section = extraction_section(admin.get("/v1/memories/stats").json())
    assert section.get("endpoint") == endpoint, section
    assert field_like(section, "last", "error"), section

    extractor = start_llama_server(tmp_path / "llama-extraction", port=port)
    try:
        wait_final(admin, "alice", expected=1, timeout=ONE_JOB_BOUND)
        # Chats read the status the gateway refreshes every second.
        deadline = time.monotonic() + 10
        while status != "ok" and time.monotonic() < deadline:
            _, headers = plain_chat(client, {**ALICE, "X-Memory-Mode": "read"}, ask, max_tokens=1)
            status = headers["X-Memory-Status"]
        assert status == "ok"
    finally:
        extractor.stop()


def test_an_exchange_longer_than_the_extraction_context_is_clipped_not_failed(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
) -> None:
    """A ~3,300-token message fits the server's 4096-token window for chat,
    but not with the extraction prompt around it and `max_tokens` (384) to
    spare: unclipped, the extraction call is a 400 `context_length_exceeded`
    on every attempt. With `memory.llm.context_tokens: 4096` (the server's
    `--n_ctx`), the gateway clips the prompt to fit and the model answers."""
    gateway = real_gateway()
    client, admin = sdk(gateway), admin_of(gateway)
    filler = " ".join(
        f"On day {i} I walked my dog Rex along the river, then I cooked dinner for my family."
        for i in range(180)
    )
    message = f"My name is Alice and I live in Berlin. Here is my diary: {filler}"
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2",
        messages=[{"role": "user", "content": message}],
        extra_headers=ALICE,
        max_tokens=16,
    )
    usage = raw.parse().usage
    assert usage is not None and 3000 < usage.prompt_tokens < 4096 - 16, usage
    [job] = wait_final(admin, "alice", expected=1, timeout=ONE_JOB_BOUND)
    # The prompt fitted: the model answered. What a 135M model answers may
    # still be invalid (an alias it made up): that is `invalid_answer`, a
    # retry's business, never the context error every attempt got unclipped.
    assert job["state"] == "done" or job["reason"] == "invalid_answer", summary([job])
    assert "context" not in (job["last_error"] or ""), summary([job])


def test_a_prompt_too_long_for_the_local_model_is_its_400_and_records_nothing(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
) -> None:
    gateway = real_gateway()
    client, admin = sdk(gateway), admin_of(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        plain_chat(client, ALICE, [{"role": "user", "content": "word " * 5000}])
    assert caught.value.code == "context_length_exceeded", caught.value.body
    assert caught.value.response.headers["X-Memory-Status"] == "ok"
    time.sleep(0.5)
    assert jobs_of(admin, "alice") == []


def test_a_client_that_hangs_up_stops_the_servers_generation(
    real_gateway: Callable[..., GatewayServer],
    admin_of: Callable[[GatewayServer], httpx.Client],
    llama_servers: LlamaServers,  # noqa: F811
) -> None:
    """With `--interrupt_requests False` the server finishes a stream unless
    its client goes away. An app that closes a long stream after a few chunks
    (a user who closes the tab) must free the one slot at once: the gateway
    closes its upstream connection, the server stops generating, and the next
    request is answered in about its own time, not after the abandoned 2,000
    tokens (~20 s). The abandoned exchange is not recorded."""
    server = llama_servers("--interrupt_requests", "False")
    gateway = real_gateway(server)
    client, admin = sdk(gateway), admin_of(gateway)
    with client.chat.completions.with_streaming_response.create(
        model="smollm2",
        messages=LONG_ANSWER,  # type: ignore[arg-type]
        stream=True,
        extra_headers=ALICE,
        max_tokens=2000,
        extra_body={"min_tokens": 2000},
    ) as response:
        for n, _ in enumerate(response.parse()):
            if n == 5:
                break
    start = time.monotonic()
    plain_chat(client, BOB, [{"role": "user", "content": "Say hi."}], max_tokens=4)
    waited = time.monotonic() - start
    assert waited < 8, f"the next request waited {waited:.1f} s: the abandoned stream ran on"
    time.sleep(0.5)
    assert jobs_of(admin, "alice") == []
