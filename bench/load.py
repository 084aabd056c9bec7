"""A lean closed-loop load generator for chat completions, run as its own process.

`concurrency` keep-alive connections each send one request after another for
`duration` seconds (after a short warm-up). It speaks raw HTTP/1.1 over asyncio
streams (uvloop when present): a full HTTP client would spend more CPU than the
proxy under test on this 2-core machine. Prints one JSON object: request count,
errors, requests/s, latency and time-to-first-byte percentiles in milliseconds.

TTFB is the time to the first body byte: for a stream, the first SSE chunk.

By default 64 distinct bodies are cycled, so with memory on most questions
were asked before and their embeddings come from the gateway's query cache;
`--fresh` makes every measured question new, as a real user's would be.

With several ports (`--port 8081 8082 8083`: replicas behind no load
balancer), each connection's requests go to them in turn, one after the other.

Example:
    python bench/load.py --port 8080 --concurrency 16 --duration 5 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

CITIES = ["Paris", "Lisbon", "Kyoto", "Oslo", "Lima", "Cairo", "Austin", "Hanoi", "Quito", "Perth"]
TOPICS = ["trip", "dentist", "sister", "garden", "bike", "thesis", "diet", "band", "move", "job"]


# What the last event of a complete stream of each API contains.
STREAM_ENDS = (b"[DONE]", b"response.completed", b"message_stop")
# The path each API is served at (`--api`).
PATHS = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
SYSTEM = "You are a helpful assistant."
HISTORY = [
    {"role": "user", "content": "Hi, I need some help planning."},
    {"role": "assistant", "content": "Of course, what would you like to plan?"},
]


def body(model: str, stream: bool, i: int, api: str = "chat") -> bytes:
    """A realistic request of `api` (a system prompt, a turn of history, a
    question); its question is the i-th."""
    city, topic = CITIES[i % len(CITIES)], TOPICS[(i // len(CITIES)) % len(TOPICS)]
    question = {
        "role": "user",
        "content": f"What do you remember about my {topic} and {city}? ({i})",
    }
    payload: dict[str, Any]
    if api == "responses":
        payload = {"model": model, "instructions": SYSTEM, "input": [*HISTORY, question]}
    elif api == "messages":
        payload = {
            "model": model,
            "max_tokens": 256,
            "system": SYSTEM,
            "messages": [*HISTORY, question],
        }
    else:
        messages = [{"role": "system", "content": SYSTEM}, *HISTORY, question]
        payload = {"model": model, "messages": messages, "temperature": 0}
    if stream:
        payload["stream"] = True
    return msgspec.json.encode(payload)


def bodies(model: str, stream: bool, n: int = 64, api: str = "chat") -> list[bytes]:
    """Distinct bodies, cycled: after the first n requests every question has
    been asked before (and its embedding is in the gateway's query cache)."""
    return [body(model, stream, i, api) for i in range(n)]


def request_bytes(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Result(msgspec.Struct):
    latency: list[float] = msgspec.field(default_factory=list)
    ttfb: list[float] = msgspec.field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = msgspec.field(default_factory=dict)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A response's status and headers (names lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def read_chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The chunks of a chunked body as they arrive (each with its CRLF)."""
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        yield await reader.readexactly(size + 2)


async def one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes, stream: bool
) -> tuple[int, float, float, bool, bool]:
    """Send one request and read its whole response: status, latency, ttfb, ok, keep-alive."""
    t0 = time.perf_counter()
    writer.write(req)
    status, headers = await read_head(reader)
    keep = headers.get("connection", "").lower() != "close"
    ttfb = 0.0
    ok = status == 200
    if headers.get("transfer-encoding", "").lower() == "chunked":
        last = b""
        first = True
        async for data in read_chunks(reader):
            if first:
                ttfb = time.perf_counter() - t0
                first = False
            last = data
        if stream:
            ok = ok and any(end in last for end in STREAM_ENDS)
    else:
        length = int(headers.get("content-length", "0"))
        if length:
            data = await reader.readexactly(length)
            ttfb = time.perf_counter() - t0
            if stream:
                ok = ok and any(end in data for end in STREAM_ENDS)
    return status, time.perf_counter() - t0, ttfb, ok, keep


async def run(args: argparse.Namespace) -> Result:
    headers = {"authorization": f"Bearer {args.key}", "x-user-id": args.user}
    for h in args.header:
        k, _, v = h.partition(":")
        headers[k.strip()] = v.strip()
    ports = args.port
    reqs = {
        port: [
            request_bytes(args.host, port, args.path, b, headers)
            for b in bodies(args.model, args.stream, api=args.api)
        ]
        for port in ports
    }
    # --fresh: question numbers from a random start, so that no question of
    # this run was asked in an earlier one either.
    fresh = itertools.count(random.randrange(10**6, 10**9))
    result = Result()
    start = asyncio.Event()
    deadline = [0.0]
    warmed = [0]

    async def worker(w: int) -> None:
        # One connection to each port; request n goes to port n % len(ports).
        conns = [await asyncio.open_connection(args.host, port) for port in ports]

        async def reopen(k: int) -> None:
            conns[k][1].close()
            conns[k] = await asyncio.open_connection(args.host, ports[k])

        i = w * 7
        n = 0
        try:
            for _ in range(args.warmup * len(ports)):
                k = n % len(ports)
                reqs_k = reqs[ports[k]]
                *_, keep = await one(*conns[k], reqs_k[i % len(reqs_k)], args.stream)
                i += 1
                n += 1
                if not keep:
                    await reopen(k)
            warmed[0] += 1
            await start.wait()
            while time.perf_counter() < deadline[0]:
                k = n % len(ports)
                n += 1
                if args.fresh:
                    new = body(args.model, args.stream, next(fresh), args.api)
                    req = request_bytes(args.host, ports[k], args.path, new, headers)
                else:
                    req = reqs[ports[k]][i % len(reqs[ports[k]])]
                i += 1
                try:
                    status, lat, ttfb, ok, keep = await one(*conns[k], req, args.stream)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    result.errors += 1
                    await reopen(k)
                    continue
                key = str(status)
                result.statuses[key] = result.statuses.get(key, 0) + 1
                if ok:
                    result.latency.append(lat)
                    result.ttfb.append(ttfb)
                else:
                    result.errors += 1
                if not keep:
                    await reopen(k)
        finally:
            for _, writer in conns:
                writer.close()

    workers = [asyncio.create_task(worker(w)) for w in range(args.concurrency)]
    # The clock starts once every connection is open and warmed up.
    while warmed[0] < args.concurrency and not any(t.done() for t in workers):
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    deadline[0] = t0 + args.duration
    start.set()
    await asyncio.gather(*workers)
    result.statuses["_elapsed"] = int((time.perf_counter() - t0) * 1000)
    return result


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k] * 1000


def summary(result: Result) -> dict[str, Any]:
    elapsed = result.statuses.pop("_elapsed", 0) / 1000 or 1.0
    return {
        "requests": len(result.latency),
        "errors": result.errors,
        "statuses": result.statuses,
        "rps": len(result.latency) / elapsed,
        "p50_ms": pct(result.latency, 50),
        "p90_ms": pct(result.latency, 90),
        "p99_ms": pct(result.latency, 99),
        "ttfb_p50_ms": pct(result.ttfb, 50),
        "ttfb_p99_ms": pct(result.ttfb, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, nargs="+", required=True, help="several: requests go to each in turn"
    )
    parser.add_argument(
        "--api", choices=sorted(PATHS), default="chat", help="the request shape (and its path)"
    )
    parser.add_argument("--path", default=None, help="default: the --api's path")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--key", default="sk-bench-not-a-real-key")
    parser.add_argument("--user", default="bench-user")
    parser.add_argument("--header", action="append", default=[], help="extra 'Name: value'")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=3, help="requests per connection")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--raw", action="store_true", help="also print every latency")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="every measured request asks a question never asked before (no cached embedding)",
    )
    args = parser.parse_args()
    args.path = args.path or PATHS[args.api]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run(args))
    out = summary(result)
    if args.raw:
        out["latency_ms"] = [round(x * 1000, 3) for x in result.latency]
        out["ttfb_ms"] = [round(x * 1000, 3) for x in result.ttfb]
    print(msgspec.json.encode(out).decode(), flush=True)


if __name__ == "__main__":
    main()
